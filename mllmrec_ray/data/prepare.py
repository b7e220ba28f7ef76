"""`data prepare`: load a dataset, apply the protocol, write the data directory.

The directory (docs/interfaces.md): items.parquet, interactions.parquet,
samples.parquet and manifest.json. Every file is written atomically and the
manifest last, after removing any older one: a directory with a manifest is complete,
and its manifest's sha256 values say which parquet files belong to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mllmrec_ray.io import atomic_write_json, atomic_write_parquet, file_sha256

from .fetch import fetch_ml100k
from .loaders import DataError, attach_images, load_dataset
from .protocol import build_samples

MANIFEST_VERSION = 1
SCHEMAS = {
    "items": pa.schema([("item_id", pa.string()), ("title", pa.string()), ("year", pa.int32()),
                        ("genres", pa.list_(pa.string())), ("image_path", pa.string())]),
    "interactions": pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                               ("timestamp", pa.int64()), ("rating", pa.float64())]),
    "samples": pa.schema([("sample_id", pa.string()), ("user_id", pa.string()), ("split", pa.string()),
                          ("history", pa.list_(pa.string())), ("target", pa.string()),
                          ("candidates", pa.list_(pa.string())), ("candidates_100", pa.list_(pa.string())),
                          ("position", pa.int64())]),
}


@dataclass
class PreparedData:
    """A prepared data directory in memory, as pandas frames of plain Python values:
    strings are str or None, lists are lists, items.year is nullable Int32."""

    items: pd.DataFrame
    interactions: pd.DataFrame
    samples: pd.DataFrame
    manifest: dict
    path: Path


def prepare_dataset(out_dir, *, dataset: str | None = None, fmt: str | None = None, path=None,
                    columns: dict[str, str] | None = None, images=None, seed: int = 0, min_inter: int = 10,
                    negatives: int = 9, negatives_large: int = 99, split=(0.7, 0.1, 0.2), tie_break: str = "item",
                    train_windows: str = "last", window_stride: int = 1, max_windows_per_user: int | None = None,
                    cache_dir=None, name: str | None = None, verbose: bool = True) -> dict:
    """Write items/interactions/samples parquet + manifest.json into out_dir; returns the manifest.

    Either dataset="ml-100k" (fetched into the cache when missing) or fmt + path.
    """
    say = print if verbose else (lambda *a, **k: None)
    if dataset is not None:
        if dataset != "ml-100k":
            raise DataError(f"unknown dataset {dataset!r}: only ml-100k can be fetched; use --format and --path")
        path, fmt = fetch_ml100k(cache_dir, verbose=verbose)
    elif fmt is None or path is None:
        raise DataError("give either a dataset name or both a format and a path")
    path = Path(path).resolve()
    say(f"loading {fmt} data from {path}")
    items, interactions = load_dataset(fmt, path, columns)
    unmatched_images = 0
    if images is not None:
        images = Path(images).resolve()
        items, unmatched_images = attach_images(items, images)

    try:
        samples, stats = build_samples(items, interactions, min_inter=min_inter, negatives=negatives,
                                       negatives_large=negatives_large, seed=seed, split=tuple(split),
                                       tie_break=tie_break, train_windows=train_windows,
                                       window_stride=window_stride, max_windows_per_user=max_windows_per_user)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None  # the protocol knows no file names: say which data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the old manifest must not vouch for new files
    tables = {"items": items, "interactions": interactions, "samples": samples}
    files, content = {}, hashlib.sha256()
    for key, df in tables.items():
        schema = SCHEMAS[key]
        table = pa.table({f.name: pa.array(df[f.name], type=f.type, from_pandas=True) for f in schema},
                         schema=schema)
        sink = pa.BufferOutputStream()  # content hash: the tables' Arrow bytes, not Parquet's encoding
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        content.update(sink.getvalue().to_pybytes())
        atomic_write_parquet(table, out / f"{key}.parquet")
        files[f"{key}.parquet"] = {"rows": table.num_rows, "sha256": file_sha256(out / f"{key}.parquet")}

    with_image = int(items["image_path"].notna().sum())
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "dataset": name or dataset or path.name,
        "config": {
            "dataset": dataset, "format": fmt, "path": str(path), "columns": columns,
            "images": None if images is None else str(images), "seed": seed, "min_inter": min_inter,
            "negatives": negatives, "negatives_large": negatives_large, "split": list(split),
            "tie_break": tie_break, "train_windows": train_windows, "window_stride": window_stride,
            "max_windows_per_user": max_windows_per_user,
        },
        "counts": {
            "items": len(items), "interactions": len(interactions), "users": stats["users"],
            "samples": stats["samples"], "train": stats["train"], "valid": stats["valid"], "test": stats["test"],
            # train = train_users last windows + extra_windows earlier ones (train_windows: sliding)
            "train_users": stats["train"] - stats["extra_windows"], "extra_windows": stats["extra_windows"],
        },
        "oddities": {
            "users_below_min_inter": stats["users_below_min_inter"],
            "repeated_interactions": stats["repeated_interactions"],
            "items_without_title": int(items["title"].isna().sum()),
            "items_without_year": int(items["year"].isna().sum()),
            "items_without_interactions": int((~items["item_id"].isin(set(interactions["item_id"]))).sum()),
            "items_with_image": with_image,
            "items_without_image": len(items) - with_image,
            "images_matching_no_item": unmatched_images,
        },
        "files": files,
        "content_hash": content.hexdigest(),
    }
    atomic_write_json(out / "manifest.json", manifest)

    c, o = manifest["counts"], manifest["oddities"]
    say(f"wrote {out}: {c['items']} items, {c['interactions']} interactions, {c['users']} users -> "
        f"{c['samples']} samples (train {c['train']} / valid {c['valid']} / test {c['test']})"
        + (f"; train = {c['train_users']} users' last windows + {c['extra_windows']} earlier windows"
           if train_windows == "sliding" else ""))
    say(f"  {o['users_below_min_inter']} users below {min_inter} interactions, {o['items_without_title']} items "
        f"without title, {o['items_with_image']} with an image, {o['repeated_interactions']} repeated interactions")
    return manifest


def load_prepared(data_dir, verify: bool = True) -> PreparedData:
    """Read a directory written by prepare_dataset; with verify, check each file's sha256."""
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir}: no manifest.json (not prepared, or preparation did not finish)") from None
    if verify:
        for fname, meta in manifest["files"].items():
            got = file_sha256(data_dir / fname)
            if got != meta["sha256"]:
                raise DataError(f"{data_dir / fname}: sha256 {got} does not match the manifest ({meta['sha256']})")
    frames = {}
    for key, schema in SCHEMAS.items():
        table = pq.read_table(data_dir / f"{key}.parquet")
        df = table.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
        for f in schema:
            # pandas would give numpy arrays for lists and NaN for missing strings: give plain values
            if pa.types.is_list(f.type) or pa.types.is_string(f.type):
                df[f.name] = pd.Series(table.column(f.name).to_pylist(), dtype=object, index=df.index)
        frames[key] = df
    return PreparedData(frames["items"], frames["interactions"], frames["samples"], manifest, data_dir)
