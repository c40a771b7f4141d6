"""The per-layer sensitivity scan: perplexity when only one linear layer is compressed.

For every targeted linear layer and every setting of the scan (a pruning sparsity, a bit
width), the layer's weight is replaced by its compressed version, the perplexity of a small
slice of a held-out split is measured, and the weight is put back: the model leaves the scan
exactly as it came. Wanda and SparseGPT settings read each layer's input statistics, gathered
once, block by block, on the dense model (:mod:`compress.compressors.sequential`): the inputs
that layer sees when it is the only one compressed.

Quantization settings are round-to-nearest on a min-max grid per group of input columns,
computed in float32 ("simulated"): they measure what the rounding costs, not a kernel.

Results are cached (:mod:`compress.cache`) under the model (the baseline's key and a digest of
the weights), the data and the scan settings; a cached result is verified when read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from compress.cache import cache_dir, read_entry, stable_hash, write_entry
from compress.compressors.masks import lowest
from compress.compressors.sequential import InputStats, block_linears, run_sequential
from compress.compressors.sparsegpt import sparsegpt
from compress.compressors.targets import nothing_selected, select_modules
from compress.compressors.wanda import wanda
from compress.data.calibration import CalibrationSpec, calibration_windows
from compress.errors import CompressError
from compress.evaluate.perplexity import perplexity
from compress.evaluate.uncertainty import perplexity_difference
from compress.models.adapter import LayoutError, adapter_for
from compress.scan.spec import ScanSpec

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the cached result's meaning changes (2: each delta's interval)
STAGE = "scan"
BROKEN = 1e12  # the increase an allocation reads where pruning made the perplexity infinite
Echo = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """One column of the scan: ``prune`` at a sparsity or ``rtn`` at a bit width."""

    kind: str  # "prune" | "rtn"
    value: float  # sparsity, or bits
    method: str  # magnitude | wanda | sparsegpt | rtn
    simulated: bool
    group_size: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "prune":
            return f"prune {self.method} {self.value:g}"
        g = f" g{self.group_size}" if self.group_size else ""
        return f"rtn {int(self.value)}-bit{g}" + (" (simulated)" if self.simulated else "")


@dataclass
class ScanResult:
    baseline_perplexity: float
    tokens: int  # scored tokens per perplexity
    split: str
    seq_len: int
    layers: list[str]
    numel: dict[str, int]
    blocks: dict[str, int | None]
    settings: list[str]
    rows: list[dict] = field(default_factory=list)  # one per (layer, setting)
    seconds: float = 0.0
    key: str = ""
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScanResult:
        return cls(**data)

    def delta(self, layer: str, setting: str) -> float:
        for r in self.rows:
            if r["layer"] == layer and r["setting"] == setting:
                return r["delta"]
        raise KeyError((layer, setting))

    def within_noise(self, layer: str, setting: str) -> bool:
        """Whether the layer's increase under ``setting`` has an interval containing 0."""
        for r in self.rows:
            if r["layer"] == layer and r["setting"] == setting:
                return r["delta_lo"] <= 0 <= r["delta_hi"]
        raise KeyError((layer, setting))

    def noise_note(self, sparsity: float) -> str | None:
        """A warning when the scan cannot rank the layers at the scanned pruning sparsity
        nearest ``sparsity``, so an allocation built from it may do no better than uniform
        pruning: most layers' increases are not clear increases (their intervals reach 0 or
        below), or a quarter or more of the layers, pruned alone, *lower* the perplexity beyond
        noise (a model that is not trained out: its single-layer changes do not add up)."""
        cols = self.prune_settings()
        if not cols:
            return None
        col = min(cols, key=lambda c: (abs(c["sparsity"] - sparsity), -c["sparsity"]))
        rows = {r["layer"]: r for r in self.rows if r["setting"] == col["setting"]}
        unclear = [n for n in self.layers if rows[n]["delta_lo"] <= 0]
        lowered = [n for n in self.layers if rows[n]["delta_hi"] < 0]
        n = len(self.layers)
        advice = (
            "the scan cannot rank these layers, and an allocation built from it may do no "
            "better than uniform pruning (train the model further, or scan more tokens: "
            "scan.tokens)"
        )
        if 4 * len(lowered) >= n:
            return (
                f"scan: at {col['setting']}, pruning {len(lowered)} of {n} layers alone lowered "
                f"the perplexity beyond noise on the {self.tokens:,} scanned tokens: the model "
                f"is likely not trained out and its single-layer changes do not add up; {advice}"
            )
        if 2 * len(unclear) > n:
            return (
                f"scan: at {col['setting']}, {len(unclear)} of {n} layers' perplexity changes "
                f"are not clear increases (their 95% intervals reach 0) on the "
                f"{self.tokens:,} scanned tokens: {advice}"
            )
        return None

    def prune_settings(self) -> list[dict]:
        """The pruning columns: ``{"setting", "sparsity"}`` in increasing sparsity."""
        seen: dict[str, float] = {}
        for r in self.rows:
            if r["kind"] == "prune":
                seen.setdefault(r["setting"], r["value"])
        return [{"setting": s, "sparsity": v} for s, v in sorted(seen.items(), key=lambda x: x[1])]

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """Each layer's (sparsity, perplexity increase) at every scanned pruning sparsity, in
        increasing sparsity: what the non-uniform allocations read
        (:mod:`compress.scan.allocation`)."""
        cols = self.prune_settings()
        if not cols:
            raise CompressError(
                "scan.prune: the scan has no pruning settings to allocate sparsity from"
            )

        def finite(d: float) -> float:  # a broken model (perplexity overflowed) costs most
            return d if math.isfinite(d) else BROKEN

        return {
            layer: [(c["sparsity"], finite(self.delta(layer, c["setting"]))) for c in cols]
            for layer in self.layers
        }

    def ranking(self, setting: str) -> list[str]:
        """Layers by perplexity increase under ``setting``, most sensitive first."""
        return sorted(self.layers, key=lambda n: -self.delta(n, setting))

    def per_weight(self, sparsity: float) -> dict[str, float]:
        """Each layer's scanned increase at ``sparsity`` per weight pruned: what the scan
        allocations rank layers by (:func:`compress.scan.allocation.per_weight`)."""
        from compress.scan.allocation import per_weight

        return per_weight(self.numel, self.curves(), sparsity)

    def allocation_ranking(self, sparsity: float) -> list[str]:
        """Layers by increase per pruned weight at ``sparsity``, most sensitive first: the
        order ``scan-dense`` leaves layers dense in."""
        score = self.per_weight(sparsity)
        return sorted(self.layers, key=lambda n: (-score[n], self.layers.index(n)))


def settings_of(spec: ScanSpec) -> list[Setting]:
    out = []
    if spec.prune is not None:
        out += [Setting("prune", s, spec.prune.method, False) for s in spec.prune.sparsities]
    if spec.quantize is not None:
        g = spec.quantize.group_size
        out += [Setting("rtn", float(b), "rtn", True, g) for b in spec.quantize.bits]
    return out


def rtn_simulated(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``weight`` (out, in) rounded to the nearest of ``2**bits`` levels of a min-max grid per
    group of ``group_size`` input columns (per row when None or when it does not divide the
    columns), returned in float32."""
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    g = group_size if group_size and cols % group_size == 0 else cols
    groups = w.reshape(rows, cols // g, g)
    lo = groups.amin(-1, keepdim=True).clamp(max=0.0)
    hi = groups.amax(-1, keepdim=True).clamp(min=0.0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(rows, cols)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:24]


def _compress(setting: Setting, w: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    if setting.kind == "rtn":
        return rtn_simulated(w, int(setting.value), setting.group_size)
    s = setting.value
    if setting.method == "magnitude":
        return w.float().masked_fill(lowest(w.abs(), round(s * w.numel())), 0.0)
    assert stats is not None
    if setting.method == "wanda":
        return w.float().masked_fill(wanda(w, stats.sq_norms, s), 0.0)
    return sparsegpt(w, stats.H, s, None, 128, 0.01)


def _input_stats(
    model: nn.Module,
    names: list[str],
    tokens: dict[str, torch.Tensor],
    calibration: CalibrationSpec,
    fingerprint: str,
    method: str,
) -> dict[str, InputStats]:
    try:
        layout = adapter_for(model).layout(model)
    except LayoutError as exc:
        raise CompressError(f"{STAGE}.prune.method {method}: {exc}") from None
    by_block, outside = block_linears(layout, names)
    if outside:
        raise CompressError(
            f"{STAGE}.targets: {outside[0]} is in no transformer block; {method} needs the "
            "blocks' linear layers only (leave it out with ignore)"
        )
    max_len = adapter_for(model).max_seq_len(model)
    ids = calibration_windows(tokens, calibration, max_len, fingerprint, stage=STAGE)
    out: dict[str, InputStats] = {}

    def keep(_block: object, stats: dict[str, InputStats]) -> None:
        out.update(stats)

    run_sequential(model, layout, ids, by_block, keep)
    return out


def _blocks(model: nn.Module, names: list[str]) -> dict[str, int | None]:
    try:
        layout = adapter_for(model).layout(model)
    except LayoutError:
        return {n: None for n in names}
    where = {n: b.index for b in layout.blocks for n in b.linears}
    return {n: where.get(n) for n in names}


@torch.no_grad()
def scan_model(
    model: nn.Module,
    tokens: dict[str, torch.Tensor],
    spec: ScanSpec,
    seq_len: int,
    calibration: CalibrationSpec | None = None,
    fingerprint: str = "",
    echo: Echo | None = None,
) -> ScanResult:
    """Measure ``spec``'s settings layer by layer on ``model`` (restored afterwards)."""
    start = time.perf_counter()
    if spec.split not in tokens:
        have = ", ".join(sorted(tokens)) or "none"
        raise CompressError(f"{STAGE}.split: no {spec.split!r} split (splits: {have})")
    ids = tokens[spec.split].reshape(-1)[: spec.tokens]
    if ids.numel() < seq_len + 1:
        raise CompressError(
            f"{STAGE}.tokens: {ids.numel()} tokens of the {spec.split} split are fewer than one "
            f"window of {seq_len} + 1"
        )
    sel = select_modules(model, (nn.Linear,), spec.targets, spec.ignore, stage=STAGE)
    if not sel.selected:
        raise nothing_selected(STAGE, sel.skipped)
    modules = dict(sel.selected)
    names = list(modules)
    settings = settings_of(spec)
    stats: dict[str, InputStats] = {}
    if spec.prune is not None and spec.prune.method != "magnitude":
        stats = _input_stats(
            model, names, tokens, calibration or CalibrationSpec(), fingerprint, spec.prune.method
        )

    base = perplexity(model, ids, seq_len, batch_size=spec.batch_size)
    say = echo or (lambda line: log.info("%s", line))
    say(
        f"scan: {len(names)} layers x {len(settings)} settings on {base.tokens:,} tokens of "
        f"the {spec.split} split; baseline perplexity {base.perplexity:.3f}"
    )
    result = ScanResult(
        baseline_perplexity=base.perplexity,
        tokens=base.tokens,
        split=spec.split,
        seq_len=seq_len,
        layers=names,
        numel={n: m.weight.numel() for n, m in modules.items()},
        blocks=_blocks(model, names),
        settings=[s.label for s in settings],
    )
    total = len(names) * len(settings)
    done = 0
    for name in names:
        weight = modules[name].weight
        original = weight.detach().clone()
        try:
            for setting in settings:
                new = _compress(setting, original, stats.get(name))
                weight.copy_(new.to(weight.dtype))
                measured = perplexity(model, ids, seq_len, batch_size=spec.batch_size)
                value = measured.perplexity
                done += 1
                delta = value - base.perplexity
                diff = perplexity_difference(
                    measured.window_nll, base.window_nll, base.window_tokens
                )
                result.rows.append(
                    {
                        "layer": name,
                        "block": result.blocks[name],
                        "numel": result.numel[name],
                        "setting": setting.label,
                        "kind": setting.kind,
                        "method": setting.method,
                        "value": setting.value,
                        "simulated": setting.simulated,
                        "perplexity": value,
                        "delta": delta if math.isfinite(value) else float("inf"),
                        # paired bootstrap 95% interval over the scan's windows
                        "delta_lo": diff.lo if math.isfinite(value) else float("inf"),
                        "delta_hi": diff.hi if math.isfinite(value) else float("inf"),
                        "ratio": value / base.perplexity,
                    }
                )
                say(
                    f"scan [{done}/{total}] {name}: {setting.label}: ppl {value:.3f} ({delta:+.3f})"
                )
        finally:
            weight.copy_(original)
    result.seconds = time.perf_counter() - start
    return result


def scan_key(
    spec: ScanSpec,
    seq_len: int,
    model_key: str,
    model: nn.Module,
    data: str,
    calibration: CalibrationSpec | None,
) -> str:
    needs_calibration = spec.prune is not None and spec.prune.method != "magnitude"
    return stable_hash(
        {
            "baseline": model_key,
            "weights": weights_digest(model),
            "data": data,
            "scan": spec.model_dump(mode="json"),
            "seq_len": seq_len,
            "calibration": calibration.model_dump() if needs_calibration and calibration else None,
            "format": FORMAT,
        },
        length=24,
    )


def cache_path(key: str):  # noqa: ANN201 - a Path
    return cache_dir() / "scan" / f"{key}.json"


def cached_scan(
    model: nn.Module,
    tokens: dict[str, torch.Tensor],
    spec: ScanSpec,
    seq_len: int,
    model_key: str,
    calibration: CalibrationSpec | None = None,
    fingerprint: str = "",
    echo: Echo | None = None,
) -> ScanResult:
    """:func:`scan_model`, read from the cache when this model, data and scan were measured
    before (``fingerprint`` names the corpus and tokenizer; ``model_key`` the baseline)."""
    key = scan_key(spec, seq_len, model_key, model, fingerprint, calibration)
    path = cache_path(key)
    data = read_entry(path, "sensitivity scan")
    if data is not None:
        try:
            result = ScanResult.from_dict(json.loads(data))
        except (TypeError, ValueError) as exc:
            log.warning("cache: sensitivity scan %s is unreadable (%s); measuring again", path, exc)
        else:
            result.cached, result.key = True, key
            (echo or (lambda line: log.info("%s", line)))(f"scan: cached ({path})")
            return result
    result = scan_model(model, tokens, spec, seq_len, calibration, fingerprint, echo)
    result.key = key
    write_entry(path, json.dumps(result.to_dict(), sort_keys=True).encode())
    return result
