"""The SPEC section 1 protocol: last window, 7:1:2 user split, never-touched negatives."""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pytest

from mllmrec_ray.data import DataError, build_samples, split_sizes


def make_tables(n_users=60, n_items=300, seed=1):
    """Users with 5..40 interactions, timestamps full of ties, a few repeated items."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [str(i) for i in range(1, n_items + 1)]})
    rows = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(5, 41))
        picks = rng.choice(n_items, size=n, replace=False) + 1
        for j, i in enumerate(picks):
            rows.append((str(u), str(i), 1000 + j // 3))  # three items per second
    rng.shuffle(rows)  # file order is not time order
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return items, inter


def test_split_sizes():
    assert split_sizes(943) == (660, 94, 189)
    assert split_sizes(10) == (7, 1, 2)
    assert split_sizes(1) == (1, 0, 0)
    with pytest.raises(DataError):
        split_sizes(10, (0.5, 0.1, 0.1))


def test_invariants():
    items, inter = make_tables()
    min_inter = 10
    samples, stats = build_samples(items, inter, min_inter=min_inter, negatives=9, negatives_large=99, seed=3,
                                   tie_break="file")
    touched = inter.groupby("user_id")["item_id"].agg(set).to_dict()
    counts = inter.groupby("user_id").size()
    assert stats["users"] == 60
    assert stats["users_below_min_inter"] == int((counts < min_inter).sum()) > 0
    assert len(samples) == int((counts >= min_inter).sum())
    assert tuple(samples["split"].value_counts()[["train", "valid", "test"]]) == split_sizes(len(samples))
    for s in samples.itertuples():
        assert s.sample_id == f"u{s.user_id}"
        assert len(s.history) == min_inter - 1 and s.target not in s.history
        assert len(set(s.history)) == len(s.history)
        for cands, k in ((s.candidates, 10), (s.candidates_100, 100)):
            assert len(cands) == k and len(set(cands)) == k and s.target in cands
            assert not (set(cands) - {s.target}) & touched[s.user_id]  # negatives never touched
        # the window is the user's last min_inter items in time order
        log = inter[inter["user_id"] == s.user_id].sort_values("timestamp", kind="stable")
        assert log["timestamp"].iloc[-1] == log.set_index("item_id").loc[s.target, "timestamp"]
        assert set(s.history) | {s.target} == set(log["item_id"].iloc[-min_inter:])
    # the target is not always in the same slot: candidates are shuffled
    assert len({s.candidates.index(s.target) for s in samples.itertuples()}) > 3


def test_deterministic_per_seed():
    items, inter = make_tables()
    a, _ = build_samples(items, inter, seed=7)
    b, _ = build_samples(items, inter, seed=7)
    c, _ = build_samples(items, inter, seed=8)
    assert a.equals(b)
    assert a["split"].tolist() != c["split"].tolist()
    assert a["candidates"].tolist() != c["candidates"].tolist()
    assert a["history"].tolist() == c["history"].tolist()  # the window does not depend on the seed
    # the 10-lists do not change when the 100-lists are left out
    d, _ = build_samples(items, inter, seed=7, negatives_large=0)
    assert d["candidates"].tolist() == a["candidates"].tolist() and d["candidates_100"].isna().all()


def test_equal_timestamps_tie_break():
    items = pd.DataFrame({"item_id": [str(i) for i in range(1, 31)]})
    # user 1: items 3, 1, 2 at the same second after two earlier ones; file order decides
    inter = pd.DataFrame({"user_id": ["1"] * 5, "item_id": ["9", "3", "1", "2", "8"],
                          "timestamp": [5, 7, 7, 7, 4]})
    s, _ = build_samples(items, inter, min_inter=5, seed=0, negatives_large=0, tie_break="file")
    assert s["history"][0] == ["8", "9", "3", "1"] and s["target"][0] == "2"
    s, _ = build_samples(items, inter, min_inter=5, seed=0, negatives_large=0, tie_break="item")
    assert s["history"][0] == ["8", "9", "1", "2"] and s["target"][0] == "3"
    # the default orders ties by item id, so a reordered file gives the same sample
    shuffled = inter.iloc[[4, 3, 2, 1, 0]].reset_index(drop=True)
    for frame in (inter, shuffled):
        s, _ = build_samples(items, frame, min_inter=5, seed=0, negatives_large=0)
        assert s["history"][0] == ["8", "9", "1", "2"] and s["target"][0] == "3"


def test_repeated_items_counted_not_targets():
    items = pd.DataFrame({"item_id": [str(i) for i in range(1, 31)]})
    inter = pd.DataFrame({"user_id": ["1"] * 6, "item_id": ["1", "2", "3", "4", "5", "2"],
                          "timestamp": [1, 2, 3, 4, 5, 6]})
    s, stats = build_samples(items, inter, min_inter=5, seed=0, negatives_large=0)
    assert stats["repeated_interactions"] == 1
    assert s["history"][0] == ["1", "2", "3", "4"] and s["target"][0] == "5"


def test_negatives_are_uniform_over_the_unseen():
    items = pd.DataFrame({"item_id": [str(i) for i in range(1, 13)]})
    inter = pd.DataFrame({"user_id": ["1", "1"], "item_id": ["1", "2"], "timestamp": [1, 2]})
    seen = collections.Counter()
    for seed in range(200):
        s, _ = build_samples(items, inter, min_inter=2, negatives=5, negatives_large=0, seed=seed)
        seen.update(set(s["candidates"][0]) - {"2"})
    assert set(seen) == {str(i) for i in range(3, 13)}  # never "1" (history) or "2" (target)
    assert min(seen.values()) > 60 and max(seen.values()) < 140  # expected 100 each


def test_errors():
    items, inter = make_tables(n_users=5)
    with pytest.raises(DataError, match="user_id.*>= 100"):
        build_samples(items, inter, min_inter=100)
    small = pd.DataFrame({"item_id": [str(i) for i in range(1, 12)]})
    log = pd.DataFrame({"user_id": ["1"] * 3, "item_id": ["1", "2", "3"], "timestamp": [1, 2, 3]})
    with pytest.raises(DataError, match="user 1: only 8 never-seen items, 9 negatives needed"):
        build_samples(small, log, min_inter=3, negatives=9, negatives_large=0)
