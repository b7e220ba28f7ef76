"""Training data as every model sees it: the items covered by the training windows.

Every ranker (LLM prompts' collaborative evidence, Popularity, SASRec on the same
windows) learns from the same thing: per *training* user, the items of that user's
training windows in time order. With `data.train_windows: last` that is the last
`min_inter` items of each training user; with `sliding` it is the span of all the
user's windows. Valid and test users never contribute, so their targets cannot
reach any statistic built from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def training_sequences(samples: Iterable[Mapping]) -> dict[str, list[str]]:
    """user_id -> items of that user's training windows, oldest first (train split only).

    A window is `history + [target]`; its target sits at `position` in the user's
    sequence (the column is absent when each user has one window). Overlapping windows
    agree on the items they share, so their union by position is the user's span.
    """
    spans: dict[str, dict[int, str]] = {}
    for s in samples:
        if s["split"] != "train":
            continue
        window = [str(i) for i in s["history"]] + [str(s["target"])]
        end = s.get("position")
        end = len(window) - 1 if end is None else int(end)
        span = spans.setdefault(str(s["user_id"]), {})
        for offset, item in enumerate(window):
            pos = end - len(window) + 1 + offset
            if span.setdefault(pos, item) != item:
                raise ValueError(f"sample {s['sample_id']}: window disagrees with another window of user "
                                 f"{s['user_id']} at position {pos} ({item} vs {span[pos]})")
    return {user: [span[p] for p in sorted(span)] for user, span in spans.items()}
