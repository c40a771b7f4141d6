"""Benchmark the scan allocation: uniform pruning vs sparsity allocated by the per-layer
sensitivity scan, at the same overall sparsity.

    python benchmarks/scan.py [--sparsities 0.5 0.7] [--methods magnitude wanda sparsegpt]

On the baseline of ``recipes/scan-converged.yaml`` (the built-in `tiny` GPT trained until its
validation loss stops improving, as ``benchmarks/methods.py`` judges the methods on; trained on
first use, then cached), the scan (magnitude pruning of one layer at a time at each of
``--scan-sparsities`` and simulated round-to-nearest at 8/4 bits, perplexity on the first
16384 tokens of the valid split; ``--scan-tokens``, ``--scan-bits``) gives each block linear
layer a curve of perplexity increase against sparsity. Every variant then prunes every block
linear layer of the same baseline to the same overall sparsity:

- ``uniform``: every layer at the target;
- ``scan``: OWL-style, less sensitive layers (per pruned weight) pruned more, within
  target +- strength;
- ``k most sensitive dense``: the k most sensitive layers (per pruned weight) left dense, the
  others pruned evenly;
- ``scan-optimal``: the sparsities minimising the sum of the scanned increases (optionally
  within target +- strength).

Perplexity is measured on the recipe's evaluation split (test, which the scan never read),
with the paired bootstrap 95% interval of each variant's difference to uniform pruning at the
same sparsity and method. Writes ``benchmarks/results/scan.csv`` (tidy rows) and
``benchmarks/results/scan.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import commit, machine, today, write_tidy  # noqa: E402

from compress import atomic  # noqa: E402
from compress.cache import stable_hash  # noqa: E402
from compress.compressors import StageContext, run_stage  # noqa: E402
from compress.compressors.prune import PruneConfig  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.evaluate.perplexity import perplexity  # noqa: E402
from compress.evaluate.uncertainty import perplexity_difference  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from compress.scan.spec import ScanPruneSpec, ScanQuantSpec, ScanSpec  # noqa: E402
from compress.scan.workspace import scan_workspace, sensitivity_for  # noqa: E402
from compress.workbench import environment, prepare  # noqa: E402

OUT = REPO / "benchmarks" / "results"
RECIPE = REPO / "recipes" / "scan-converged.yaml"


def variants(strengths: list[float], dense: list[int]) -> list[tuple[str, dict]]:
    out = [("uniform", {"allocation": "uniform"})]
    out += [
        (f"scan (strength {s:g})", {"allocation": "scan", "scan_strength": s}) for s in strengths
    ]
    out += [
        (f"{k} most sensitive dense", {"allocation": "scan-dense", "dense_layers": k})
        for k in dense
    ]
    out.append(("scan-optimal", {"allocation": "scan-optimal"}))
    out += [
        (f"scan-optimal (band {s:g})", {"allocation": "scan-optimal", "scan_strength": s})
        for s in strengths
    ]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument(
        "--scan-sparsities",
        type=float,
        nargs="+",
        default=[0.3, 0.5, 0.7, 0.9],
        help="the scan's pruning columns (the curves the allocations read)",
    )
    p.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--dense", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=64, help="calibration windows (wanda)")
    p.add_argument("--scan-tokens", type=int, default=16384, help="tokens per scan perplexity")
    p.add_argument("--scan-bits", type=int, nargs="*", default=[8, 4], help="simulated RTN columns")
    p.add_argument("--note", default="", help="a sentence for the results page")
    p.add_argument(
        "--out", default="scan", help="results name: benchmarks/results/<out>.md and .csv"
    )
    p.add_argument("--recipe", type=Path, default=RECIPE, help="the baseline's recipe")
    p.add_argument(
        "--accept-partial",
        action="store_true",
        help="use a baseline whose training was stopped early as it is (marked PARTIAL)",
    )
    args = p.parse_args()

    load_before = os.getloadavg()[0]
    recipe = load_recipe(args.recipe)
    if args.accept_partial:
        train = recipe.train.model_copy(update={"partial": "accept"})
        recipe = recipe.model_copy(update={"train": train})
    base_scan = recipe.scan or ScanSpec()
    quant = base_scan.quantize or ScanQuantSpec()
    scan_spec = base_scan.model_copy(
        update={
            "tokens": args.scan_tokens,
            "prune": ScanPruneSpec(method="magnitude", sparsities=args.scan_sparsities),
            "quantize": quant.model_copy(update={"bits": args.scan_bits})
            if args.scan_bits
            else None,
        }
    )
    recipe = recipe.model_copy(update={"variants": [], "scan": scan_spec})
    ws = prepare(recipe, REPO, progress=False)
    print(ws.baseline_info.headline(), flush=True)
    start = time.perf_counter()
    scan = scan_workspace(ws, echo=lambda line: print(line, flush=True))
    scan_seconds = scan.seconds
    print(f"scan took {time.perf_counter() - start:.1f} s here (cached: {scan.cached})")

    spec = recipe.eval.perplexity
    ids = ws.tokens[spec.split][: spec.max_tokens] if spec.max_tokens else ws.tokens[spec.split]
    dense_ppl = perplexity(ws.baseline, ids, spec.seq_len, spec.stride, spec.batch_size)
    ctx = StageContext(
        seed=recipe.seed,
        tokens=ws.tokens,
        calibration=recipe.calibration.model_copy(update={"samples": args.samples}),
        fingerprint=f"{ws.corpus.fingerprint}:{ws.tokenizer.fingerprint}",
        sensitivity=sensitivity_for(ws),
    )
    results = []
    for method in args.methods:
        for sparsity in args.sparsities:
            uniform = None
            for label, settings in variants(args.strengths, args.dense):
                cfg = PruneConfig(method=method, sparsity=sparsity, **settings)
                t0 = time.perf_counter()
                try:
                    model, report = run_stage("prune", copy.deepcopy(ws.baseline), cfg, ctx)
                except CompressError as exc:  # e.g. too few weights left to prune
                    print(f"{method} {sparsity:g} {label}: not possible: {exc}", flush=True)
                    results.append(
                        {
                            "method": method,
                            "target": sparsity,
                            "allocation": label,
                            "error": str(exc),
                        }
                    )
                    continue
                ppl = perplexity(model, ids, spec.seq_len, spec.stride, spec.batch_size)
                if uniform is None:
                    uniform = ppl
                diff = perplexity_difference(
                    ppl.window_nll, uniform.window_nll, ppl.window_tokens, seed=recipe.seed
                )
                layer_sp = [t["sparsity"] for t in report.touched]
                row = {
                    "method": method,
                    "target": sparsity,
                    "allocation": label,
                    "config": stable_hash(cfg.model_dump(mode="json"), 12),
                    "achieved": report.extra["sparsity"],
                    "layer_min": min(layer_sp),
                    "layer_max": max(layer_sp),
                    "perplexity": ppl.perplexity,
                    "ratio": ppl.perplexity / dense_ppl.perplexity,
                    "vs_uniform": diff.estimate,
                    "vs_uniform_lo": diff.lo,
                    "vs_uniform_hi": diff.hi,
                    "seconds": time.perf_counter() - t0,
                }
                results.append(row)
                print(
                    f"{method} {sparsity:g} {label}: ppl {ppl.perplexity:.3f} "
                    f"(vs uniform {diff.estimate:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}]), "
                    f"achieved {row['achieved']:.6f}, layers {row['layer_min']:.3f}-"
                    f"{row['layer_max']:.3f}",
                    flush=True,
                )
    load_after = os.getloadavg()[0]
    env = environment()
    write_results(
        results,
        scan,
        dense_ppl,
        ws,
        env,
        load_before,
        load_after,
        scan_seconds,
        args.note,
        args.out,
    )
    return 0


def trained(t: dict | None) -> str:
    """How the baseline was trained, from its cached training record."""
    if not t:
        return "not trained here"
    best = t.get("best_val_loss")
    return (
        f"trained {t.get('steps')} steps in {t.get('seconds', 0) / 60:.1f} min, stopped by "
        f"{t.get('stopped_by')}"
        + (f", best validation loss {best:.3f} at step {t.get('best_step')}" if best else "")
    )


def write_results(
    results, scan, dense_ppl, ws, env, load_before, load_after, scan_seconds, note, out
):
    mach, stamp, rev = machine(env), today(), commit()
    tidy = []
    ok = [r for r in results if "error" not in r]
    for r in ok:
        what = f"prune {r['method']} {r['target']:g} {r['allocation']}"
        for metric in ("perplexity", "ratio", "vs_uniform", "achieved", "layer_min", "layer_max"):
            tidy.append(
                {
                    "what": what,
                    "config": r["config"],
                    "metric": metric,
                    "value": f"{r[metric]:.6g}",
                    "machine": mach,
                    "date": stamp,
                    "commit": rev,
                }
            )
    OUT.mkdir(parents=True, exist_ok=True)
    write_tidy(OUT / f"{out}.csv", tidy)

    mid = next(
        (c for c in scan.prune_settings() if abs(c["sparsity"] - 0.5) < 1e-9),
        scan.prune_settings()[0],
    )
    per = scan.per_weight(mid["sparsity"])
    ranking = scan.allocation_ranking(mid["sparsity"])
    lines = [
        "# Sensitivity scan: uniform vs scan-allocated sparsity",
        "",
        "Measured by `python benchmarks/scan.py "
        + " ".join(sys.argv[1:])
        + "` on "
        + f"{ws.baseline_info.description} (baseline key `{ws.baseline_info.key}`; "
        + trained(ws.baseline_info.train)
        + (
            f"; PARTIAL: {ws.baseline_info.steps_text()}, stopped early on this busy machine"
            if ws.baseline_info.partial
            else ""
        )
        + "), "
        f"{mach}, {stamp}, commit {rev}. Load average {load_before:.1f} before, "
        f"{load_after:.1f} after (a shared machine; perplexity does not depend on load).",
        "",
        *([note, ""] if note else []),
        f"Scan: {len(scan.layers)} block linear layers x {len(scan.settings)} settings "
        f"({', '.join(scan.settings)}), perplexity on {scan.tokens:,} tokens of the "
        f"{scan.split} split, baseline {scan.baseline_perplexity:.3f}; "
        + f"took {scan_seconds:.0f} s"
        + (" when measured (this run read it from the cache)." if scan.cached else ".")
        + f" Most sensitive per pruned weight at {mid['setting']} (increase, and per 1,000 "
        "pruned weights): "
        + ", ".join(
            f"`{n}` ({scan.delta(n, mid['setting']):+.2f}, {1000 * per[n]:+.3f})"
            for n in ranking[:4]
        )
        + "; least: "
        + ", ".join(
            f"`{n}` ({scan.delta(n, mid['setting']):+.2f}, {1000 * per[n]:+.3f})"
            for n in ranking[-2:]
        )
        + ".",
        "",
        *(
            f"Warning from the scan: {n.removeprefix('scan: ')}."
            for n in dict.fromkeys(scan.noise_note(r["target"]) for r in ok)
            if n
        ),
        "",
        f"Pruning: every block linear layer of the same baseline to the same overall sparsity "
        f"(exact: `achieved`). Perplexity on {dense_ppl.tokens:,} scored tokens of the test "
        f"split (the scan never read it); dense {dense_ppl.perplexity:.3f}. `vs uniform`: "
        "perplexity "
        "minus uniform pruning's at the same method and sparsity, with its paired bootstrap "
        "95% interval over the scoring windows; an interval containing 0 is within noise.",
        "",
        "| method | sparsity | allocation | achieved | layer sparsity | perplexity | x dense "
        "| vs uniform (95% CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['target']:g} | {r['allocation']} | - | - | - | - | "
                f"not possible: {r['error']} |"
            )
            continue
        ci = (
            "-"
            if r["allocation"] == "uniform"
            else f"{r['vs_uniform']:+.3f} [{r['vs_uniform_lo']:+.3f}, {r['vs_uniform_hi']:+.3f}]"
            + (" within noise" if r["vs_uniform_lo"] <= 0 <= r["vs_uniform_hi"] else "")
        )
        lines.append(
            f"| {r['method']} | {r['target']:g} | {r['allocation']} | {r['achieved']:.6f} | "
            f"{r['layer_min']:.3f}-{r['layer_max']:.3f} | {r['perplexity']:.3f} | "
            f"{r['ratio']:.3f} | {ci} |"
        )
    better = [r for r in ok if r["allocation"] != "uniform" and r["vs_uniform_hi"] < 0]
    worse = [r for r in ok if r["allocation"] != "uniform" and r["vs_uniform_lo"] > 0]
    lines += [
        "",
        f"Of {sum(r['allocation'] != 'uniform' for r in ok)} measured non-uniform variants, "
        f"{len(better)} beat uniform pruning beyond noise and {len(worse)} lost to it beyond "
        "noise (the rest are within noise). By allocation (over methods and sparsities):",
        "",
        "| allocation | beat uniform | within noise | lost | not possible |",
        "|---|---|---|---|---|",
    ]
    labels = list(dict.fromkeys(r["allocation"] for r in results if r["allocation"] != "uniform"))
    for label in labels:
        rows = [r for r in results if r["allocation"] == label]
        won = sum(1 for r in rows if "error" not in r and r["vs_uniform_hi"] < 0)
        lost = sum(1 for r in rows if "error" not in r and r["vs_uniform_lo"] > 0)
        failed = sum(1 for r in rows if "error" in r)
        tied = len(rows) - won - lost - failed
        lines.append(f"| {label} | {won} | {tied} | {lost} | {failed} |")
    lines.append("")
    atomic.write_text(OUT / f"{out}.md", "\n".join(lines))
    print(f"wrote {OUT / f'{out}.md'} and {OUT / f'{out}.csv'}")


if __name__ == "__main__":
    sys.exit(main())
