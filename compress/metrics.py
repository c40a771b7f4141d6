"""Every number compress reports, defined once: its key, label, unit, direction and meaning.

A run's rows, a sweep's trial attributes, the CSV and JSON columns, the HTML tables, the
definitions written into every report and the metric names a sweep may minimise or constrain
all use these keys. :class:`Measurement` is one variant's measured numbers; ratios to the
baseline are derived from two of them by :func:`ratios`, never measured separately (except the
latency ratio, which is measured paired: variant and baseline timed in alternating rounds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # short heading for tables and the dashboard
    definition: str  # written into every report
    unit: Literal["", "ms", "bytes", "tokens", "bits", "x"] = ""
    better: Literal["lower", "higher"] | None = None
    objective: bool = False  # a sweep may minimise or constrain it


_PPL = (
    "exp of the token-weighted mean negative log-likelihood (natural log) of the held-out "
    "split's tokens, as the Hugging Face guide 'Perplexity of fixed-length models' defines it: "
    "windows of at most seq_len tokens start every stride tokens, and each window scores only "
    "the tokens after the previous window's end, each from the tokens before it in the window "
    "(with stride = seq_len the first token of each window is not scored). Every variant of a "
    "run is scored on exactly the same tokens."
)
_LATENCY = (
    "median wall time of one forward pass over a batch of token ids, at the stated batch size, "
    "sequence length and torch thread count, after warm-up passes (on CUDA, timed to "
    "completion). Each variant is timed together with the baseline in alternating rounds (one "
    "pass each per round); the baseline's own row pools its timings from every such "
    "measurement."
)
_RSS = (
    "peak resident set size (VmHWM; ru_maxrss where there is no /proc) of a fresh Python "
    "process that imports torch and compress, loads the saved variant and runs one forward "
    "pass at the latency batch shape."
)

_CI = (
    "percentile bootstrap over {unit} (2000 resamples, seeded with the recipe's seed), 95% "
    "confidence."
)
_LOAD = "during the variant's latency measurement."

CATALOG: tuple[Metric, ...] = (
    Metric("perplexity", "perplexity", _PPL, better="lower", objective=True),
    Metric(
        "perplexity_lo",
        "perplexity CI low",
        "lower end of the perplexity's 95% confidence interval: "
        + _CI.format(unit="the scoring windows (each window's NLL sum and token count)"),
    ),
    Metric("perplexity_hi", "perplexity CI high", "upper end of the same interval."),
    Metric(
        "ppl_delta",
        "perplexity - baseline",
        "the variant's perplexity minus the baseline's, both on the same windows.",
        better="lower",
    ),
    Metric(
        "ppl_delta_lo",
        "ppl delta CI low",
        "lower end of the 95% confidence interval of ppl_delta: "
        + _CI.format(unit="the windows, the same ones for the variant and the baseline (paired)"),
    ),
    Metric("ppl_delta_hi", "ppl delta CI high", "upper end of the same interval."),
    Metric(
        "ppl_within_noise",
        "ppl delta within noise",
        "true when ppl_delta's confidence interval contains 0: the data cannot tell the "
        "variant's perplexity from the baseline's.",
    ),
    Metric(
        "control_perplexity",
        "control perplexity",
        "perplexity of the variant's compute-matched control: the uncompressed baseline put "
        "through the variant's training stages (distill, finetune) in order, with the same "
        "settings (distillation from the baseline teacher, the baseline as its own student). "
        "Empty for a variant that does not train.",
        better="lower",
    ),
    Metric(
        "perplexity_control_ratio",
        "perplexity x control",
        "perplexity divided by control_perplexity: below 1, the variant's training did more "
        "than the same training of the uncompressed baseline. In a sweep, a trial without "
        "training stages has the baseline as its control.",
        "x",
        "lower",
        objective=True,
    ),
    Metric(
        "ppl_delta_control",
        "perplexity - control",
        "the variant's perplexity minus its control's, both on the same windows.",
        better="lower",
    ),
    Metric(
        "ppl_delta_control_lo",
        "ppl delta vs control CI low",
        "lower end of the 95% confidence interval of ppl_delta_control: "
        + _CI.format(unit="the windows, the same ones for the variant and the control (paired)"),
    ),
    Metric(
        "ppl_delta_control_hi", "ppl delta vs control CI high", "upper end of the same interval."
    ),
    Metric(
        "ppl_control_within_noise",
        "ppl vs control within noise",
        "true when ppl_delta_control's confidence interval contains 0: the data cannot tell the "
        "variant's perplexity from its control's.",
    ),
    Metric("nll", "NLL", "mean negative log-likelihood per scored token, in nats.", better="lower"),
    Metric("eval_tokens", "scored tokens", "number of tokens the perplexity scored.", "tokens"),
    Metric("latency_ms", "latency (ms)", _LATENCY, "ms", "lower", objective=True),
    Metric(
        "latency_iqr_ms",
        "latency IQR (ms)",
        "interquartile range (75th minus 25th percentile) of the same forward-pass timings.",
        "ms",
    ),
    Metric(
        "latency_baseline_ms",
        "baseline latency (ms)",
        "the baseline's median forward time in the variant's own paired measurement.",
        "ms",
    ),
    Metric(
        "latency_ratio",
        "latency x baseline (paired)",
        "the variant's median forward time over the baseline's median in the same paired "
        "measurement (alternating rounds), so drift of the machine hits both alike.",
        "x",
        "lower",
        objective=True,
    ),
    Metric(
        "latency_ratio_lo",
        "latency ratio CI low",
        "lower end of latency_ratio's 95% confidence interval: "
        + _CI.format(unit="the rounds, each round's two timings kept together (paired)"),
        "x",
    ),
    Metric("latency_ratio_hi", "latency ratio CI high", "upper end of the same interval.", "x"),
    Metric(
        "latency_noisy",
        "latency noisy",
        "true when latency_ratio's interval is still wider than eval.latency.ci_target (its "
        "half-width relative to the ratio) after eval.latency.max_seconds of rounds: the "
        "ratio is not trustworthy at that precision.",
    ),
    Metric(
        "latency_rounds",
        "latency rounds",
        "alternating rounds timed (at least eval.latency.repeats; more until the interval was "
        "narrow enough or the time budget was spent).",
    ),
    Metric(
        "load_avg_before",
        "load before",
        "1-minute load average just before the variant's latency measurement (os.getloadavg).",
    ),
    Metric("load_avg_after", "load after", "1-minute load average just after it."),
    Metric(
        "cpu_steal",
        "CPU steal",
        "fraction of the machine's CPU time stolen by the hypervisor for other guests "
        + _LOAD
        + " (from /proc/stat; empty where unavailable).",
    ),
    Metric(
        "weight_bytes",
        "weight bytes",
        "exact bytes of every tensor in the model's state dict as stored, shared (tied) "
        "tensors once: quantized codes plus their scales, absmax values and quantization maps; "
        "biases, norms and embeddings in their own dtype.",
        "bytes",
        "lower",
        objective=True,
    ),
    Metric(
        "quantized_layer_bytes",
        "quantized-layer bytes",
        "bytes of the layers a quantization stage converted, after conversion.",
        "bytes",
        "lower",
    ),
    Metric(
        "quantized_layer_fp32_bytes",
        "quantized-layer fp32 bytes",
        "bytes of the same layers before conversion.",
        "bytes",
    ),
    Metric(
        "bits_per_weight",
        "bits/weight",
        "bits per weight of the quantized layers' weight matrices including their scales and "
        "maps (biases excluded); 32 for an unquantized model.",
        "bits",
        "lower",
    ),
    Metric(
        "sparsity",
        "sparsity",
        "fraction of exactly-zero entries in the weight matrices of the linear layers (float "
        "weights or int8 codes; embeddings, the tied LM head and packed 4-bit codes excluded).",
    ),
    Metric(
        "quantized_modules", "quantized layers", "number of layers a quantization stage converted."
    ),
    Metric(
        "param_count",
        "parameters",
        "parameters the model represents, tied weights once, packed 4-bit weights at their "
        "logical (unpacked) count.",
        better="lower",
        objective=True,
    ),
    Metric(
        "saved_bytes",
        "checkpoint bytes",
        "size on disk of the saved variant (weights plus its JSON manifest and config).",
        "bytes",
        "lower",
        objective=True,
    ),
    Metric("peak_rss_bytes", "peak RSS bytes", _RSS, "bytes", "lower", objective=True),
    Metric(
        "model_rss_bytes",
        "model RSS bytes",
        "peak RSS minus that process's resident size after importing the libraries the variant "
        "needs (torch; bitsandbytes, transformers where needed) and before loading it: what the "
        "model and its inference added.",
        "bytes",
        "lower",
        objective=True,
    ),
    Metric(
        "gpu_peak_bytes",
        "GPU peak allocated",
        "on a CUDA device: torch.cuda.max_memory_allocated of that fresh process (counted from "
        "torch.cuda.reset_peak_memory_stats after the CUDA context exists) over moving the "
        "variant to the GPU and one forward pass at the latency batch shape: its weights plus "
        "the forward pass's activations and workspaces. Empty when the run is on the CPU.",
        "bytes",
        "lower",
        objective=True,
    ),
    Metric(
        "rss_after_load_bytes",
        "RSS after load",
        "resident size of that process right after loading the variant.",
        "bytes",
    ),
    Metric(
        "rss_after_import_bytes",
        "RSS after import",
        "resident size of that process after importing the libraries, before loading.",
        "bytes",
    ),
)
"""Measured metrics, in report column order."""

# Accuracy and generation: how much of the baseline's behaviour a variant keeps. Higher is
# better for each; a sweep minimises or caps its ``<key>_shortfall`` (see SHORTFALL_OF).
_GENERATION = (
    "greedy continuations (new_tokens tokens, the most likely token each step) of the "
    "eval.generation prompts: windows of prompt_tokens tokens evenly spaced over the held-out "
    "split, decoded with the run's tokenizer and scored as one corpus with sacrebleu's "
    "defaults"
)
QUALITY: tuple[Metric, ...] = (
    Metric(
        "top1_accuracy",
        "top-1 accuracy",
        "fraction of the tokens the perplexity scores (same windows, same context) that are "
        "the model's most likely next token.",
        better="higher",
    ),
    Metric(
        "top1_agreement",
        "top-1 agreement",
        "fraction of the same positions where the variant's most likely next token equals "
        "the baseline's (1.0 for the baseline).",
        better="higher",
    ),
    Metric(
        "bleu",
        "BLEU",
        f"BLEU (0-100) of the {_GENERATION}, against the text that follows each prompt.",
        better="higher",
    ),
    Metric(
        "chrf",
        "chrF",
        f"chrF (0-100) of the {_GENERATION}, against the text that follows each prompt.",
        better="higher",
    ),
    Metric(
        "bleu_fidelity",
        "BLEU vs baseline",
        f"BLEU (0-100) of the {_GENERATION}, against the baseline's continuations of the same "
        "prompts: 100 means the same text.",
        better="higher",
    ),
    Metric(
        "chrf_fidelity",
        "chrF vs baseline",
        f"chrF (0-100) of the {_GENERATION}, against the baseline's continuations.",
        better="higher",
    ),
)
CATALOG = (*CATALOG, *QUALITY)

SHORTFALL_OF: dict[str, float] = {
    "top1_accuracy": 1.0,
    "top1_agreement": 1.0,
    "bleu": 100.0,
    "chrf": 100.0,
    "bleu_fidelity": 100.0,
    "chrf_fidelity": 100.0,
}
"""Higher-is-better metrics and their best value: ``<key>_shortfall`` = best - value, lower is
better, so a sweep (which minimises, and caps with ``max``) can use them."""

RATIO_OF: tuple[str, ...] = (
    "perplexity",
    "weight_bytes",
    "param_count",
    "saved_bytes",
    "peak_rss_bytes",
    "model_rss_bytes",
    "gpu_peak_bytes",
)
"""Metrics that get a ``<key>_ratio`` = value / the baseline's value of the same run."""

QUANTIZED_RATIO = "quantized_layer_bytes_ratio"
"""Bytes of the quantized layers relative to their fp32 size, within the same variant."""

BY_KEY: dict[str, Metric] = {m.key: m for m in CATALOG}
for _key in RATIO_OF:
    BY_KEY[f"{_key}_ratio"] = Metric(
        f"{_key}_ratio",
        f"{BY_KEY[_key].label} x baseline",
        f"{_key} divided by the baseline's value of the same run.",
        "x",
        BY_KEY[_key].better,
        objective=BY_KEY[_key].objective,
    )
BY_KEY[QUANTIZED_RATIO] = Metric(
    QUANTIZED_RATIO,
    "quantized-layer bytes x fp32",
    "bytes of the quantized layers after conversion over the same layers' bytes before "
    "(fp32), within one variant.",
    "x",
    "lower",
)

for _key, _best in SHORTFALL_OF.items():
    BY_KEY[f"{_key}_shortfall"] = Metric(
        f"{_key}_shortfall",
        f"{BY_KEY[_key].label} shortfall",
        f"{_best:g} minus {_key}: lower is better.",
        better="lower",
        objective=True,
    )

MEASURED_KEYS: tuple[str, ...] = tuple(m.key for m in CATALOG)
ALL_KEYS: tuple[str, ...] = tuple(BY_KEY)


def objectives() -> dict[str, str]:
    """Metrics a sweep can minimise, constrain or recommend by: key -> label."""
    return {k: m.label for k, m in BY_KEY.items() if m.objective}


def definitions() -> dict[str, str]:
    """Key -> definition of every measured metric and of the ratios, for the report's "what
    the numbers mean" section."""
    out = {m.key: m.definition for m in CATALOG}
    out["*_ratio"] = (
        f"the metric divided by the baseline's value of the same run ({', '.join(RATIO_OF)}); "
        "latency_ratio is measured paired, see above."
    )
    out[QUANTIZED_RATIO] = BY_KEY[QUANTIZED_RATIO].definition
    out["*_shortfall"] = (
        "the best possible value minus the metric (1 for top1_accuracy and top1_agreement, 100 "
        "for bleu, chrf, bleu_fidelity, chrf_fidelity): the form a sweep minimises or caps."
    )
    return out


@dataclass
class Measurement:
    """One variant's measured numbers (None where not measured). Keys are catalog keys."""

    perplexity: float | None = None
    perplexity_lo: float | None = None
    perplexity_hi: float | None = None
    ppl_delta: float | None = None
    ppl_delta_lo: float | None = None
    ppl_delta_hi: float | None = None
    ppl_within_noise: bool | None = None
    control_perplexity: float | None = None
    perplexity_control_ratio: float | None = None
    ppl_delta_control: float | None = None
    ppl_delta_control_lo: float | None = None
    ppl_delta_control_hi: float | None = None
    ppl_control_within_noise: bool | None = None
    nll: float | None = None
    eval_tokens: int | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    latency_baseline_ms: float | None = None
    latency_ratio: float | None = None
    latency_ratio_lo: float | None = None
    latency_ratio_hi: float | None = None
    latency_noisy: bool | None = None
    latency_rounds: int | None = None
    load_avg_before: float | None = None
    load_avg_after: float | None = None
    cpu_steal: float | None = None
    weight_bytes: int | None = None
    quantized_layer_bytes: int | None = None
    quantized_layer_fp32_bytes: int | None = None
    bits_per_weight: float | None = None
    sparsity: float | None = None
    quantized_modules: int | None = None
    param_count: int | None = None
    saved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    model_rss_bytes: int | None = None
    gpu_peak_bytes: int | None = None
    rss_after_load_bytes: int | None = None
    rss_after_import_bytes: int | None = None
    # accuracy and generation (QUALITY)
    top1_accuracy: float | None = None
    top1_agreement: float | None = None
    bleu: float | None = None
    chrf: float | None = None
    bleu_fidelity: float | None = None
    chrf_fidelity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The measured values and, derived from them, every ``<key>_shortfall``."""
        out = asdict(self)
        out.update(shortfalls(out))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """The catalog's keys of ``data`` (other keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


MEASURED_ALWAYS: tuple[str, ...] = (
    "perplexity",
    "nll",
    "eval_tokens",
    "latency_ms",
    "latency_baseline_ms",
    "latency_ratio",
    "weight_bytes",
    "param_count",
    "saved_bytes",
)
"""The metrics every measured variant has (the others depend on its stages or settings)."""


def measurement_problem(data: Any) -> str | None:
    """Why ``data`` is not a complete :meth:`Measurement.to_dict` record (every catalog key,
    integers where the catalog has integers, finite numbers, :data:`MEASURED_ALWAYS` present),
    or None when it is one. For records read back from storage or a cache."""
    if not isinstance(data, dict):
        return f"not a mapping but {type(data).__name__}"
    for f in fields(Measurement):
        if f.name not in data:
            return f"no {f.name!r}"
        value = data[f.name]
        if value is None:
            if f.name in MEASURED_ALWAYS:
                return f"{f.name!r} is missing its value"
            continue
        if str(f.type).startswith("bool"):  # a flag (latency_noisy, ppl_within_noise)
            if not isinstance(value, bool):
                return f"{f.name!r} is {value!r}, not true or false"
            continue
        wanted = int if str(f.type).startswith("int") else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            return f"{f.name!r} is {value!r}, not {'an integer' if wanted is int else 'a number'}"
        if not math.isfinite(value):
            return f"{f.name!r} is {value!r}"
    return None


def as_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, or NaN."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def ratio(num: Any, den: Any) -> float | None:
    """num / den as a float; None when either is missing (None/NaN) or den is 0."""
    a, b = as_float(num), as_float(den)
    if a is None or b is None or b == 0:
        return None
    return a / b


def shortfalls(row: dict[str, Any]) -> dict[str, float | None]:
    """``<key>_shortfall`` = best value - value for every metric of SHORTFALL_OF (None where
    the value is missing)."""
    out: dict[str, float | None] = {}
    for key, best in SHORTFALL_OF.items():
        value = as_float(row.get(key))
        out[f"{key}_shortfall"] = None if value is None else best - value
    return out


def ratios(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """The ``*_ratio`` metrics of ``row`` against ``baseline`` (both flat metric dicts)."""
    out = {f"{k}_ratio": ratio(row.get(k), baseline.get(k)) for k in RATIO_OF}
    out[QUANTIZED_RATIO] = ratio(
        row.get("quantized_layer_bytes"), row.get("quantized_layer_fp32_bytes")
    )
    return out
