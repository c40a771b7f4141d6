"""Screenshots of what a user sees, taken with headless Chromium.

    python benchmarks/screenshots.py [--work DIR] [--reuse] [--chromium /usr/bin/chromium]

Runs three small recipes on the ``tiny`` preset as a user would (``python -m compress.run``):
a default run (one int8 variant), a multi-variant run (prune -> distill -> int8 and three
quantizers) and a small sweep; then starts ``python -m compress.dashboard`` on the sweep's
folder on a free port, waits until it answers, and stops it after its screenshot. Each page is
captured whole at 1200 px wide and saved, palette-reduced to stay small, under
``benchmarks/results/screenshots/``: ``default-report.png``, ``multi-variant-report.png``,
``sweep-report.png``, ``dashboard.png`` (the study) and ``dashboard-trials.png``. Console
errors and page exceptions of each page are printed (the report pages must have none; see
``tests/report/test_browser.py``).

``--reuse`` takes the reports already in ``--work`` instead of running the recipes again.
The baseline comes from the compress cache (``COMPRESS_CACHE_DIR``), trained on first use.
Needs playwright (the ``dev`` extra) and a Chromium binary; no browser is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "screenshots"
WIDTH = 1200

_COMMON = """\
model: {preset: tiny}
data: {corpus: builtin, vocab_size: 1024}
train: {max_steps: 200, max_minutes: null, batch_size: 8, seq_len: 128, lr: 0.003,
        warmup_steps: 20, eval_every: 100, eval_batches: 2}
eval:
  perplexity: {split: test, seq_len: 128, max_tokens: 8192}
  latency: {batch_size: 4, seq_len: 128, warmup: 1, repeats: 5, max_seconds: 20}
  generation: {prompts: 2, prompt_tokens: 16, new_tokens: 12}
"""

RECIPES: dict[str, str] = {
    "default": """\
# The default run on the tiny preset: the baseline and its int8 version.
name: default
"""
    + _COMMON
    + """\
variants:
  - name: int8
    pipeline:
      - int8: {}
""",
    "multi": """\
# Several variants side by side: a pruned model recovered by distillation, then quantized,
# and three quantizers of the baseline.
name: multi
"""
    + _COMMON
    + """\
variants:
  - name: prune50
    pipeline:
      - prune: {sparsity: 0.5}
  - name: prune50-distill-int8
    from: prune50
    pipeline:
      - distill: {train: {max_steps: 30, eval_every: 15, eval_batches: 1, seq_len: 64}}
      - int8: {}
  - name: nf4
    pipeline:
      - nf4: {}
  - name: rtn4-g32
    pipeline:
      - rtn: {bits: 4, group_size: 32}
  - name: cpu-int8
    pipeline:
      - dynamic-int8: {}
""",
    "sweep": """\
# A small sweep: pruning x quantization, six trials.
name: sweep
"""
    + _COMMON.replace("generation: {prompts: 2", "generation: {prompts: 1")
    + """\
sweep:
  trials: 6
  sampler: {startup_trials: 3}
  objectives: [perplexity, latency_ratio, weight_bytes]
  params:
    prune: {choice: [false, true]}
    sparsity: {float: [0.1, 0.8], step: 0.1, when: {prune: true}}
    quantizer: {choice: [none, int8, cpu-int8]}
  pipeline:
    - prune: {sparsity: $sparsity}
      when: {prune: true}
    - int8: {}
      when: {quantizer: int8}
    - dynamic-int8: {}
      when: {quantizer: cpu-int8}
  seeds:
    int8: {quantizer: int8}
    prune50: {prune: true, sparsity: 0.5}
""",
}


def run_recipe(work: Path, name: str, env: dict) -> Path:
    recipe = work / f"{name}.yaml"
    recipe.write_text(RECIPES[name])
    out = work / "reports" / name
    cmd = [sys.executable, "-m", "compress.run", recipe.name, "--report-dir", str(out)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--no-progress"], cwd=work, env=env, text=True)
    print(f"  exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
    if proc.returncode not in (0, 1):  # 1: a variant failed, which the report shows
        raise SystemExit(f"{name}: compress.run exited {proc.returncode}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the dashboard exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise SystemExit(f"the dashboard did not answer at {url} within {timeout:.0f} s")


def small_png(png: bytes, path: Path) -> int:
    """Save ``png`` reduced to a 64-colour palette (text and charts stay sharp); its size."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path.stat().st_size


def capture(browser, url: str, path: Path, settle_ms: int = 0) -> list[str]:
    """A full-page screenshot of ``url``; returns the console errors and page exceptions."""
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))
    page.goto(url, wait_until="networkidle")
    if settle_ms:
        page.wait_for_timeout(settle_ms)
    size = small_png(page.screenshot(full_page=True), path)
    print(f"  {path}: {size / 1000:.0f} KB", flush=True)
    page.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="folder for recipes and reports (default: a temp dir)")
    p.add_argument("--reuse", action="store_true", help="take the reports already in --work")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not Path(args.chromium).is_file():
        raise SystemExit(f"--chromium: {args.chromium} does not exist")
    from playwright.sync_api import sync_playwright

    work = args.work or Path(tempfile.mkdtemp(prefix="compress-screens-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reports = {}
    for name in RECIPES:
        folder = work / "reports" / name
        reports[name] = folder if args.reuse and folder.is_dir() else run_recipe(work, name, env)
    pages = {
        "default-report.png": reports["default"] / "report.html",
        "multi-variant-report.png": reports["multi"] / "report.html",
        "sweep-report.png": reports["sweep"] / "report.html",
    }
    failures = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        for shot, html in pages.items():
            for problem in capture(browser, html.resolve().as_uri(), args.out / shot):
                failures += 1
                print(f"  {shot}: {problem}")
        port = free_port()
        cmd = [sys.executable, "-m", "compress.dashboard", str(reports["sweep"])]
        dash = subprocess.Popen([*cmd, "--port", str(port)], cwd=work, env=env)
        try:
            root = f"http://127.0.0.1:{port}"
            wait_for(f"{root}/dashboard/", dash)
            with urllib.request.urlopen(f"{root}/api/studies", timeout=30) as resp:
                listing = json.load(resp)
            studies = listing.get("study_summaries") or listing.get("studies") or []
            if not studies:
                raise SystemExit(f"the dashboard lists no study: {listing}")
            study_id = studies[0]["study_id"]
            for shot, path in (
                ("dashboard.png", f"/dashboard/studies/{study_id}"),
                ("dashboard-trials.png", f"/dashboard/studies/{study_id}/trials"),
            ):
                for problem in capture(browser, root + path, args.out / shot, settle_ms=4000):
                    print(f"  {shot}: {problem}")  # the dashboard's own page: reported only
        finally:
            dash.terminate()
            try:
                dash.wait(timeout=20)
            except subprocess.TimeoutExpired:
                dash.kill()
        browser.close()
    print(f"reports under {work / 'reports'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
