"""Datasets: fetch MovieLens-100K, read the supported layouts, apply the protocol, write and
read the prepared data directory (items/interactions/samples parquet + manifest.json)."""

from .fetch import default_cache_dir, fetch_ml100k
from .loaders import (FORMATS, DataError, attach_images, load_csv, load_dataset, load_microlens, load_ml1m,
                      load_ml100k, load_recbole)
from .prepare import PreparedData, load_prepared, prepare_dataset
from .protocol import build_samples, split_sizes

__all__ = [
    "FORMATS", "DataError", "PreparedData", "attach_images", "build_samples", "default_cache_dir",
    "fetch_ml100k", "load_csv", "load_dataset", "load_microlens", "load_ml100k", "load_ml1m",
    "load_prepared", "load_recbole", "prepare_dataset", "split_sizes",
]
