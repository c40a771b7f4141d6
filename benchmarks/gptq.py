"""Benchmark GPTQ against round-to-nearest on the same packed int4 kernel.

    python benchmarks/gptq.py [--samples 128] [--train-minutes 20]

On the built-in default baseline (the `small` preset, trained with the default recipe's
settings under the ``--train-minutes`` cap; ``benchmarks/methods.py`` compares GPTQ with
round-to-nearest on converged baselines instead), quantizes every block linear
layer to 4 bits (groups of 128 and 32, asymmetric) with ``rtn`` and with ``gptq`` (with and
without act-order) on the same calibration windows, and writes:

- ``benchmarks/results/gptq.csv``: tidy rows (what, config, metric, value, machine);
- ``benchmarks/results/gptq.md``: perplexity and its ratio to the dense baseline, the bytes of
  the quantized layers as a fraction of their fp32 bytes, and GPTQ's mean per-layer output
  error beside round-to-nearest's on the same inputs; published numbers labelled as such.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress.cache import stable_hash  # noqa: E402
from compress.compressors import REGISTRY, StageContext, run_stage  # noqa: E402
from compress.evaluate.perplexity import perplexity  # noqa: E402
from compress.recipe import recipe_from_dict  # noqa: E402
from compress.workbench import environment, prepare  # noqa: E402

OUT = REPO / "benchmarks" / "results"
VARIANTS = {
    "rtn-int4-g128": ("rtn", {"bits": 4, "group_size": 128}),
    "gptq-int4-g128": ("gptq", {"bits": 4, "group_size": 128}),
    "gptq-int4-g128-actorder": ("gptq", {"bits": 4, "group_size": 128, "act_order": True}),
    "rtn-int4-g32": ("rtn", {"bits": 4, "group_size": 32}),
    "gptq-int4-g32": ("gptq", {"bits": 4, "group_size": 32}),
}
# Published (not measured here): /work/shared/DESIGN.md, OPT-125M WikiText-2 perplexity.
PUBLISHED = [("dense", 27.66), ("round-to-nearest 4-bit", 37.28), ("GPTQ 4-bit", 31.12)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--train-minutes", type=float, default=20, help="built-in baseline cap")
    args = ap.parse_args()
    data = {
        "calibration": {"samples": args.samples},
        "train": {"max_minutes": args.train_minutes},
        "variants": [{"name": "gptq", "pipeline": [{"gptq": {}}]}],  # a recipe needs one
    }
    recipe = recipe_from_dict(data, "default", "default")
    ws = prepare(recipe, REPO, progress=False)
    spec = recipe.eval.perplexity
    ids = ws.tokens[spec.split]

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, ids, spec.seq_len, spec.stride, spec.batch_size).perplexity

    ctx = StageContext(
        seed=0,
        tokens=ws.tokens,
        calibration=recipe.calibration,
        fingerprint=f"{ws.corpus.fingerprint}:{ws.tokenizer.fingerprint}",
    )
    dense = ppl(ws.baseline)
    rows = [("dense", {"perplexity": dense, "ratio": 1.0})]
    for name, (stage, settings) in VARIANTS.items():
        cfg = REGISTRY[stage].config_cls(**settings)
        model, report = run_stage(stage, copy.deepcopy(ws.baseline).eval(), cfg, ctx)
        value = ppl(model)
        metrics = {
            "perplexity": value,
            "ratio": value / dense,
            "quantized_bytes_ratio": report.touched_bytes_after / report.touched_bytes_before,
            "bits_per_weight": report.extra["bits_per_weight"],
            "quantized_layers": len(report.touched),
        }
        if stage == "gptq":
            metrics["layer_error_mean"] = report.extra["reconstruction_error_mean"]
            metrics["rtn_layer_error_mean"] = report.extra["rtn_error_mean"]
            metrics["layers_below_rtn"] = sum(
                t["reconstruction_error"] < t["rtn_error"] for t in report.touched
            )
        print(name, metrics, flush=True)
        rows.append((name, metrics))
    write(rows, ws, recipe)


def write(rows: list, ws, recipe) -> None:
    env = environment()
    machine = machine_name(env)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    calib = recipe.calibration
    trained = ws.baseline_info.train or {}
    meta = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "calibration": calib.model_dump(),
        "baseline": ws.baseline_info.key,
    }
    config = stable_hash(meta)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "gptq.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["what", "config", "metric", "value", "machine"])
        for name, metrics in rows:
            for metric, value in metrics.items():
                out.writerow([name, config, metric, value, machine])
    lines = [
        "# GPTQ vs round-to-nearest on the packed int4 CPU kernel",
        "",
        f"Measured {meta['date']} at commit {commit} on {machine} by `python benchmarks/gptq.py`.",
        f"Baseline: built-in default ({ws.baseline_info.description}; {trained.get('steps')} "
        f"training steps, stopped by {trained.get('stopped_by')}). Calibration: {calib.samples} "
        f"windows of the {calib.split} split (seed {calib.seed}). Perplexity: "
        f"{recipe.eval.perplexity.split} split, windows of {recipe.eval.perplexity.seq_len}.",
        "",
        "Layer error: mean over the quantized layers of ||WX - W'X||^2 / ||WX||^2 on each "
        "layer's calibration inputs; round-to-nearest's on the same inputs beside it.",
        "",
        "| variant | perplexity | ratio to dense | quantized bytes / fp32 | bits per weight "
        "| layer error (rtn on same inputs) | layers below rtn |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        if name == "dense":
            lines.append(f"| dense | {m['perplexity']:.2f} | 1.000 | - | 32 | - | - |")
            continue
        err = (
            f"{m['layer_error_mean']:.5f} ({m['rtn_layer_error_mean']:.5f})"
            if "layer_error_mean" in m
            else "-"
        )
        below = (
            f"{m['layers_below_rtn']}/{m['quantized_layers']}" if "layers_below_rtn" in m else "-"
        )
        lines.append(
            f"| {name} | {m['perplexity']:.2f} | {m['ratio']:.3f} | "
            f"{m['quantized_bytes_ratio']:.3f} | {m['bits_per_weight']:.2f} | {err} | {below} |"
        )
    lines += [
        "",
        "Published reference points (not measured here): OPT-125M WikiText-2 perplexity "
        "(GPTQ paper):",
        "",
        "| method | perplexity (published) |",
        "|---|---|",
    ]
    lines += [f"| {m} | {p} |" for m, p in PUBLISHED]
    (OUT / "gptq.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
