"""Benchmark memory at scale: a 1.1B-parameter Llama through ``python -m compress.run``.

    python benchmarks/scale.py [--variants int8 nf4 dynamic-int8] [--work-dir DIR]

1. Builds a randomly initialised Llama with TinyLlama-1.1B's shape (hidden 2048, MLP 5632,
   22 layers, 32 query heads, 4 key/value heads, vocabulary 32000; ``from_config``) and saves
   it with ``save_pretrained`` (fp32, about 4.4 GB) next to a small byte-level BPE tokenizer
   trained on the local WikiText-2 validation text (nothing is downloaded). This runs in its
   own process so its memory is gone before the runs start.
2. For each variant runs one recipe (baseline + that variant, CPU, a short evaluation) with
   ``python -m compress.run -v``, one at a time, and follows the run's process: its peak RSS
   (VmHWM) and its RSS at each phase (the log lines "variant X: building", "built",
   "measured"). Each variant's own peak RSS comes from the run itself: a fresh child process
   loads the saved variant and runs one forward pass (``compress.evaluate.memory.peak_rss``).
3. Writes tidy rows to ``benchmarks/results/scale.csv`` and a summary with the breakdown of
   where resident memory goes to ``benchmarks/results/scale.md``.

Needs about 14 GB of free memory (checked first) and ~15 GB of disk in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from _common import commit, machine, today, write_tidy  # noqa: E402

from compress.workbench import environment  # noqa: E402

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
TINYLLAMA = dict(  # TinyLlama-1.1B's configuration
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB = 4096  # the local tokenizer's; its ids are a subset of the model's 32000
GIB = 1 << 30
NEED_FREE_GIB = 14


def data_dir() -> Path:
    root = os.environ.get("COMPRESS_SHARED_DATA")
    path = Path(root) / "wikitext-2" if root else WIKITEXT
    if not (path / "wiki.test.tokens").is_file():
        raise SystemExit(f"{path}: WikiText-2 files are absent (set COMPRESS_SHARED_DATA)")
    return path


def build(model_dir: Path) -> None:
    """The random 1.1B Llama and a local tokenizer, saved as a Hugging Face directory."""
    import torch
    import transformers

    from compress.data import files_corpus, train_tokenizer
    from compress.data.tokenizer import EOS_TOKEN

    wiki = data_dir()
    corpus = files_corpus([str(wiki / "wiki.valid.tokens")], base_dir=wiki)
    tok = train_tokenizer(corpus, VOCAB)
    config = transformers.LlamaConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, **TINYLLAMA)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(model_dir))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token=EOS_TOKEN
    ).save_pretrained(str(model_dir))
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.nbytes for p in model.parameters())
    (model_dir / "scale-build.json").write_text(
        json.dumps({"params": params, "weight_bytes": weights, "peak_rss_bytes": _own_hwm()})
    )


def _own_hwm() -> int:
    return _status_kb(Path("/proc/self/status"), "VmHWM") * 1024


def _status_kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ProcessLookupError):
        pass
    return 0


def recipe(model_dir: Path, variants: list[str]) -> dict:
    wiki = data_dir()
    valid, test = str(wiki / "wiki.valid.tokens"), str(wiki / "wiki.test.tokens")
    return {
        "name": "scale",
        "device": "cpu",
        "model": {"hf": str(model_dir)},
        "data": {"corpus": "files", "files": {"train": [valid], "valid": [valid], "test": [test]}},
        "eval": {
            "perplexity": {"split": "test", "seq_len": 64, "batch_size": 4, "max_tokens": 256},
            "latency": {"batch_size": 1, "seq_len": 64, "threads": 2, "warmup": 1, "repeats": 3},
        },
        "variants": [{"name": v, "pipeline": [STAGES[v]]} for v in variants],
    }


STAGES = {"int8": {"int8": {}}, "nf4": {"nf4": {}}, "dynamic-int8": {"dynamic-int8": {}}}
PHASES = {
    "building and measuring": "build",  # copy of the baseline through the stages
    "built": "measure",  # perplexity, save, peak-RSS child
    "perplexity, size and peak RSS measured": "latency",  # timed paired with the baseline
}
PHASE = re.compile(r"variant (\S+): (" + "|".join(PHASES) + ")")


def follow(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its peak RSS (VmHWM), and per phase of each variant (from its log lines)
    the RSS when the phase began and the highest RSS seen while it ran (polled every 0.1 s)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    status = Path(f"/proc/{proc.pid}/status")
    phases: list[dict] = [
        {"variant": "-", "phase": "setup", "start_rss_bytes": 0, "max_rss_bytes": 0}
    ]
    err_lines: list[str] = []
    lock = threading.Lock()

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if m := PHASE.search(line):
                rss = _status_kb(status, "VmRSS") * 1024
                with lock:
                    phases.append(
                        {
                            "variant": m.group(1),
                            "phase": PHASES[m.group(2)],
                            "start_rss_bytes": rss,
                            "max_rss_bytes": rss,
                        }
                    )

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    hwm = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        hwm = max(hwm, _status_kb(status, "VmHWM") * 1024)
        rss = _status_kb(status, "VmRSS") * 1024
        with lock:
            phases[-1]["max_rss_bytes"] = max(phases[-1]["max_rss_bytes"], rss)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    stdout = proc.stdout.read() if proc.stdout else ""
    print(stdout, flush=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd}: exit {proc.returncode}\n{''.join(err_lines[-20:])}")
    return {"wall_s": wall, "run_peak_rss_bytes": hwm, "phases": phases, "rc": proc.returncode}


def free_gib() -> float:
    return _status_kb(Path("/proc/meminfo"), "MemAvailable") / (1 << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--work-dir", type=Path, help="keep the model and reports here")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--rewrite", action="store_true", help="rewrite the results from WORK_DIR's last runs"
    )
    args = p.parse_args()
    if args.build_only:
        build(args.build_only)
        return
    if args.rewrite:
        if args.work_dir is None:
            p.error("--rewrite needs --work-dir")
        model_dir = args.work_dir / "tinyllama-shape-random"
        built = json.loads((model_dir / "scale-build.json").read_text())
        run = json.loads((args.work_dir / "scale-run.json").read_text())
        write_results(args.out, built, run)
        return
    if free_gib() < NEED_FREE_GIB:
        raise SystemExit(f"only {free_gib():.1f} GiB available; this needs {NEED_FREE_GIB} GiB")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="compress-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tinyllama-shape-random"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    env.setdefault("COMPRESS_CACHE_DIR", str(work / "cache"))
    try:
        if not (model_dir / "scale-build.json").is_file():
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "--build-only", str(model_dir)], env=env, check=True
            )
            print(f"built {model_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        built = json.loads((model_dir / "scale-build.json").read_text())
        path = work / "scale.yaml"
        path.write_text(yaml.safe_dump(recipe(model_dir, args.variants), sort_keys=False))
        out = work / "report"
        cmd = [sys.executable, "-m", "compress.run", str(path), "--report-dir", str(out)]
        print(f"running {', '.join(args.variants)} ({free_gib():.1f} GiB available)", flush=True)
        run = follow([*cmd, "--no-progress", "-v"], env)
        run["rows"] = json.loads((out / "results.json").read_text())["rows"]
        (work / "scale-run.json").write_text(json.dumps(run, indent=2))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, built, run)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def write_results(out: Path, built: dict, run: dict) -> None:
    stamp = {"machine": machine(environment()), "date": today(), "commit": commit()}
    rows = {r["variant"]: r for r in run["rows"]}
    tidy: list[dict] = []

    def add(config: str, metric: str, value: float | int | None) -> None:
        if value is not None:
            tidy.append(
                {"what": "scale", "config": config, "metric": metric, "value": value} | stamp
            )

    add("model", "params", built["params"])
    add("model", "fp32_weight_bytes", built["weight_bytes"])
    add("model", "build_peak_rss_bytes", built["peak_rss_bytes"])
    add("run", "wall_s", run["wall_s"])
    add("run", "peak_rss_bytes", run["run_peak_rss_bytes"])
    for name, r in rows.items():
        add(name, "ok", int(r["status"] == "ok"))
        for key in (*CHILD_KEYS, "perplexity", "latency_ms", "latency_iqr_ms", "latency_ratio"):
            add(name, key, r.get(key))
    for p in run["phases"]:
        add(f"{p['variant']}/{p['phase']}", "run_rss_at_start_bytes", p["start_rss_bytes"])
        add(f"{p['variant']}/{p['phase']}", "run_rss_max_bytes", p["max_rss_bytes"])
    out.mkdir(parents=True, exist_ok=True)
    write_tidy(out / "scale.csv", tidy)
    (out / "scale.md").write_text(markdown(built, run, rows, stamp))


CHILD_KEYS = (
    "weight_bytes",
    "saved_bytes",
    "rss_after_import_bytes",
    "rss_after_load_bytes",
    "peak_rss_bytes",
    "model_rss_bytes",
)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def markdown(built: dict, run: dict, rows: dict[str, dict], stamp: dict) -> str:
    fp32 = built["weight_bytes"]
    lines = [
        "# Scale: a 1.1B-parameter Llama through `python -m compress.run`",
        "",
        f"Written by `python benchmarks/scale.py` on {stamp['date']}, commit {stamp['commit']}, "
        f"{stamp['machine']}. The model has TinyLlama-1.1B's shape, randomly initialised "
        f"(`from_config`): {built['params']:,} parameters, fp32 weights {_gib(fp32)} GiB "
        "(GiB = 2^30 bytes). One recipe (`device: cpu`; perplexity on 256 test tokens of "
        "WikiText-2 in windows of 64; latency batch 1 x 64, 3 rounds) with the baseline and "
        f"{', '.join(n for n in rows if n != 'baseline')}, run once through "
        f"`python -m compress.run` in {run['wall_s'] / 60:.0f} minutes on a machine shared with "
        "other work (so latencies say little here).",
        "",
        "## Each variant in its own process",
        "",
        "The run measures every variant's memory in a fresh child process that imports torch "
        "(and bitsandbytes, transformers where the variant needs them), loads the saved variant "
        "and runs one forward pass at the latency shape. `model RSS` = peak - RSS after the "
        "imports; `load overhead` = RSS after load - RSS after import - weight bytes; `forward` = "
        "peak - RSS after load.",
        "",
        "| variant | weights GiB | weights x fp32 | after import GiB | after load GiB | peak GiB "
        "| model RSS GiB | model RSS x fp32 weights | load overhead GiB | forward GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | failed: {r.get('error')} |||||||||")
            continue
        over = r["rss_after_load_bytes"] - r["rss_after_import_bytes"] - r["weight_bytes"]
        fwd = r["peak_rss_bytes"] - r["rss_after_load_bytes"]
        lines.append(
            f"| {name} | {_gib(r['weight_bytes'])} | {r['weight_bytes'] / fp32:.3f} "
            f"| {_gib(r['rss_after_import_bytes'])} | {_gib(r['rss_after_load_bytes'])} "
            f"| {_gib(r['peak_rss_bytes'])} | {_gib(r['model_rss_bytes'])} "
            f"| {r['model_rss_bytes'] / fp32:.3f} | {_gib(over)} | {_gib(fwd)} |"
        )
    lines += [
        "",
        "## The run's own process",
        "",
        "`python -m compress.run` holds the fp32 baseline for the whole run (each variant's "
        "latency is timed paired with it). For each variant, from the run's log lines: its RSS "
        "when the phase began and the highest RSS polled (every 0.1 s) while it ran. `build`: "
        "the baseline copied and taken through the stage; `measure`: perplexity, saving the "
        "variant, waiting for its child process; `latency`: timed paired with the baseline. "
        f"The run's peak RSS (VmHWM) was {_gib(run['run_peak_rss_bytes'])} GiB = "
        f"{run['run_peak_rss_bytes'] / fp32:.2f}x the fp32 weights.",
        "",
        "| variant | phase | RSS at start GiB | max RSS GiB | max x fp32 weights |",
        "|---|---|---|---|---|",
    ]
    for p in run["phases"]:
        lines.append(
            f"| {p['variant']} | {p['phase']} | {_gib(p['start_rss_bytes'])} "
            f"| {_gib(p['max_rss_bytes'])} | {p['max_rss_bytes'] / fp32:.2f} |"
        )
    lines += ["", "## Where the memory goes", ""] + analysis(built, run, rows)
    return "\n".join(lines) + "\n"


def analysis(built: dict, run: dict, rows: dict[str, dict]) -> list[str]:
    """The breakdown, each number from the tables above."""
    fp32 = built["weight_bytes"]
    base = rows.get("baseline", {})
    out = []
    if base.get("status") == "ok":
        over = base["rss_after_load_bytes"] - base["rss_after_import_bytes"] - base["weight_bytes"]
        out.append(
            f"- fp32 baseline, own process: {_gib(base['rss_after_import_bytes'])} GiB of runtime "
            f"(Python, torch, transformers) before loading; loading adds the weights "
            f"({_gib(base['weight_bytes'])} GiB) plus {_gib(over)} GiB; one forward pass adds "
            f"{_gib(base['peak_rss_bytes'] - base['rss_after_load_bytes'])} GiB. Its model RSS "
            f"is {base['model_rss_bytes'] / fp32:.2f}x its weight bytes."
        )
    for name, r in rows.items():
        if name == "baseline" or r.get("status") != "ok":
            continue
        over = r["rss_after_load_bytes"] - r["rss_after_import_bytes"] - r["weight_bytes"]
        vs = (
            f", {r['model_rss_bytes'] / base['model_rss_bytes']:.2f}x the baseline's"
            if base.get("model_rss_bytes")
            else ""
        )
        out.append(
            f"- {name}, own process: weights {_gib(r['weight_bytes'])} GiB "
            f"({r['weight_bytes'] / fp32:.3f}x fp32); model RSS {_gib(r['model_rss_bytes'])} GiB "
            f"= {r['model_rss_bytes'] / fp32:.3f}x the fp32 weights{vs}. Beyond its weights, "
            f"loading kept {_gib(over)} GiB and the forward pass added "
            f"{_gib(r['peak_rss_bytes'] - r['rss_after_load_bytes'])} GiB; its runtime after "
            f"the imports was {_gib(r['rss_after_import_bytes'])} GiB."
        )
    builds = [p for p in run["phases"] if p["phase"] == "build" and p["variant"] != "baseline"]
    for p in builds:
        grew = p["max_rss_bytes"] - p["start_rss_bytes"]
        out.append(
            f"- run process, building {p['variant']}: RSS {_gib(p['start_rss_bytes'])} GiB with "
            f"the baseline held, at most {_gib(p['max_rss_bytes'])} GiB while building "
            f"(+{_gib(grew)} GiB = {grew / fp32:.2f}x the fp32 weights: the copy of the baseline "
            "the stage converts, and the quantizer's per-layer temporaries)."
        )
    setup = next((p for p in run["phases"] if p["phase"] == "setup"), None)
    if setup:
        out.append(
            f"- run process, setup (corpus, tokenizer, token ids, loading the baseline): at most "
            f"{_gib(setup['max_rss_bytes'])} GiB = {setup['max_rss_bytes'] / fp32:.2f}x the "
            "fp32 weights."
        )
    return out


if __name__ == "__main__":
    main()
