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


def probe_all(variants: Path, run: dict) -> dict[str, dict]:
    """:func:`probe` of every saved variant of the run, one fresh process at a time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    out = {}
    for r in run["rows"]:
        if r["status"] != "ok":
            continue
        cmd = [sys.executable, __file__, "--probe-one", str(variants / r["variant"])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[r["variant"]] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"probed {r['variant']}", flush=True)
    return out


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


def probe(variant_dir: Path) -> None:
    """In this (fresh) process: import what the variant needs, load it, run one forward pass at
    the benchmark's latency shape; print RSS split into anonymous and file-backed pages
    (/proc/self/status RssAnon, RssFile) after each step, as one JSON line."""
    import torch

    from compress.models.adapter import adapter_for
    from compress.models.hf import import_transformers
    from compress.variant import BNB_KINDS, MANIFEST, load_variant

    def split() -> dict:
        status = Path("/proc/self/status")
        return {k: _status_kb(status, k) * 1024 for k in ("RssAnon", "RssFile")}

    torch.set_num_threads(2)
    manifest = json.loads((variant_dir / MANIFEST).read_text())
    if any(q["kind"] in BNB_KINDS for q in manifest["quantized"].values()):
        from compress._bnb import import_bnb

        import_bnb()
    import_transformers().AutoModelForCausalLM  # noqa: B018
    out = {"import": split()}
    model = load_variant(variant_dir)
    out["load"] = split()
    x = torch.randint(0, adapter_for(model).vocab_size(model), (1, 64))
    with torch.inference_mode():
        model(x)
    out["forward"] = split()
    print(json.dumps(out))


def free_gib() -> float:
    return _status_kb(Path("/proc/meminfo"), "MemAvailable") / (1 << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--work-dir", type=Path, help="keep the model and reports here")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe-one", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--probe",
        action="store_true",
        help="after the run (or with --rewrite): anonymous vs file-backed RSS of each saved "
        "variant, one fresh process each",
    )
    p.add_argument(
        "--rewrite", action="store_true", help="rewrite the results from WORK_DIR's last runs"
    )
    args = p.parse_args()
    if args.build_only:
        build(args.build_only)
        return
    if args.probe_one:
        probe(args.probe_one)
        return
    if args.rewrite:
        if args.work_dir is None:
            p.error("--rewrite needs --work-dir")
        model_dir = args.work_dir / "tinyllama-shape-random"
        built = json.loads((model_dir / "scale-build.json").read_text())
        run = json.loads((args.work_dir / "scale-run.json").read_text())
        if args.probe:
            run["probe"] = probe_all(args.work_dir / "report" / "variants", run)
            (args.work_dir / "scale-run.json").write_text(json.dumps(run, indent=2))
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
        if args.probe:
            run["probe"] = probe_all(out / "variants", run)
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
        "imports.",
        "",
        "| variant | weights GiB | weights x fp32 | after import GiB | after load GiB | peak GiB "
        "| model RSS GiB | model RSS x fp32 weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | failed: {r.get('error')} |||||||")
            continue
        lines.append(
            f"| {name} | {_gib(r['weight_bytes'])} | {r['weight_bytes'] / fp32:.3f} "
            f"| {_gib(r['rss_after_import_bytes'])} | {_gib(r['rss_after_load_bytes'])} "
            f"| {_gib(r['peak_rss_bytes'])} | {_gib(r['model_rss_bytes'])} "
            f"| {r['model_rss_bytes'] / fp32:.3f} |"
        )
    probe = run.get("probe") or {}
    if probe:
        lines += [
            "",
            "The same saved variants loaded again, one fresh process each (`scale.py --probe`), "
            "with the resident set split into anonymous memory and file-backed pages "
            "(RssAnon, RssFile of /proc/self/status):",
            "",
            "| variant | anon after import | file after import | anon after load "
            "| file after load | anon after forward | file after forward |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, p in probe.items():
            cells = " | ".join(
                f"{_gib(p[step]['RssAnon'])} | {_gib(p[step]['RssFile'])}"
                for step in ("import", "load", "forward")
            )
            lines.append(f"| {name} | {cells} |")
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
    probe = run.get("probe") or {}
    ok = {n: r for n, r in rows.items() if r.get("status") == "ok"}
    out = []
    lazy = [n for n, p in probe.items() if n != "dynamic-int8"]
    if lazy:
        grew = {
            n: (
                probe[n]["forward"]["RssFile"] - probe[n]["import"]["RssFile"],
                probe[n]["forward"]["RssAnon"] - probe[n]["import"]["RssAnon"],
            )
            for n in lazy
        }
        parts = ", ".join(
            f"{n} +{_gib(f)} GiB file-backed and +{_gib(a)} GiB anonymous for "
            f"{_gib(ok[n]['weight_bytes'])} GiB of weights"
            for n, (f, a) in grew.items()
            if n in ok
        )
        out.append(
            "- Weights are not copied into the process at load: `load_variant` reads "
            "`model.safetensors` with safetensors' `load_file`, whose tensors are memory-mapped "
            "pages of the file. They become resident as the forward pass first touches them, so "
            "RSS after load stays near the runtime's and the peak comes with the forward pass. "
            f"From import to the end of one forward pass: {parts}. The weights account for "
            "nearly all of each variant's memory; activations, logits and kernel scratch at "
            "batch 1 x 64 are the anonymous part."
        )
    if "dynamic-int8" in probe and "dynamic-int8" in ok:
        p, r = probe["dynamic-int8"], ok["dynamic-int8"]
        int8 = ok.get("int8")
        same = (
            f" (int8, with the same weight bytes: {int8['model_rss_bytes'] / fp32:.3f}x)"
            if int8
            else ""
        )
        out.append(
            "- dynamic-int8 repacks its int8 codes into fbgemm's layout while loading: "
            f"anonymous memory +{_gib(p['load']['RssAnon'] - p['import']['RssAnon'])} GiB at "
            "load, while the codes it read from the file stay resident as file-backed pages "
            f"(+{_gib(p['load']['RssFile'] - p['import']['RssFile'])} GiB after load). Its "
            "codes are resident twice, so its model RSS is "
            f"{r['model_rss_bytes'] / fp32:.3f}x the fp32 weights{same}."
        )
    for name, r in ok.items():
        if name != "baseline":
            out.append(
                f"- {name}: model RSS {_gib(r['model_rss_bytes'])} GiB = "
                f"{r['model_rss_bytes'] / fp32:.3f}x the fp32 weights "
                f"(weights {r['weight_bytes'] / fp32:.3f}x)."
            )
    phases = run["phases"]
    for k, p in enumerate(phases):
        if p["phase"] != "build" or p["variant"] == "baseline":
            continue
        after = next((q for q in phases[k + 1 :] if q["variant"] == p["variant"]), None)
        kept = ""
        if after is not None and p["variant"] in ok:
            start, end = p["start_rss_bytes"], after["start_rss_bytes"]
            kept = (
                f"; when the build ended RSS was {_gib(end)} GiB, {_gib(end - start)} GiB above "
                f"the start, about the variant's weights "
                f"({_gib(ok[p['variant']]['weight_bytes'])} GiB): the copy and the temporaries "
                "were freed and handed back"
            )
        grew = (p["max_rss_bytes"] - p["start_rss_bytes"]) / fp32
        out.append(
            f"- The run process while building {p['variant']}: "
            f"{_gib(p['start_rss_bytes'])} GiB with the baseline held, at most "
            f"{_gib(p['max_rss_bytes'])} GiB (+{grew:.2f}x the fp32 weights: the baseline's "
            "copy that the stage converts layer by layer, its temporaries and the converted "
            f"layers){kept}."
        )
    out.append(
        f"- The run's peak, {run['run_peak_rss_bytes'] / fp32:.2f}x the fp32 weights, is the "
        "held baseline plus one fp32 copy being converted and its temporaries. Building the "
        "variant from a reload of the baseline instead of a copy would allocate the same fp32 "
        "bytes while the stage runs; what the build must not do is keep them afterwards, and "
        "the RSS when each build ended shows it does not."
    )
    return out


if __name__ == "__main__":
    main()
