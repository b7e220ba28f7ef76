"""Popularity baseline: rank candidates by how often training users interacted with them."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence


def fit_popularity(interactions, train_users: Iterable[str]) -> Counter:
    """Interaction count per item, over the interactions of training users only.

    `interactions` is the interactions table (DataFrame with `user_id`, `item_id`).
    Valid/test users are left out so that their targets cannot leak into the counts.
    """
    train = interactions[interactions["user_id"].isin(set(train_users))]
    return Counter(train["item_id"].tolist())


def rank_by_popularity(counts: Counter, candidates: Sequence[str]) -> list[str]:
    """Candidates sorted by count, descending; ties (e.g. unseen items) by item id."""
    return sorted(candidates, key=lambda item: (-counts[item], item))
