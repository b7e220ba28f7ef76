"""Reading a run directory's tables into the plain dicts prompts are built from.

SFT, GRPO, evaluation and serving all build prompts the same way, from the same
items (with captions when Stage I made them) and the same per-sample reasoning.
"""

from __future__ import annotations

import os
from pathlib import Path


def load_items(data_dir: str | os.PathLike, captions: str | os.PathLike | None = None) -> dict[str, dict]:
    """item_id -> {"item_id", "title", "caption", ...}; caption is None without Stage I captions."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data_dir) / "items.parquet").to_pylist()
    items = {row["item_id"]: dict(row, caption=None) for row in table}
    if captions is not None and Path(captions).exists():
        for row in pq.read_table(captions, columns=["item_id", "caption"]).to_pylist():
            if row["item_id"] in items:
                items[row["item_id"]]["caption"] = row["caption"]
    return items


def load_samples(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Rows of samples.parquet for one split, in file order."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data_dir) / "samples.parquet", filters=[("split", "==", split)])
    return table.to_pylist()


def load_reasoning(
    cot: str | os.PathLike | None,
    mda: str | os.PathLike | None,
    selected_column: str,
    cot_source: str = "refined",
) -> dict[str, str]:
    """sample_id -> CoT text for the samples MDA selected (`selected_sft` or `selected_grpo`).

    Joined by explicit sample_id, never by position. Missing files mean plain prompts.
    """
    import pyarrow.parquet as pq

    if cot is None or mda is None or not Path(cot).exists() or not Path(mda).exists():
        return {}
    column = {"refined": "refined_cot", "pseudo": "pseudo_cot"}[cot_source]
    selected = {
        r["sample_id"]
        for r in pq.read_table(mda, columns=["sample_id", selected_column]).to_pylist()
        if r[selected_column]
    }
    texts = {}
    for r in pq.read_table(cot, columns=["sample_id", column]).to_pylist():
        if r["sample_id"] in selected and r[column]:
            texts[r["sample_id"]] = r[column]
    return texts
