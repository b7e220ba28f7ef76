"""Sequence-model evidence for the prompt (`prompt.collab_seq`): each candidate's rank under SASRec.

The popularity and follows levels (`mllmrec_ray.data.collab`) are counts; a next-item
model trained on the same training windows ranks the demo's valid candidates far better
(SASRec HR@3 0.85 vs 0.77 for the levels alone), and a 135M model can read a printed rank
where it cannot learn the sequence patterns itself (LLaRA and CoLLM feed such a model's
signal to the LLM as embeddings; here it is text, like the rest of the evidence).

Cross-fitted, so a training prompt never shows evidence from a model that saw its user:
training users are split into `folds` by their position in sorted order; the model of
fold k trains on every other fold's users and gives the evidence of fold k's users. A
model trained on all training users gives the evidence of everyone else (valid and test
users, serving requests). Valid and test users never enter any model's training data; the
valid split only picks each model's epoch (early stopping, as the SASRec baseline does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mllmrec_ray.baselines.sasrec import SASRecRanker, fit_sasrec


@dataclass
class SeqEvidence:
    full: SASRecRanker                                  # trained on every training user
    folds: list[SASRecRanker]                           # folds[k]: trained without fold k's users
    fold_of: dict[str, int]                             # training user -> fold
    trained_on: list[list[str]] = field(default_factory=list)  # users of full, then of each fold model

    def ranker_for(self, user: str | None) -> SASRecRanker:
        """The model whose training data does not contain `user`."""
        k = self.fold_of.get(str(user)) if user is not None else None
        return self.full if k is None else self.folds[k]

    def ranks(self, history: Sequence[str], candidates: Sequence[str], user: str | None = None) -> list[int]:
        """1-based rank of each candidate (1 = the model's first choice); items the model never saw
        rank last, in list order. Without a known history item every candidate gets rank 0 (no evidence)."""
        ranker = self.ranker_for(user)
        hist = [str(h) for h in history if str(h) in ranker.index]
        cands = [str(c) for c in candidates]
        if not hist:
            return [0] * len(cands)
        known = [c for c in cands if c in ranker.index]
        order = ranker.rank([hist], [known])[0] if known else []
        order += [c for c in cands if c not in ranker.index]
        pos = {c: i + 1 for i, c in enumerate(order)}
        return [pos[c] for c in cands]

    def state(self) -> dict:
        return {"full": self.full.state(), "folds": [m.state() for m in self.folds], "fold_of": self.fold_of,
                "trained_on": self.trained_on}

    @classmethod
    def from_state(cls, state: dict) -> "SeqEvidence":
        return cls(SASRecRanker.from_state(state["full"]), [SASRecRanker.from_state(m) for m in state["folds"]],
                   dict(state["fold_of"]), [list(u) for u in state.get("trained_on", [])])


def fit_seq_evidence(sequences: Mapping[str, Sequence[str]], item_ids: Sequence[str], valid=None, *,
                     folds: int = 2, seed: int = 0, log=print, **sasrec_kwargs) -> SeqEvidence:
    """A full model and `folds` cross-fitted models from `training_sequences(...)` (user -> items).
    `valid` = (histories, candidate lists, targets) for early stopping, as in `fit_sasrec`."""
    if folds < 2:
        raise ValueError(f"seq evidence folds={folds}: need >= 2 (a fold model must leave its users out)")
    users = sorted(map(str, sequences))
    if len(users) < folds:
        raise ValueError(f"seq evidence: {len(users)} training users for {folds} folds")
    fold_of = {u: i % folds for i, u in enumerate(users)}
    groups = [users] + [[u for u in users if fold_of[u] != k] for k in range(folds)]
    models = []
    for name, group in zip(["full"] + [f"fold {k}" for k in range(folds)], groups):
        if log:
            log(f"[seqrec] training SASRec ({name}) on {len(group)} training users")
        models.append(fit_sasrec([sequences[u] for u in group], item_ids, valid, seed=seed, log=log,
                                 **sasrec_kwargs))
    return SeqEvidence(models[0], models[1:], fold_of, groups)
