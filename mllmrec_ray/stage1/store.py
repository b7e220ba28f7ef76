"""Resumable Stage I results: rows keyed by what produced them, kept in atomic part files.

A row's key hashes (kind, item or sample id, input hash, model, prompt version).
Each finished batch is written as one part file (`<root>/part-<hash>.parquet`,
temp file + rename), so a crash loses at most the batches in flight. A rerun reads
the finished keys, sends only the missing rows to the engines, and merges the
wanted keys into the stage's output table. Changing the model, the prompt version
or any input (a caption, a pseudo-CoT, the image bytes) changes the key, so stale
rows are never reused; they simply stop being selected.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mllmrec_ray.io import atomic_write_parquet


def content_hash(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable value (bytes are hashed as they are)."""
    h = hashlib.sha256()
    if isinstance(obj, (bytes, bytearray)):
        h.update(bytes(obj))
    else:
        h.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    return h.hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def row_key(kind: str, row_id: str, input_hash: str, model: str, prompt_version: str) -> str:
    """The key of one Stage I result (24 hex chars)."""
    return content_hash([kind, str(row_id), input_hash, model, prompt_version])[:24]


class PartStore:
    """Finished rows of one Stage I step (e.g. `stage1/parts/pseudo/`); every row has a `key` column."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def part_files(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    def read(self) -> pa.Table | None:
        """All finished rows (a key written twice keeps its last copy by file name order)."""
        tables = [pq.read_table(p) for p in self.part_files()]
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="permissive")
        keys = table.column("key").to_pylist()
        last = {k: i for i, k in enumerate(keys)}
        if len(last) == len(keys):
            return table
        return table.take(sorted(last.values()))

    def finished_keys(self) -> set[str]:
        return {k for p in self.part_files() for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()}

    def write(self, table: pa.Table) -> Path | None:
        """Persist one finished batch atomically; the file name is the hash of its keys (idempotent)."""
        if table.num_rows == 0:
            return None
        name = f"part-{content_hash(sorted(table.column('key').to_pylist()))[:20]}.parquet"
        return atomic_write_parquet(table, self.root / name)

    def select(self, keys: Iterable[str]) -> pa.Table | None:
        """Finished rows for `keys`, in the order given (missing keys are skipped)."""
        table = self.read()
        if table is None:
            return None
        index = {k: i for i, k in enumerate(table.column("key").to_pylist())}
        return table.take([index[k] for k in keys if k in index])


def batch_id(keys) -> str:
    """Id of the rows generated in one call (their `batch_seconds` is that call's time)."""
    return content_hash(sorted(map(str, keys)))[:16]


def _plain(x):
    """A numpy scalar as a Python value; NaN (how Ray Data may carry a None) as None."""
    x = x.item() if isinstance(x, np.generic) else x
    return None if isinstance(x, float) and x != x else x


def store_generations(batch: dict, store_root: str, targets: dict | None = None,
                      constants: dict | None = None) -> dict[str, Any]:
    """Sanitise generated CoTs against their sample's target and persist the batch as one part file.

    targets: sample_id -> (target id, target title, candidate ids); when given, `text` is
    masked (`mllmrec_ray.prompting.parsing.sanitize_cot`), dropped if a mention survives, and stored
    as `cot` with `n_masks` / `dropped`. The raw text of a CoT is never stored.
    Returns `{"n": [rows stored]}` so the driver can count finished rows.
    """
    from mllmrec_ray.stage1.cot_prompts import sanitize_generation

    rows = {k: list(v) for k, v in batch.items()}
    n = len(rows["key"])
    if targets is not None:
        clean = [sanitize_generation(t, *targets[s]) for t, s in zip(rows.pop("text"), rows["sample_id"])]
        rows["cot"] = [c[0] for c in clean]
        rows["n_masks"] = [c[1] for c in clean]
        rows["dropped"] = [c[2] for c in clean]
    for k, v in (constants or {}).items():
        rows[k] = [v] * n
    # Ray Data may put several generator calls in one block: each call tagged its rows.
    rows.setdefault("batch", [batch_id(rows["key"])] * n)
    table = pa.table({k: [_plain(x) for x in v] for k, v in rows.items()})
    PartStore(store_root).write(table)
    return {"n": [n]}
