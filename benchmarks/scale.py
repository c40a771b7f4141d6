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


def recipe(model_dir: Path, variant: str, stage: dict) -> dict:
    wiki = data_dir()
    valid, test = str(wiki / "wiki.valid.tokens"), str(wiki / "wiki.test.tokens")
    return {
        "name": f"scale-{variant}",
        "device": "cpu",
        "model": {"hf": str(model_dir)},
        "data": {"corpus": "files", "files": {"train": [valid], "valid": [valid], "test": [test]}},
        "eval": {
            "perplexity": {"split": "test", "seq_len": 64, "batch_size": 4, "max_tokens": 512},
            "latency": {"batch_size": 1, "seq_len": 64, "threads": 2, "warmup": 1, "repeats": 3},
        },
        "variants": [{"name": variant, "pipeline": [stage]}],
    }


STAGES = {"int8": {"int8": {}}, "nf4": {"nf4": {}}, "dynamic-int8": {"dynamic-int8": {}}}
PHASE = re.compile(r"variant (\S+): (building and measuring|built|perplexity, size and peak RSS)")


def follow(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its peak RSS (VmHWM, polled) and its RSS at each phase log line."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    status = Path(f"/proc/{proc.pid}/status")
    phases: list[dict] = []
    err_lines: list[str] = []
    hwm = [0]

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if m := PHASE.search(line):
                rss = _status_kb(status, "VmRSS") * 1024
                phases.append({"variant": m.group(1), "phase": m.group(2), "rss_bytes": rss})

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    t0 = time.perf_counter()
    while proc.poll() is None:
        hwm[0] = max(hwm[0], _status_kb(status, "VmHWM") * 1024)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    stdout = proc.stdout.read() if proc.stdout else ""
    print(stdout, flush=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd}: exit {proc.returncode}\n{''.join(err_lines[-20:])}")
    return {"wall_s": wall, "run_peak_rss_bytes": hwm[0], "phases": phases, "rc": proc.returncode}


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
        runs = json.loads((args.work_dir / "scale-runs.json").read_text())
        write_results(args.out, built, runs)
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
        runs = {}
        for variant in args.variants:
            path = work / f"scale-{variant}.yaml"
            path.write_text(yaml.safe_dump(recipe(model_dir, variant, STAGES[variant])))
            out = work / "reports" / variant
            cmd = [sys.executable, "-m", "compress.run", str(path), "--report-dir", str(out)]
            print(f"running {variant} ({free_gib():.1f} GiB available)", flush=True)
            run = follow([*cmd, "--no-progress", "-v"], env)
            run["rows"] = json.loads((out / "results.json").read_text())["rows"]
            runs[variant] = run
            (work / "scale-runs.json").write_text(json.dumps(runs, indent=2))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, built, runs)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def write_results(out: Path, built: dict, runs: dict[str, dict]) -> None:
    env = environment()
    stamp = {"machine": machine(env), "date": today(), "commit": commit()}
    fp32 = built["weight_bytes"]
    tidy: list[dict] = []

    def add(config: str, metric: str, value: float | int | None) -> None:
        if value is not None:
            tidy.append(
                {"what": "scale", "config": config, "metric": metric, "value": value} | stamp
            )

    add("model", "params", built["params"])
    add("model", "fp32_weight_bytes", fp32)
    add("model", "build_peak_rss_bytes", built["peak_rss_bytes"])
    table = []
    base_row = None
    for variant, run in runs.items():
        rows = {r["variant"]: r for r in run["rows"]}
        base_row = base_row or rows.get("baseline")
        r = rows[variant]
        phase = {(p["variant"], p["phase"]): p["rss_bytes"] for p in run["phases"]}
        add(variant, "run_wall_s", run["wall_s"])
        add(variant, "run_peak_rss_bytes", run["run_peak_rss_bytes"])
        add(variant, "run_rss_before_build_bytes", phase.get((variant, "building and measuring")))
        add(variant, "run_rss_after_build_bytes", phase.get((variant, "built")))
        add(variant, "status", 1 if r["status"] == "ok" else 0)
        for key in (
            "weight_bytes",
            "saved_bytes",
            "peak_rss_bytes",
            "rss_after_import_bytes",
            "rss_after_load_bytes",
            "model_rss_bytes",
            "perplexity",
            "latency_ms",
            "latency_iqr_ms",
            "latency_ratio",
        ):
            add(variant, key, r.get(key))
        table.append((variant, r, run, phase))
    if base_row is not None:
        for key in ("peak_rss_bytes", "rss_after_import_bytes", "rss_after_load_bytes"):
            add("baseline", key, base_row.get(key))
        add("baseline", "model_rss_bytes", base_row.get("model_rss_bytes"))
        add("baseline", "perplexity", base_row.get("perplexity"))
    out.mkdir(parents=True, exist_ok=True)
    write_tidy(out / "scale.csv", tidy)
    (out / "scale.md").write_text(markdown(built, base_row, table, stamp))


def markdown(built: dict, base: dict | None, table: list, stamp: dict) -> str:
    fp32 = built["weight_bytes"]
    lines = [
        "# Scale: a 1.1B-parameter Llama through `python -m compress.run`",
        "",
        f"Written by `python benchmarks/scale.py` on {stamp['date']}, commit {stamp['commit']}, "
        f"{stamp['machine']}. Model: TinyLlama-1.1B's shape, randomly initialised "
        f"(`from_config`), {built['params']:,} parameters, fp32 weights {_gib(fp32)} GiB. One "
        "recipe per variant (baseline + that variant, `device: cpu`, perplexity on 512 test "
        "tokens of WikiText-2 in windows of 64, latency batch 1 x 64, 3 rounds), run one at a "
        "time. GiB = 2^30 bytes.",
        "",
        "## Each variant's own process",
        "",
        "A fresh child process imports torch (and bitsandbytes, transformers as needed), loads the "
        "saved variant and runs one forward pass at the latency shape; `model RSS` is its peak "
        "minus its size after the imports.",
        "",
        "| variant | weights GiB | weights x fp32 | after import GiB | after load GiB | peak GiB "
        "| model RSS GiB | model RSS x fp32 weights | load overhead GiB | forward GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = ([("baseline (fp32)", base)] if base else []) + [(v, r) for v, r, _, _ in table]
    for name, r in rows:
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
        "`load overhead` = RSS after load - RSS after import - weight bytes (what loading kept "
        "beyond the weights: allocator slack, buffers such as rotary tables, copies); "
        "`forward` = peak - RSS after load (activations, logits, kernels' scratch buffers, and "
        "any dequantized copy of a layer's weights a kernel makes).",
        "",
        "## The run's own process (`python -m compress.run`)",
        "",
        "It holds the fp32 baseline for the whole run (every variant's latency is timed paired "
        "with it) and builds the variant beside it.",
        "",
        "| recipe | wall s | run peak RSS GiB | x fp32 weights | RSS before building the variant "
        "GiB | RSS after building it GiB | perplexity | latency ms (IQR) | latency x baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r, run, phase in table:
        lat = (
            "-"
            if r.get("latency_ms") is None
            else f"{r['latency_ms']:.0f} ({r['latency_iqr_ms']:.0f})"
        )
        lines.append(
            f"| {variant} | {run['wall_s']:.0f} | {_gib(run['run_peak_rss_bytes'])} "
            f"| {run['run_peak_rss_bytes'] / fp32:.2f} "
            f"| {_gib(phase.get((variant, 'building and measuring')))} "
            f"| {_gib(phase.get((variant, 'built')))} "
            f"| {r.get('perplexity') or '-'} | {lat} | {r.get('latency_ratio') or '-'} |"
        )
    lines += ["", "## Where the memory goes", "", "ANALYSIS", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
