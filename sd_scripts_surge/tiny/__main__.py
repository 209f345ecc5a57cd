"""`python -m sd_scripts_surge.tiny build|info` (console script `sd-surge-tiny`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sd_scripts_surge.tiny.kit import (
    FULL_RECIPE,
    QUICK_RECIPE,
    default_cache_dir,
    ensure_tiny_kit,
    kit_is_valid,
    read_stamp,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sd_scripts_surge.tiny",
        description="Build or inspect the tiny offline SDXL kit (tokenizers, shapes dataset, base + teacher).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the kit (skipped when a valid one is already there)")
    info = sub.add_parser("info", help="print where the kit is and what its stamp says")
    for p in (build, info):
        p.add_argument("--cache_dir", type=Path, default=None,
                       help=f"kit directory (default: {default_cache_dir()}; set $SURGE_CACHE_DIR to move it)")
        p.add_argument("--quick", action="store_true", help="the reduced recipe used by the tests")
    build.add_argument("--force", action="store_true", help="rebuild even if a valid kit is there")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = QUICK_RECIPE if args.quick else FULL_RECIPE
    root = args.cache_dir or default_cache_dir()
    if args.command == "build":
        paths = ensure_tiny_kit(root, force=args.force, progress=not args.quiet, recipe=recipe)
        print(json.dumps({k: str(v) for k, v in vars(paths).items() if k != "metrics"}, indent=2))
        print(json.dumps(paths.metrics, indent=2))
        return 0
    stamp = read_stamp(root)
    valid = kit_is_valid(root, recipe)
    print(f"kit directory: {root}")
    print(f"status: {'valid' if valid else 'missing or stale (run: python -m sd_scripts_surge.tiny build)'}")
    if stamp:
        shown = {k: v for k, v in stamp.items() if k != "files"}
        shown["num_files"] = len(stamp.get("files", {}))
        print(json.dumps(shown, indent=2))
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
