"""Benchmark the pruning methods: magnitude vs Wanda vs SparseGPT at 50%, 70% and 2:4.

    python benchmarks/methods.py [--samples 128] [--train-minutes 20] [--gpt2-minutes 10]

Two baselines: the built-in default (the `small` preset, trained with the default recipe's
settings except for its time cap, ``--train-minutes``, or loaded from the cache) and a tiny
GPT-2 (Hugging Face, built with ``from_config`` and trained here on the same corpus with the
built-in tokenizer, cached). Every method prunes every block linear layer of the same baseline
with the same calibration windows (the recipe default: ``samples`` windows of the train split),
and perplexity is measured on the default recipe's evaluation split. Writes:

- ``benchmarks/results/methods.json``: every row so far (``--models``/``--settings`` runs, e.g.
  in parallel, add theirs to it);
- ``benchmarks/results/methods.csv``: tidy rows (what, config, metric, value, machine);
- ``benchmarks/results/methods.md``: perplexity, its ratio to the dense baseline, and the mean
  per-layer output error for every model, method and sparsity, beside published numbers
  (labelled as such, from larger trained models).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress.cache import cache_dir, stable_hash  # noqa: E402
from compress.compressors import REGISTRY, StageContext, run_stage  # noqa: E402
from compress.data.calibration import CalibrationSpec, resolve_seq_len  # noqa: E402
from compress.evaluate.perplexity import perplexity  # noqa: E402
from compress.models.hf import HFCausalLM, conv1d_to_linear, import_transformers  # noqa: E402
from compress.recipe import recipe_from_dict  # noqa: E402
from compress.train import TrainConfig, train  # noqa: E402
from compress.workbench import Workspace, environment, prepare  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
MODELS = ("builtin-small", "gpt2-tiny")
SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"pattern": "2:4"}}
OUT = REPO / "benchmarks" / "results"

# Published (not measured here): /work/shared/DESIGN.md "Reference points", WikiText-2 perplexity.
PUBLISHED = [
    ("OPT-125M", "dense", "-", 27.66, "SparseGPT paper"),
    ("OPT-125M", "magnitude", "50%", 193.0, "SparseGPT paper"),
    ("OPT-125M", "sparsegpt", "50%", 36.85, "SparseGPT paper"),
    ("LLaMA-7B", "dense", "-", 5.68, "Wanda paper"),
    ("LLaMA-7B", "magnitude", "50%", 17.29, "Wanda paper"),
    ("LLaMA-7B", "sparsegpt", "50%", 7.22, "Wanda paper"),
    ("LLaMA-7B", "wanda", "50%", 7.26, "Wanda paper"),
]


def tiny_gpt2(ws: Workspace, steps: int, minutes: float) -> tuple[HFCausalLM, int]:
    """A GPT-2 (4 layers, d=128) trained ``steps`` steps (at most ``minutes``) on the
    workspace's train split, cached as a ``save_pretrained`` directory keyed by its inputs;
    and the steps it was trained."""
    transformers = import_transformers()
    cfg = transformers.GPT2Config(
        vocab_size=ws.tokenizer.vocab_size, n_positions=256, n_embd=128, n_layer=4, n_head=4
    )
    tcfg = TrainConfig(max_steps=steps, max_minutes=minutes, batch_size=8, seq_len=128, lr=2e-3)
    key = stable_hash([cfg.to_dict(), ws.corpus.fingerprint, ws.tokenizer.fingerprint, tcfg])
    path = cache_dir() / "benchmarks" / f"methods-gpt2-{key}"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        report = train(HFCausalLM(hf), ws.tokens["train"], tcfg, progress=False)
        hf.save_pretrained(str(path))
        (path / "steps.txt").write_text(str(report.steps))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    model = HFCausalLM(hf, conv1d_to_linear(hf, prefix="hf.")).eval()
    return model, int((path / "steps.txt").read_text())


def evaluate(ws: Workspace, model: torch.nn.Module, seq_len: int) -> float:
    spec = ws.recipe.eval.perplexity
    ids = ws.tokens[spec.split]
    ids = ids[: spec.max_tokens] if spec.max_tokens else ids
    return perplexity(model, ids, seq_len, None, spec.batch_size).perplexity


def bench_model(
    ws: Workspace, name: str, model, calib: CalibrationSpec, seq_len: int, labels: list[str]
) -> list:
    rows = []
    dense = evaluate(ws, model, seq_len)
    print(f"{name}: dense perplexity {dense:.2f}", flush=True)
    rows.append((name, "dense", "-", {"perplexity": dense, "ratio": 1.0}))
    ctx = StageContext(
        seed=0,
        tokens=ws.tokens,
        calibration=calib,
        fingerprint=f"{ws.corpus.fingerprint}:{ws.tokenizer.fingerprint}",
    )
    for label in labels:
        settings = SETTINGS[label]
        for method in METHODS:
            cfg = REGISTRY["prune"].config_cls(method=method, **settings)
            t0 = time.perf_counter()
            pruned, report = run_stage("prune", copy.deepcopy(model).eval(), cfg, ctx)
            seconds = time.perf_counter() - t0
            ppl = evaluate(ws, pruned, seq_len)
            errs = [t["reconstruction_error"] for t in report.touched]
            metrics = {
                "perplexity": ppl,
                "ratio": ppl / dense,
                "sparsity": report.extra["sparsity"],
                "layer_error_mean": sum(errs) / len(errs),
                "layer_error_max": max(errs),
                "prune_seconds": seconds,
            }
            print(f"{name} {method} {label}: {metrics}", flush=True)
            rows.append((name, method, label, metrics))
            del pruned
    return rows


def write(rows: list, meta: dict, machine: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    config = stable_hash(meta)
    with (OUT / "methods.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["what", "config", "metric", "value", "machine"])
        for model, method, label, metrics in rows:
            for metric, value in metrics.items():
                out.writerow([f"{model}/{method}/{label}", config, metric, value, machine])
    lines = [
        "# Pruning methods: magnitude vs Wanda vs SparseGPT",
        "",
        f"Measured {meta['date']} at commit {meta['commit']} on {machine} by "
        "`python benchmarks/methods.py`.",
        f"Calibration: {meta['calibration']}. Perplexity: {meta['eval']}.",
        "",
        f"Baselines: {'; '.join(meta['baselines'])}.",
        "",
        "Layer error: mean (max) over the pruned layers of ||WX - W'X||^2 / ||WX||^2 on the "
        "calibration inputs each layer saw (block by block, after the earlier blocks were "
        "pruned).",
        "",
        "| model | method | sparsity | perplexity | ratio to dense | layer error mean (max) |",
        "|---|---|---|---|---|---|",
    ]
    for model, method, label, m in rows:
        err = (
            f"{m['layer_error_mean']:.4f} ({m['layer_error_max']:.4f})"
            if "layer_error_mean" in m
            else "-"
        )
        lines.append(
            f"| {model} | {method} | {label} | {m['perplexity']:.2f} | {m['ratio']:.3f} | {err} |"
        )
    lines += [
        "",
        "Published reference points (not measured here; WikiText-2 perplexity of larger trained "
        "models, see the papers):",
        "",
        "| model | method | sparsity | perplexity (published) | source |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {meth} | {s} | {p} | {src} |" for m, meth, s, p, src in PUBLISHED]
    (OUT / "methods.md").write_text("\n".join(lines) + "\n")


def merge_rows(rows: list, meta: dict, baselines: dict[str, str]) -> tuple[list, dict]:
    """``rows`` merged into ``methods.json`` (rows of other models or settings, from other runs
    of this script, are kept; the same row is replaced), under a lock so that runs split by
    ``--models``/``--settings`` can go in parallel."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "methods.json"
    with (cache_dir() / "methods-benchmark.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old.get("meta", {}).get("calibration") != meta["calibration"]:
            old = {}  # other calibration settings: not comparable, start over
        merged = {(r[0], r[1], r[2]): r for r in old.get("rows", [])}
        merged.update({(r[0], r[1], r[2]): list(r) for r in rows})
        order = {m: i for i, m in enumerate(MODELS)}
        labels = {lab: i for i, lab in enumerate(["-", *SETTINGS])}
        methods = {m: i for i, m in enumerate(["dense", *METHODS])}
        out_rows = sorted(merged.values(), key=lambda r: (order[r[0]], labels[r[2]], methods[r[1]]))
        all_baselines = {**old.get("baselines", {}), **baselines}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps({"meta": meta, "baselines": all_baselines, "rows": out_rows}, indent=1)
        )
        os.replace(tmp, path)
    return out_rows, {**meta, "baselines": [all_baselines[m] for m in MODELS if m in all_baselines]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--train-minutes", type=float, default=20, help="built-in baseline cap")
    ap.add_argument("--gpt2-steps", type=int, default=300, help="training steps of the GPT-2")
    ap.add_argument("--gpt2-minutes", type=float, default=10, help="GPT-2 training cap")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = ap.parse_args()
    torch.manual_seed(0)
    data = {
        "calibration": {"samples": args.samples},
        "train": {"max_minutes": args.train_minutes},
    }
    recipe = recipe_from_dict(data, "default", "default")
    ws = prepare(recipe, REPO, progress=False)
    calib = recipe.calibration
    seq_len = recipe.eval.perplexity.seq_len
    info = ws.baseline_info
    trained = info.train or {}
    rows, baselines = [], {}
    if "builtin-small" in args.models:
        baselines["builtin-small"] = (
            f"built-in default ({info.description}; {trained.get('steps')} training steps, "
            f"stopped by {trained.get('stopped_by')}, final train loss "
            f"{trained.get('final_train_loss') or float('nan'):.3f})"
        )
        rows += bench_model(ws, "builtin-small", ws.baseline, calib, seq_len, args.settings)
    if "gpt2-tiny" in args.models:
        gpt2, steps = tiny_gpt2(ws, args.gpt2_steps, args.gpt2_minutes)
        baselines["gpt2-tiny"] = f"tiny GPT-2 (4 layers, d=128, trained {steps} steps)"
        rows += bench_model(ws, "gpt2-tiny", gpt2, calib, seq_len, args.settings)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "calibration": f"{calib.samples} windows of "
        f"{resolve_seq_len(calib, ws.adapter.max_seq_len(ws.baseline))} tokens of the "
        f"{calib.split} split, seed {calib.seed}",
        "eval": f"{recipe.eval.perplexity.split} split, windows of {seq_len}",
    }
    all_rows, meta = merge_rows(rows, meta, baselines)
    write(all_rows, meta, machine_name(environment()))


if __name__ == "__main__":
    main()
