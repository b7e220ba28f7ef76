"""The evaluation protocol of SPEC section 1: last-window samples, user split, candidates.

Everything random comes from one seed through independent numpy streams (split,
10-list, 100-list, and the 10- and 100-lists of sliding training windows), so
changing the size of one list never changes the others, and turning sliding windows
on or off never changes the last-window samples.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from .loaders import DataError

SPLITS = ("train", "valid", "test")
TRAIN_WINDOWS = ("last", "sliding")


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


def _row(sample_id: str, user: str, split: str, history, target: int, c10, c100, position: int,
         catalogue: list) -> dict:
    """One samples.parquet row; item indices become catalogue ids."""
    return {"sample_id": sample_id, "user_id": user, "split": split,
            "history": [catalogue[i] for i in history], "target": catalogue[target],
            "candidates": [catalogue[i] for i in c10],
            "candidates_100": None if c100 is None else [catalogue[i] for i in c100], "position": position}


def user_sequences(interactions: pd.DataFrame, catalogue: list, tie_break: str) -> tuple[dict, int]:
    """({user: catalogue indices of their distinct items in time order}, repeated interactions dropped).

    Ties in time are broken as `build_samples` documents; a repeated item keeps its first time."""
    log = interactions[["user_id", "item_id", "timestamp"]].copy()
    log["row"] = np.arange(len(log))
    ids = log["item_id"].astype(str)
    numeric = tie_break == "item" and ids.str.isdigit().all()
    log["tie"] = log["row"] if tie_break == "file" else (ids.astype("int64") if numeric else ids)
    log = log.sort_values(["user_id", "timestamp", "tie", "row"], kind="stable")
    repeated = log.duplicated(["user_id", "item_id"], keep="first")
    log = log[~repeated]
    index = {item: i for i, item in enumerate(catalogue)}
    # log is sorted by user: cut its item indices where the user changes
    item_idx = log["item_id"].map(index)
    if item_idx.isna().any():
        raise DataError(f"field 'item_id': interaction item {log['item_id'][item_idx.isna()].iloc[0]!r} "
                        "is not in the items table")
    item_idx = item_idx.to_numpy(dtype=np.int64)
    user_col = log["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1]])
    return dict(zip(user_col[starts].tolist(), np.split(item_idx, starts[1:]))), int(repeated.sum())


def build_samples(items: pd.DataFrame, interactions: pd.DataFrame, *, min_inter: int = 10, negatives: int = 9,
                  negatives_large: int = 99, seed: int = 0, split=(0.7, 0.1, 0.2),
                  tie_break: str = "item", train_windows: str = "last", window_stride: int = 1,
                  max_windows_per_user: int | None = None) -> tuple[pd.DataFrame, dict]:
    """One sample per user with >= min_inter distinct items. Returns (samples, stats).

    Interactions are ordered by timestamp, equal timestamps by row order in the file
    (tie_break="file") or by item id (tie_break="item"; numeric ids numerically). On
    ML-100K 415 of 943 users have their last two items at the same second, so this
    choice moves targets and measurably changes baseline scores; "item" is the default
    because it gives the same samples whatever the source's row order (the GroupLens
    u.data and the RecBole .inter files order rows differently). A user's repeated
    item keeps its first time only (so a target never repeats a history item). Negatives
    come from the whole catalogue (`items`) minus everything the user ever touched.

    train_windows="sliding" adds, for *training* users only, the earlier windows whose
    targets sit `window_stride` items apart before the last one (at least min_inter-1
    items of history each), at most `max_windows_per_user` windows per user counting the
    last one (the most recent are kept). Such a window's sample_id is `u<user>_t<p>`,
    p being the `position` of its target in the user's deduplicated time-ordered
    sequence; every sample has `position`. Their rows follow all last-window rows.
    """
    if min_inter < 2:
        raise DataError(f"min_inter={min_inter}: a sample needs at least one history item and a target")
    if tie_break not in ("file", "item"):
        raise DataError(f"tie_break={tie_break!r}: expected 'file' or 'item'")
    if negatives < 1 or negatives_large < 0:
        raise DataError(f"negatives={negatives}, negatives_large={negatives_large}: need >= 1 and >= 0")
    if train_windows not in TRAIN_WINDOWS:
        raise DataError(f"train_windows={train_windows!r}: expected 'last' or 'sliding'")
    if window_stride < 1:
        raise DataError(f"window_stride={window_stride}: need >= 1")
    if max_windows_per_user is not None and max_windows_per_user < 1:
        raise DataError(f"max_windows_per_user={max_windows_per_user}: need >= 1 or None")
    catalogue = items["item_id"].tolist()
    by_user, repeated = user_sequences(interactions, catalogue, tie_break)
    # numeric ids in numeric order ("2" < "10"), other ids after them as text
    users = sorted(by_user, key=lambda u: (0, int(u), u) if u.isdigit() else (1, 0, u))
    kept = [u for u in users if len(by_user[u]) >= min_inter]
    if not kept:
        raise DataError(f"field 'user_id': none of the {len(users)} users has >= {min_inter} distinct items "
                        f"(the most any user has is {max(map(len, by_user.values()), default=0)})")

    # spawn(n)'s first children do not depend on n: the window streams (3, 4) leave the
    # split (0) and the last-window lists (1, 2) exactly as without sliding windows
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
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
        rows.append(_row(f"u{user}", user, split_of[pos], window[:-1], target, c10, c100, len(seq) - 1, catalogue))
    extra_windows = 0
    if train_windows == "sliding":
        for pos, user in enumerate(kept):
            if split_of[pos] != "train":  # valid/test users keep their single last window
                continue
            seq = by_user[user]
            ends = list(range(len(seq) - 1 - window_stride, min_inter - 2, -window_stride))
            if max_windows_per_user is not None:
                ends = ends[:max_windows_per_user - 1]  # the most recent; the last window counts too
            seen = set(seq.tolist())
            for p in reversed(ends):  # oldest first
                target = int(seq[p])
                c10 = _candidates(streams[3], target, seen, len(catalogue), negatives, user)
                c100 = (_candidates(streams[4], target, seen, len(catalogue), negatives_large, user)
                        if negatives_large else None)
                rows.append(_row(f"u{user}_t{p}", user, "train", seq[p - min_inter + 1:p], target, c10, c100, p,
                                 catalogue))
                extra_windows += 1
    samples = pd.DataFrame(rows, columns=["sample_id", "user_id", "split", "history", "target",
                                          "candidates", "candidates_100", "position"])
    samples["position"] = samples["position"].astype("int64")
    clash = samples["sample_id"][samples["sample_id"].duplicated()]
    if len(clash):  # everything joins by sample_id: a user id like "7_t3" must not shadow a window
        raise DataError(f"field 'user_id': sample_id {clash.iloc[0]!r} names two samples")
    stats = {
        "users": len(users),
        "users_below_min_inter": len(users) - len(kept),
        "repeated_interactions": repeated,
        "samples": len(samples),
        "extra_windows": extra_windows,
        **{s: int((samples["split"] == s).sum()) for s in SPLITS},
    }
    return samples, stats
