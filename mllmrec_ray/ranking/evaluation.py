"""Evaluation records: load a split, score rankings, write and tabulate records.

A record (docs/interfaces.md) is
`{"model", "dataset", "split", "candidates", "n", "HR@3", "HR@5", "NDCG@3", "NDCG@5",
  ("HR@10", "NDCG@10" for 100 candidates), "ci95": {metric: [lo, hi]}, "valid_ratio"}`
plus whatever `extra` keys a ranker adds (e.g. training time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mllmrec_ray.io import atomic_write_json
from mllmrec_ray.ranking.metrics import compute_metrics, ks_for

SPLITS = ("train", "valid", "test")


def load_split(data_dir: str | os.PathLike, split: str, n_candidates: int = 10):
    """(samples, items) DataFrames for one split of a prepared data dir.

    The returned samples carry the candidate list of the requested size in the
    column `candidates` (taken from `candidates_100` for 100), so every ranker
    reads the same column; `history` and `candidates` are plain Python lists.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from mllmrec_ray.data.run_data import candidate_column

    column = candidate_column(n_candidates)
    data_dir = Path(data_dir)
    table = pq.read_table(
        data_dir / "samples.parquet",
        columns=["sample_id", "user_id", "split", "history", "target", column],
        filters=[("split", "==", split)],
    )
    samples = pd.DataFrame(
        {
            "sample_id": table.column("sample_id").to_pylist(),
            "user_id": table.column("user_id").to_pylist(),
            "split": table.column("split").to_pylist(),
            "history": table.column("history").to_pylist(),
            "target": table.column("target").to_pylist(),
            "candidates": table.column(column).to_pylist(),
        }
    )
    # Every ranker is scored on these lists: a malformed list would silently bias all of them.
    for sid, target, cands in zip(samples.sample_id, samples.target, samples.candidates):
        if len(cands) != n_candidates or len(set(cands)) != n_candidates or target not in cands:
            raise ValueError(f"sample {sid}: bad {column} (size {len(cands)}, target inside: "
                             f"{target in cands})")
    items = pq.read_table(data_dir / "items.parquet").to_pandas()
    return samples, items


def evaluate_rankings(
    rankings: Sequence[Sequence[str] | None],
    targets: Sequence[str],
    n_candidates: int,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """{"n", metric means..., "ci95": {metric: [lo, hi]}, "valid_ratio"} for one split."""
    result = compute_metrics(rankings, targets, ks_for(n_candidates), n_resamples, seed)
    names = sorted(result["means"], key=lambda m: (m.split("@")[0] != "HR", int(m.split("@")[1])))
    out: dict = {"n": len(targets)}
    out.update({m: result["means"][m] for m in names})
    out["ci95"] = {m: result["ci95"][m] for m in names}
    out["valid_ratio"] = sum(r is not None for r in rankings) / len(rankings)
    return out


def make_record(
    model: str,
    dataset: str,
    split: str,
    n_candidates: int,
    rankings: Sequence[Sequence[str] | None],
    targets: Sequence[str],
    extra: dict | None = None,
    seed: int = 0,
) -> dict:
    """The evaluation record of one model on one split (see module docstring)."""
    record = {"model": model, "dataset": dataset, "split": split, "candidates": n_candidates}
    record.update(evaluate_rankings(rankings, targets, n_candidates, seed=seed))
    for key in extra or {}:
        if key in record:
            raise ValueError(f"extra key {key!r} would overwrite a record field")
    record.update(extra or {})
    return record


def write_record(path: str | os.PathLike, record: dict) -> Path:
    return atomic_write_json(path, record)


RANKINGS_SUFFIX = ".rankings.parquet"


def rankings_path(record_path: str | os.PathLike) -> Path:
    """The rankings file beside a record: eval/pop.json -> eval/pop.rankings.parquet."""
    record_path = Path(record_path)
    if record_path.suffix != ".json":
        raise ValueError(f"record path {record_path} does not end in .json")
    return record_path.with_name(record_path.name[: -len(".json")] + RANKINGS_SUFFIX)


def write_rankings(
    path: str | os.PathLike, sample_ids: Sequence[str], rankings: Sequence[Sequence[str] | None]
) -> Path:
    """Write per-sample rankings (`sample_id`, `ranking` best first; null = invalid answer) atomically."""
    import pyarrow as pa

    from mllmrec_ray.io import atomic_write_parquet

    sample_ids = [str(s) for s in sample_ids]
    if len(sample_ids) != len(rankings):
        raise ValueError(f"{path}: {len(sample_ids)} sample ids for {len(rankings)} rankings")
    if len(set(sample_ids)) != len(sample_ids):
        dup = next(s for s in sample_ids if sample_ids.count(s) > 1)
        raise ValueError(f"{path}: sample_id {dup!r} appears more than once")
    table = pa.table(
        {
            "sample_id": pa.array(sample_ids, pa.string()),
            # None stays null (a miss), never an empty list: the two must not be confused on reading
            "ranking": pa.array([None if r is None else [str(i) for i in r] for r in rankings],
                                pa.list_(pa.string())),
        }
    )
    return atomic_write_parquet(table, path)


def read_rankings(path: str | os.PathLike) -> tuple[list[str], list[list[str] | None]]:
    """(sample_ids, rankings) from a file written by `write_rankings`."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"sample_id", "ranking"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a rankings file (missing columns {sorted(missing)})")
    return table.column("sample_id").to_pylist(), table.column("ranking").to_pylist()


def check_rankings(
    record: dict,
    sample_ids: Sequence[str],
    rankings: Sequence[Sequence[str] | None],
    samples,
    source: str = "rankings",
    tol: float = 1e-9,
) -> dict:
    """Per-sample metric arrays of saved rankings, after checking they reproduce `record`.

    `samples` is the record's split from `load_split`. Every sample id must belong to
    it, every ranking may only hold distinct candidate ids of its sample (a top-K list
    from generate mode is shorter than the candidate list), and the recomputed means,
    n and valid_ratio must equal the record's within `tol`. Errors name `source`.
    """
    from mllmrec_ray.ranking.metrics import per_sample

    by_id = {sid: (t, c) for sid, t, c in zip(samples["sample_id"], samples["target"], samples["candidates"])}
    if not rankings:
        raise ValueError(f"{source}: no rankings")
    if len(rankings) != record.get("n"):
        raise ValueError(f"{source}: {len(rankings)} rankings but the record says n={record.get('n')}")
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError(f"{source}: duplicate sample ids")
    targets = []
    for sid, ranking in zip(sample_ids, rankings):
        if sid not in by_id:
            raise ValueError(f"{source}: sample_id {sid!r} is not in the {record.get('split')} split")
        target, cands = by_id[sid]
        if ranking is not None and (len(set(ranking)) != len(ranking) or not set(ranking) <= set(cands)):
            raise ValueError(f"{source}: ranking of {sid!r} is not distinct candidate ids: {list(ranking)}")
        targets.append(target)
    values = per_sample(rankings, targets, ks_for(int(record["candidates"])))
    recomputed = {m: float(v.mean()) for m, v in values.items()}
    recomputed["valid_ratio"] = sum(r is not None for r in rankings) / len(rankings)
    for name, value in recomputed.items():
        if name in record and abs(float(record[name]) - value) > tol:
            raise ValueError(f"{source}: {name} recomputed from the rankings is {value:.10f}, "
                             f"the record says {record[name]}")
    return values


def format_table(records: Sequence[dict]) -> str:
    """Markdown table, one row per record, cells like `0.6543 [0.59,0.72]`."""
    metrics: list[str] = []
    for prefix in ("HR", "NDCG"):
        for k in (3, 5, 10):
            if any(f"{prefix}@{k}" in r for r in records):
                metrics.append(f"{prefix}@{k}")
    header = ["model", "dataset", "split", "cand", "n", *metrics, "valid"]
    rows = []
    for r in records:
        row = [str(r.get("model", "")), str(r.get("dataset", "")), str(r.get("split", "")),
               str(r.get("candidates", "")), str(r.get("n", ""))]
        for m in metrics:
            if m not in r:
                row.append("-")
                continue
            lo, hi = r.get("ci95", {}).get(m, (None, None))
            ci = f" [{lo:.2f},{hi:.2f}]" if lo is not None else ""
            row.append(f"{r[m]:.4f}{ci}")
        vr = r.get("valid_ratio")
        row.append("-" if vr is None else f"{vr:.3f}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)
