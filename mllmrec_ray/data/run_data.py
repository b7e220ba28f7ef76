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


def pick_samples(samples: list[dict], must: set[str], n: int, seed: int, avoid: set[str] = frozenset()) -> list[dict]:
    """`n` training samples: every MDA-selected (CoT) sample first, then a seeded random fill that
    takes samples outside `avoid` first and falls back to those in it only when the rest run out.

    A random subset alone would drop the few CoT samples (the demo's 96 of 660 held none of its 2),
    and with sliding windows the file lists one user's windows together, so no prefix either.
    SFT and GRPO both pick their samples with it.
    """
    import random

    first = [i for i, s in enumerate(samples) if s["sample_id"] in must][:n]
    fresh = [i for i, s in enumerate(samples) if s["sample_id"] not in must and s["sample_id"] not in avoid]
    seen = [i for i, s in enumerate(samples) if s["sample_id"] not in must and s["sample_id"] in avoid]
    rng = random.Random(seed)
    keep = first + rng.sample(fresh, min(len(fresh), n - len(first)))
    keep += rng.sample(seen, min(len(seen), n - len(keep)))
    return [samples[i] for i in sorted(keep)]


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


def load_collab(data_dir: str | os.PathLike, prompt_cfg) -> "object | None":
    """`CollabStats` from the training windows of a prepared data dir when `prompt.collab` is on, else None.

    Built from samples.parquet's train split only (`training_sequences`), so every stage that
    builds prompts (SFT, GRPO, eval, serving) sees the same evidence; `prompt.collab_seq` adds the
    sequence models of `SEQ_EVIDENCE`.
    """
    if not getattr(prompt_cfg, "collab", False):
        return None
    import pyarrow.parquet as pq

    from mllmrec_ray.data.collab import fit_collab
    from mllmrec_ray.data.windows import training_sequences

    data_dir = Path(data_dir)
    train = pq.read_table(data_dir / "samples.parquet", filters=[("split", "==", "train")]).to_pylist()
    catalogue = pq.read_table(data_dir / "items.parquet", columns=["item_id"]).column("item_id").to_pylist()
    stats = fit_collab(training_sequences(train), catalogue, window=prompt_cfg.collab_window,
                       recent=prompt_cfg.collab_recent, levels=prompt_cfg.collab_levels)
    stats.style = getattr(prompt_cfg, "evidence_style", "words")
    stats.compact = getattr(prompt_cfg, "instructions", "full") == "compact"
    if getattr(prompt_cfg, "collab_seq", False):
        stats.seq = load_seq_evidence(data_dir)
    return stats


SEQ_EVIDENCE = "seq_evidence.pt"  # written into the data dir by `mllmrec evidence`


def load_seq_evidence(data_dir: str | os.PathLike):
    """The cross-fitted SASRec models `mllmrec evidence` trained for `prompt.collab_seq`."""
    import torch

    from mllmrec_ray.data.seq_evidence import SeqEvidence

    path = Path(data_dir) / SEQ_EVIDENCE
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt.collab_seq is on but the sequence-model evidence is missing; "
                                f"run `mllmrec evidence --data {data_dir}` (the pipeline's seqrec stage)")
    # tensors and plain data only: nothing in the file can run code on load
    return SeqEvidence.from_state(torch.load(path, map_location="cpu", weights_only=True))


def candidate_column(n_candidates: int) -> str:
    """The samples.parquet column holding the candidate lists of that size (10 or 100)."""
    column = {10: "candidates", 100: "candidates_100"}.get(n_candidates)
    if column is None:
        raise ValueError(f"n_candidates must be 10 or 100, got {n_candidates}")
    return column
