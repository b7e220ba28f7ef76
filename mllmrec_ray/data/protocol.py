"""The evaluation protocol of SPEC section 1: last-window samples, user split, candidates.

Everything random comes from one seed through independent numpy streams (split,
10-list, 100-list), so changing the size of one list never changes the others.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from .loaders import DataError

SPLITS = ("train", "valid", "test")


def split_sizes(n: int, ratios=(0.7, 0.1, 0.2)) -> tuple[int, int, int]:
    """Round half up for train and valid, the rest is test: 943 -> 660/94/189."""
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios {ratios} must be three non-negative numbers summing to 1")
    n_train = int(n * ratios[0] + 0.5)
    n_valid = min(int(n * ratios[1] + 0.5), n - n_train)
    return n_train, n_valid, n - n_train - n_valid


def _candidates(rng, target: int, seen: set[int], n_items: int, k: int, user: str) -> list[int]:
    """target + k items drawn uniformly without replacement from those not in `seen`, shuffled.

    A uniformly random ordered draw of k + |seen| catalogue items, with the seen ones
    removed, starts with a uniformly random ordered draw from the unseen ones: no need
    to build the (large) unseen set per user.
    """
    if n_items - len(seen) < k:
        raise DataError(f"user {user}: only {n_items - len(seen)} never-seen items, {k} negatives needed")
    draw = rng.choice(n_items, size=min(n_items, k + len(seen)), replace=False)
    negatives = [int(i) for i in draw if int(i) not in seen][:k]
    return [int(i) for i in rng.permutation([target] + negatives)]


def build_samples(items: pd.DataFrame, interactions: pd.DataFrame, *, min_inter: int = 10, negatives: int = 9,
                  negatives_large: int = 99, seed: int = 0, split=(0.7, 0.1, 0.2),
                  tie_break: str = "item") -> tuple[pd.DataFrame, dict]:
    """One sample per user with >= min_inter distinct items. Returns (samples, stats).

    Interactions are ordered by timestamp, equal timestamps by row order in the file
    (tie_break="file") or by item id (tie_break="item"; numeric ids numerically). On
    ML-100K 415 of 943 users have their last two items at the same second, so this
    choice moves targets and measurably changes baseline scores; "item" is the default
    because it gives the same samples whatever the source's row order (the GroupLens
    u.data and the RecBole .inter files order rows differently). A user's repeated
    item keeps its first time only (so a target never repeats a history item). Negatives
    come from the whole catalogue (`items`) minus everything the user ever touched.
    """
    if min_inter < 2:
        raise DataError(f"min_inter={min_inter}: a sample needs at least one history item and a target")
    if tie_break not in ("file", "item"):
        raise DataError(f"tie_break={tie_break!r}: expected 'file' or 'item'")
    if negatives < 1 or negatives_large < 0:
        raise DataError(f"negatives={negatives}, negatives_large={negatives_large}: need >= 1 and >= 0")
    log = interactions[["user_id", "item_id", "timestamp"]].copy()
    log["row"] = np.arange(len(log))
    ids = log["item_id"].astype(str)
    numeric = tie_break == "item" and ids.str.isdigit().all()
    log["tie"] = log["row"] if tie_break == "file" else (ids.astype("int64") if numeric else ids)
    log = log.sort_values(["user_id", "timestamp", "tie", "row"], kind="stable")
    repeated = log.duplicated(["user_id", "item_id"], keep="first")
    log = log[~repeated]

    catalogue = items["item_id"].tolist()
    index = {item: i for i, item in enumerate(catalogue)}
    # log is sorted by user: cut its item indices where the user changes
    item_idx = log["item_id"].map(index)
    if item_idx.isna().any():
        raise DataError(f"field 'item_id': interaction item {log['item_id'][item_idx.isna()].iloc[0]!r} "
                        "is not in the items table")
    item_idx = item_idx.to_numpy(dtype=np.int64)
    user_col = log["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1]])
    by_user = dict(zip(user_col[starts].tolist(), np.split(item_idx, starts[1:])))
    # numeric ids in numeric order ("2" < "10"), other ids after them as text
    users = sorted(by_user, key=lambda u: (0, int(u), u) if u.isdigit() else (1, 0, u))
    kept = [u for u in users if len(by_user[u]) >= min_inter]
    if not kept:
        raise DataError(f"field 'user_id': none of the {len(users)} users has >= {min_inter} distinct items "
                        f"(the most any user has is {max(map(len, by_user.values()), default=0)})")

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    order = streams[0].permutation(len(kept))
    n_train, n_valid, _ = split_sizes(len(kept), split)
    split_of = np.empty(len(kept), dtype=object)
    split_of[order[:n_train]] = "train"
    split_of[order[n_train:n_train + n_valid]] = "valid"
    split_of[order[n_train + n_valid:]] = "test"

    rows = []
    for pos, user in enumerate(tqdm(kept, desc="samples", unit="user", disable=None, mininterval=2)):
        seq = by_user[user]
        window = seq[-min_inter:]
        seen = set(seq.tolist())
        target = int(window[-1])
        c10 = _candidates(streams[1], target, seen, len(catalogue), negatives, user)
        c100 = (_candidates(streams[2], target, seen, len(catalogue), negatives_large, user)
                if negatives_large else None)
        rows.append({
            "sample_id": f"u{user}",
            "user_id": user,
            "split": split_of[pos],
            "history": [catalogue[i] for i in window[:-1]],
            "target": catalogue[target],
            "candidates": [catalogue[i] for i in c10],
            "candidates_100": None if c100 is None else [catalogue[i] for i in c100],
        })
    samples = pd.DataFrame(rows, columns=["sample_id", "user_id", "split", "history", "target",
                                          "candidates", "candidates_100"])
    stats = {
        "users": len(users),
        "users_below_min_inter": len(users) - len(kept),
        "repeated_interactions": int(repeated.sum()),
        "samples": len(samples),
        **{s: int((samples["split"] == s).sum()) for s in SPLITS},
    }
    return samples, stats
