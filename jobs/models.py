"""`mllmrec models`: fetch a model into the local cache, or show where a name resolves.

Usage: mllmrec models fetch smollm2-135m [--cache-dir DIR] [--force]
       mllmrec models path NAME_OR_PATH [--cache-dir DIR]
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["fetch", "path"])
    parser.add_argument("name", help="cache alias (smollm2-135m), or for `path` any model name or directory")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $MLLMREC_CACHE or ~/.cache/mllmrec)")
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")


def main(args: argparse.Namespace) -> int:
    from mllmrec_ray.runtime.models import fetch_model, resolve_model

    if args.action == "fetch":
        print(fetch_model(args.name, args.cache_dir, force=args.force))
    else:
        print(resolve_model(args.name, args.cache_dir))
    return 0
