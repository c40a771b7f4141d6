"""One recipe in, one comparison out: the path every entry point (run, sweep) goes through.

    prepare(recipe)  -> corpus, tokenizer, token ids, baseline (the built-in GPT trained or
                        cached, or a Hugging Face model), unigram reference
    build_variant    -> baseline copy through the variant's compressor stages, stage reports
    measure_static   -> perplexity, top-1 accuracy and agreement with the baseline, greedy
                        continuations scored with BLEU/chrF, memory, saved size, peak RSS
    paired_latency   -> the variant and the baseline timed in alternating rounds, so drift on a
                        noisy machine hits both alike; the ratio is the paired one, with its
                        bootstrap confidence interval (rounds go on until it is narrow enough)
    build_control    -> for a variant that trains: the baseline through the same training
                        stages (cached once per budget; see compress.control), measured as a
                        row of its own and compared with the variant window by window
    run_variants     -> every variant built, measured and freed in turn (only the baseline and
                        the variants a later one starts from or learns from stay in memory;
                        freed memory goes back to the OS after each build and each variant)

A variant that fails is recorded with its error; the others go on.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn

from compress.cache import stable_hash
from compress.compressors import StageContext, StageReport, run_stage
from compress.compressors.training import TrainingStageConfig
from compress.control import (
    Control,
    building_control,
    control_key,
    control_stages,
    read_control,
    tokens_fingerprint,
    write_control,
)
from compress.data import (
    Corpus,
    Tokenizer,
    builtin_corpus,
    encode_splits,
    files_corpus,
    hf_corpus,
    train_tokenizer,
    unigram_perplexity,
)
from compress.errors import CompressError, RecipeError
from compress.evaluate.accuracy import Top1, top1
from compress.evaluate.generation import greedy, held_out_prompts, text_scores
from compress.evaluate.latency import (
    LatencyResult,
    PairedLatency,
    interleaved_latency,
    paired_ratio,
    summarize,
)
from compress.evaluate.layers import layer_stats
from compress.evaluate.load import LoadProbe
from compress.evaluate.memory import (
    count_zeros,
    dir_bytes,
    module_weight_bytes,
    param_count,
    peak_rss,
)
from compress.evaluate.perplexity import PerplexityResult, perplexity
from compress.evaluate.uncertainty import perplexity_difference, perplexity_interval
from compress.metrics import Measurement
from compress.models.adapter import ModelAdapter, adapter_for, resolve_device
from compress.models.baseline import BaselineInfo, get_baseline, load_hf_baseline
from compress.models.gpt import PRESETS, GPTConfig
from compress.preflight import check_tokens
from compress.progress import Progress
from compress.recipe import Recipe, Stage, VariantSpec, parse_stage, stage_seq_lens, variant_stages
from compress.report.describe import describe_pipeline
from compress.runtime import building_allocator, release_memory
from compress.settings import DataSpec
from compress.sweep.space import split_stage
from compress.train import TrainConfig
from compress.variant import save_variant

log = logging.getLogger(__name__)

BASELINE = "baseline"


@dataclass(frozen=True)
class Reference:
    """What every variant is compared with: the baseline's top-1 predictions on the scored
    tokens, and the generation prompts with their reference text and the baseline's
    continuations (empty lists when generation is off)."""

    top1: Top1
    prompts: list[str]
    references: list[str]
    continuations: list[str]
    prompt_ids: torch.Tensor | None  # (K, prompt_tokens)


@dataclass
class Workspace:
    recipe: Recipe
    corpus: Corpus
    tokenizer: Tokenizer
    tokens: dict[str, torch.Tensor]
    baseline: nn.Module
    baseline_info: BaselineInfo
    unigram_perplexity: float  # of the evaluation split, unigram fit on the training split
    setup_seconds: float
    device: torch.device = torch.device("cpu")
    # The baseline's perplexity, window by window: what every variant's difference is paired
    # with. Set when the baseline is measured, or scored on first need.
    baseline_perplexity: PerplexityResult | None = None
    base_dir: Path = Path(".")  # the recipe's folder: relative data paths start here
    # token ids of the other corpora stages train on (finetune), by data_key(spec)
    data_tokens: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _reference: Reference | None = field(default=None, repr=False)
    # what is running now, on the terminal (silent unless an entry point asks for it)
    progress: Progress = field(default_factory=Progress.off, repr=False)

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.baseline)

    @property
    def input_vocab(self) -> int:
        """Token ids below this are valid inputs for the tokenizer and the model alike (random
        inputs for timing are drawn from it)."""
        return min(self.tokenizer.vocab_size, self.adapter.vocab_size(self.baseline))

    def load_tokens(self, spec: DataSpec) -> dict[str, torch.Tensor]:
        """Token ids per split of the corpus ``spec``, in the run's tokenizer (cached)."""
        key = data_key(spec)
        if key not in self.data_tokens:
            corpus = load_corpus_spec(spec, self.base_dir)
            self.data_tokens[key] = encode_splits(self.tokenizer, corpus)
        return self.data_tokens[key]

    def reference(self) -> Reference:
        """The baseline's outputs every variant is compared with (computed once)."""
        if self._reference is None:
            self._reference = _reference(self)
        return self._reference


@dataclass
class VariantResult:
    name: str
    measurement: Measurement = field(default_factory=Measurement)
    description: str = ""  # its stages from the baseline on, e.g. "prune 50% magnitude -> int8"
    error: str | None = None  # why it failed; None when it was measured
    stages: list[StageReport] = field(default_factory=list)
    perplexity: PerplexityResult | None = None
    latency: LatencyResult | None = None
    rss: dict | None = None
    traceback: str | None = None
    continuations: list[str] | None = None  # greedy continuations of the generation prompts
    layers: list[dict] | None = None  # per linear layer: sparsity, bits per weight (as stored)
    # "baseline", "variant" or "control" (the compute-matched control of variants that train)
    role: str = "variant"
    control: str | None = None  # a variant that trains: the name of its control's row
    # a control's paired timings of the baseline, pooled into the baseline's own row
    baseline_latency_samples: list[float] = field(default_factory=list, repr=False)

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "failed"

    @property
    def row(self) -> dict:
        """The flat record of the run's CSV, JSON and study: name, status, error, stages, then
        every metric of the catalog (:mod:`compress.metrics`)."""
        return {
            "variant": self.name,
            "status": self.status,
            "error": self.error,
            "stages": self.description,
            "role": self.role,
            "control": self.control,
            **self.measurement.to_dict(),
        }


def train_config(recipe: Recipe) -> TrainConfig:
    settings = recipe.train.model_dump(exclude={"partial"})  # a cache policy, not training
    return TrainConfig(**settings, seed=recipe.seed)


def load_corpus(recipe: Recipe, base_dir: Path) -> Corpus:
    return load_corpus_spec(recipe.data, base_dir)


def load_corpus_spec(spec: DataSpec, base_dir: Path) -> Corpus:
    if spec.corpus == "builtin":
        return builtin_corpus()
    if spec.corpus == "hf":
        return hf_corpus(spec.path, spec.name, spec.text_field, dict(spec.splits))
    return files_corpus(spec.files, base_dir=base_dir, fractions=spec.fractions)


def data_key(spec: DataSpec) -> str:
    return stable_hash(spec.model_dump(mode="json"))


def stage_corpora(recipe: Recipe) -> list[DataSpec]:
    """The corpora the stages train on besides the run's own (finetune's ``data``): those of
    the variants, and those a sweep's pipeline template names without a ``$parameter`` (a
    corpus chosen by a parameter is read when a trial first needs it)."""
    stages = [stage for variant in recipe.variants for stage in variant_stages(variant)]
    if recipe.sweep is not None:
        for item in recipe.sweep.pipeline:
            try:
                stages.append(parse_stage(split_stage(item)[0], "sweep.pipeline", "<recipe>"))
            except RecipeError:  # settings with $parameters: known per trial only
                continue
    out: dict[str, DataSpec] = {}
    for stage in stages:
        spec = getattr(stage.config, "data", None)
        if isinstance(spec, DataSpec):
            out[data_key(spec)] = spec
    return list(out.values())


def prepare(recipe: Recipe, base_dir: Path, progress: bool = True) -> Workspace:
    """Data, tokenizer, token ids and the baseline on the recipe's device; every check that
    needs the model (context length, vocabulary) runs here, before any variant is built."""
    start = time.perf_counter()
    shown = Progress(enabled=progress)
    device = resolve_device(recipe.device)
    with shown.phase("corpus: reading"):
        corpus = load_corpus(recipe, base_dir)
        # Read the stages' corpora now, so a missing file stops the run before any training.
        others = {data_key(s): load_corpus_spec(s, base_dir) for s in stage_corpora(recipe)}
    if recipe.model.hf is not None:
        with shown.phase(f"baseline: loading {recipe.model.hf}"):
            baseline, info, tokenizer = load_hf_baseline(recipe.model, base_dir)
        with shown.phase("tokenizer: encoding the splits"):
            tokens = encode_splits(tokenizer, corpus)
        check_tokens(recipe, tokens, trains_baseline=False)
        vocab = adapter_for(baseline).vocab_size(baseline)
        for split, ids in tokens.items():
            if ids.numel() and int(ids.max()) >= vocab:
                raise CompressError(
                    f"model.hf: the tokenizer gives id {int(ids.max())} in the {split} split but "
                    f"the model's vocabulary has {vocab} entries"
                )
    else:
        # The tokenizer and the token ids come from the cache when they are there; the phase
        # line names the step, not how it will be done.
        with shown.phase(f"tokenizer (vocab {recipe.data.vocab_size}) and token ids"):
            tokenizer = train_tokenizer(corpus, recipe.data.vocab_size)
            tokens = encode_splits(tokenizer, corpus)
        check_tokens(recipe, tokens, trains_baseline=True)
        cfg = GPTConfig(vocab_size=tokenizer.vocab_size, **PRESETS[recipe.model.preset])
        with shown.phase(f"baseline: built-in GPT '{recipe.model.preset}'"):
            baseline, info = get_baseline(
                cfg,
                tokens,
                corpus.fingerprint,
                tokenizer.fingerprint,
                train_config(recipe),
                progress,
                partial=recipe.train.partial,
            )
        if recipe.model.dtype != "float32":
            baseline = baseline.to(getattr(torch, recipe.model.dtype))
    _check_context(recipe, adapter_for(baseline).max_seq_len(baseline))
    baseline = baseline.to(device).eval()
    split = recipe.eval.perplexity.split
    eval_ids = _eval_ids(recipe, tokens)
    unigram = unigram_perplexity(tokens["train"], eval_ids, tokenizer.vocab_size)
    log.info("unigram perplexity of %s split: %.2f", split, unigram)
    data_tokens = {key: encode_splits(tokenizer, c) for key, c in others.items()}
    return Workspace(
        recipe,
        corpus,
        tokenizer,
        tokens,
        baseline,
        info,
        unigram,
        time.perf_counter() - start,
        device,
        base_dir=base_dir,
        data_tokens=data_tokens,
        progress=shown,
    )


def _check_context(recipe: Recipe, max_len: int | None) -> None:
    """Sequence lengths the recipe asks for must fit the model's context."""
    if max_len is None:
        return
    asks = [
        ("eval.perplexity.seq_len", recipe.eval.perplexity.seq_len),
        ("eval.latency.seq_len", recipe.eval.latency.seq_len),
        ("eval.generation.prompt_tokens + new_tokens - 1", recipe.eval.generation_tokens),
    ]
    if recipe.calibration.seq_len is not None:
        asks.append(("calibration.seq_len", recipe.calibration.seq_len))
    if recipe.scan is not None and recipe.scan.seq_len is not None:
        asks.append(("scan.seq_len", recipe.scan.seq_len))
    for i, variant in enumerate(recipe.variants):
        for j, item in enumerate(variant.pipeline):
            ((name, settings),) = item.items()
            calib = settings.get("calibration") if isinstance(settings, dict) else None
            if isinstance(calib, dict) and isinstance(calib.get("seq_len"), int):
                key = f"variants[{i}].pipeline[{j}].{name}.calibration.seq_len"
                asks.append((key, calib["seq_len"]))
            nested = settings.get("train") if isinstance(settings, dict) else None
            if isinstance(nested, dict) and isinstance(nested.get("seq_len"), int):
                asks.append(
                    (f"variants[{i}].pipeline[{j}].{name}.train.seq_len", nested["seq_len"])
                )
    for key, n in [*asks, *stage_seq_lens(recipe)]:
        if n > max_len:
            raise CompressError(f"{key} = {n} exceeds the model's context length {max_len}")


def _eval_ids(recipe: Recipe, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    spec = recipe.eval.perplexity
    ids = tokens[spec.split]
    return ids[: spec.max_tokens] if spec.max_tokens else ids


def build_variant(
    ws: Workspace, variant: VariantSpec, models: dict[str, nn.Module], progress: bool = False
) -> tuple[nn.Module, list[StageReport]]:
    """A deep copy of the variant's starting model (``from``: the baseline or an earlier
    variant, found in ``models``) taken through the variant's stages, in recipe order."""
    if variant.start not in models:
        raise CompressError(f"starts from {variant.start!r}, which failed")
    model = copy.deepcopy(models[variant.start]).eval()
    return _run_stages(ws, variant.name, model, variant_stages(variant), models, progress)


def _run_stages(
    ws: Workspace,
    name: str,
    model: nn.Module,
    stages: list[Stage],
    models: dict[str, nn.Module],
    progress: bool,
) -> tuple[nn.Module, list[StageReport]]:
    ctx = StageContext(
        seed=ws.recipe.seed,
        tokens=ws.tokens,
        models=models,
        progress=progress,
        calibration=ws.recipe.calibration,
        fingerprint=f"{ws.corpus.fingerprint}:{ws.tokenizer.fingerprint}",
        train=train_config(ws.recipe),
        load_tokens=ws.load_tokens,
        sensitivity=_sensitivity(ws),
    )
    reports = []
    for stage in stages:
        torch.manual_seed(ws.recipe.seed)
        model, report = run_stage(stage.name, model, stage.config, ctx)
        reports.append(report)
        log.info(
            "%s: %s touched %d modules, skipped %d",
            name,
            stage.name,
            len(report.touched),
            len(report.skipped),
        )
    return model.eval(), reports


def _sensitivity(ws: Workspace):  # noqa: ANN202 - compress.compressors.base.Sensitivity
    from compress.scan.workspace import sensitivity_for  # the scan imports the compressors

    return sensitivity_for(ws)


def measure_static(
    ws: Workspace,
    name: str,
    model: nn.Module,
    reports: list[StageReport],
    variant_dir: Path,
    chain: list[StageReport] | None = None,
) -> VariantResult:
    """Everything but latency: perplexity, weight bytes, saved size, peak RSS in a child.

    ``reports`` are the variant's own stages; ``chain`` all stages from the baseline on
    (including those of the variants it starts from), which the row describes.
    """
    recipe = ws.recipe
    chain = reports if chain is None else chain
    quant = [r for r in chain if "bits_per_weight" in r.extra]
    zeros, total = count_zeros(model)
    description = describe_pipeline(chain)
    m = Measurement(
        param_count=param_count(model),
        weight_bytes=module_weight_bytes(model),
        quantized_layer_bytes=sum(r.touched_bytes_after for r in quant),
        quantized_layer_fp32_bytes=sum(r.touched_bytes_before for r in quant),
        bits_per_weight=quant[-1].extra["bits_per_weight"] if quant else 32.0,
        sparsity=zeros / total if total else 0.0,
        quantized_modules=sum(len(r.touched) for r in quant),
    )
    shown = ws.progress
    with shown.phase(f"{name}: perplexity ({_eval_ids(recipe, ws.tokens).numel():,} tokens)"):
        ppl = _perplexity(ws, model)
    if not torch.isfinite(torch.tensor(ppl.perplexity)):
        raise FloatingPointError(f"perplexity is {ppl.perplexity}")
    if model is ws.baseline:
        ws.baseline_perplexity = ppl
    set_perplexity(m, ppl, baseline_perplexity(ws), recipe.seed)
    gen = recipe.eval.generation
    what = f"top-1 accuracy, {gen.prompts} greedy continuations" if gen.prompts else "top-1"
    with shown.phase(f"{name}: {what}"):
        continuations = measure_quality(ws, model, m)
    if variant_dir.exists():
        shutil.rmtree(variant_dir)
    save_variant(model, variant_dir, extra={"variant": name, "stages": description})
    m.saved_bytes = dir_bytes(variant_dir)
    rss = None
    if recipe.eval.memory.peak_rss:
        lat = recipe.eval.latency
        with shown.phase(f"{name}: peak memory (a fresh process loads the saved model)"):
            rss = peak_rss(
                variant_dir, lat.batch_size, lat.seq_len, _threads(recipe), device=str(ws.device)
            )
        m.peak_rss_bytes = rss["peak_rss_bytes"]
        m.gpu_peak_bytes = rss.get("gpu_peak_bytes")
        m.rss_after_load_bytes = rss["rss_after_load_bytes"]
        m.rss_after_import_bytes = rss["rss_after_import_bytes"]
        m.model_rss_bytes = rss["peak_rss_bytes"] - rss["rss_after_import_bytes"]
    return VariantResult(
        name,
        m,
        description,
        None,
        reports,
        ppl,
        None,
        rss,
        continuations=continuations,
        layers=layer_stats(model),
    )


def variant_chain(recipe: Recipe, name: str) -> list[Stage]:
    """Every stage of the variant ``name`` from the baseline on: those of the variants it
    starts from (``from``), then its own."""
    specs = {v.name: v for v in recipe.variants}
    chain: list[Stage] = []
    while name in specs:
        chain = variant_stages(specs[name]) + chain
        name = specs[name].start
    return chain


def control_for(ws: Workspace, stages: list[Stage]) -> tuple[list[Stage], str] | None:
    """The control stages for a variant whose stages (from the baseline on) are ``stages`` and
    the control's cache key; None when the variant does not train."""
    ctl = control_stages(stages)
    if not ctl:
        return None
    resolved = []
    for stage in ctl:
        extra: dict = {}
        if isinstance(stage.config, TrainingStageConfig):  # what the stage leaves to the run
            extra["train"] = dataclasses.asdict(stage.config.train_config(train_config(ws.recipe)))
        if stage.name == "finetune":
            if stage.config.data is not None:
                extra["data_tokens"] = tokens_fingerprint(ws.load_tokens(stage.config.data))
        resolved.append(extra)
    return ctl, control_key(ws.baseline_info.identity, ws.recipe.seed, ctl, resolved)


def build_control(ws: Workspace, stages: list[Stage], key: str, progress: bool = False) -> Control:
    """The control ``key``: read from the cache, or the baseline trained through ``stages``
    (see :func:`control_for`) and cached. Another process training the same control is waited
    for, and its entry read, instead of training it twice."""
    cached = read_control(key)
    if cached is None:
        with building_control(key):
            cached = read_control(key)  # written while this process waited
            if cached is None:
                model = copy.deepcopy(ws.baseline).eval()
                model, reports = _run_stages(
                    ws, "control", model, stages, {BASELINE: ws.baseline}, progress
                )
                path = write_control(key, model, reports)
                log.info("control %s trained and cached at %s", key, path)
                return Control(key, model.eval(), reports, False, path)
    log.info("control %s loaded from %s", key, cached.path)
    cached.model = cached.model.to(ws.device).eval()
    return cached


def control_perplexity(
    ws: Workspace, stages: list[Stage], progress: bool = False
) -> PerplexityResult:
    """The perplexity of the control for a variant whose stages (from the baseline on) are
    ``stages``; the baseline's own when it does not train (a sweep compares every trial)."""
    found = control_for(ws, stages)
    if found is None:
        return baseline_perplexity(ws)
    ctl = build_control(ws, *found, progress)
    return _perplexity(ws, ctl.model)


def set_control(
    m: Measurement, ppl: PerplexityResult, control: PerplexityResult, seed: int
) -> None:
    """The variant's perplexity against its control's on the same windows: the control's value,
    the ratio, the difference and its paired 95% interval."""
    m.control_perplexity = control.perplexity
    m.perplexity_control_ratio = ppl.perplexity / control.perplexity
    delta = perplexity_difference(ppl.window_nll, control.window_nll, ppl.window_tokens, seed)
    m.ppl_delta_control, m.ppl_delta_control_lo = delta.estimate, delta.lo
    m.ppl_delta_control_hi = delta.hi
    m.ppl_control_within_noise = delta.contains(0.0)


def _top1(ws: Workspace, model: nn.Module) -> Top1:
    spec = ws.recipe.eval.perplexity
    return top1(model, _eval_ids(ws.recipe, ws.tokens), spec.seq_len, spec.stride, spec.batch_size)


def _continue(ws: Workspace, model: nn.Module, prompt_ids: torch.Tensor) -> list[str]:
    new = greedy(model, prompt_ids, ws.recipe.eval.generation.new_tokens)
    return [ws.tokenizer.decode(row.tolist()) for row in new]


def _reference(ws: Workspace) -> Reference:
    gen = ws.recipe.eval.generation
    if not gen.prompts:
        return Reference(_top1(ws, ws.baseline), [], [], [], None)
    pairs = held_out_prompts(
        _eval_ids(ws.recipe, ws.tokens), gen.prompts, gen.prompt_tokens, gen.new_tokens
    )
    return Reference(
        top1=_top1(ws, ws.baseline),
        prompts=[ws.tokenizer.decode(row.tolist()) for row in pairs.prompts],
        references=[ws.tokenizer.decode(row.tolist()) for row in pairs.references],
        continuations=_continue(ws, ws.baseline, pairs.prompts),
        prompt_ids=pairs.prompts,
    )


def measure_quality(ws: Workspace, model: nn.Module, m: Measurement) -> list[str] | None:
    """Top-1 accuracy and agreement with the baseline on the scored tokens; BLEU and chrF of
    greedy continuations against the text and against the baseline's. Fills ``m``; returns
    the continuations (None when generation is off)."""
    ref = ws.reference()
    mine = ref.top1 if model is ws.baseline else _top1(ws, model)
    m.top1_accuracy = mine.accuracy
    m.top1_agreement = mine.agreement(ref.top1)
    if ref.prompt_ids is None:
        return None
    texts = ref.continuations if model is ws.baseline else _continue(ws, model, ref.prompt_ids)
    against_text = text_scores(texts, ref.references)
    against_baseline = text_scores(texts, ref.continuations)
    m.bleu, m.chrf = against_text.bleu, against_text.chrf
    m.bleu_fidelity, m.chrf_fidelity = against_baseline.bleu, against_baseline.chrf
    return texts


def _perplexity(ws: Workspace, model: nn.Module) -> PerplexityResult:
    spec = ws.recipe.eval.perplexity
    return perplexity(
        model, _eval_ids(ws.recipe, ws.tokens), spec.seq_len, spec.stride, spec.batch_size
    )


def baseline_perplexity(ws: Workspace) -> PerplexityResult:
    """The baseline's perplexity result with its per-window numbers (scored once per
    workspace)."""
    if ws.baseline_perplexity is None:
        ws.baseline_perplexity = _perplexity(ws, ws.baseline)
    return ws.baseline_perplexity


def set_perplexity(
    m: Measurement, ppl: PerplexityResult, base: PerplexityResult, seed: int
) -> None:
    """The perplexity metrics: the value, its 95% interval over windows, and its difference to
    the baseline's on the same windows with that difference's paired 95% interval."""
    m.perplexity, m.nll, m.eval_tokens = ppl.perplexity, ppl.nll, ppl.tokens
    ci = perplexity_interval(ppl.window_nll, ppl.window_tokens, seed)
    m.perplexity_lo, m.perplexity_hi = ci.lo, ci.hi
    delta = perplexity_difference(ppl.window_nll, base.window_nll, ppl.window_tokens, seed)
    m.ppl_delta, m.ppl_delta_lo, m.ppl_delta_hi = delta.estimate, delta.lo, delta.hi
    m.ppl_within_noise = delta.contains(0.0)


def _threads(recipe: Recipe) -> int:
    return recipe.eval.latency.threads or torch.get_num_threads()


def failed(name: str, exc: BaseException) -> VariantResult:
    log.error("variant %s failed: %s: %s", name, type(exc).__name__, exc)
    return VariantResult(
        name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
    )


def paired_latency(ws: Workspace, model: nn.Module, threads: int) -> PairedLatency:
    """The variant and the baseline timed in alternating rounds in one measurement, with the
    ratio's confidence interval (the baseline alone, ratio 1, when it is the variant)."""
    lat = ws.recipe.eval.latency
    if model is ws.baseline:
        probe, start = LoadProbe.start(), time.perf_counter()
        alone = interleaved_latency(
            {"variant": model},
            ws.input_vocab,
            lat.batch_size,
            lat.seq_len,
            threads,
            lat.warmup,
            lat.repeats,
            seed=ws.recipe.seed,
        )["variant"]
        seconds = time.perf_counter() - start
        return PairedLatency.alone(alone, lat.ci_target, seconds, probe.finish())
    return paired_ratio(
        ws.baseline,
        model,
        ws.input_vocab,
        lat.batch_size,
        lat.seq_len,
        threads,
        lat.warmup,
        lat.repeats,
        lat.ci_target,
        lat.max_seconds,
        seed=ws.recipe.seed,
    )


def _later_references(recipe: Recipe) -> dict[str, int]:
    """For each variant, the position (1 = the first variant after the baseline) of the last
    variant that starts from it or distils from it: how long it must stay in memory."""
    last: dict[str, int] = {}
    for i, v in enumerate(recipe.variants, start=1):
        last[v.start] = i
        for stage in variant_stages(v):
            teacher = getattr(stage.config, "teacher", None)
            if teacher is not None:
                last[teacher] = i
    return last


def run_variants(ws: Workspace, out_dir: Path, progress: bool = False) -> list[VariantResult]:
    """Build and measure the baseline and every variant, one at a time; failures are isolated
    per variant. Each variant's latency is timed paired with the baseline's, and the variant
    is freed after it is measured unless a later variant starts from it or learns from it."""
    recipe = ws.recipe
    threads = _threads(recipe)
    keep_until = _later_references(recipe)
    models: dict[str, nn.Module] = {BASELINE: ws.baseline}
    chains: dict[str, list[StageReport]] = {BASELINE: []}
    results: list[VariantResult] = []
    baseline_samples: list[float] = []
    specs: list[tuple[str, VariantSpec | None]] = [(BASELINE, None)]
    specs += [(v.name, v) for v in recipe.variants]
    # control key -> (its row's name, its perplexity; None when it failed)
    controls: dict[str, tuple[str, PerplexityResult | None]] = {}
    taken = {n for n, _ in specs}
    for i, (name, spec) in enumerate(specs):
        log.info("variant %s: building and measuring", name)
        model = None
        try:
            if spec is None:
                model, reports, chain = ws.baseline, [], []
            else:
                stages = " -> ".join(stage.name for stage in variant_stages(spec))
                with building_allocator(), ws.progress.phase(f"{name}: building ({stages})"):
                    model, reports = build_variant(ws, spec, models, progress)
                chain = chains[spec.start] + reports
                release_memory()  # the fp32 layers a stage replaced, freed but still resident
                log.info("variant %s: built", name)
            res = measure_static(ws, name, model, reports, out_dir / "variants" / name, chain)
            chains[name] = chain
            log.info("variant %s: perplexity, size and peak RSS measured", name)
            if spec is not None or len(specs) == 1:
                lat = recipe.eval.latency
                with ws.progress.phase(
                    f"{name}: latency, paired rounds with the baseline (up to "
                    f"{lat.max_seconds:g} s)"
                ):
                    timings = paired_latency(ws, model, threads)
                res.latency = timings.variant
                baseline_samples += timings.baseline.samples_ms
                set_latency(res.measurement, timings)
            if spec is not None and keep_until.get(name, -1) > i:
                models[name] = model
        except Exception as exc:  # one variant's failure never loses the others
            res = failed(name, exc)
        results.append(res)
        if spec is not None:
            del model  # freed now unless kept in `models` for a later variant
        for done in [n for n in models if n != BASELINE and keep_until.get(n, -1) <= i]:
            del models[done]
        release_memory()
        found = control_for(ws, variant_chain(recipe, name)) if spec is not None else None
        if found is not None and res.status == "ok":
            stages, key = found
            if key not in controls:  # one control per budget, measured once per run
                cname = f"{name}-control"
                while cname in taken:
                    cname += "_"
                taken.add(cname)
                cres = measure_control(ws, cname, stages, key, out_dir, threads, progress)
                if cres.latency is not None:
                    baseline_samples += cres.baseline_latency_samples
                controls[key] = (cname, cres.perplexity)
                results.append(cres)
                release_memory()
            res.control, control_ppl = controls[key]
            if control_ppl is not None and res.perplexity is not None:
                set_control(res.measurement, res.perplexity, control_ppl, recipe.seed)
    base = results[0]
    base.role = BASELINE
    if base.status == "ok" and baseline_samples and base.latency is None:
        lat = recipe.eval.latency  # the baseline's timings from every pair, pooled
        base.latency = summarize(baseline_samples, lat.batch_size, lat.seq_len, threads, lat.warmup)
        set_latency(base.measurement, PairedLatency.alone(base.latency, lat.ci_target))
    return results


def measure_control(
    ws: Workspace,
    name: str,
    stages: list[Stage],
    key: str,
    out_dir: Path,
    threads: int,
    progress: bool = False,
) -> VariantResult:
    """Build (or read from the cache) and measure the control ``key`` as the row ``name``, the
    way a variant is measured; a failure is recorded in its row and loses nothing else."""
    log.info("control %s: building and measuring", name)
    try:
        with building_allocator():
            ctl = build_control(ws, stages, key, progress)
        res = measure_static(ws, name, ctl.model, ctl.reports, out_dir / "variants" / name)
        timings = paired_latency(ws, ctl.model, threads)
        res.latency = timings.variant
        res.baseline_latency_samples = list(timings.baseline.samples_ms)
        set_latency(res.measurement, timings)
        res.description = "control: " + res.description
        del ctl
    except Exception as exc:
        res = failed(name, exc)
    res.role = "control"
    return res


def set_latency(m: Measurement, timings: PairedLatency) -> None:
    """The latency metrics of a paired measurement (see :func:`paired_latency`)."""
    v, b = timings.variant, timings.baseline
    m.latency_ms, m.latency_iqr_ms = v.median_ms, v.iqr_ms
    m.latency_baseline_ms = b.median_ms
    m.latency_ratio = timings.ratio.estimate
    m.latency_ratio_lo, m.latency_ratio_hi = timings.ratio.lo, timings.ratio.hi
    m.latency_noisy, m.latency_rounds = timings.noisy, timings.rounds
    load = timings.load
    m.load_avg_before, m.load_avg_after = load.get("load_avg_before"), load.get("load_avg_after")
    m.cpu_steal = load.get("cpu_steal")


def environment() -> dict[str, str]:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda": _cuda_devices(),
    }
    for pkg in (
        "compress",
        "torch",
        "bitsandbytes",
        "torchao",
        "torch-pruning",
        "optuna",
        "tokenizers",
        "safetensors",
        "pandas",
        "matplotlib",
    ):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    return env


def _cuda_devices() -> str:
    """The CUDA devices torch sees (name, memory) and its CUDA version, or why there are none."""
    if not torch.cuda.is_available():
        return "none (torch sees no CUDA device)"
    names = [
        f"{torch.cuda.get_device_name(i)} "
        f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
        for i in range(torch.cuda.device_count())
    ]
    return f"{', '.join(names)}; CUDA {torch.version.cuda}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
