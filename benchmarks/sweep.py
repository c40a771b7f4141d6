"""Benchmark the default sweep: its wall time and front, a re-run, and trials/hour by workers.

    python benchmarks/sweep.py [--recipe recipes/sweep.yaml] [--minutes 5]
                               [--phases full,workers,kill]

1. ``full``: runs ``python -m compress.run recipes/sweep.yaml`` as a user would, in a cache
   folder that shares the user's cached baseline but starts with no sweep results (and again,
   as the command tells a user to, if the recipe's time cap ended it before its trial budget).
   Records its wall time, the trials by state, the Pareto front, and for each seeded
   single-technique variant the sampled trials that dominate it and by how much (read from
   the run's own trials.json).
2. Then runs the same command once more: a finished sweep must measure nothing (no trial
   lines) and end in seconds.
3. ``workers``: trials per hour with 1 and then 2 local workers: the same search space, a
   fresh study and an empty result cache each, ``--minutes`` of sweeping each
   (``timeout_minutes``), counting the trials that were measured (not reused) per hour.
4. ``kill``: a short sweep of the same recipe is killed (SIGKILL to the whole command)
   while a trial runs, then started again after the heartbeat grace period; every trial that
   had completed must still be there with the same values and must not run again, and the
   killed trial must be failed and run again once.

Writes tidy rows (what, config, metric, value, machine) to ``benchmarks/results/sweep.csv``
and a readable summary to ``benchmarks/results/sweep.md``; the phases not run keep their
earlier rows and section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress.cache import cache_dir  # noqa: E402
from compress.evaluate.latency import quartiles  # noqa: E402
from compress.workbench import environment  # noqa: E402

TRIAL_LINE = re.compile(r"^\[\d+/\d+\] trial (\d+) ", re.M)


def fresh_cache(base: Path) -> Path:
    """A cache folder that links the user's cached corpora, tokenizers and baselines but has
    no sweep results, so every trial is measured."""
    root = Path(tempfile.mkdtemp(prefix="compress-bench-cache-", dir=base))
    for entry in cache_dir().iterdir():
        if entry.name != "sweep-results":
            (root / entry.name).symlink_to(entry)
    return root


def command(recipe: Path, report: Path, cache: Path, *extra: str) -> dict:
    """``subprocess`` arguments for ``python -m compress.run RECIPE`` into ``report``, with
    ``cache`` as its cache folder."""
    return {
        "args": [
            sys.executable,
            "-m",
            "compress.run",
            str(recipe),
            "--report-dir",
            str(report),
            "--no-progress",
            *extra,
        ],
        "cwd": REPO,
        "env": {**os.environ, "COMPRESS_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)},
    }


def run(recipe: Path, report: Path, cache: Path, *extra: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(**command(recipe, report, cache, *extra), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{recipe} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def kill_and_restart(recipe: dict, work: Path) -> tuple[list[tuple[str, str, float]], list[str]]:
    """Phase 4: SIGKILL a running sweep mid-trial, restart it, check nothing completed is lost."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grace = 20
    killed = dict(recipe)
    killed["sweep"] = {
        **recipe["sweep"],
        "trials": len(recipe["sweep"].get("seeds", {})) + 4,  # baseline, seeds, 3 sampled
        "heartbeat": {"interval": 5, "grace": grace},
    }
    killed["sweep"].pop("timeout_minutes", None)
    path = work / "killed.yaml"
    path.write_text(yaml.safe_dump(killed, sort_keys=False))
    report, cache = work / "killed", fresh_cache(work)
    proc = subprocess.Popen(
        **command(path, report, cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    storage = f"sqlite:///{report / 'sweep.db'}"
    victim = None
    while victim is None and proc.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=killed["name"], storage=storage)
        except Exception:  # not created yet
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else time.time()
            if t.number >= 3 and time.time() - started > 3:  # well inside the trial
                victim = t.number
                os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if victim is None:
        sys.exit("kill and restart: the sweep ended before a trial could be killed")
    study = optuna.load_study(study_name=killed["name"], storage=storage)
    before = {t.number: t.values for t in study.get_trials() if t.state.name == "COMPLETE"}
    time.sleep(grace + 2)
    seconds, out = run(path, report, cache)
    ran = {int(n) for n in TRIAL_LINE.findall(out)}
    study = optuna.load_study(study_name=killed["name"], storage=storage)
    after = {t.number: t for t in study.trials}
    done = {n for n, t in after.items() if t.state.name == "COMPLETE"}
    lost = [n for n, v in before.items() if n not in done or after[n].values != v]
    rerun = sorted(ran & set(before))
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == victim]
    retried_ok = sum(t.number in done for t in retries)
    rows = [
        ("kill", "killed_trial", victim),
        ("kill", "completed_before_kill", len(before)),
        ("kill", "completed_lost", len(lost)),
        ("kill", "completed_run_again", len(rerun)),
        ("kill", "killed_trial_state_after", after[victim].state.name),
        ("kill", "killed_trial_retries_completed", retried_ok),
        ("kill", "restart_wall_seconds", round(seconds, 1)),
        ("kill", "completed_after_restart", len(done)),
    ]
    md = [
        "## Kill and restart",
        "",
        stamp(),
        "",
        f"A sweep of the same recipe with a budget of {killed['sweep']['trials']} trials was "
        f"killed (SIGKILL to the whole command) while trial {victim} was running, "
        f"after {len(before)} trials had completed, and started again {grace + 2} s later "
        f"(heartbeat grace {grace} s).",
        "",
        f"- Completed trials lost: **{len(lost)}**; run again: **{len(rerun)}**.",
        f"- The killed trial {victim}: {after[victim].state.name.lower()}, then run again "
        f"{len(retries)} time(s), {retried_ok} completed.",
        f"- The restart took {seconds:.0f} s and ended with {len(done)} completed trials.",
        "",
    ]
    return rows, md


def stamp() -> str:
    """When and from which commit a section was measured (phases can be re-run alone)."""
    rev = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return f"_Measured {time.strftime('%Y-%m-%d')} at commit {rev or 'unknown'}._"


def load(report: Path) -> tuple[list[dict], dict]:
    doc = json.loads((report / "trials.json").read_text())
    return doc["rows"], doc["meta"]


def sweeping_hours(report: Path, study: str) -> tuple[int, float, list[float]]:
    """(trials measured, hours from the start of the first trial after the baseline (trial
    0, measured before the workers start) to the last completion, the baseline's latency in
    each measured trial's paired timing), read from the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    st = optuna.load_study(study_name=study, storage=f"sqlite:///{report / 'sweep.db'}")
    trials = [t for t in st.trials if t.number > 0 and t.datetime_complete is not None]
    measured = [
        t for t in trials if t.state.name == "COMPLETE" and not t.user_attrs.get("cached_from")
    ]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    base_ms = [
        t.user_attrs["latency_baseline_ms"]
        for t in measured
        if t.user_attrs.get("pipeline") and t.user_attrs.get("latency_baseline_ms")
    ]
    return len(measured), (end - start).total_seconds() / 3600, base_ms


def spread(samples: list[float]) -> tuple[float, float, float]:
    """(median, IQR as a fraction of the median, largest deviation from the median as one)."""
    q1, med, q3 = quartiles(samples)
    return med, (q3 - q1) / med, max(abs(x - med) for x in samples) / med


def full_phase(recipe_path: Path, recipe: dict, work: Path) -> tuple[list, list[str]]:
    """Phase 1 and 2: the default sweep as a user runs it (again while its time cap cut it
    short), then a re-run of the finished sweep."""
    budget = recipe["sweep"]["trials"]
    report = work / "full"
    cache = fresh_cache(work)
    invocations = []
    while True:  # a run that its timeout_minutes cut short is continued, as the CLI says
        seconds, _ = run(recipe_path, report, cache)
        trials, meta = load(report)
        done = sum(1 for t in trials if t["state"] == "COMPLETE")
        invocations.append((seconds, done))
        if done >= budget or len(invocations) == 3:
            break
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    reused = sum(1 for t in trials if t["state"] == "COMPLETE" and t.get("cached_from"))
    sweep = meta["sweep"]
    objectives = ", ".join(o[0] if isinstance(o, list) else str(o) for o in sweep["objectives"])
    covers = "yes" if sweep["front_covers_seeds"] else "NO"
    total = sum(sec for sec, _ in invocations)
    rows: list[tuple[str, str, float | int | str]] = [
        ("full", "wall_seconds", round(total, 1)),
        ("full", "invocations", len(invocations)),
        ("full", "trials_budget", budget),
        ("full", "front_size", len(sweep["front"])),
        ("full", "front_configurations", len(sweep["front_configurations"])),
        ("full", "front_covers_seeds", int(bool(sweep["front_covers_seeds"]))),
        ("full", "trials_reused", reused),
    ]
    rows += [
        (f"invocation={i + 1}", "wall_seconds", round(sec, 1))
        for i, (sec, _) in enumerate(invocations)
    ]
    rows += [
        (f"invocation={i + 1}", "trials_complete_after", n) for i, (_, n) in enumerate(invocations)
    ]
    rows += [("full", f"trials_{s.lower()}", n) for s, n in sorted(states.items())]
    train = meta["baseline"]["train"]
    rows += [("baseline", k, train[k]) for k in ("steps", "stopped_by", "seconds", "best_val_loss")]
    base = next(t for t in trials if t["number"] == 0)
    rows.append(("baseline", "perplexity", base["perplexity"]))
    again_seconds, again_out = run(recipe_path, report, cache)
    measured_again = TRIAL_LINE.findall(again_out)
    trials_again, _ = load(report)
    rows += [
        ("rerun", "wall_seconds", round(again_seconds, 1)),
        ("rerun", "trials_run", len(measured_again)),
        ("rerun", "trials_total_before", len(trials)),
        ("rerun", "trials_total_after", len(trials_again)),
    ]
    cap = recipe["sweep"].get("timeout_minutes")
    runs = "; ".join(
        f"run {i + 1}: {sec / 60:.1f} min, {n} complete" for i, (sec, n) in enumerate(invocations)
    )
    md = [
        f"## Default sweep (`{recipe_path.relative_to(REPO)}`, baseline cached)",
        "",
        stamp(),
        "",
        f"- Baseline: trained {train['steps']} steps (stopped by {train['stopped_by']} after "
        f"{train['seconds']:.0f} s), test perplexity {base['perplexity']:.2f}.",
        f"- Wall time: **{total / 60:.1f} min** for {len(trials)} trials "
        f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))}; "
        f"{reused} reused a result of an identical earlier configuration), in "
        f"{len(invocations)} invocation(s) of the command"
        + (f" (its time cap is {cap:g} min; {runs})" if len(invocations) > 1 else "")
        + ".",
        f"- Pareto front: {len(sweep['front_configurations'])} configurations "
        f"({len(sweep['front'])} trials) over {objectives}. "
        f"Front never worse than the seeds: **{covers}**.",
        f"- Re-run of the finished sweep: **{again_seconds:.1f} s**, "
        f"{len(measured_again)} trials run, trials {len(trials)} -> {len(trials_again)}.",
        "",
        "### Seeded single-technique variants and the sampled trials that beat them",
        "",
        "Each ratio is the sampled trial's value divided by the seed's (lower is better); "
        "a sampled trial listed here is no worse on every objective and better on one.",
        "",
        "| seed | trial | perplexity | latency (x baseline) | weight MB | beaten by (best 3) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    by_number = {t["number"]: t for t in trials}
    for s in sweep["seed_comparison"]:
        v = s.get("values") or {}
        beaten = []
        for d in (s.get("dominated_by") or [])[:3]:
            r = d.get("ratios", {})
            t = by_number.get(d.get("trial"), {})
            beaten.append(
                f"trial {d.get('trial')} `{t.get('stages', '')}`: ppl "
                f"{r.get('perplexity', float('nan')):.3f}x, latency "
                f"{r.get('latency_ratio', float('nan')):.3f}x, weights "
                f"{r.get('weight_bytes', float('nan')):.3f}x"
            )
        n_beat = len(s.get("dominated_by") or [])
        md.append(
            f"| {s['seed']} | {s['trial']} | {v.get('perplexity', float('nan')):.2f} | "
            f"{v.get('latency_ratio', float('nan')):.3f} | "
            f"{v.get('weight_bytes', float('nan')) / 1e6:.2f} | "
            + (f"{n_beat}: " + "; ".join(beaten) if beaten else "none (on the front)")
            + " |"
        )
        rows.append((f"seed:{s['seed']}", "dominated_by_sampled", n_beat))
    md += [
        "",
        "### Pareto front",
        "",
        "| trial | kind | stages | perplexity | latency x | weight MB |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for n in sweep["front_configurations"]:
        t = by_number[n]
        md.append(
            f"| {n} | {t.get('seed') or 'sampled'} | `{t.get('stages') or 'baseline'}` | "
            f"{t['perplexity']:.2f} | {t['latency_ratio']:.3f} | "
            f"{t['weight_bytes'] / 1e6:.2f} |"
        )
        rows.append((f"front:{n}", "perplexity", t["perplexity"]))
        rows.append((f"front:{n}", "latency_ratio", t["latency_ratio"]))
        rows.append((f"front:{n}", "weight_bytes", t["weight_bytes"]))
    md.append("")
    return rows, md


def workers_phase(recipe: dict, work: Path, minutes: float) -> tuple[list, list[str]]:
    """Phase 3: trials per hour with 1 then 2 local workers, same space, fresh study and
    result cache each."""
    timed = dict(recipe)
    timed["sweep"] = {**recipe["sweep"], "trials": 1000, "timeout_minutes": minutes}
    timed_path = work / "timed.yaml"
    timed_path.write_text(yaml.safe_dump(timed, sort_keys=False))
    rows: list[tuple[str, str, float | int | str]] = []
    md = [
        f"## Trials per hour by local workers ({minutes:g} min of sweeping each)",
        "",
        stamp(),
        "",
        "The baseline is timed again inside every measured trial (paired latency), so the spread",
        "of those baseline timings shows whether workers disturbed each other's measurements.",
        "",
        "| workers | trials measured | sweeping hours | trials / hour | vs 1 worker | "
        "baseline ms in trials: median | IQR / median | max deviation |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    per_hour: dict[int, float] = {}
    for workers in (1, 2):
        report = work / f"w{workers}"
        study = f"w{workers}"
        run(timed_path, report, fresh_cache(work), "--workers", str(workers), "--study", study)
        n, hours, base_ms = sweeping_hours(report, study)
        per_hour[workers] = n / hours
        med, iqr, dev = spread(base_ms)
        rows += [
            (f"workers={workers}", "trials_measured", n),
            (f"workers={workers}", "sweeping_hours", round(hours, 4)),
            (f"workers={workers}", "trials_per_hour", round(n / hours, 1)),
            (f"workers={workers}", "baseline_latency_ms_median", round(med, 2)),
            (f"workers={workers}", "baseline_latency_iqr_fraction", round(iqr, 4)),
            (f"workers={workers}", "baseline_latency_max_deviation_fraction", round(dev, 4)),
        ]
        md.append(
            f"| {workers} | {n} | {hours:.3f} | {n / hours:.0f} | "
            f"{per_hour[workers] / per_hour[1]:.2f}x | {med:.2f} | {iqr:.3f} | {dev:.3f} |"
        )
    md += [
        "",
        "Both worker counts sample the same space from their own fresh study, so they measure "
        "somewhat different trials (distillation makes some trials much longer than others).",
        "",
    ]
    return rows, md


# phase -> (the CSV configs it writes, the heading of its section in sweep.md)
PHASES = {
    "full": (("full", "invocation=", "rerun", "seed:", "front:", "baseline"), "## Default sweep"),
    "workers": (("workers=",), "## Trials per hour"),
    "kill": (("kill",), "## Kill and restart"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "sweep.yaml")
    p.add_argument("--minutes", type=float, default=5.0, help="sweeping time per worker count")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated phases to run (full, workers, kill); the results of the others "
        "are kept from the committed files",
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in phases if x not in PHASES]
    if unknown:
        p.error(f"--phases: unknown {', '.join(unknown)}; allowed: {', '.join(PHASES)}")

    work = Path(tempfile.mkdtemp(prefix="compress-bench-sweep-"))
    recipe = yaml.safe_load(args.recipe.read_text())
    results: dict[str, tuple[list, list[str]]] = {}
    if "full" in phases:
        results["full"] = full_phase(args.recipe, recipe, work)
    if "workers" in phases:
        results["workers"] = workers_phase(recipe, work, args.minutes)
    if "kill" in phases:
        results["kill"] = kill_and_restart(recipe, work)

    env_info = environment()
    machine = machine_name(env_info)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / "sweep.csv", args.out / "sweep.md"
    old_rows = csv_path.read_text().splitlines()[1:] if csv_path.is_file() else []
    old_md = md_path.read_text() if md_path.is_file() else ""
    old_sections = {
        heading: "## " + part.rstrip("\n") + "\n"
        for part in old_md.split("\n## ")[1:]
        for _, heading in PHASES.values()
        if ("## " + part).startswith(heading)
    }
    lines = ["what,config,metric,value,machine"]
    body: list[str] = []
    for phase, (configs, heading) in PHASES.items():
        if phase in results:
            rows, md = results[phase]
            lines += [f'sweep,{c},{m},{v},"{machine}"' for c, m, v in rows]
            body += md
        else:  # kept as measured before
            lines += [r for r in old_rows if r.split(",")[1].startswith(configs)]
            if heading in old_sections:
                body += old_sections[heading].splitlines() + [""]
    csv_path.write_text("\n".join(lines) + "\n")
    head = [
        "# Sweep benchmark",
        "",
        f"Machine: {machine}; Python {platform.python_version()}. "
        f"Written by `python benchmarks/sweep.py`; each section says when and from which "
        f"commit it was measured, and the machine is in every CSV row.",
        "",
    ]
    md_path.write_text("\n".join(head + body))
    print("\n".join(head + body))


if __name__ == "__main__":
    main()
