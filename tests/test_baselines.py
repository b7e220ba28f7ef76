import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from mllmrec_ray.baselines.popularity import fit_popularity, rank_by_popularity
from mllmrec_ray.baselines.sasrec import fit_sasrec
from mllmrec_ray.baselines.trivial import rank_min_id, rank_random
from mllmrec_ray.ranking.evaluation import check_rankings, load_split, rankings_path, read_rankings
from mllmrec_ray.io import atomic_write_json, atomic_write_parquet
from mllmrec_ray.ranking.metrics import per_sample

N_ITEMS = 30
ITEMS = [f"i{k}" for k in range(N_ITEMS)]


def test_popularity_counts_train_users_only():
    inter = pd.DataFrame({
        "user_id": ["1", "1", "2", "2", "3", "3", "3", "3"],
        "item_id": ["a", "b", "a", "c", "z", "z", "z", "z"],  # user 3 (test) loves z
    })
    counts = fit_popularity(inter, ["1", "2"])
    assert counts["z"] == 0 and counts["a"] == 2
    assert rank_by_popularity(counts, ["z", "c", "a", "b"]) == ["a", "b", "c", "z"]


def _cycle_data(n_users, seed, length=20):
    """Sequences where the next item is always (last + 1) mod N, plus 10-candidate tasks."""
    rng = np.random.default_rng(seed)
    seqs, hists, cands, targets = [], [], [], []
    for _ in range(n_users):
        start = int(rng.integers(N_ITEMS))
        seq = [ITEMS[(start + t) % N_ITEMS] for t in range(length)]
        seqs.append(seq)
        hists.append(seq[-10:-1])
        targets.append(seq[-1])
        others = [i for i in ITEMS if i not in seq]  # length <= 21 leaves >= 9 negatives
        c = [seq[-1]] + [str(i) for i in rng.choice(others, 9, replace=False)]
        rng.shuffle(c)
        cands.append(c)
    return seqs, hists, cands, targets


def _train(seed, epochs=30):
    seqs, *_ = _cycle_data(150, seed=0)
    _, vh, vc, vt = _cycle_data(40, seed=1)
    return fit_sasrec(seqs, ITEMS, (vh, vc, vt), epochs=epochs, patience=10, batch_size=32,
                      lr=5e-3, hidden=32, max_len=20, seed=seed, log=None)


def test_sasrec_learns_deterministic_transitions():
    ranker = _train(seed=0)
    _, th, tc, tt = _cycle_data(100, seed=2)
    hr1 = per_sample(ranker.rank(th, tc), tt, (1,))["HR@1"].mean()
    assert hr1 > 0.8, hr1  # random ranking gives 0.1


def test_sasrec_is_deterministic_with_a_seed():
    a, b = _train(seed=7, epochs=2), _train(seed=7, epochs=2)
    for (name, pa_), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa_, pb), name
    _, th, tc, _ = _cycle_data(30, seed=3)
    assert a.rank(th, tc) == b.rank(th, tc)


def test_baseline_cli_writes_record(tmp_path):
    seqs, _, cands, targets = _cycle_data(60, seed=4, length=12)
    rows, inter = [], []
    for u, (seq, c) in enumerate(zip(seqs, cands)):
        split = "train" if u < 40 else ("valid" if u < 48 else "test")
        rows.append({"sample_id": f"u{u}", "user_id": str(u), "split": split,
                     "history": seq[-10:-1], "target": seq[-1], "candidates": c,
                     "candidates_100": None})
        inter += [{"user_id": str(u), "item_id": it, "timestamp": t, "rating": 4.0}
                  for t, it in enumerate(seq[-10:])]
    schema = pa.schema([("sample_id", pa.string()), ("user_id", pa.string()),
                        ("split", pa.string()), ("history", pa.list_(pa.string())),
                        ("target", pa.string()), ("candidates", pa.list_(pa.string())),
                        ("candidates_100", pa.list_(pa.string()))])
    atomic_write_parquet(pa.Table.from_pylist(rows, schema=schema), tmp_path / "samples.parquet")
    atomic_write_parquet(pa.Table.from_pylist(inter), tmp_path / "interactions.parquet")
    atomic_write_parquet(pa.table({"item_id": ITEMS, "title": ITEMS}), tmp_path / "items.parquet")
    atomic_write_json(tmp_path / "manifest.json", {"dataset": "cycle"})
    for model in ("pop", "sasrec", "random", "min-id"):
        out = tmp_path / "eval" / f"{model}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "baseline", "--data", str(tmp_path),
             "--model", model, "--out", str(out), "--epochs", "3"],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        rec = json.loads(out.read_text())
        assert rec["model"] == model and rec["dataset"] == "cycle" and rec["n"] == 12
        assert rec["split"] == "test" and rec["candidates"] == 10 and rec["valid_ratio"] == 1.0
        assert "| " + model in proc.stdout
        # the rankings beside the record reproduce it, one full permutation per test sample
        ids, rankings = read_rankings(rankings_path(out))
        samples, _ = load_split(tmp_path, "test")
        check_rankings(rec, ids, rankings, samples, source=model)
        assert ids == samples["sample_id"].tolist()
        assert all(sorted(r) == sorted(c) for r, c in zip(rankings, samples["candidates"]))


def test_min_id_ranks_numeric_ids_by_value_then_text():
    assert rank_min_id(["10", "2", "1682", "33"]) == ["2", "10", "33", "1682"]
    # non-numeric ids after every numeric one, in text order; "7" and "007" tie on value
    assert rank_min_id(["b", "10", "a7", "007", "7", "-1"]) == ["007", "7", "10", "-1", "a7", "b"]


def test_random_ranking_is_a_seeded_permutation():
    cands = [str(i) for i in range(10)]
    r = rank_random(cands, seed=3, key="u1")
    assert sorted(r) == sorted(cands)
    assert r == rank_random(cands, seed=3, key="u1")  # same seed and sample: same order
    assert cands == [str(i) for i in range(10)]  # the input list is not shuffled in place
    others = {tuple(rank_random(cands, seed=s, key="u1")) for s in range(20)}
    assert len(others) > 15  # the seed changes the order
    assert rank_random(cands, seed=3, key="u2") != r
