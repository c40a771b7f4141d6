"""Entry point: ``python -m compress.scan RECIPE.yaml``.

Prepares the recipe's baseline (cached), measures the per-layer sensitivity scan (cached),
and writes ``scan.csv``, ``scan.json`` and ``scan.html`` into the report folder. Exit codes:
0 success, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from compress.errors import CompressError
from compress.models.adapter import resolve_device
from compress.preflight import check_output
from compress.recipe import load_recipe
from compress.storage import mask_urls


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m compress.scan",
        description="Perplexity change when only one linear layer is pruned or quantized.",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML (its scan: section, or the defaults)")
    p.add_argument("--report-dir", type=Path, help="write here (default reports/<name>-scan)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        recipe = load_recipe(args.recipe)
        try:
            resolve_device(recipe.device)
        except CompressError as exc:
            raise CompressError(f"{args.recipe}: {exc}") from None
        run_dir = Path(recipe.report.dir or Path("reports") / recipe.name)
        # beside the run's report, not in it: a run replaces its folder as a whole
        out_dir = args.report_dir or run_dir.with_name(f"{run_dir.name}-scan")
        check_output(out_dir)
        from compress.scan.report import write_scan
        from compress.scan.workspace import scan_spec, scan_workspace
        from compress.workbench import prepare

        print(f"compress.scan: {args.recipe} -> {out_dir}/", flush=True)
        ws = prepare(recipe, args.recipe.resolve().parent, progress=not args.no_progress)
        print(f"{ws.baseline_info.headline()}; setup {ws.setup_seconds:.1f} s", flush=True)
        result = scan_workspace(ws, echo=lambda line: print(line, flush=True))
        meta = {
            "recipe": str(args.recipe),
            "model": ws.baseline_info.description,
            "baseline key": ws.baseline_info.key,
            "scan settings": scan_spec(recipe).model_dump(mode="json"),
            "cache": f"{'read from' if result.cached else 'written to'} key {result.key}",
        }
        paths = write_scan(out_dir, result, recipe.name, meta)
    except CompressError as exc:
        print(f"error: {mask_urls(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    from compress.scan.report import noise_notes

    for note in noise_notes(result):
        print(f"warning: {note}")
    first = result.prune_settings()
    if first:
        mid = first[len(first) // 2]
        top = ", ".join(result.allocation_ranking(mid["sparsity"])[:3])
        print(f"most sensitive per pruned weight at sparsity {mid['sparsity']:g}: {top}")
    print(f"scan: {paths['html']}  (also {paths['csv'].name}, {paths['json'].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
