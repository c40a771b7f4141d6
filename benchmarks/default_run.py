"""Benchmark the default run: wall time cold and cached, and perplexity-evaluation throughput.

    python benchmarks/default_run.py [--recipe recipes/int8.yaml] [--repeats 5]

1. Runs ``python -m compress.run RECIPE`` twice as a user would, in a fresh cache folder:
   first cold (corpus, tokenizer and baseline are built and trained), then again (everything
   cached). Records each run's wall time, setup time and the baseline's training time, and the
   int8/baseline acceptance numbers from the run's own results.
2. On the cached baseline, times perplexity evaluation of the recipe's held-out tokens against a
   bare forward pass over exactly the same windows (no loss), in alternating rounds, and reports
   tokens/s of each and their ratio (the evaluation's overhead).

Writes tidy rows (what, config, metric, value, machine) to ``benchmarks/results/default_run.csv``
and a readable summary to ``benchmarks/results/default_run.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress.cache import stable_hash  # noqa: E402
from compress.evaluate.perplexity import perplexity, windows  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from compress.workbench import environment, prepare  # noqa: E402


def timed_run(recipe: Path, report_dir: Path, env: dict) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "compress.run",
        str(recipe),
        "--report-dir",
        str(report_dir),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout)
    return wall, json.loads((report_dir / "results.json").read_text())


@torch.inference_mode()
def eval_vs_forward(ws, repeats: int) -> dict:
    """Perplexity evaluation vs bare forward passes over the same windows, alternating rounds."""
    spec = ws.recipe.eval.perplexity
    ids = ws.tokens[spec.split][: spec.max_tokens] if spec.max_tokens else ws.tokens[spec.split]
    model = ws.baseline.eval()
    seq_len, stride = spec.seq_len, spec.stride or spec.seq_len
    spans = windows(ids.numel(), seq_len, stride)
    offsets = torch.arange(seq_len)
    batches = [
        ids[torch.tensor([b for b, _ in spans[i : i + spec.batch_size]])[:, None] + offsets]
        for i in range(0, len(spans), spec.batch_size)
    ]
    input_tokens = sum(b.numel() for b in batches)

    def bare() -> None:
        for x in batches:
            model(x)

    def evaluate() -> None:
        perplexity(model, ids, seq_len, stride, spec.batch_size)

    bare()
    evaluate()  # warm-up
    times: dict[str, list[float]] = {"forward": [], "perplexity": []}
    for r in range(repeats):
        order = [("forward", bare), ("perplexity", evaluate)]
        for name, fn in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    fwd, ev = statistics.median(times["forward"]), statistics.median(times["perplexity"])
    scored = perplexity(model, ids, seq_len, stride, spec.batch_size).tokens
    return {
        "windows": len(spans),
        "input_tokens": input_tokens,
        "scored_tokens": scored,
        "forward_s_median": fwd,
        "perplexity_s_median": ev,
        "forward_tokens_per_s": input_tokens / fwd,
        "perplexity_tokens_per_s": input_tokens / ev,
        "perplexity_over_forward_time": ev / fwd,
        "repeats": repeats,
        "samples": times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "int8.yaml")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "COMPRESS_CACHE_DIR": str(tmp / "cache")}
        cold_s, cold = timed_run(args.recipe, tmp / "cold", env)
        warm_s, warm = timed_run(args.recipe, tmp / "warm", env)
        os.environ["COMPRESS_CACHE_DIR"] = env["COMPRESS_CACHE_DIR"]
        recipe = load_recipe(args.recipe)
        ws = prepare(recipe, args.recipe.resolve().parent, progress=False)
        assert ws.baseline_info.cached
        thr = eval_vs_forward(ws, args.repeats)

    rows = {r["variant"]: r for r in cold["rows"]}
    base, meta = rows["baseline"], cold["meta"]
    train = meta["baseline"]["train"]
    results = {
        "first_run_wall_s": cold_s,
        "first_run_setup_s": meta["setup_seconds"],
        "baseline_train_s": train["seconds"],
        "baseline_train_steps": train["steps"],
        "baseline_stopped_by": train["stopped_by"],
        "cached_run_wall_s": warm_s,
        "cached_run_setup_s": warm["meta"]["setup_seconds"],
        "cached_run_baseline_cached": warm["meta"]["baseline"]["cached"],
        "baseline_params": base["param_count"],
        "baseline_perplexity": base["perplexity"],
        "unigram_perplexity": meta["unigram_perplexity"],
        "baseline_over_unigram": base["perplexity"] / meta["unigram_perplexity"],
        "eval_tokens": base["eval_tokens"],
    }
    for name, row in rows.items():
        if name == "baseline":
            continue
        results[f"{name}_perplexity"] = row["perplexity"]
        results[f"{name}_perplexity_ratio"] = row["perplexity"] / base["perplexity"]
        results[f"{name}_quantized_layer_bytes_ratio"] = (
            row["quantized_layer_bytes"] / row["quantized_layer_fp32_bytes"]
        )
        results[f"{name}_weight_bytes_ratio"] = row["weight_bytes"] / base["weight_bytes"]
        results[f"{name}_latency_ratio"] = row["latency_ratio"]  # measured paired
    results.update({f"eval_{k}": v for k, v in thr.items() if k != "samples"})

    env_info = environment()
    machine = machine_name(env_info)
    config = stable_hash({"recipe": recipe.model_dump(mode="json")}, 12)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["what,config,metric,value,machine"]
    for k, v in results.items():
        lines.append(f'default_run,{config},{k},{v},"{machine}"')
    (args.out / "default_run.csv").write_text("\n".join(lines) + "\n")
    md = [
        f"# Default run benchmark ({args.recipe.relative_to(REPO)})",
        "",
        f"Machine: {machine}; Python {platform.python_version()}; "
        f"measured {time.strftime('%Y-%m-%d')} by `python benchmarks/default_run.py`.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in results.items():
        md.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    (args.out / "default_run.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
