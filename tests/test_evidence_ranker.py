"""benchmarks/evidence_ranker.py: the conditional logit over printed evidence learns what predicts the target."""

import importlib.util
import random
from pathlib import Path

import torch


def _module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence_ranker.py"
    spec = importlib.util.spec_from_file_location("evidence_ranker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_recovers_the_column_that_predicts_the_target():
    """Targets are the follows-level-4 candidate; popularity and rank are noise: the fit must rank by follows."""
    mod = _module()
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        feats = [(rng.randint(1, 5), rng.randint(0, 3), r) for r in rng.sample(range(1, 11), 10)]
        t = rng.randrange(10)
        feats[t] = (feats[t][0], 4, feats[t][2])
        rows.append((feats, t))
    w = mod.fit(rows, [6, 5, 11])
    assert w[1][4] > w[1][:4].max() + 1.0               # the follows level 4 weight stands out
    assert float(w[2][1:].max() - w[2][1:].min()) < 1.0  # the noise column stays near flat
    scores = mod.scores(w, torch.tensor([f for f, _ in rows]))
    assert (scores.argmax(-1) == torch.tensor([t for _, t in rows])).all()
