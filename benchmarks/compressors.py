"""Benchmark every compressor on the default `small` baseline: one table, and the goals checked.

    python benchmarks/compressors.py [--recipes int8 nf4 ...]

Runs each recipe with ``python -m compress.run`` (the cached baseline is shared through the
normal cache), collects every variant's row, and writes:

- ``benchmarks/results/compressors.csv``: tidy rows (what, config, metric, value, machine);
- ``benchmarks/results/compressors.md``: the table of perplexity, latency and memory ratios to
  the baseline for every variant, and each goal with the numbers that decide it.

Latency ratios are side by side: within one run all variants are timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress.cache import stable_hash  # noqa: E402
from compress.workbench import environment  # noqa: E402

RECIPES = ["int8", "nf4", "cpu-int8", "prune50", "structured30", "distill", "prune-distill-int8"]


def run_recipe(name: str, out: Path) -> dict:
    recipe = REPO / "recipes" / f"{name}.yaml"
    cmd = [
        sys.executable,
        "-m",
        "compress.run",
        str(recipe),
        "--report-dir",
        str(out),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout, flush=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr}")
    data = json.loads((out / "results.json").read_text())
    data["wall_s"] = time.perf_counter() - t0
    return data


def ratio(row: dict, base: dict, key: str) -> float | None:
    a, b = row.get(key), base.get(key)
    return a / b if a is not None and b else None


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def goals(results: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []

    def rows(recipe: str) -> dict[str, dict]:
        return {r["variant"]: r for r in results[recipe]["rows"]} if recipe in results else {}

    r = rows("prune50")
    if r:
        b, p, rec = (r[k]["perplexity"] for k in ("baseline", "prune50", "prune50-recovered"))
        before, after = p - b, rec - b
        out.append(
            (
                "50% magnitude pruning: recovery cuts the perplexity increase at least in half",
                after <= 0.5 * before,
                f"baseline {b:.2f}, pruned {p:.2f} (+{before:.2f}), recovered {rec:.2f} "
                f"({after:+.2f}, {after / before:.2f} of the increase)",
            )
        )
    r = rows("structured30")
    if r:
        b, s, rec = (r[k] for k in ("baseline", "structured30", "structured30-recovered"))
        pr, lr = ratio(s, b, "param_count"), s["latency_ratio"]
        iqr = s["latency_iqr_ms"] / b["latency_ms"]
        out.append(
            (
                "structured 30%: parameters down at least 25%, latency down measurably",
                pr <= 0.75 and lr + iqr / 2 < 1,
                f"params {pr:.3f}x, latency {lr:.3f}x (IQR {iqr:.3f} of baseline median; "
                f"{s['latency_ms']:.1f} vs {b['latency_ms']:.1f} ms), perplexity "
                f"{b['perplexity']:.2f} -> {s['perplexity']:.2f} -> recovered "
                f"{rec['perplexity']:.2f}",
            )
        )
    r = rows("cpu-int8")
    if r:
        b, d = r["baseline"], r["dynamic-int8"]
        speed = 1 / d["latency_ratio"]  # measured paired with the baseline
        pr = ratio(d, b, "perplexity")
        lat = results["cpu-int8"]["meta"]["variants"]["baseline"]["latency"]
        out.append(
            (
                "CPU-fast int8: >= 1.5x faster than fp32 at batch 8x256, perplexity within 1%",
                speed >= 1.5 and abs(pr - 1) <= 0.01,
                f"{speed:.2f}x faster ({d['latency_ms']:.1f} vs "
                f"{b['latency_ms']:.1f} ms at batch {lat['batch_size']}x{lat['seq_len']}, "
                f"{lat['threads']} threads), "
                f"perplexity ratio {pr:.4f}; bitsandbytes int8 latency "
                f"{fmt(r['bnb-int8']['latency_ratio'], '.2f')}x",
            )
        )
    r = rows("distill")
    if r:
        b, d, s = r["baseline"], r["student-distilled"], r["student-scratch"]
        out.append(
            (
                "distillation: a half-size student beats the same student trained on labels alone",
                d["perplexity"] < s["perplexity"],
                f"student params {ratio(d, b, 'param_count'):.3f}x; "
                f"distilled {d['perplexity']:.2f} vs "
                f"labels only {s['perplexity']:.2f} (baseline {b['perplexity']:.2f}), same budget",
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            results[name] = run_recipe(name, Path(tmp) / name)

    env = environment()
    machine = machine_name(env)
    header = (
        "| recipe | variant | stages | perplexity | ppl x | latency ms (IQR) | latency x "
        "| weight x | q-layer x | saved x | model RSS x | params x | sparsity |"
    )
    table = [header, "|" + "---|" * 13]
    tidy = ["what,config,metric,value,machine"]
    for name, data in results.items():
        config = stable_hash(data["meta"].get("variants", {}).keys(), 12)
        base = data["rows"][0]
        for row in data["rows"]:
            if name != args.recipes[0] and row["variant"] == "baseline":
                continue
            if row.get("status") != "ok":
                table.append(f"| {name} | {row['variant']} | failed: {row.get('error')} |")
                continue
            q = row.get("quantized_layer_bytes_ratio")
            table.append(
                f"| {name} | {row['variant']} | {row.get('stages') or '-'} "
                f"| {row['perplexity']:.2f} | {ratio(row, base, 'perplexity'):.4f} "
                f"| {row['latency_ms']:.1f} ({row['latency_iqr_ms']:.1f}) "
                f"| {row['latency_ratio']:.3f} "
                f"| {ratio(row, base, 'weight_bytes'):.3f} | {fmt(q)} "
                f"| {ratio(row, base, 'saved_bytes'):.3f} "
                f"| {fmt(ratio(row, base, 'model_rss_bytes'))} "
                f"| {ratio(row, base, 'param_count'):.3f} | {row['sparsity']:.3f} |"
            )
            for key in (
                "perplexity",
                "latency_ms",
                "latency_iqr_ms",
                "latency_ratio",
                "weight_bytes",
                "saved_bytes",
                "model_rss_bytes",
                "peak_rss_bytes",
                "param_count",
                "sparsity",
            ):
                if row.get(key) is not None:
                    tidy.append(f'{name}/{row["variant"]},{config},{key},{row[key]},"{machine}"')
    checks = goals(results)
    md = [
        "# Compressors on the default baseline",
        "",
        f"Machine: {machine}. Measured {time.strftime('%Y-%m-%d')} by "
        "`python benchmarks/compressors.py`; every ratio is to the baseline of the same run "
        "(latency timed side by side in interleaved rounds, batch 8 x 256 tokens).",
        "",
        *table,
        "",
        "## Goals",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {what}. {detail}" for what, ok, detail in checks],
        "",
        "Wall time per recipe (s): "
        + ", ".join(f"{k} {v['wall_s']:.0f}" for k, v in results.items()),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compressors.csv").write_text("\n".join(tidy) + "\n")
    (args.out / "compressors.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
