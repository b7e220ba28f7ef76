"""Collaborative evidence for the prompt (`prompt.collab`, the MMSRARec idea): short text per candidate.

A 135M model cannot memorise which of 1,682 movies follow which; it can learn to read a
level printed next to each candidate. Two statistics, both from the training windows of
*training* users only (`mllmrec_ray.data.windows.training_sequences`):
- popularity: how many training users watched the item;
- follows: how many training users watched the candidate within `window` steps after one
  of the user's `recent` last history items (item-to-item transitions; on the ML-100K
  valid split, last 3 items / window 3 ranked best among co-occurrence variants).
Each is printed as a level `1..levels` (popularity, by catalogue quantiles) and `0..levels-1`
(follows, by powers of two), e.g. `(popularity 4/5, follows recent 2/4)`. With `prompt.collab_seq`
a third, `next-item rank 1/10`, comes from a cross-fitted SASRec (`mllmrec_ray.data.seq_evidence`).

Leave-user-out: a training sample's own user is subtracted from every statistic, so its
target's levels look exactly as they would for an unseen user (otherwise the target of
every training prompt would follow its history by construction). Valid and test users
never enter the statistics, so their targets cannot reach a prompt through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

COLLAB_LEGEND = (
    "Evidence from other users: how popular each candidate is, and how many users watched it "
    "soon after the last items this user watched (higher means more likely)."
)
SEQ_LEGEND = " Next-item rank: where a sequence model trained on other users places it (1 = most likely)."


@dataclass
class CollabStats:
    """Counts over training users; see the module docstring for what each means."""

    index: dict[str, int]
    pop: np.ndarray                 # (items,) users who watched the item
    follows: np.ndarray             # (items, items) users with b within `window` steps after a
    positions: dict[str, dict[str, int]]  # user -> item -> position, for leave-user-out
    pop_edges: np.ndarray           # popularity quantile edges over the catalogue
    window: int = 3
    recent: int = 3
    levels: int = 5
    seq: "object | None" = None     # `SeqEvidence` (prompt.collab_seq): adds each candidate's next-item rank
    style: str = "words"            # prompt.evidence_style: "words" or "short" (see `texts`)
    compact: bool = False           # prompt.instructions == "compact": a one-line legend (see `legend`)

    def counts(self, history: Sequence[str], candidates: Sequence[str],
               user: str | None = None) -> list[tuple[int, int]]:
        """(popularity, follows) of each candidate for this history, the user's own interactions left out."""
        own = self.positions.get(str(user), {}) if user is not None else {}
        recent = [str(h) for h in history[-self.recent:] if str(h) in self.index]
        out = []
        for c in map(str, candidates):
            j = self.index.get(c)
            if j is None:  # an item no training user has: no evidence either way
                out.append((0, 0))
                continue
            pop = int(self.pop[j]) - (c in own)
            fol = int(sum(self.follows[self.index[h], j] for h in recent))
            if c in own:  # subtract this user's own transitions into c
                fol -= sum(1 for h in recent if h in own and 1 <= own[c] - own[h] <= self.window)
            out.append((pop, fol))
        return out

    def levels_of(self, counts: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """(popularity level 1..levels, follows level 0..levels-1) per candidate."""
        out = []
        for pop, fol in counts:
            p = 1 + int(np.searchsorted(self.pop_edges, pop, side="right"))
            f = 0 if fol <= 0 else min(self.levels - 1, 1 + int(np.floor(np.log2(fol))))  # 1, 2-3, 4-7, ...
            out.append((min(p, self.levels), f))
        return out

    def texts(self, history: Sequence[str], candidates: Sequence[str], user: str | None = None) -> list[str]:
        """The evidence written before each candidate in the prompt: `words` "(popularity 3/5, follows
        recent 0/4, next-item rank 1/10):", `short` "(pop 3, fol 0, rank 1):" (half the tokens; the
        scales are in `legend`)."""
        short = self.style == "short"
        texts = [f"pop {p}, fol {f}" if short else f"popularity {p}/{self.levels}, follows recent {f}/{self.levels - 1}"
                 for p, f in self.levels_of(self.counts(history, candidates, user))]
        if self.seq is not None:
            n = len(candidates)
            texts = [(f"{t}, rank {r}" if short else f"{t}, next-item rank {r}/{n}") if r else t
                     for t, r in zip(texts, self.seq.ranks(history, candidates, user))]
        return [f"({t}):" for t in texts]

    def legend(self, texts: Sequence[str]) -> str:
        """The line above the candidates that says what `texts` (this prompt's evidence) mean; the
        rank part only when a rank is shown (an empty history has none). `compact`: the scales only."""
        ranked = any(", rank " in t or "next-item rank" in t for t in texts)
        if self.compact:
            scales = ("pop 1-{0}, fol 0-{1}" if self.style == "short" else "popularity, follows recent").format(
                self.levels, self.levels - 1)
            return (f"Evidence from other users ({scales}): higher is more likely"
                    + (f"; rank 1-{len(texts)} by a sequence model, 1 is most likely." if ranked else "."))
        if self.style != "short":
            return COLLAB_LEGEND + (SEQ_LEGEND if any("next-item rank" in t for t in texts) else "")
        text = (f"Evidence from other users per candidate: pop = how popular it is (1-{self.levels}), fol = how "
                f"many users watched it soon after this user's last items (0-{self.levels - 1}); higher means "
                f"more likely.")
        if any(", rank " in t for t in texts):
            text += f" rank = where a sequence model trained on other users places it (1-{len(texts)}, 1 = most likely)."
        return text


def fit_collab(sequences: Mapping[str, Sequence[str]], catalogue: Sequence[str], window: int = 3,
               recent: int = 3, levels: int = 5) -> CollabStats:
    """Statistics from `training_sequences(...)` (user -> items oldest first) over the item catalogue."""
    if window < 1 or recent < 1 or levels < 2:
        raise ValueError(f"collab window={window}, recent={recent}, levels={levels}: need >= 1, >= 1, >= 2")
    index = {str(i): n for n, i in enumerate(catalogue)}
    pop = np.zeros(len(index), dtype=np.int64)
    follows = np.zeros((len(index), len(index)), dtype=np.int32)
    positions: dict[str, dict[str, int]] = {}
    for user, seq in sequences.items():
        seq = [str(i) for i in seq]
        unknown = [i for i in seq if i not in index]
        if unknown:
            raise ValueError(f"user {user}: item {unknown[0]!r} of a training window is not in the item table")
        ids = np.array([index[i] for i in seq], dtype=np.int64)
        positions[str(user)] = {i: p for p, i in enumerate(seq)}
        pop[np.unique(ids)] += 1
        for d in range(1, window + 1):
            if len(ids) > d:
                np.add.at(follows, (ids[:-d], ids[d:]), 1)
    # popularity levels: equal-mass bins over the catalogue's items that someone watched
    watched = pop[pop > 0]
    qs = np.linspace(0, 1, levels + 1)[1:-1]
    edges = np.unique(np.quantile(watched, qs)) if len(watched) else np.zeros(0)
    return CollabStats(index=index, pop=pop, follows=follows, positions=positions, pop_edges=edges,
                       window=window, recent=recent, levels=levels)


def rank_by_evidence(stats: CollabStats, history: Sequence[str], candidates: Sequence[str],
                     user: str | None = None) -> list[str]:
    """The evidence alone as a ranker (the `collab` row): follows level, then popularity level,
    exactly the levels the prompt shows; equal levels keep the candidate order."""
    levels = stats.levels_of(stats.counts(history, candidates, user))
    order = sorted(range(len(candidates)), key=lambda i: (-levels[i][1], -levels[i][0]))
    return [str(candidates[i]) for i in order]
