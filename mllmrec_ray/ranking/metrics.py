"""HR@K and NDCG@K from one full ranking per sample, with bootstrap intervals.

Conventions (SPEC section 1):
- A ranking is a list of item ids, best first, or None. None means the ranker gave
  no valid answer: the sample is a miss (hit 0, ndcg 0) and stays in the denominator.
- With exactly one relevant item (the target), NDCG@K = 1/log2(rank + 2) when the
  target's 0-based rank is < K, else 0 (the ideal DCG is 1).
- The rank of the target is the number of *distinct* ids before its first
  occurrence: a repeated id after its first occurrence is ignored (it cannot push
  the target down twice). Ids that are not candidates are not filtered here; they
  occupy ranks like any other id. Checking that a ranking only uses candidate ids
  is the caller's job (an invalid answer should reach this module as None).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def ks_for(n_candidates: int) -> tuple[int, ...]:
    """Cut-offs reported for a candidate-set size: 3 and 5 always, 10 with 100 candidates."""
    return (3, 5, 10) if n_candidates >= 100 else (3, 5)


def target_rank(ranking: Sequence[str] | None, target: str) -> int | None:
    """0-based rank of `target` in `ranking` (duplicates ignored), None if absent or no ranking."""
    if ranking is None:
        return None
    seen: set[str] = set()
    for item in ranking:
        if item == target:
            return len(seen)
        seen.add(item)
    return None


def per_sample(
    rankings: Sequence[Sequence[str] | None], targets: Sequence[str], ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """{"HR@K": hits, "NDCG@K": gains} as float arrays with one entry per sample."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings for {len(targets)} targets")
    ranks = [target_rank(r, t) for r, t in zip(rankings, targets)]
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"HR@{k}"] = np.array([1.0 if r is not None and r < k else 0.0 for r in ranks])
        out[f"NDCG@{k}"] = np.array(
            [1.0 / math.log2(r + 2) if r is not None and r < k else 0.0 for r in ranks]
        )
    return out


def bootstrap_ci(
    values: dict[str, np.ndarray], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap interval of the mean of each per-sample array.

    All metrics share the same resampled index sets (paired), so the intervals
    describe the same bootstrap samples; the seed makes them reproducible.
    """
    n = len(next(iter(values.values())))
    if n == 0:
        raise ValueError("cannot bootstrap an empty evaluation")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    tail = (1.0 - level) / 2.0 * 100.0
    out = {}
    for name, v in values.items():
        means = v[idx].mean(axis=1)
        lo, hi = np.percentile(means, [tail, 100.0 - tail])
        out[name] = [float(lo), float(hi)]
    return out


def compute_metrics(
    rankings: Sequence[Sequence[str] | None],
    targets: Sequence[str],
    ks: Sequence[int],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Means, 95% bootstrap intervals and per-sample arrays of HR@K / NDCG@K."""
    values = per_sample(rankings, targets, ks)
    return {
        "means": {name: float(v.mean()) for name, v in values.items()},
        "ci95": bootstrap_ci(values, n_resamples=n_resamples, seed=seed),
        "per_sample": values,
    }


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Paired percentile bootstrap of mean(a - b) for two per-sample arrays over the same samples.

    Resampling the per-sample differences (not each model on its own) keeps the
    pairing, so sample difficulty shared by both models cancels out.
    Returns {"diff": mean(a - b), "ci95": [lo, hi] (at `level`), "p_le_0": share of
    resampled mean differences <= 0}.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired arrays must be 1-D and aligned, got shapes {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("cannot bootstrap an empty comparison")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)  # bound the index matrix's memory on large evaluations
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p_le_0": float((means <= 0).mean())}
