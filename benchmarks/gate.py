"""Benchmark the machine gate: forward latency alone, beside a training process, and gated.

    python benchmarks/gate.py [--rounds 6] [--repeats 20]

A background process trains a ``small`` GPT (``compress.train.train``, 2 threads) inside
``gate.computing()``, with the gate installed, so the training loop's own per-step
``checkpoint()`` is what lets a measurement in. In the foreground, the ``small`` model
(vocab 4096) is timed with ``interleaved_latency`` (batch 8 x 256, 2 threads) under three
conditions, in rounds whose order rotates:

* ``alone``: the background is paused (blocked between steps, computing nothing);
* ``ungated``: the background trains while the foreground measures;
* ``gated``: the background trains and the foreground measures inside ``gate.exclusive()``,
  which waits for the background to reach its next step's checkpoint.

Writes tidy rows (what, config, metric, value, machine) to ``benchmarks/results/gate.csv`` and
a table with the ratios to ``alone`` to ``benchmarks/results/gate.md``. Other processes on the
machine are not gated and show up as noise: the alone rounds' spread is reported to judge it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine as machine_name  # noqa: E402

from compress import gate  # noqa: E402
from compress.cache import stable_hash  # noqa: E402
from compress.evaluate.latency import interleaved_latency, quartiles  # noqa: E402
from compress.models.gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from compress.runtime import tune_allocator  # noqa: E402
from compress.train import TrainConfig, train  # noqa: E402
from compress.workbench import environment  # noqa: E402

VOCAB = 4096
BATCH, SEQ, THREADS = 8, 256, 2
TRAIN = dict(batch_size=8, seq_len=128, max_steps=10**9, warmup_steps=10, eval_every=10**9)


class _Stop(Exception):
    pass


def background(g: gate.MachineGate, go, training, stop, steps) -> None:
    """Train a small GPT on random tokens until ``stop``; between steps, wait while ``go`` is
    clear (the ``alone`` condition)."""
    torch.set_num_threads(THREADS)
    gate.install(g)
    model = GPT(GPTConfig(vocab_size=VOCAB, **PRESETS["small"]))
    ids = torch.randint(0, VOCAB, (200_000,), generator=torch.Generator().manual_seed(0))

    def on_step() -> None:
        with steps.get_lock():
            steps.value += 1
        if not go.is_set():
            training.clear()
            while not go.wait(0.05):
                if stop.is_set():
                    raise _Stop
        if stop.is_set():
            raise _Stop
        training.set()

    try:
        with g.computing():
            train(model, ids, TrainConfig(**TRAIN), progress=False, on_step=on_step)
    except _Stop:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    allocator = tune_allocator()  # as compress.run and the sweep workers do
    model = GPT(GPTConfig(vocab_size=VOCAB, **PRESETS["small"])).eval()

    def measure() -> list[float]:
        r = interleaved_latency(
            {"small": model}, VOCAB, BATCH, SEQ, THREADS, args.warmup, args.repeats
        )
        return r["small"].samples_ms

    ctx = mp.get_context("spawn")
    go, training, stop, steps = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Value("l", 0)
    samples: dict[str, list[float]] = {"alone": [], "gated": [], "ungated": []}
    round_medians: dict[str, list[float]] = {k: [] for k in samples}
    waits: list[float] = []
    with tempfile.TemporaryDirectory() as lock_dir:
        g = gate.MachineGate(lock_dir)
        worker = ctx.Process(target=background, args=(g, go, training, stop, steps), daemon=True)
        worker.start()
        try:
            go.set()
            if not training.wait(600):
                raise SystemExit("the background process did not start training")
            measure()  # warm up this process

            def set_background(on: bool) -> None:
                if on:
                    go.set()
                    training.wait(600)
                else:
                    go.clear()
                    while training.is_set():  # cleared once it is blocked between steps
                        time.sleep(0.01)

            def gated() -> list[float]:
                with g.exclusive() as waited:
                    waits.append(waited)
                    return measure()

            conditions = {
                "alone": (False, measure),
                "gated": (True, gated),
                "ungated": (True, measure),
            }
            names = list(conditions)
            for r in range(args.rounds):
                for name in names[r % 3 :] + names[: r % 3]:
                    on, fn = conditions[name]
                    set_background(on)
                    s = fn()
                    samples[name] += s
                    round_medians[name].append(statistics.median(s))
                    print(f"round {r}: {name} median {round_medians[name][-1]:.2f} ms")
        finally:
            stop.set()
            go.set()
            worker.join(600)
            if worker.is_alive():
                worker.kill()
                worker.join()

    results: dict[str, dict[str, float]] = {}
    for name, s in samples.items():
        q25, q50, q75 = quartiles(s)
        results[name] = {
            "latency_ms_median": q50,
            "latency_ms_iqr": q75 - q25,
            "latency_ms_median_of_round_medians": statistics.median(round_medians[name]),
            "latency_ms_round_median_spread": max(round_medians[name]) - min(round_medians[name]),
            "samples": len(s),
        }
    for name in results:
        results[name]["ratio_to_alone"] = (
            results[name]["latency_ms_median"] / results["alone"]["latency_ms_median"]
        )
    results["gated"]["exclusive_wait_s_median"] = statistics.median(waits)
    results["gated"]["exclusive_wait_s_max"] = max(waits)
    results["background"] = {"train_steps": steps.value}

    env_info = environment()
    machine = machine_name(env_info)
    settings = {
        "model": "small",
        "vocab": VOCAB,
        "batch": BATCH,
        "seq": SEQ,
        "threads": THREADS,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "allocator": allocator,
        "background_train": TRAIN,
    }
    config = stable_hash(settings, 12)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["what,config,metric,value,machine"]
    for what, metrics in results.items():
        for k, v in metrics.items():
            lines.append(f'{what},{config},{k},{v},"{machine}"')
    (args.out / "gate.csv").write_text("\n".join(lines) + "\n")

    md = [
        "# Machine gate benchmark",
        "",
        f"Machine: {machine}; Python {platform.python_version()}; "
        f"measured {time.strftime('%Y-%m-%d')} by `python benchmarks/gate.py`.",
        "",
        f"Forward latency of the `small` GPT (vocab {VOCAB}, batch {BATCH} x {SEQ}, "
        f"{THREADS} threads; {args.rounds} rounds x {args.repeats} passes, rotating order) "
        f"while a background process trains a `small` GPT (batch {TRAIN['batch_size']} x "
        f"{TRAIN['seq_len']}, {THREADS} threads) under `gate.computing()`. "
        f"Allocator: {allocator}.",
        "",
        "| condition | median ms | IQR ms | ratio to alone | round medians ms |",
        "|---|---|---|---|---|",
    ]
    for name in samples:
        m = results[name]
        rounds = ", ".join(f"{x:.1f}" for x in round_medians[name])
        md.append(
            f"| {name} | {m['latency_ms_median']:.2f} | {m['latency_ms_iqr']:.2f} | "
            f"{m['ratio_to_alone']:.3f} | {rounds} |"
        )
    md += [
        "",
        f"Gated: waited {results['gated']['exclusive_wait_s_median']:.2f} s (median; max "
        f"{results['gated']['exclusive_wait_s_max']:.2f} s) for the background to reach its "
        f"next training step's checkpoint; the background made {steps.value} steps in all.",
    ]
    (args.out / "gate.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
