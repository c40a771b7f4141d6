"""Benchmark every compressor on tiny trained Hugging Face models: GPT-2, OPT and Llama.

    python benchmarks/hf_models.py [--families gpt2 opt llama] [--steps 300]

1. Trains a byte-level BPE tokenizer (vocabulary 2048) on the local WikiText-2 validation text,
   builds each family's tiny model with ``from_config`` (``tests/hf_models.py``: 2 layers,
   width 64, 4 heads; Llama with grouped-query attention, 2 key/value heads), trains it briefly
   on that text, and saves it with ``save_pretrained`` (weights, config, tokenizer), as a
   user's model directory would be.
2. Runs one recipe per family with ``python -m compress.run``: the baseline and every
   compressor (int8, nf4, fp4, dynamic-int8, rtn, prune, prune -> distill, structured, a
   distilled half-depth student), scored on the WikiText-2 test text. A variant that fails is
   an error row with its message; the others are still measured.
3. Writes tidy rows to ``benchmarks/results/hf_models.csv`` and the tables to
   ``benchmarks/results/hf_models.md``.

Training uses the validation text (WikiText-2's train split is not in the shared data) and
the perplexity is of the test text, so the two never overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from _common import commit, machine, today, write_tidy  # noqa: E402

from compress.workbench import environment  # noqa: E402

VOCAB = 2048
STUDENT = {  # half the depth: a size every family's adapter knows
    "gpt2": {"n_layer": 1},
    "opt": {"num_hidden_layers": 1},
    "llama": {"num_hidden_layers": 1},
}
METRICS = (
    "perplexity",
    "perplexity_ratio",
    "latency_ms",
    "latency_iqr_ms",
    "latency_baseline_ms",
    "latency_ratio",
    "latency_ratio_lo",
    "latency_ratio_hi",
    "latency_noisy",
    "weight_bytes",
    "weight_bytes_ratio",
    "param_count",
    "sparsity",
    "peak_rss_bytes",
)


def wikitext() -> Path:
    root = os.environ.get("COMPRESS_SHARED_DATA")
    path = (Path(root) if root else REPO.parent / "shared" / "data") / "wikitext-2"
    if not (path / "wiki.test.tokens").is_file():
        raise SystemExit(f"{path}: WikiText-2 files are absent (set COMPRESS_SHARED_DATA)")
    return path


def data_spec() -> dict:
    wiki = wikitext()
    valid, test = str(wiki / "wiki.valid.tokens"), str(wiki / "wiki.test.tokens")
    return {"corpus": "files", "files": {"train": [valid], "valid": [valid], "test": [test]}}


def build_models(root: Path, families: list[str], steps: int) -> dict[str, float]:
    """Each family's tiny model, trained ``steps`` steps and saved under ``root/<family>``;
    returns the training seconds per family."""
    import torch

    from compress.data import encode_splits, files_corpus, train_tokenizer
    from tests.hf_models import build_trained, save_model_dir

    # Tiny models gain nothing from a second thread, and on a busy machine every operation
    # would wait for it to be scheduled.
    torch.set_num_threads(1)
    spec = data_spec()
    corpus = files_corpus(spec["files"], base_dir=REPO)
    tokenizer = train_tokenizer(corpus, VOCAB)
    train_ids = encode_splits(tokenizer, corpus)["train"]
    seconds = {}
    for family in families:
        done = root / family / "benchmark-train.json"
        if done.is_file() and json.loads(done.read_text())["steps"] == steps:
            seconds[family] = json.loads(done.read_text())["seconds"]
            continue
        t0 = time.perf_counter()
        hf = build_trained(family, tokenizer, train_ids, steps=steps)
        seconds[family] = time.perf_counter() - t0
        save_model_dir(hf, tokenizer, root / family)
        done.write_text(json.dumps({"steps": steps, "seconds": seconds[family]}))
        print(f"{family}: trained {steps} steps in {seconds[family]:.0f} s", flush=True)
    return seconds


# Groups of 32 weights. The tiny Llama's down_proj reads 176 inputs (11 x 16), which no group
# size of the packed int4 kernel divides, so it stays fp32 (the stage refuses it otherwise).
RTN = {
    "gpt2": {"bits": 4, "group_size": 32},
    "opt": {"bits": 4, "group_size": 32},
    "llama": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "down_proj"]},
}

# Structured pruning on GPT-2 and OPT removes MLP channels only: their attention heads cannot be
# removed (the stage refuses, see compress/compressors/structured_layout.py); Llama loses whole
# key/value groups of heads as well.
STRUCTURED = {
    "gpt2": {"ratio": 0.3, "prune_heads": False},
    "opt": {"ratio": 0.3, "prune_heads": False},
    "llama": {"ratio": 0.3},
}

# Recovery training for the distill rows; the keys left out are the recipe's (none given here,
# so compress's defaults).
RECOVER_TRAIN = {
    "max_steps": 60,
    "seq_len": 64,
    "lr": 1e-3,
    "warmup_steps": 20,
    "weight_decay": 0.0,
    "eval_every": 50,
    "eval_batches": 4,
}


def recipe(family: str, model_dir: Path) -> dict:
    recover = {"teacher": "baseline", "train": RECOVER_TRAIN}
    return {
        "name": f"hf-{family}",
        "device": "cpu",
        "model": {"hf": str(model_dir)},
        "data": data_spec(),
        "eval": {
            "perplexity": {"split": "test", "seq_len": 128, "batch_size": 8, "max_tokens": 16384},
            "latency": {"batch_size": 4, "seq_len": 128, "threads": 1, "warmup": 2, "repeats": 11},
            "memory": {"peak_rss": False},  # a child process per variant; memory: scale.py
        },
        "variants": [
            {"name": "int8", "pipeline": [{"int8": {}}]},
            {"name": "nf4", "pipeline": [{"nf4": {}}]},
            {"name": "fp4", "pipeline": [{"fp4": {}}]},
            {"name": "dynamic-int8", "pipeline": [{"dynamic-int8": {}}]},
            {"name": "rtn-int4-g32", "pipeline": [{"rtn": RTN[family]}]},
            {"name": "prune50", "pipeline": [{"prune": {"sparsity": 0.5}}]},
            {"name": "prune50-recovered", "from": "prune50", "pipeline": [{"distill": recover}]},
            {"name": "structured30", "pipeline": [{"structured": STRUCTURED[family]}]},
            {
                "name": "student-distilled",
                "pipeline": [
                    {
                        "distill": {
                            **recover,
                            "student": STUDENT[family],
                            "train": {**RECOVER_TRAIN, "max_steps": 120},
                        }
                    }
                ],
            },
        ],
    }


def run(family: str, model_dir: Path, work: Path) -> dict:
    path = work / f"hf-{family}.yaml"
    path.write_text(yaml.safe_dump(recipe(family, model_dir), sort_keys=False))
    out = work / "reports" / family
    cmd = [sys.executable, "-m", "compress.run", str(path), "--report-dir", str(out)]
    # One thread throughout (see build_models); the latency settings say so too.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    print(proc.stdout, flush=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{family}: exit {proc.returncode}\n{proc.stderr}")
    load.append(os.getloadavg()[0])
    data = json.loads((out / "results.json").read_text())
    return {
        "wall_s": wall,
        "rows": data["rows"],
        "baseline": data["meta"]["baseline"],
        "load": load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(STUDENT), choices=list(STUDENT))
    p.add_argument("--steps", type=int, default=300, help="training steps of each tiny model")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work-dir", type=Path, help="keep (and reuse) the trained models here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="compress-hf-") as tmp:
        work = args.work_dir or Path(tmp)
        os.environ.setdefault("COMPRESS_CACHE_DIR", str(work / "cache"))
        train_s = build_models(work / "models", args.families, args.steps)
        runs = {f: run(f, work / "models" / f, work) for f in args.families}
    write_results(args.out, runs, train_s, args.steps)


def _latency_x(row: dict) -> str:
    """The paired latency ratio with its 95% interval, and ``noisy`` where the run said so."""
    x = row.get("latency_ratio")
    if x is None:
        return "-"
    text = f"{x:.3f}"
    if row.get("latency_ratio_lo") is not None and row.get("latency_ratio_hi") is not None:
        text += f" [{row['latency_ratio_lo']:.3f}, {row['latency_ratio_hi']:.3f}]"
    return text + (" noisy" if row.get("latency_noisy") else "")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_results(out: Path, runs: dict[str, dict], train_s: dict, steps: int) -> None:
    stamp = {"machine": machine(environment()), "date": today(), "commit": commit()}
    tidy = []
    for family, run in runs.items():
        tidy.append(
            {"what": "hf_models", "config": family, "metric": "train_s", "value": train_s[family]}
            | stamp
        )
        for r in run["rows"]:
            config = f"{family}/{r['variant']}"
            ok = r["status"] == "ok"
            tidy.append(
                {"what": "hf_models", "config": config, "metric": "ok", "value": int(ok)} | stamp
            )
            for key in METRICS:
                if r.get(key) is not None:
                    tidy.append(
                        {"what": "hf_models", "config": config, "metric": key, "value": r[key]}
                        | stamp
                    )
    out.mkdir(parents=True, exist_ok=True)
    write_tidy(out / "hf_models.csv", tidy)
    lines = [
        "# Every compressor on tiny trained Hugging Face models",
        "",
        f"Written by `python benchmarks/hf_models.py` on {stamp['date']}, commit "
        f"{stamp['commit']}, {stamp['machine']}. Each family's model (`tests/hf_models.py`: "
        f"2 layers, width 64, 4 heads; Llama with 2 key/value heads) was built with "
        f"`from_config`, trained {steps} steps on the WikiText-2 validation text with a "
        f"byte-level BPE tokenizer of {VOCAB} tokens, saved with `save_pretrained` and run "
        "through `python -m compress.run` on the CPU. Perplexity: the first 16384 tokens of the "
        "WikiText-2 test text, windows of 128. Latency: one forward pass at batch 4 x 128, "
        "1 thread (everything in these runs uses one), each variant timed in 11 rounds "
        "alternating with the baseline; `ms` is the "
        "variant's median and interquartile range, `x` the ratio of the medians in that paired "
        "measurement with its 95% bootstrap interval (`noisy`: wider than the run's "
        "target). Models this small and this briefly trained cannot rank the methods "
        "(see the README's notes); the table shows that every stage runs on every family and "
        "what it does to size and speed.",
        "",
    ]
    for family, run in runs.items():
        lines += [
            f"## {family}",
            "",
            f"Training {train_s[family]:.0f} s; run {run['wall_s']:.0f} s; "
            f"baseline {run['baseline']['description']}. Load average (1 min) at the run's start "
            f"and end: {run['load'][0]:.1f} and {run['load'][1]:.1f} on {os.cpu_count()} cores "
            "(latency spreads grow with it).",
            "",
            "| variant | stages | perplexity | ppl x | latency ms (IQR) | latency x [95% CI] "
            "| weight bytes | weight x | params | sparsity | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = run["rows"][0]
        for r in run["rows"]:
            if r["status"] != "ok":
                error = str(r.get("error")).replace("|", "\\|").replace("\n", " ")
                lines.append(
                    f"| {r['variant']} | {r.get('stages') or ''} |||||||||failed: {error} |"
                )
                continue
            ppl_x = r["perplexity"] / base["perplexity"] if base.get("perplexity") else None
            wt_x = r["weight_bytes"] / base["weight_bytes"] if base.get("weight_bytes") else None
            lines.append(
                f"| {r['variant']} | {r.get('stages') or '-'} | {r['perplexity']:.2f} "
                f"| {_fmt(ppl_x, '.3f')} "
                f"| {_fmt(r.get('latency_ms'), '.2f')} ({_fmt(r.get('latency_iqr_ms'), '.2f')}) "
                f"| {_latency_x(r)} | {r['weight_bytes']:,} "
                f"| {_fmt(wt_x, '.3f')} | {r['param_count']:,} | {r['sparsity']:.3f} | ok |"
            )
        lines.append("")
    (out / "hf_models.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
