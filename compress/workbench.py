"""One recipe in, one comparison out: the path every entry point (run, sweep) goes through.

    prepare(recipe)  -> corpus, tokenizer, token ids, baseline (cached), unigram reference
    build_variant    -> baseline copy through the variant's compressor stages, stage reports
    measure          -> perplexity, memory, saved size, peak RSS per variant; latency for all
                        variants in interleaved rounds so drift on a noisy machine hits all alike
    run_recipe       -> rows (baseline first) and the details a report needs

A variant that fails is recorded with its error; the others go on.
"""

from __future__ import annotations

import copy
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

from compress.compressors import REGISTRY, StageContext, StageReport, run_stage
from compress.data import (
    Corpus,
    Tokenizer,
    builtin_corpus,
    encode_splits,
    files_corpus,
    train_tokenizer,
    unigram_perplexity,
)
from compress.errors import CompressError
from compress.evaluate.latency import LatencyResult, interleaved_latency
from compress.evaluate.memory import (
    count_zeros,
    dir_bytes,
    module_weight_bytes,
    param_count,
    peak_rss,
)
from compress.evaluate.perplexity import PerplexityResult, perplexity
from compress.models.baseline import BaselineInfo, get_baseline
from compress.models.gpt import GPT, PRESETS, GPTConfig
from compress.recipe import Recipe, VariantSpec, variant_stages
from compress.train import TrainConfig
from compress.variant import save_variant

log = logging.getLogger(__name__)

BASELINE = "baseline"


@dataclass
class Workspace:
    recipe: Recipe
    corpus: Corpus
    tokenizer: Tokenizer
    tokens: dict[str, torch.Tensor]
    baseline: GPT
    baseline_info: BaselineInfo
    unigram_perplexity: float  # of the evaluation split, unigram fit on the training split
    setup_seconds: float


@dataclass
class VariantResult:
    name: str
    row: dict
    stages: list[StageReport] = field(default_factory=list)
    perplexity: PerplexityResult | None = None
    latency: LatencyResult | None = None
    rss: dict | None = None
    traceback: str | None = None


def train_config(recipe: Recipe) -> TrainConfig:
    return TrainConfig(**recipe.train.model_dump(), seed=recipe.seed)


def load_data(recipe: Recipe, base_dir: Path) -> tuple[Corpus, Tokenizer, dict[str, torch.Tensor]]:
    spec = recipe.data
    if spec.corpus == "builtin":
        corpus = builtin_corpus()
    else:
        corpus = files_corpus(spec.files, base_dir=base_dir, fractions=spec.fractions)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    return corpus, tokenizer, encode_splits(tokenizer, corpus)


def prepare(recipe: Recipe, base_dir: Path, progress: bool = True) -> Workspace:
    start = time.perf_counter()
    corpus, tokenizer, tokens = load_data(recipe, base_dir)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, **PRESETS[recipe.model.preset])
    baseline, info = get_baseline(
        cfg, tokens, corpus.fingerprint, tokenizer.fingerprint, train_config(recipe), progress
    )
    split = recipe.eval.perplexity.split
    eval_ids = _eval_ids(recipe, tokens)
    unigram = unigram_perplexity(tokens["train"], eval_ids, tokenizer.vocab_size)
    log.info("unigram perplexity of %s split: %.2f", split, unigram)
    return Workspace(
        recipe, corpus, tokenizer, tokens, baseline, info, unigram, time.perf_counter() - start
    )


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
    ctx = StageContext(seed=ws.recipe.seed, tokens=ws.tokens, models=models, progress=progress)
    reports = []
    for stage in variant_stages(variant):
        torch.manual_seed(ws.recipe.seed)
        model, report = run_stage(stage.name, model, stage.config, ctx)
        reports.append(report)
        log.info(
            "%s: %s touched %d modules, skipped %d",
            variant.name,
            stage.name,
            len(report.touched),
            len(report.skipped),
        )
    return model.eval(), reports


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
    row: dict = {
        "variant": name,
        "status": "ok",
        "error": None,
        "stages": " -> ".join(f"{r.stage}({d})" if (d := _describe(r)) else r.stage for r in chain),
        "params": param_count(model),
        "weight_bytes": module_weight_bytes(model),
        "quantized_layer_bytes": sum(r.touched_bytes_after for r in quant),
        "quantized_layer_fp32_bytes": sum(r.touched_bytes_before for r in quant),
        "bits_per_weight": quant[-1].extra["bits_per_weight"] if quant else 32.0,
        "sparsity": zeros / total if total else 0.0,
        "quantized_modules": sum(len(r.touched) for r in quant),
    }
    ppl_spec = recipe.eval.perplexity
    ppl = perplexity(
        model,
        _eval_ids(recipe, ws.tokens),
        ppl_spec.seq_len,
        ppl_spec.stride,
        ppl_spec.batch_size,
    )
    if not torch.isfinite(torch.tensor(ppl.perplexity)):
        raise FloatingPointError(f"perplexity is {ppl.perplexity}")
    row.update(perplexity=ppl.perplexity, nll=ppl.nll, eval_tokens=ppl.tokens)
    if variant_dir.exists():
        shutil.rmtree(variant_dir)
    save_variant(model, variant_dir, extra={"variant": name, "stages": row["stages"]})
    row["saved_bytes"] = dir_bytes(variant_dir)
    rss = None
    if recipe.eval.memory.peak_rss:
        lat = recipe.eval.latency
        rss = peak_rss(variant_dir, lat.batch_size, lat.seq_len, _threads(recipe))
        row["peak_rss_bytes"] = rss["peak_rss_bytes"]
        row["rss_after_load_bytes"] = rss["rss_after_load_bytes"]
        row["rss_after_import_bytes"] = rss["rss_after_import_bytes"]
        row["model_rss_bytes"] = rss["peak_rss_bytes"] - rss["rss_after_import_bytes"]
    return VariantResult(name, row, reports, ppl, None, rss)


def _describe(report: StageReport) -> str:
    return REGISTRY[report.stage].config_cls.model_validate(report.config).describe()


def _threads(recipe: Recipe) -> int:
    return recipe.eval.latency.threads or torch.get_num_threads()


def failed(name: str, exc: BaseException) -> VariantResult:
    log.error("variant %s failed: %s: %s", name, type(exc).__name__, exc)
    return VariantResult(
        name,
        {"variant": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"},
        traceback=traceback.format_exc(),
    )


def run_variants(ws: Workspace, out_dir: Path, progress: bool = False) -> list[VariantResult]:
    """Build and measure the baseline and every variant; failures are isolated per variant."""
    recipe = ws.recipe
    results: list[VariantResult] = []
    models: dict[str, nn.Module] = {}
    specs: list[tuple[str, VariantSpec | None]] = [(BASELINE, None)]
    specs += [(v.name, v) for v in recipe.variants]
    chains: dict[str, list[StageReport]] = {}
    for name, spec in specs:
        log.info("variant %s: building and measuring", name)
        try:
            if spec is None:
                model, reports, chain = ws.baseline, [], []
            else:
                model, reports = build_variant(ws, spec, models, progress)
                chain = chains[spec.start] + reports
            res = measure_static(ws, name, model, reports, out_dir / "variants" / name, chain)
            models[name] = model
            chains[name] = chain
        except Exception as exc:  # one variant's failure never loses the others
            res = failed(name, exc)
        results.append(res)
    lat = recipe.eval.latency
    if models:
        log.info("latency: %d interleaved rounds over %d variants", lat.repeats, len(models))
        try:
            timings = interleaved_latency(
                models,
                ws.tokenizer.vocab_size,
                lat.batch_size,
                lat.seq_len,
                _threads(recipe),
                lat.warmup,
                lat.repeats,
                seed=recipe.seed,
            )
        except Exception as exc:
            timings = {}
            for r in results:
                if r.name in models:
                    r.row.update(status="failed", error=f"latency: {type(exc).__name__}: {exc}")
        for r in results:
            if r.name in timings:
                r.latency = timings[r.name]
                r.row["latency_ms_median"] = r.latency.median_ms
                r.row["latency_ms_iqr"] = r.latency.iqr_ms
    return results


def environment() -> dict[str, str]:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    for pkg in (
        "compress",
        "torch",
        "bitsandbytes",
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
