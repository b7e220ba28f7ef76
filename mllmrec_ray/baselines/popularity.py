"""Popularity baseline: rank candidates by how often training users interacted with them."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence


def fit_popularity(interactions, train_users: Iterable[str]) -> Counter:
    """Interaction count per item, over the interactions of training users only.

    `interactions` is the interactions table (DataFrame with `user_id`, `item_id`).
    Valid/test users are left out so that their targets cannot leak into the counts.
    """
    train = interactions[interactions["user_id"].isin(set(train_users))]
    return Counter(train["item_id"].tolist())


def fit_popularity_sequences(sequences: Mapping[str, Sequence[str]]) -> Counter:
    """Number of users whose sequence holds each item: each (user, item) counts once.

    `sequences` is user -> items, e.g. `data.windows.training_sequences` of the train
    samples, so Popularity learns from exactly the windows the LLM trains on.
    """
    return Counter(item for items in sequences.values() for item in set(items))


def rank_by_popularity(counts: Counter, candidates: Sequence[str]) -> list[str]:
    """Candidates sorted by count, descending; ties (e.g. unseen items) by item id."""
    return sorted(candidates, key=lambda item: (-counts[item], item))
