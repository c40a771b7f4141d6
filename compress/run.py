"""Entry point: ``python -m compress.run RECIPE.yaml``.

Validates the recipe, prepares data and the (cached) baseline, builds and measures every
variant, writes ``reports/<name>/`` and prints a summary, where the report is, and the command
that opens the run's Optuna study in the dashboard. Exit codes: 0 success, 1 some variant
failed (the others are still reported), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from compress.errors import CompressError
from compress.evaluate import DEFINITIONS
from compress.metrics import QUALITY
from compress.models.adapter import resolve_device
from compress.preflight import check_output
from compress.recipe import Recipe, load_recipe
from compress.report import add_ratios, dashboard_command, html_table, write_report
from compress.report.curves import curve_charts, write_tensorboard
from compress.report.folder import claim
from compress.report.generation import continuations_html
from compress.report.html import charts_html
from compress.runtime import tune_allocator
from compress.storage import mask_urls
from compress.workbench import (
    BASELINE,
    VariantResult,
    Workspace,
    environment,
    prepare,
    run_variants,
)

log = logging.getLogger("compress")

QUALITY_KEYS = tuple(m.key for m in QUALITY)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m compress.run",
        description="Compress the baseline GPT as the recipe says; report what each variant costs.",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/int8.yaml")
    p.add_argument("--report-dir", type=Path, help="write the report here (default reports/<name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="keep glibc's default malloc thresholds (see compress.runtime.tune_allocator)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sweep = p.add_argument_group("sweeps (recipes with a sweep: section)")
    sweep.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    sweep.add_argument(
        "--storage",
        help="Optuna storage URL shared by every worker, e.g. "
        "postgresql+psycopg://user@host:5432/db (default: sqlite sweep.db in the report folder)",
    )
    sweep.add_argument("--study", help="study name (default: sweep.study or the recipe name)")
    sweep.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every trial's saved model under REPORT_DIR/checkpoints",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _num(v: float | None) -> str:
    """About four significant figures, never in exponent notation: 129.3, 42.31, 0.5120."""
    if v is None:
        return "-"
    a = abs(v)
    digits = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else 3
    return f"{v:.{digits}f}"


def _signed(v: float) -> str:
    """A difference with its sign: +0.10, -1.25, +123.4."""
    a = abs(v)
    return f"{v:+.{0 if a >= 1000 else 1 if a >= 100 else 2}f}"


def _ppl_delta_cell(r: dict) -> str:
    """``+0.10 [-0.05,+0.25]~``: the difference to the baseline, its 95% interval, and ``~``
    when the interval contains 0 (within noise)."""
    if r.get("ppl_delta") is None or r.get("ppl_delta_lo") is None or r["variant"] == BASELINE:
        return "-"
    cell = f"{_signed(r['ppl_delta'])} [{_signed(r['ppl_delta_lo'])},{_signed(r['ppl_delta_hi'])}]"
    return cell + ("~" if r.get("ppl_within_noise") else "")


def _latency_ms_cell(r: dict) -> str:
    if r.get("latency_ms") is None:
        return "-"
    iqr = r.get("latency_iqr_ms")
    return _num(r["latency_ms"]) + ("" if iqr is None else f"±{_num(iqr)}")


def _control_cell(r: dict) -> str:
    """``+0.60 [-0.20,+1.40]~``: a training variant's perplexity minus its compute-matched
    control's on the same windows, the 95% interval, ``~`` when it contains 0; ``control`` on a
    control's own row (which control a variant has: results.csv, column ``control``)."""
    if r.get("role") == "control":
        return "control"
    if r.get("ppl_delta_control") is None or r.get("ppl_delta_control_lo") is None:
        return "-"
    cell = (
        f"{_signed(r['ppl_delta_control'])} [{_signed(r['ppl_delta_control_lo'])},"
        f"{_signed(r['ppl_delta_control_hi'])}]"
    )
    return cell + ("~" if r.get("ppl_control_within_noise") else "")


def _latency_ratio_cell(r: dict) -> str:
    """``0.512``, with ``*`` when its interval stayed wider than asked (the interval itself is
    in results.csv and the report)."""
    if r.get("latency_ratio") is None:
        return "-"
    return f"{r['latency_ratio']:.3f}" + ("*" if r.get("latency_noisy") else "")


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def _name(r: dict, width: int = 16) -> str:
    name = str(r["variant"])
    return name if len(name) <= width else name[: width - 2] + ".."


@dataclass(frozen=True)
class Column:
    head: str
    cell: Callable[[dict], str]
    keep: int  # the table drops the lowest first while it is wider than the terminal
    legend: str = ""  # what the heading's abbreviations and the cell's marks mean
    right: bool = True


COLUMNS: tuple[Column, ...] = (
    Column("variant", _name, 100, right=False),
    Column("ppl", lambda r: _num(r.get("perplexity")), 90, "ppl = perplexity"),
    Column(
        "ppl - base [95% CI]",
        _ppl_delta_cell,
        80,
        "base = baseline; [a,b] = 95% confidence interval; ~ = within noise (it contains 0)",
        right=False,
    ),
    Column(
        "ppl - ctrl [95% CI]",
        _control_cell,
        75,
        "ctrl = the baseline trained like the variant (compute-matched control)",
        right=False,
    ),
    Column("lat ms", _latency_ms_cell, 40, "lat ms = median forward pass ± interquartile range"),
    Column(
        "lat x",
        _latency_ratio_cell,
        70,
        "x = ratio to the baseline (latency: paired); * = noisy (interval wider than "
        "eval.latency.ci_target)",
    ),
    Column("size x", lambda r: _fmt(r.get("weight_bytes_ratio"), ".3f"), 60, "size = weight bytes"),
    Column(
        "RSS MB",
        lambda r: _mb(r.get("peak_rss_bytes")),
        20,
        "RSS = peak resident memory of a fresh process",
    ),
    Column("GPU MB", lambda r: _mb(r.get("gpu_peak_bytes")), 15, "GPU = peak GPU memory"),
    Column(
        "top-1", lambda r: _fmt(r.get("top1_accuracy"), ".3f"), 30, "top-1 = next-token accuracy"
    ),
    Column(
        "chrF fid",
        lambda r: _fmt(r.get("chrf_fidelity"), ".1f"),
        10,
        "chrF fid = chrF against the baseline's continuations",
    ),
    Column("status", lambda r: "ok" if r["status"] == "ok" else "FAILED", 95, right=False),
)
"""The terminal summary's columns, in display order; every metric is in results.csv."""


def _columns(rows: list[dict], width: int) -> tuple[list[Column], list[list[str]], list[int]]:
    """The columns that fit in `width` (the least important left out first), each row's
    cells and the columns' widths."""
    cols = [
        c
        for c in COLUMNS
        if (c.head != "GPU MB" or any(r.get("gpu_peak_bytes") is not None for r in rows))
        and (c.cell is not _control_cell or any(r.get("role") == "control" for r in rows))
    ]
    while True:
        cells = [[c.cell(r) for c in cols] for r in rows]
        widths = [max(len(c.head), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
        if sum(widths) + 2 * (len(cols) - 1) <= width or len(cols) <= 3:
            return cols, cells, widths
        cols.remove(min(cols, key=lambda c: c.keep))


def summary_table(rows: list[dict], width: int = 80) -> str:
    """The variants side by side in at most `width` columns: the least important columns
    are left out while the table is wider (all of them are in results.csv)."""
    cols, cells, widths = _columns(rows, width)

    def fmt(items: list[str]) -> str:
        return "  ".join(
            (item.rjust(w) if c.right else item.ljust(w))
            for item, w, c in zip(items, widths, cols, strict=True)
        ).rstrip()

    out = [fmt([c.head for c in cols]), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in cells]
    return "\n".join(out)


def legend(rows: list[dict], width: int = 80) -> str:
    """What the abbreviations and marks of the columns :func:`summary_table` shows mean."""
    cols, _, _ = _columns(rows, width)
    return "; ".join(c.legend for c in cols if c.legend) + "."


def say(text: str, width: int = 80, indent: str = "") -> None:
    """Print `text` wrapped at `width` columns, after `indent`; continuation lines indented
    two more spaces."""
    for line in textwrap.wrap(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,
    ):
        print(line, flush=True)


def summary_lines(rows: list[dict], recipe: Recipe, width: int = 80) -> list[str]:
    """What the terminal shows after a run: the table, its legend, why each failed variant
    failed and which numbers are noise, every line at most `width` characters."""

    def wrap(text: str) -> list[str]:
        return textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)

    lines = summary_table(rows, width).splitlines()
    lines += wrap(legend(rows, width))
    for r in rows:
        if r["status"] != "ok":
            lines += wrap(f"FAILED {r['variant']}: {r.get('error')}")
    for note in noise_notes(rows, recipe):
        lines += wrap(note)
    return lines


def noise_notes(rows: list[dict], recipe: Recipe) -> list[str]:
    """A line per variant whose numbers the data cannot back: a noisy latency ratio, a
    perplexity change within noise."""
    out = []
    target = recipe.eval.latency.ci_target
    for r in rows[1:]:
        if r.get("latency_noisy"):
            out.append(
                f"noise: {r['variant']}: latency ratio {r['latency_ratio']:.3f} is NOISY (95% CI "
                f"{r['latency_ratio_lo']:.3f}-{r['latency_ratio_hi']:.3f}, wider than "
                f"±{target:.0%} after {r.get('latency_rounds')} rounds; load average "
                f"{_fmt(r.get('load_avg_before'), '.1f')} -> "
                f"{_fmt(r.get('load_avg_after'), '.1f')})"
            )
        if r.get("ppl_control_within_noise"):
            out.append(
                f"noise: {r['variant']}: perplexity change against its control "
                f"{r.get('control')} ({r['ppl_delta_control']:+.3f}) is within noise (95% CI "
                f"{r['ppl_delta_control_lo']:+.3f} to {r['ppl_delta_control_hi']:+.3f} contains 0)"
            )
        if r.get("ppl_within_noise"):
            out.append(
                f"noise: {r['variant']}: perplexity change {r['ppl_delta']:+.3f} is within noise "
                f"(95% CI {r['ppl_delta_lo']:+.3f} to {r['ppl_delta_hi']:+.3f} contains 0)"
            )
    return out


def training_curves(ws: Workspace, results: list[VariantResult]) -> dict[str, list[dict]]:
    """Every training phase's per-step records: ``baseline`` (the built-in GPT, trained now or
    cached with its curve) and ``<variant>/<stage>`` for each stage that trained."""
    curves: dict[str, list[dict]] = {}
    train = ws.baseline_info.train
    if train and train.get("curve"):
        curves["baseline"] = train["curve"]
    for r in results:
        names = [rep.stage for rep in r.stages]
        for i, rep in enumerate(r.stages):
            if rep.curve:
                stage = rep.stage if names.count(rep.stage) == 1 else f"{rep.stage}-{i}"
                curves[f"{r.name}/{stage}"] = rep.curve
    return curves


def _curves_section(curves: dict[str, list[dict]], tb_dir: Path) -> str:
    if not curves:
        return (
            "<p>No training in this run has a recorded curve (a Hugging Face baseline is not "
            "trained; a baseline cached before curves were recorded has none).</p>"
        )
    return (
        f"<p>Per step: loss, learning rate, gradient norm and tokens/s in TensorBoard: "
        f"<code>tensorboard --logdir {html.escape(str(tb_dir))}</code>. Below: training loss "
        "at every step and validation loss where it was measured.</p>"
        + charts_html(curve_charts(curves))
    )


def _generation_section(ws: Workspace, results: list[VariantResult]) -> str:
    ref = ws.reference()
    gen = ws.recipe.eval.generation
    columns = [(r.name, r.continuations) for r in results if r.continuations is not None]
    intro = (
        f"<p>{gen.prompts} prompts of {gen.prompt_tokens} held-out tokens, each continued "
        f"greedily for {gen.new_tokens} tokens; BLEU and chrF in the summary score these "
        "continuations against the reference text and against the baseline's. The first "
        f"{min(3, gen.prompts)}:</p>"
    )
    return intro + continuations_html(ref.prompts, ref.references, columns)


def _sections(
    ws: Workspace,
    results: list[VariantResult],
    rows: list[dict],
    curves: dict[str, list[dict]] | None = None,
    tb_dir: Path = Path("tb"),
) -> list[tuple[str, str]]:
    recipe = ws.recipe
    info = ws.baseline_info
    base = rows[0]
    ppl = base.get("perplexity")
    tr = info.train
    baseline_rows = [
        {
            "what": "model",
            "value": f"{info.description}, {base.get('param_count') or 0:,} parameters",
        },
        {"what": "baseline key", "value": info.key},
        {"what": "source", "value": str(info.path)},
        {
            "what": "this run",
            "value": "trained now" if not info.cached else "loaded",
        },
        {"what": "device", "value": str(ws.device)},
    ]
    if tr is not None:
        baseline_rows += [
            {
                "what": "training",
                "value": f"{tr['steps']} steps, {tr['tokens_seen']:,} tokens, "
                f"{tr['seconds']:.1f} s, stopped by {tr['stopped_by']}"
                + (f" ({info.steps_text().upper()})" if info.partial else ""),
            },
            {"what": "best validation loss", "value": _fmt(tr.get("best_val_loss"), ".4f")},
        ]
    baseline_rows += [
        {
            "what": f"baseline perplexity ({recipe.eval.perplexity.split})",
            "value": _fmt(ppl, ".3f"),
        },
        {
            "what": f"unigram perplexity ({recipe.eval.perplexity.split})",
            "value": f"{ws.unigram_perplexity:.3f}",
        },
        {
            "what": "baseline / unigram",
            "value": _fmt(ppl / ws.unigram_perplexity if ppl else None, ".4f"),
        },
    ]
    ppl_spec, lat = recipe.eval.perplexity, recipe.eval.latency
    first = next((r for r in results if r.perplexity), None)
    first_lat = next((r for r in results if r.latency), None)
    setup_rows = [
        {"what": "corpus", "value": ws.corpus.description},
        {"what": "corpus fingerprint", "value": ws.corpus.fingerprint},
        {
            "what": "tokenizer",
            "value": (
                f"byte-level BPE trained on the train split, vocab {ws.tokenizer.vocab_size}"
                if info.train is not None
                else f"the model's own, vocab {ws.tokenizer.vocab_size}"
            )
            + f", fingerprint {ws.tokenizer.fingerprint}",
        },
        {
            "what": "tokens per split",
            "value": ", ".join(f"{k}: {v.numel():,}" for k, v in ws.tokens.items()),
        },
        {
            "what": "perplexity",
            "value": f"split {ppl_spec.split}, seq_len {ppl_spec.seq_len}, "
            f"stride {ppl_spec.stride or ppl_spec.seq_len}, "
            f"{first.perplexity.tokens if first else '-'} scored tokens",
        },
        {
            "what": "latency",
            "value": f"batch {lat.batch_size} x {lat.seq_len} tokens, "
            f"{first_lat.latency.threads if first_lat else '-'} threads, "
            f"{lat.warmup} warm-up passes, "
            f"at least {lat.repeats} interleaved rounds per variant, more until the latency "
            f"ratio's 95% interval is within ±{lat.ci_target:.0%} of it or {lat.max_seconds:g} s "
            "are spent (else it is marked noisy)",
        },
    ]
    quality_rows = [
        {
            "variant": r["variant"],
            **{k: r.get(k) for k in QUALITY_KEYS},
        }
        for r in rows
        if r["status"] == "ok"
    ]
    sections = [
        *_notes_section(run_notes(ws, ppl)),
        ("Baseline", html_table(baseline_rows)),
        ("Data and measurement settings", html_table(setup_rows)),
        ("Accuracy and generation", html_table(quality_rows)),
        ("Training curves", _curves_section(curves or {}, tb_dir)),
    ]
    if recipe.eval.generation.prompts and any(r.continuations for r in results):
        sections.append(("Greedy continuations", _generation_section(ws, results)))
    scan = _scan_section(ws, results)
    if scan:
        sections.append(("Sensitivity scan of the baseline", scan))
    for r in results:
        for rep in r.stages:
            body = (  # the per-module tables folded: one line per stage until opened
                f"<details><summary>{len(rep.touched)} modules converted, "
                f"{len(rep.skipped)} skipped, {rep.seconds:.2f} s; weight bytes "
                f"{rep.weight_bytes_before:,} &rarr; {rep.weight_bytes_after:,}</summary>"
                + html_table([{k: v for k, v in t.items() if k != "quant"} for t in rep.touched])
                + "<h4>Skipped</h4>"
                + html_table(rep.skipped)
                + "</details>"
            )
            sections.append((f"Stage report: {r.name} / {rep.stage}", body))
        if r.traceback:
            sections.append((f"Failure: {r.name}", f"<pre>{html.escape(r.traceback)}</pre>"))
    return sections


def _scan_section(ws: Workspace, results: list[VariantResult]) -> str:
    """The baseline's sensitivity scan (heat map and ranking) when a variant allocated its
    sparsity from a scan: read from the cache the stage filled, or measured now."""
    users = [
        r.name
        for r in results
        for rep in r.stages
        if rep.extra.get("allocation", "uniform") != "uniform"
    ]
    if not users:
        return ""
    from compress.scan.report import scan_section
    from compress.scan.workspace import scan_workspace

    try:
        result = scan_workspace(ws)
    except CompressError as exc:
        return f"<p>The scan could not be shown: {html.escape(str(exc))}</p>"
    names = ", ".join(html.escape(n) for n in dict.fromkeys(users))
    notes = []
    for s in sorted(
        {
            rep.config.get("sparsity", 0.5)
            for r in results
            for rep in r.stages
            if rep.extra.get("allocation", "uniform") != "uniform"
        }
    ):
        note = result.noise_note(s)
        if note and note not in notes:
            log.warning("%s", note)
            notes.append(note)
    return (
        f"<p>Allocated their sparsity from a scan: {names} (a variant that prunes a model "
        "other than the baseline, through <code>from:</code>, reads that model's scan).</p>"
        + scan_section(result, notes)
    )


def run_notes(ws: Workspace, baseline_ppl: float | None) -> list[str]:
    """What makes this run's numbers mean less: the corpus's notes (a file that looks binary)
    and a baseline no better than the unigram model (see :mod:`compress.sanity`)."""
    from compress.sanity import baseline_note

    split = ws.recipe.eval.perplexity.split
    note = baseline_note(baseline_ppl, ws.unigram_perplexity, split)
    return [*ws.corpus.notes, *([note] if note else [])]


def _notes_section(notes: list[str]) -> list[tuple[str, str]]:
    if not notes:
        return []
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return [("Notes", f"<ul>{items}</ul>")]


def _meta(
    ws: Workspace,
    results: list[VariantResult],
    seconds: float,
    curves: dict[str, list[dict]] | None = None,
) -> dict:
    """The report's metadata; its notes are also warned about here, once per run (the corpus
    warned about its own when it was read)."""
    notes = run_notes(ws, results[0].measurement.perplexity)
    for note in notes[len(ws.corpus.notes) :]:
        log.warning("%s", note)
    ref = ws.reference() if any(r.continuations is not None for r in results) else None
    return {
        "recipe": ws.recipe.name,
        "corpus": {"description": ws.corpus.description, "fingerprint": ws.corpus.fingerprint},
        "tokenizer": {
            "vocab_size": ws.tokenizer.vocab_size,
            "fingerprint": ws.tokenizer.fingerprint,
        },
        "baseline": {
            "key": ws.baseline_info.key,
            "cached": ws.baseline_info.cached,
            "description": ws.baseline_info.description,
            "source": str(ws.baseline_info.path),
            "train": None
            if ws.baseline_info.train is None
            else {k: v for k, v in ws.baseline_info.train.items() if k != "history"},
        },
        "unigram_perplexity": ws.unigram_perplexity,
        "notes": notes,
        "training": curves or {},
        "generation": None
        if ref is None
        else {"prompts": ref.prompts, "references": ref.references},
        "setup_seconds": ws.setup_seconds,
        "total_seconds": seconds,
        "variants": {
            r.name: {
                # each stage's curve is under "training", by phase
                "stages": [
                    {k: v for k, v in s.to_dict().items() if k != "curve"} for s in r.stages
                ],
                "perplexity": r.perplexity.to_dict() if r.perplexity else None,
                "latency": r.latency.to_dict() if r.latency else None,
                "rss": r.rss,
                "continuations": r.continuations,
                "layers": r.layers,
            }
            for r in results
        },
    }


def _recipe_text(recipe: Recipe, recipe_path: Path) -> str:
    """The recipe as the user wrote it (the file's text); its resolved form if the file is
    gone or unreadable by now."""
    try:
        return recipe_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def run(
    recipe: Recipe,
    recipe_path: Path,
    report_dir: Path | None,
    progress: bool,
    allocator: str = "system default",
) -> int:
    start = time.perf_counter()
    out_dir = report_dir or Path("reports") / recipe.name
    if recipe.report.dir and not report_dir:
        out_dir = Path(recipe.report.dir)
    check_output(out_dir)
    names = ", ".join(["baseline", *(v.name for v in recipe.variants)])
    with claim(out_dir, "run") as folder:  # one writer, a folder compress owns: before any work
        print(f"compress: {recipe_path} -> {out_dir}/  (variants: {names})", flush=True)
        ws = prepare(recipe, recipe_path.resolve().parent, progress=progress)
        say(f"data: {ws.corpus.description}")
        print(f"{ws.baseline_info.headline()}; setup {ws.setup_seconds:.1f} s", flush=True)
        with folder.staged() as staging:  # the previous report stays whole until the swap
            results = run_variants(ws, staging, progress=progress)
            curves = training_curves(ws, results)
            tb_dir = out_dir / "tb"  # where it will be once the staging folder is published
            write_tensorboard(staging / "tb", curves)
            rows = [r.row for r in results]
            if ws.baseline_info.partial:  # never reported as a normal result: every row says so
                rows = [{**row, "baseline_partial": ws.baseline_info.steps_text()} for row in rows]
            recipe_text = _recipe_text(recipe, recipe_path)
            seconds = time.perf_counter() - start
            written = write_report(
                staging,
                rows,
                name=recipe.name,
                recipe_text=recipe_text,
                meta=_meta(ws, results, seconds, curves),
                definitions=DEFINITIONS,
                environment={**environment(), "allocator": allocator},
                sections=_sections(ws, results, add_ratios(rows), curves, tb_dir),
            )
    paths = {key: out_dir / path.name for key, path in written.items()}
    rows = add_ratios(rows)
    print()
    for line in summary_lines(rows, recipe):
        print(line)
    print(
        f"unigram perplexity of the same tokens: {ws.unigram_perplexity:.2f}; "
        f"run took {seconds:.1f} s"
    )
    print(f"every metric of every variant: {paths['csv']}")
    print(f"report: {paths['html']}  (also {paths['json'].name})")
    print(f"dashboard: {dashboard_command(paths['study'])}")
    if curves:
        print(f"training curves: tensorboard --logdir {tb_dir}")
    if warning := ws.baseline_info.partial_warning(rows[0].get("perplexity")):
        print(f"\n{warning}", file=sys.stderr)
    n_failed = sum(r["status"] != "ok" for r in rows)
    if n_failed:
        print(f"{n_failed} of {len(rows)} variants failed; see the report", file=sys.stderr)
        return 1
    return 0


def run_sweep_cli(recipe: Recipe, args: argparse.Namespace) -> int:
    from compress.storage import command_for
    from compress.sweep.driver import run_sweep, summary

    out_dir = args.report_dir or Path(recipe.report.dir or Path("reports") / recipe.name)
    spec = recipe.sweep
    assert spec is not None
    check_output(out_dir, args.storage or spec.storage)
    print(
        f"compress: sweep {args.recipe} -> {out_dir}/  ({spec.trials} trials, objectives: "
        f"{', '.join(spec.objectives)})",
        flush=True,
    )
    with claim(out_dir, "sweep") as folder:  # shared: other sweep commands may join the study
        folder.ensure()
        outcome = run_sweep(
            recipe,
            args.recipe,
            out_dir,
            storage=args.storage,
            study=args.study,
            workers=args.workers,
            progress=not args.no_progress and args.workers == 1,
            verbose=args.verbose,
            keep_checkpoints=args.keep_checkpoints,
            echo=lambda line: print(line, flush=True),
        )
    print()
    for line in summary(outcome, spec).splitlines():
        indent = " " * (len(line) - len(line.lstrip()))
        say(line.strip(), indent=indent)
    print()
    print(f"report: {outcome.paths['html']}  (also {outcome.paths['csv'].name})")
    print(f"dashboard: {command_for(out_dir)}")
    if outcome.failed_workers:
        for failed in outcome.failed_workers:
            print(f"error: {failed}", file=sys.stderr)
        print(
            "the other workers' trials are in the study; run the same command to continue",
            file=sys.stderr,
        )
        return 1
    if outcome.interrupted:
        print(
            "interrupted: the study is consistent; run the same command to continue",
            file=sys.stderr,
        )
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    allocator = "system default" if args.default_allocator else tune_allocator()
    try:
        recipe = load_recipe(args.recipe)
        try:  # a device that is not there stops the run before any work
            resolve_device(recipe.device)
        except CompressError as exc:
            raise CompressError(f"{args.recipe}: {exc}") from None
        sweep_flags = [
            flag
            for flag, given in (
                ("--workers", args.workers != 1),
                ("--storage", args.storage),
                ("--study", args.study),
                ("--keep-checkpoints", args.keep_checkpoints),
            )
            if given
        ]
        if recipe.sweep is not None:
            return run_sweep_cli(recipe, args)
        if sweep_flags:
            raise CompressError(
                f"{args.recipe}: {', '.join(sweep_flags)} only apply to a recipe with a "
                "sweep: section (see recipes/sweep.yaml)"
            )
        return run(
            recipe, args.recipe, args.report_dir, progress=not args.no_progress, allocator=allocator
        )
    except CompressError as exc:
        print(f"error: {mask_urls(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
