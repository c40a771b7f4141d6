"""How much of each recovery beats its compute-matched control.

    python benchmarks/controls.py [--recipe benchmarks/controls.yaml] [--report DIR]

Runs ``python -m compress.run RECIPE --report-dir DIR`` (skipped when DIR already holds the
run's ``results.json`` and ``--report`` names it), then reads every variant that trains and its
control from the run's own results: its perplexity, the baseline's, the control's (the
baseline trained the same way), the change against the baseline and against the control, each
with its paired 95% interval over the same windows, and the perplexity of the model it was
trained from.

Writes tidy rows (what, config, metric, value, machine) to ``benchmarks/results/controls.csv``
and the table to ``benchmarks/results/controls.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import commit, machine, today, write_tidy  # noqa: E402

from compress.cache import stable_hash  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def run(recipe: Path, report: Path) -> None:
    cmd = [sys.executable, "-m", "compress.run", str(recipe), "--report-dir", str(report)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = subprocess.run([*cmd, "--no-progress"], cwd=REPO, env=env).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}")


def _ci(row: dict, key: str, sign: float = 1.0) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    value = row.get(key)
    if value is None or lo is None or hi is None:
        return "-"
    a, b = sorted((sign * lo, sign * hi))
    return f"{sign * value:+.2f} [{a:+.2f}, {b:+.2f}]"


def table(rows: list[dict], starts: dict[str, str]) -> tuple[list[str], list[dict]]:
    """Markdown lines and tidy rows for every variant that has a control."""
    by = {r["variant"]: r for r in rows}
    base = rows[0]
    lines = [
        "| variant | trained from (ppl) | ppl | baseline ppl | control ppl | ppl - baseline "
        "(95% CI) | control - baseline | ppl - control (95% CI) | recovery | of it beyond "
        "the control |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tidy = []
    for r in rows:
        if not r.get("control") or r.get("control_perplexity") is None:
            continue
        ctl = by[r["control"]]
        start = starts.get(r["variant"], "baseline")
        before = by[start]["perplexity"] if start != "baseline" else None
        recovery = None if before is None else before - r["perplexity"]
        # the recovery a variant owes to training alone is what the control gained over the
        # baseline; the rest (control ppl - variant ppl) is what training did beyond it
        beyond = ctl["perplexity"] - r["perplexity"]
        lines.append(
            f"| {r['variant']} | "
            + ("a new student" if before is None else f"{start} ({before:.2f})")
            + f" | {r['perplexity']:.2f} | {base['perplexity']:.2f} | {ctl['perplexity']:.2f} | "
            f"{_ci(r, 'ppl_delta')} | {ctl['perplexity'] - base['perplexity']:+.2f} | "
            f"{_ci(r, 'ppl_delta_control')}"
            + (" within noise" if r.get("ppl_control_within_noise") else "")
            + " | "
            + ("-" if recovery is None else f"{recovery:.2f}")
            + " | "
            + ("-" if recovery is None else f"{beyond:.2f} ({beyond / recovery:.0%})")
            + " |"
        )
        for metric, value in (
            ("perplexity", r["perplexity"]),
            ("baseline_perplexity", base["perplexity"]),
            ("control_perplexity", ctl["perplexity"]),
            ("ppl_delta", r["ppl_delta"]),
            ("ppl_delta_control", r["ppl_delta_control"]),
            ("ppl_delta_control_lo", r["ppl_delta_control_lo"]),
            ("ppl_delta_control_hi", r["ppl_delta_control_hi"]),
            ("recovery", recovery),
        ):
            tidy.append({"what": r["variant"], "metric": metric, "value": value})
    return lines, tidy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "benchmarks" / "controls.yaml")
    p.add_argument("--report", type=Path, help="an existing report folder of that recipe")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/controls.py", *(sys.argv[1:] if argv is None else argv)])
    report = args.report or REPO / "reports" / "controls"
    if args.report is None or not (report / "results.json").is_file():
        run(args.recipe, report)
    doc = json.loads((report / "results.json").read_text())
    rows, meta = doc["rows"], doc["meta"]
    recipe = load_recipe(args.recipe)
    if meta["recipe"] != recipe.name:
        raise SystemExit(f"{report} holds the run of {meta['recipe']!r}, not {recipe.name!r}")
    starts = {v.name: v.start for v in recipe.variants}
    lines, tidy = table(rows, starts)
    env = meta_env(report)
    config = stable_hash(recipe.model_dump(mode="json"), length=12)
    for row in tidy:
        row.update(config=config, machine=env, date=today(), commit=commit())
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_tidy(RESULTS / "controls.csv", tidy)
    base = meta["baseline"]["train"] or {}
    recipe_name = os.path.relpath(args.recipe.resolve(), REPO)
    header = [
        "# Recovery against compute-matched controls",
        "",
        f"Recipe `{recipe_name}` "
        f"(config {config}), commit {commit()}, {today()}, {env}. Baseline: "
        f"{meta['baseline']['description']}, {base.get('steps')} of "
        f"{base.get('planned_steps')} steps. Command: `{command}`"
        + (
            f" on the report of `python -m compress.run {recipe_name} --report-dir {report}`."
            if args.report is not None
            else "."
        ),
        "",
        "Perplexity on the held-out test split; every difference is paired on the same "
        "windows, with its bootstrap 95% interval. The control of a variant is the "
        "uncompressed baseline trained with the same stage settings (distilled from the "
        "baseline teacher for the same steps, learning rate, sequence length and loss). "
        "Recovery: perplexity of the model the variant was trained from minus the variant's; "
        "of it beyond the control: control ppl - variant ppl, the part extra training of "
        "the uncompressed model does not explain (negative: the control gained more).",
        "",
    ]
    (RESULTS / "controls.md").write_text("\n".join([*header, *lines, ""]))
    print("\n".join(lines))
    return 0


def meta_env(report: Path) -> str:
    from compress.workbench import environment

    del report  # the run and this script share the machine
    return machine(environment())


if __name__ == "__main__":
    sys.exit(main())
