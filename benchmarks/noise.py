"""How far a latency ratio's confidence interval can be trusted, idle and under load.

    python benchmarks/noise.py [--recipe recipes/int8.yaml] [--reps 3] [--reference-rounds 200]

On the recipe's baseline and its first variant (the default recipe: bitsandbytes int8):

1. A long reference run: ``--reference-rounds`` alternating rounds; its ratio of medians is the
   reference ratio.
2. ``--reps`` measurements exactly as a run makes them (``eval.latency``: at least ``repeats``
   rounds, then more until the 95% interval is within ``ci_target`` or ``max_seconds`` is
   spent), first with no synthetic load, then with ``--load-procs`` busy-loop processes
   running beside them, alternating reps of the two conditions.

For each condition: how often the interval contains the reference ratio, how wide the
intervals are (half-width / ratio), how many were marked noisy, rounds, seconds, and the load
average and CPU steal during them. The machine's own background load is whatever it is, and is
recorded. Writes tidy rows (what, config, metric, value, machine) to
``benchmarks/results/noise.csv`` and a summary to ``benchmarks/results/noise.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress.cache import stable_hash  # noqa: E402
from compress.evaluate.latency import interleaved_latency, paired_ratio  # noqa: E402
from compress.evaluate.load import LoadProbe  # noqa: E402
from compress.evaluate.uncertainty import ratio_of_medians  # noqa: E402
from compress.recipe import load_recipe, recipe_from_dict  # noqa: E402
from compress.runtime import tune_allocator  # noqa: E402
from compress.workbench import (  # noqa: E402
    BASELINE,
    _threads,
    build_variant,
    environment,
    prepare,
)

BUSY_LOOP = "while True:\n    pass\n"


def start_load(procs: int) -> list[subprocess.Popen]:
    """``procs`` busy loops, the i-th pinned to the i-th CPU this process may use (where the
    platform can pin), so the load is one whole core each rather than the scheduler's choice."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    running = []
    for i in range(procs):
        pin = None
        if cpus:
            core = cpus[i % len(cpus)]

            def pin(core: int = core) -> None:
                os.sched_setaffinity(0, {core})

        running.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=pin))
    return running


def stop_load(running: list[subprocess.Popen]) -> None:
    for proc in running:
        proc.terminate()
    for proc in running:
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "int8.yaml")
    p.add_argument("--reps", type=int, default=3, help="measurements per condition")
    p.add_argument("--reference-rounds", type=int, default=200)
    p.add_argument("--load-procs", type=int, default=1, help="busy-loop processes under load")
    p.add_argument(
        "--min-rounds", type=int, help="override eval.latency.repeats (the minimum rounds)"
    )
    p.add_argument(
        "--accept-partial",
        action="store_true",
        help="use a partial cached baseline as it is (train.partial: accept) instead of "
        "resuming its training first; the results say how many steps it had",
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    allocator = tune_allocator()  # as `python -m compress.run` does
    recipe = load_recipe(args.recipe)
    if args.accept_partial:
        data = yaml.safe_load(args.recipe.read_text())
        data.setdefault("train", {})["partial"] = "accept"
        recipe = recipe_from_dict(data, str(args.recipe), default_name=args.recipe.stem)
    ws = prepare(recipe, args.recipe.resolve().parent, progress=False)
    if ws.baseline_info.partial:
        print(f"note: {ws.baseline_info.headline()}", file=sys.stderr)
    spec = recipe.variants[0]
    variant, _ = build_variant(ws, spec, {BASELINE: ws.baseline})
    lat = recipe.eval.latency
    min_rounds = args.min_rounds or lat.repeats
    threads = _threads(recipe)

    def shape(**kw):
        return dict(
            vocab_size=ws.input_vocab,
            batch_size=lat.batch_size,
            seq_len=lat.seq_len,
            threads=threads,
            warmup=lat.warmup,
            **kw,
        )

    print(f"reference: {args.reference_rounds} rounds of baseline vs {spec.name}", flush=True)
    probe = LoadProbe.start()
    t0 = time.perf_counter()
    ref = interleaved_latency(
        {"baseline": ws.baseline, "variant": variant},
        **shape(repeats=args.reference_rounds, seed=recipe.seed),
    )
    ref_seconds = time.perf_counter() - t0
    ref_load = probe.finish()
    ref_ci = ratio_of_medians(ref["baseline"].samples_ms, ref["variant"].samples_ms, recipe.seed)
    reference = ref_ci.estimate
    print(
        f"reference ratio {reference:.4f} [{ref_ci.lo:.4f}, {ref_ci.hi:.4f}], {ref_seconds:.0f} s",
        flush=True,
    )

    measured: dict[str, list[dict]] = {"idle": [], "loaded": []}
    for rep in range(args.reps):
        for condition in ("idle", "loaded"):
            running = start_load(args.load_procs) if condition == "loaded" else []
            try:
                if running:
                    time.sleep(1.0)  # let the busy loops take the cores
                out = paired_ratio(
                    ws.baseline,
                    variant,
                    **shape(
                        min_rounds=min_rounds,
                        ci_target=lat.ci_target,
                        max_seconds=lat.max_seconds,
                        seed=recipe.seed + rep,
                    ),
                )
            finally:
                stop_load(running)
            row = {
                "ratio": out.ratio.estimate,
                "lo": out.ratio.lo,
                "hi": out.ratio.hi,
                "half_width_rel": out.ratio.relative_half_width,
                "covers_reference": out.ratio.contains(reference),
                "noisy": out.noisy,
                "rounds": out.rounds,
                "seconds": out.seconds,
                **out.load,
            }
            measured[condition].append(row)
            print(
                f"{condition} rep {rep}: {row['ratio']:.4f} [{row['lo']:.4f}, {row['hi']:.4f}] "
                f"±{row['half_width_rel']:.1%} noisy={row['noisy']} rounds={row['rounds']} "
                f"load {row['load_avg_before']:.1f}->{row['load_avg_after']:.1f}",
                flush=True,
            )

    # The claim under test: a ratio measured under load either lies within 10% of the quiet
    # one (the median of the idle measurements) or is marked noisy; otherwise it is silently
    # wrong.
    quiet = statistics.median(r["ratio"] for r in measured["idle"])
    for rows in measured.values():
        for r in rows:
            r["off_quiet_rel"] = abs(r["ratio"] - quiet) / quiet
            r["silently_wrong"] = r["off_quiet_rel"] > 0.10 and not r["noisy"]

    summary: dict[str, dict[str, float]] = {}
    for condition, rows in measured.items():
        summary[condition] = {
            "measurements": len(rows),
            "covers_reference": sum(r["covers_reference"] for r in rows),
            "coverage": sum(r["covers_reference"] for r in rows) / len(rows),
            "noisy": sum(r["noisy"] for r in rows),
            "median_half_width_rel": statistics.median(r["half_width_rel"] for r in rows),
            "max_half_width_rel": max(r["half_width_rel"] for r in rows),
            "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_rounds": statistics.median(r["rounds"] for r in rows),
            "median_seconds": statistics.median(r["seconds"] for r in rows),
            "median_load_avg_after": statistics.median(r["load_avg_after"] or 0 for r in rows),
            "silently_wrong": sum(r["silently_wrong"] for r in rows),
        }

    env_info = environment()
    machine = machine_name(env_info)
    config = stable_hash(
        {"recipe": recipe.model_dump(mode="json"), "reference_rounds": args.reference_rounds}, 12
    )
    lines = ["what,config,metric,value,machine"]

    def add(what: str, metric: str, value: object) -> None:
        lines.append(f'{what},{config},{metric},{value},"{machine}"')

    add("reference", "ratio", reference)
    add("reference", "ratio_lo", ref_ci.lo)
    add("reference", "ratio_hi", ref_ci.hi)
    add("reference", "rounds", args.reference_rounds)
    add("reference", "seconds", ref_seconds)
    for k, v in ref_load.items():
        add("reference", k, v)
    for condition, rows in measured.items():
        for i, row in enumerate(rows):
            for k, v in row.items():
                add(f"{condition}[{i}]", k, v)
        for k, v in summary[condition].items():
            add(condition, k, v)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise.csv").write_text("\n".join(lines) + "\n")

    md = [
        f"# Latency-ratio noise ({args.recipe.relative_to(REPO)}, baseline vs {spec.name})",
        "",
        f"Machine: {machine}; Python {platform.python_version()}; allocator: {allocator}; "
        f"measured {time.strftime('%Y-%m-%d')} by `python benchmarks/noise.py --reps "
        f"{args.reps} --reference-rounds {args.reference_rounds} --load-procs "
        f"{args.load_procs}"
        + (f" --min-rounds {args.min_rounds}" if args.min_rounds else "")
        + (" --accept-partial`." if args.accept_partial else "`."),
        "",
        f"Baseline: {ws.baseline_info.description}, {ws.baseline_info.steps_text()} of training "
        "(latency does not depend on how far it was trained; its perplexity does).",
        "",
        f"Reference: {args.reference_rounds} alternating rounds, ratio of medians "
        f"**{reference:.4f}** (95% CI {ref_ci.lo:.4f}-{ref_ci.hi:.4f}), {ref_seconds:.0f} s, "
        f"load average {ref_load['load_avg_before']:.1f} -> {ref_load['load_avg_after']:.1f}.",
        "",
        f"Each measurement as a run makes it: at least {min_rounds} rounds, more until the "
        f"95% interval is within ±{lat.ci_target:.0%} or {lat.max_seconds:g} s are spent. "
        f"'idle': no synthetic load (the "
        "machine's own background load is in the last column); 'loaded': "
        f"{args.load_procs} busy-loop process(es) beside it, each pinned to one core. "
        f"'silently wrong': more than 10% from the quiet ratio (the idle median, {quiet:.4f}) "
        "and not marked noisy.",
        "",
        "| condition | CI contains reference | noisy | silently wrong | median ±half-width "
        "| max ±half-width | median ratio | median rounds | median s | median load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for condition, s in summary.items():
        md.append(
            f"| {condition} | {s['covers_reference']} of {s['measurements']} "
            f"| {s['noisy']} of {s['measurements']} "
            f"| {s['silently_wrong']} of {s['measurements']} | {s['median_half_width_rel']:.1%} "
            f"| {s['max_half_width_rel']:.1%} | {s['median_ratio']:.4f} "
            f"| {s['median_rounds']:g} | {s['median_seconds']:.1f} "
            f"| {s['median_load_avg_after']:.1f} |"
        )
    md += [
        "",
        "Every measurement:",
        "",
        "| condition | ratio | 95% CI | noisy | off quiet | silently wrong | rounds | s "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for condition, rows in measured.items():
        for r in rows:
            md.append(
                f"| {condition} | {r['ratio']:.4f} | {r['lo']:.4f}-{r['hi']:.4f} "
                f"| {r['noisy']} | {r['off_quiet_rel']:.1%} | {r['silently_wrong']} "
                f"| {r['rounds']} | {r['seconds']:.1f} | {r['load_avg_after'] or 0:.1f} |"
            )
    (args.out / "noise.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
