"""Judge the pruning and quantization methods on trained models that can tell them apart.

    python benchmarks/methods.py [--models builtin gpt2 llama] [--settings 50% 70% 2:4 4bit 3bit]
                                 [--samples 128] [--train-only]

Three baselines, each trained until its validation loss stopped improving (early stopping
with patience, the best weights kept) and cached:

- ``builtin``: the built-in GPT, ``tiny`` preset (2 layers, width 64), on the built-in corpus
  with a 1,024-entry tokenizer, through the workbench's own cached-baseline path;
- ``gpt2`` and ``llama``: Hugging Face GPT-2 and Llama (2 layers, width 128, built with
  ``from_config``) trained here on Tiny Shakespeare (``/work/shared/data``, split 90/5/5) with
  the built-in tokenizer, cached as ``save_pretrained`` directories under the cache dir.

On each: magnitude, Wanda and SparseGPT at 50% and 70% unstructured sparsity and 2:4 (every
block linear layer), and round-to-nearest against GPTQ and AWQ-style scaling at 4 bits on the
packed int4 kernel (group 128, or the largest kernel group that divides the layers' inputs) and
at 3 bits, where no kernel exists: there the algorithms' codes are dequantized into float
weights by this benchmark only, and the rows say "simulated (no 3-bit kernel)". The same
simulation at 4 bits is measured too, to show how close simulated rows are to the packed
ones. All methods see the same calibration windows (``--samples`` windows of the train
split); perplexity is measured on the test split. Latency is the forward latency relative to
the dense model, timed interleaved with it (median ratio with a bootstrap interval; marked
noisy when the interval stayed wide); weight bytes are those of the block linear layers as
stored. Writes:

- ``benchmarks/results/methods.json``: every row so far (runs restricted with ``--models`` or
  ``--settings`` add theirs; the same row is replaced);
- ``benchmarks/results/methods.csv``: tidy rows (what, config, metric, value, machine, ...);
- ``benchmarks/results/methods.md``: the table, the comparisons the methods are judged by, and
  published reference numbers of larger models beside them (labelled as such).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import commit as repo_commit  # noqa: E402
from _common import machine as machine_name  # noqa: E402
from _common import today, write_tidy  # noqa: E402

from compress.cache import cache_dir, stable_hash  # noqa: E402
from compress.compressors import REGISTRY, StageContext, run_stage  # noqa: E402
from compress.compressors.awq import awq  # noqa: E402
from compress.compressors.gptq import gptq  # noqa: E402
from compress.compressors.masks import lowest, lowest_per_row  # noqa: E402
from compress.compressors.packed import (  # noqa: E402
    GROUP_SIZES,
    choose_qparams,
    dequantize,
    quantize,
)
from compress.compressors.sequential import block_linears, output_error, run_sequential  # noqa: E402
from compress.compressors.wanda import wanda_scores  # noqa: E402
from compress.data.calibration import CalibrationSpec, calibration_windows  # noqa: E402
from compress.data.tokenizer import encode_splits, train_tokenizer  # noqa: E402
from compress.evaluate.latency import paired_ratio  # noqa: E402
from compress.evaluate.load import LoadProbe  # noqa: E402
from compress.evaluate.memory import module_weight_bytes  # noqa: E402
from compress.evaluate.perplexity import perplexity  # noqa: E402
from compress.models.adapter import adapter_for  # noqa: E402
from compress.models.hf import HFCausalLM, conv1d_to_linear, import_transformers  # noqa: E402
from compress.recipe import recipe_from_dict  # noqa: E402
from compress.settings import DataSpec  # noqa: E402
from compress.train import TrainConfig, train  # noqa: E402
from compress.workbench import environment, load_corpus_spec, prepare  # noqa: E402

MODELS = ("builtin", "gpt2", "llama")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq", "awq")
CALIBRATED_QUANT = ("gptq", "awq")  # report their layer errors beside round-to-nearest's
# The comparison group swapped (unstructured settings only): measured by this benchmark.
ABLATIONS = ("wanda per-layer", "magnitude per-row")
PRUNE = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"pattern": "2:4"}}
QUANT_BITS = {"4bit": 4, "3bit": 3}
SETTINGS = (*PRUNE, *QUANT_BITS)
OUT = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
VOCAB = 1024
CONTEXT = 128
# Until validation loss stops improving: a step budget far above what early stopping leaves.
TRAIN = dict(
    max_steps=20000,
    batch_size=16,
    seq_len=CONTEXT,
    lr=3e-3,
    eval_every=100,
    eval_batches=16,
    early_stop_patience=4,
)
# A time cap so that a slow machine still gets a model the same day: a run it stops is
# reported as such ("stopped by max_minutes"), not as converged.
HF_TRAIN = {**TRAIN, "lr": 2e-3, "max_minutes": 55.0}
BUILTIN_RECIPE = {
    "model": {"preset": "tiny"},
    "data": {"vocab_size": VOCAB},
    "train": TRAIN,
    "eval": {"perplexity": {"seq_len": CONTEXT}, "latency": {"seq_len": CONTEXT}},
    "variants": [{"name": "sparsegpt-50", "pipeline": [{"prune": {"method": "sparsegpt"}}]}],
}
LATENCY = dict(batch_size=1, seq_len=CONTEXT, threads=1, warmup=2, min_rounds=10, ci_target=0.05)

# Published (not measured here): ../shared/DESIGN.md "Reference points", WikiText-2 perplexity.
PUBLISHED = [
    ("OPT-125M", "dense", "-", 27.66, "SparseGPT paper"),
    ("OPT-125M", "magnitude", "50%", 193.0, "SparseGPT paper"),
    ("OPT-125M", "sparsegpt", "50%", 36.85, "SparseGPT paper"),
    ("LLaMA-7B", "dense", "-", 5.68, "Wanda paper"),
    ("LLaMA-7B", "magnitude", "50%", 17.29, "Wanda paper"),
    ("LLaMA-7B", "sparsegpt", "50%", 7.22, "Wanda paper"),
    ("LLaMA-7B", "wanda", "50%", 7.26, "Wanda paper"),
    ("OPT-125M", "rtn", "4bit", 37.28, "GPTQ paper"),
    ("OPT-125M", "gptq", "4bit", 31.12, "GPTQ paper"),
]


@dataclasses.dataclass
class Baseline:
    name: str
    model: torch.nn.Module
    tokens: dict[str, torch.Tensor]
    fingerprint: str
    description: str  # what it is and how it was trained


# --------------------------------------------------------------------------------- baselines


def builtin_baseline() -> Baseline:
    """The built-in GPT through the workbench's cached-baseline path (trained on first use)."""
    recipe = recipe_from_dict(BUILTIN_RECIPE, "benchmarks/methods.py", "methods")
    ws = prepare(recipe, REPO, progress=False)
    t = ws.baseline_info.train or {}
    desc = (
        f"{ws.baseline_info.description} (2 layers, width 64), built-in corpus, vocabulary "
        f"{VOCAB}; {_trained(t)}"
    )
    fp = f"{ws.corpus.fingerprint}:{ws.tokenizer.fingerprint}"
    return Baseline("builtin", ws.baseline, ws.tokens, fp, desc)


def _trained(t: dict) -> str:
    best = t.get("best_val_loss")
    return (
        f"trained {t.get('steps')} steps in {t.get('seconds', 0) / 60:.1f} min (stopped by "
        f"{t.get('stopped_by')}; best validation loss {best:.3f} at step {t.get('best_step')}, "
        "weights of that step kept)"
        if best is not None
        else f"trained {t.get('steps')} steps, stopped by {t.get('stopped_by')}"
    )


def hf_config(family: str, vocab: int):
    transformers = import_transformers()
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4, **common
        )
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return transformers.LlamaConfig(
            max_position_embeddings=CONTEXT,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    raise ValueError(family)


def hf_baseline(family: str) -> Baseline:
    """A small GPT-2 or Llama trained on Tiny Shakespeare until validation loss stops
    improving, cached as a ``save_pretrained`` directory keyed by every input."""
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"benchmarks/methods.py: {SHAKESPEARE} not found (Tiny Shakespeare)")
    transformers = import_transformers()
    corpus = load_corpus_spec(DataSpec(corpus="files", files=[str(SHAKESPEARE)]), REPO)
    tokenizer = train_tokenizer(corpus, VOCAB)
    tokens = encode_splits(tokenizer, corpus)
    cfg = hf_config(family, tokenizer.vocab_size)
    tcfg = TrainConfig(**HF_TRAIN)
    key = stable_hash(
        [cfg.to_dict(), corpus.fingerprint, tokenizer.fingerprint, dataclasses.asdict(tcfg)]
    )
    path = cache_dir() / "benchmarks" / f"methods-{family}-{key}"
    if not (path / "train.json").is_file():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        print(f"{family}: training (cached at {path})", flush=True)

        def show(rec: dict) -> None:
            if rec.get("val_loss") is not None:
                print(
                    f"{family} step {rec['step']}: validation loss {rec['val_loss']:.4f}",
                    flush=True,
                )

        report = train(
            HFCausalLM(hf),
            tokens["train"],
            tcfg,
            val_ids=tokens["valid"],
            progress=False,
            on_log=show,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        hf.save_pretrained(str(tmp))
        summary = {k: v for k, v in report.to_dict().items() if k != "history"}
        (tmp / "train.json").write_text(json.dumps(summary, indent=1))
        os.replace(tmp, path)  # a kill before this leaves no entry, never a partial one
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    model = HFCausalLM(hf, conv1d_to_linear(hf, prefix="hf.")).eval()
    t = json.loads((path / "train.json").read_text())
    desc = (
        f"Hugging Face {'GPT-2' if family == 'gpt2' else 'Llama'} (2 layers, width 128), Tiny "
        f"Shakespeare, vocabulary {VOCAB}; {_trained(t)}"
    )
    return Baseline(family, model, tokens, f"{corpus.fingerprint}:{tokenizer.fingerprint}", desc)


# ------------------------------------------------------------------------------ measurements


@dataclasses.dataclass(frozen=True)
class Grid:
    """The packed kernels' min-max grid (see ``compress.compressors.packed``) at any bit width,
    with float32 scales: what GPTQ and round-to-nearest produce, without a kernel to run it."""

    bits: int
    group_size: int | None
    symmetric: bool = False
    compute_dtype: str = "float32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size


def block_linear_names(model: torch.nn.Module) -> list[str]:
    return [n for b in adapter_for(model).layout(model).blocks for n in b.linears]


def group_size(model: torch.nn.Module) -> int:
    """128, or the largest kernel group size dividing every block linear layer's inputs."""
    ins = [model.get_submodule(n).in_features for n in block_linear_names(model)]
    fits = [g for g in GROUP_SIZES if g <= 128 and all(i % g == 0 for i in ins)]
    if not fits:
        raise SystemExit(f"benchmarks/methods.py: no kernel group size divides inputs {ins}")
    return max(fits)


@torch.no_grad()
def rewrite_blocks(model: torch.nn.Module, ctx: StageContext, new_weight) -> list[float]:
    """Replace every block linear layer's weight by ``new_weight(w, stats)``, block by block on
    the calibration windows (each block sees the inputs the rewritten blocks before it give);
    the per-layer output errors."""
    layout = adapter_for(model).layout(model)
    by_block, _ = block_linears(layout, block_linear_names(model))
    max_len = adapter_for(model).max_seq_len(model)
    ids = calibration_windows(ctx.tokens, ctx.calibration, max_len, ctx.fingerprint, "methods")
    errors = []

    def on_block(_block, stats) -> None:
        for name, st in stats.items():
            lin = model.get_submodule(name)
            w = lin.weight.detach().float()
            new = new_weight(w, st)
            errors.append(output_error(w, new, st.H))
            lin.weight.copy_(new.to(lin.weight.dtype))

    run_sequential(model, layout, ids, by_block, on_block, 8)
    return errors


def simulated(model: torch.nn.Module, method: str, grid: Grid, ctx: StageContext) -> list[float]:
    """``method`` (``rtn``, ``gptq`` or ``awq``) codes on ``grid``, dequantized into float32
    weights (AWQ's with its input scale applied)."""

    def new_weight(w: torch.Tensor, st) -> torch.Tensor:
        if method == "awq":
            fitted = awq(w, st, grid)  # type: ignore[arg-type]
            new = dequantize(fitted.codes, fitted.scales, fitted.zeros, grid)  # type: ignore[arg-type]
            return new if fitted.input_scale is None else new * fitted.input_scale
        if method == "gptq":
            codes, scales, zeros = gptq(w, st.H, grid)  # type: ignore[arg-type]
        else:
            scales, zeros = choose_qparams(w, grid)  # type: ignore[arg-type]
            codes = quantize(w, scales, zeros, grid)  # type: ignore[arg-type]
        return dequantize(codes, scales, zeros, grid)  # type: ignore[arg-type]

    return rewrite_blocks(model, ctx, new_weight)


def regrouped(model: torch.nn.Module, method: str, sparsity: float, ctx: StageContext):
    """Ablation of the comparison group: Wanda's scores ranked over the whole layer (as
    magnitude's are), or magnitude's ranked within each output row (as Wanda's are)."""

    def new_weight(w: torch.Tensor, st) -> torch.Tensor:
        if method == ABLATIONS[0]:
            mask = lowest(wanda_scores(w, st.sq_norms), round(sparsity * w.numel()))
        else:
            mask = lowest_per_row(w.abs(), sparsity)
        return w.masked_fill(mask, 0.0)

    return rewrite_blocks(model, ctx, new_weight)


def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> float:
    return perplexity(model, ids, CONTEXT, None, 8).perplexity


def linear_bytes(model: torch.nn.Module, names: list[str]) -> int:
    return sum(module_weight_bytes(model.get_submodule(n)) for n in names)


def latency(dense: torch.nn.Module, variant: torch.nn.Module, vocab: int) -> dict:
    p = paired_ratio(dense, variant, vocab, max_seconds=6.0, **LATENCY)
    return {
        "latency_ratio": p.ratio.estimate,
        "latency_ratio_lo": p.ratio.lo,
        "latency_ratio_hi": p.ratio.hi,
        "latency_noisy": p.noisy,
        "latency_rounds": p.rounds,
    }


def variants(base: Baseline, settings: list[str], group: int):
    """(method, setting, kernel, build) for every measured row: ``build(model, ctx)`` compresses
    a copy of the baseline and returns its layer errors."""

    def prune(method: str, label: str):
        def build(model, ctx):
            cfg = REGISTRY["prune"].config_cls(method=method, **PRUNE[label])
            model, report = run_stage("prune", model, cfg, ctx)
            return model, [t["reconstruction_error"] for t in report.touched], {}

        return build

    def packed(method: str):
        def build(model, ctx):
            cfg = REGISTRY[method].config_cls(bits=4, group_size=group)
            model, report = run_stage(method, model, cfg, ctx)
            errs = [t.get("reconstruction_error") for t in report.touched]
            extra = {"bits_per_weight": report.extra["bits_per_weight"]}
            if method in CALIBRATED_QUANT:
                extra["rtn_layer_error_mean"] = report.extra["rtn_error_mean"]
            return model, errs if method in CALIBRATED_QUANT else [], extra

        return build

    def ablation(method: str, label: str):
        def build(model, ctx):
            return model, regrouped(model, method, PRUNE[label]["sparsity"], ctx), {}

        return build

    def sim(method: str, bits: int):
        def build(model, ctx):
            return model, simulated(model, method, Grid(bits, group), ctx), {}

        return build

    for label in settings:
        if label in PRUNE:
            for method in PRUNE_METHODS:
                yield method, label, "dense storage", prune(method, label)
            if "sparsity" in PRUNE[label]:
                for method in ABLATIONS:
                    yield method, label, "dense storage (ablation)", ablation(method, label)
        else:
            bits = QUANT_BITS[label]
            if bits == 4:
                for method in QUANT_METHODS:
                    yield method, label, f"packed int4 g{group}", packed(method)
            for method in QUANT_METHODS:
                kernel = f"simulated g{group}" + ("" if bits == 4 else " (no 3-bit kernel)")
                yield method, label, kernel, sim(method, bits)


def bench(base: Baseline, settings: list[str], samples: int) -> list[list]:
    ids = base.tokens["test"]
    names = block_linear_names(base.model)
    vocab = adapter_for(base.model).vocab_size(base.model)
    dense_bytes = linear_bytes(base.model, names)
    dense = evaluate(base.model, ids)
    print(f"{base.name}: dense perplexity {dense:.3f}", flush=True)
    rows = [[base.name, "dense", "-", "fp32", {"perplexity": dense, "ratio": 1.0}]]
    rows[0][4].update(linear_bytes=dense_bytes, linear_bytes_ratio=1.0)
    ctx = StageContext(
        seed=0,
        tokens=base.tokens,
        calibration=CalibrationSpec(samples=samples),
        fingerprint=base.fingerprint,
    )
    group = group_size(base.model)
    for method, label, kernel, build in variants(base, settings, group):
        t0 = time.perf_counter()
        model, errs, extra = build(copy.deepcopy(base.model).eval(), ctx)
        seconds = time.perf_counter() - t0
        ppl = evaluate(model, ids)
        metrics = {"perplexity": ppl, "ratio": ppl / dense, "seconds": seconds, **extra}
        errs = [e for e in errs if e is not None]
        if errs:
            metrics["layer_error_mean"] = sum(errs) / len(errs)
            metrics["layer_error_max"] = max(errs)
        if kernel == "dense storage" or kernel.startswith("packed"):  # ablations: as pruned
            nbytes = linear_bytes(model, names)
            metrics.update(linear_bytes=nbytes, linear_bytes_ratio=nbytes / dense_bytes)
            metrics.update(latency(base.model, model, vocab))
        print(f"{base.name} {method} {label} {kernel}: {metrics}", flush=True)
        rows.append([base.name, method, label, kernel, metrics])
        del model
    return rows


# ---------------------------------------------------------------------------------- results


def merge_rows(rows: list, meta: dict, baselines: dict[str, str]) -> dict:
    """``rows`` merged into ``methods.json`` (rows of other models or settings from earlier
    runs are kept, the same row replaced), under a lock, written atomically."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "methods.json"
    with (cache_dir() / "methods-benchmark.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else {}
        same = old.get("meta", {}).get("calibration") == meta["calibration"]
        same = same and old.get("format") == 2
        old = old if same else {}  # other settings: not comparable, start over
        merged = {tuple(r[:4]): r for r in old.get("rows", [])}
        merged.update({tuple(r[:4]): r for r in rows})
        order = (
            {m: i for i, m in enumerate(MODELS)},
            {s: i for i, s in enumerate(["-", *SETTINGS])},
            {m: i for i, m in enumerate(["dense", *PRUNE_METHODS, *ABLATIONS, *QUANT_METHODS])},
        )
        out_rows = sorted(
            merged.values(),
            key=lambda r: (order[0][r[0]], order[1][r[2]], r[3].startswith("sim"), order[2][r[1]]),
        )
        loads = {**old.get("loads", {}), **meta.pop("loads")}
        data = {
            "format": 2,
            "meta": meta,
            "loads": loads,
            "baselines": {**old.get("baselines", {}), **baselines},
            "rows": out_rows,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    return data


def _find(rows: list, model: str, method: str, setting: str, simulated: bool) -> dict | None:
    for r in rows:
        if r[:3] == [model, method, setting] and r[3].startswith("sim") == simulated:
            return r[4]
    return None


JUDGED = [
    *[(s, "sparsegpt", "magnitude", False) for s in PRUNE],
    ("4bit", "gptq", "rtn", False),
    ("3bit", "gptq", "rtn", True),
    ("4bit", "awq", "rtn", False),
    ("3bit", "awq", "rtn", True),
    *[(s, "wanda", "magnitude", False) for s in PRUNE],
    *[(s, "sparsegpt", "wanda", False) for s in PRUNE],
    *[(s, "wanda per-layer", "magnitude", False) for s in PRUNE],
    *[(s, "wanda", "magnitude per-row", False) for s in PRUNE],
]


def comparisons(rows: list) -> list[tuple[str, str, str, str, float, float]]:
    """(model, setting, a, b, a's perplexity increase, b's) for every judged pair measured."""
    out = []
    for model in MODELS:
        for setting, a, b, sim in JUDGED:
            ra, rb = _find(rows, model, a, setting, sim), _find(rows, model, b, setting, sim)
            if ra is not None and rb is not None:
                label = f"{setting} (simulated)" if sim else setting
                out.append((model, label, a, b, ra["ratio"] - 1, rb["ratio"] - 1))
    return out


def verdicts(rows: list) -> list[str]:
    """The comparisons the methods are judged by, one line per model and setting."""
    lines = [
        "| model | setting | comparison | perplexity increase (ratio - 1) | holds |",
        "|---|---|---|---|---|",
    ]
    for model, setting, a, b, da, db in comparisons(rows):
        lines.append(
            f"| {model} | {setting} | {a} below {b} | {da:+.4f} vs {db:+.4f} | "
            f"{'yes' if da < db else 'NO'} |"
        )
    return lines


def reading(rows: list) -> list[str]:
    """One line per comparison: in how many (model, setting) pairs it holds, and where not."""
    tally: dict[tuple[str, str], list] = {}
    for model, setting, a, b, da, db in comparisons(rows):
        tally.setdefault((a, b), []).append((f"{model} {setting}", da < db))
    lines = []
    for (a, b), results in tally.items():
        won = sum(ok for _, ok in results)
        lost = [where for where, ok in results if not ok]
        lines.append(
            f"- {a} below {b}: {won} of {len(results)}"
            + (f" (not at: {', '.join(lost)})" if lost else "")
        )
    return lines


def noise_floor(rows: list) -> list[str]:
    """Pruned models in dense storage compute exactly what the dense model computes: the spread
    of their latency ratios is what the machine's noise does to a ratio of 1."""
    out = []
    for model in MODELS:
        ratios = [
            r[4]["latency_ratio"]
            for r in rows
            if r[0] == model and r[3] == "dense storage" and "latency_ratio" in r[4]
        ]
        if ratios:
            out.append(
                f"{model}: the pruned rows (same computation as dense) timed at "
                f"{min(ratios):.2f}-{max(ratios):.2f}x dense"
            )
    if not out:
        return []
    return [
        "Latency noise floor, measured in the same runs: "
        + "; ".join(out)
        + ". Latency differences inside that range are noise, whatever the intervals say "
        "(they cover the rounds' scatter, not drift between one row's timing and the next's)."
    ]


def write(data: dict, machine: str) -> None:
    meta, rows = data["meta"], data["rows"]
    config = stable_hash({k: meta[k] for k in ("calibration", "eval")})
    tidy = []
    for model, method, setting, kernel, metrics in rows:
        for metric, value in metrics.items():
            tidy.append(
                {
                    "what": f"{model}/{method}/{setting}/{kernel}",
                    "config": config,
                    "metric": metric,
                    "value": value,
                    "machine": machine,
                    "date": meta["date"],
                    "commit": meta["commit"],
                }
            )
    write_tidy(OUT / "methods.csv", tidy)
    loads = "; ".join(
        f"{m}: {v.get('load_avg_before'):.1f} -> {v.get('load_avg_after'):.1f}"
        for m, v in data["loads"].items()
        if v.get("load_avg_before") is not None and v.get("load_avg_after") is not None
    )
    runs = "; ".join(
        f"`{m}` {v.get('date', 'date not recorded')} at commit {v.get('commit', 'not recorded')}"
        for m, v in data["loads"].items()
    )
    lines = [
        "# Pruning and quantization methods on trained models",
        "",
        f"Measured on {machine} by `python benchmarks/methods.py`, each model's rows in one "
        f"run: {runs}.",
        f"Calibration: {meta['calibration']}. Perplexity: {meta['eval']}.",
        "",
        "Baselines (each trained until its validation loss stopped improving, then cached):",
        "",
        *[f"- `{m}`: {d}" for m, d in data["baselines"].items()],
        "",
        "Every method compresses every block linear layer (attention and MLP; not embeddings "
        "or the LM head). Pruned weights stay in dense storage (no sparse kernel here), so "
        "their bytes do not change and they compute what the dense model computes. "
        "`ablation` rows swap the comparison group, to tell Wanda's score from its grouping: "
        "`wanda per-layer` ranks Wanda's scores over the whole layer as magnitude does, "
        "`magnitude per-row` ranks |W| within each output row as Wanda does (computed by "
        "this benchmark, not a `prune` option). 4-bit rows run on the packed int4 CPU kernel "
        "(bf16 compute); `simulated` rows are the algorithm's codes dequantized into float32 "
        "weights by this benchmark, because no 3-bit kernel exists (the 4-bit simulated rows "
        "show how close simulation is to the kernel). The built-in model's layers have 64 "
        "inputs, so its groups are 64 wide, not 128. `awq` is this project's AWQ-style "
        "per-layer scale search (`awq` stage): the scale is kept as a per-channel multiply "
        "before each packed layer (counted in its bytes), not folded into the layer before, "
        "and each layer's scale is judged by that layer's output error, not the block's.",
        "",
        "Layer error: mean (max) over the compressed layers of ||WX - W'X||^2 / ||WX||^2 on "
        "the calibration inputs each layer saw (block by block, after the earlier blocks were "
        "compressed). Latency: forward pass (batch 1, 128 tokens, 1 thread) relative to the "
        "dense model, timed interleaved with it; median ratio [95% bootstrap interval], `noisy` "
        f"where the interval stayed wider than +-5%. Load average during the runs: {loads}. "
        "Bytes: block linear weights as stored, relative to fp32.",
        "",
        *noise_floor(rows),
        "",
        "| model | method | setting | kernel | perplexity | ratio to dense | latency ratio "
        "| linear bytes | layer error mean (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, method, setting, kernel, m in rows:
        err = (
            f"{m['layer_error_mean']:.4f} ({m['layer_error_max']:.4f})"
            if "layer_error_mean" in m
            else "-"
        )
        if "rtn_layer_error_mean" in m:
            err += f"; rtn on the same inputs {m['rtn_layer_error_mean']:.4f}"
        lat = "-"
        if "latency_ratio" in m:
            lat = (
                f"{m['latency_ratio']:.2f} [{m['latency_ratio_lo']:.2f}, "
                f"{m['latency_ratio_hi']:.2f}]" + (" noisy" if m["latency_noisy"] else "")
            )
        elif method == "dense":
            lat = "1"
        nbytes = (
            f"{m['linear_bytes'] / 1024:.0f} KiB ({m['linear_bytes_ratio']:.3f})"
            if "linear_bytes" in m
            else "-"
        )
        lines.append(
            f"| {model} | {method} | {setting} | {kernel} | {m['perplexity']:.3f} | "
            f"{m['ratio']:.4f} | {lat} | {nbytes} | {err} |"
        )
    lines += [
        "",
        "## What holds",
        "",
        "In how many (model, setting) pairs the first method's perplexity increase is below "
        "the second's:",
        "",
        *reading(rows),
        "",
        "Perplexity increase over dense for the pairs the methods are judged by (computed from "
        "the table above):",
        "",
        *verdicts(rows),
        "",
        "## Published reference points",
        "",
        "Not measured here: WikiText-2 perplexity of much larger trained models, from the "
        "papers (see DESIGN.md). Models, corpora and tokenizers differ from the ones above, so "
        "compare the direction and rough size of the gaps, not the perplexities. No published "
        "3-bit number is in DESIGN.md.",
        "",
        "| model | method | setting | perplexity (published) | ratio to dense | source |",
        "|---|---|---|---|---|---|",
    ]
    dense_pub = {m: p for m, meth, _, p, _ in PUBLISHED if meth == "dense"}
    lines += [
        f"| {m} | {meth} | {s} | {p} | {p / dense_pub[m]:.3f} | {src} |"
        for m, meth, s, p, src in PUBLISHED
    ]
    (OUT / "methods.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--train-only", action="store_true", help="train and cache the baselines, measure nothing"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite methods.md and methods.csv from methods.json, measure nothing",
    )
    args = ap.parse_args()
    if args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.report_only:
        path = OUT / "methods.json"
        if not path.is_file():
            ap.error(f"--report-only: {path} does not exist; run the benchmark first")
        write(json.loads(path.read_text()), machine_name(environment()))
        return
    torch.manual_seed(0)
    rows, baselines, loads = [], {}, {}
    for name in args.models:
        base = builtin_baseline() if name == "builtin" else hf_baseline(name)
        baselines[name] = base.description
        print(f"{name}: {base.description}", flush=True)
        if args.train_only:
            continue
        probe = LoadProbe.start()
        rows += bench(base, args.settings, args.samples)
        loads[name] = {**probe.finish(), "date": today(), "commit": repo_commit()}
    if args.train_only:
        return
    meta = {
        "date": today(),
        "commit": repo_commit(),
        "calibration": f"{args.samples} windows of {CONTEXT} tokens of the train split, seed 0",
        "eval": f"test split, windows of {CONTEXT}",
        "loads": loads,
    }
    data = merge_rows(rows, meta, baselines)
    write(data, machine_name(environment()))


if __name__ == "__main__":
    main()
