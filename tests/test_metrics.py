import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mllmrec_ray.ranking.evaluation import (evaluate_rankings, format_table, load_split, make_record,
                                    write_record)
from mllmrec_ray.io import atomic_write_parquet
from mllmrec_ray.ranking.metrics import bootstrap_ci, compute_metrics, ks_for, per_sample, target_rank


def test_hand_computed_cases():
    cands = ["a", "b", "c", "d", "e"]
    rankings = [cands, ["b", "c", "a", "d", "e"], ["b", "c", "d", "a", "e"], None]
    v = per_sample(rankings, ["a"] * 4, (3, 5))
    assert v["HR@3"].tolist() == [1, 1, 0, 0]
    assert v["HR@5"].tolist() == [1, 1, 1, 0]
    assert v["NDCG@3"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert v["NDCG@5"][3] == 0.0 and v["NDCG@5"][2] == pytest.approx(1 / math.log2(5))


def test_duplicates_ignored_and_missing_target():
    assert target_rank(["b", "b", "b", "a"], "a") == 1
    assert target_rank(["b", "c"], "a") is None
    assert target_rank(None, "a") is None


def test_matches_brute_force_on_random_rankings():
    rng = np.random.default_rng(1)
    items = [str(i) for i in range(100)]
    rankings, targets = [], []
    for _ in range(500):
        perm = list(rng.permutation(items))
        targets.append(perm[int(rng.integers(100))])
        rankings.append(None if rng.random() < 0.1 else list(rng.permutation(perm)))
    got = compute_metrics(rankings, targets, ks_for(100), n_resamples=50)["means"]
    for k in (3, 5, 10):
        hits, gains = [], []
        for r, t in zip(rankings, targets):
            pos = r.index(t) if r is not None else 10**9
            hits.append(float(pos < k))
            gains.append(1.0 / np.log2(pos + 2) if pos < k else 0.0)
        assert got[f"HR@{k}"] == pytest.approx(np.mean(hits))
        assert got[f"NDCG@{k}"] == pytest.approx(np.mean(gains))


def test_bootstrap_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    values = {"HR@3": (rng.random(189) < 0.6).astype(float), "NDCG@3": rng.random(189)}
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3)
    assert a != bootstrap_ci(values, seed=4)
    for name, (lo, hi) in a.items():
        assert lo <= values[name].mean() <= hi
        assert hi - lo < 0.2


def test_record_keys_and_table(tmp_path):
    targets = ["a", "b", "c", "d"]
    rankings = [["a", "b"], ["a", "b"], None, ["d"]]
    rec = make_record("pop", "ml-100k", "test", 10, rankings, targets, extra={"seconds": 1.0})
    assert set(rec) == {"model", "dataset", "split", "candidates", "n", "HR@3", "HR@5", "NDCG@3",
                        "NDCG@5", "ci95", "valid_ratio", "seconds"}
    assert rec["n"] == 4 and rec["valid_ratio"] == 0.75
    assert rec["HR@3"] == 0.75
    assert rec["NDCG@3"] == pytest.approx((1 + 1 / math.log2(3) + 0 + 1) / 4)
    assert set(rec["ci95"]) == {"HR@3", "HR@5", "NDCG@3", "NDCG@5"}
    rec100 = make_record("pop", "ml-100k", "test", 100, rankings, targets)
    assert {"HR@10", "NDCG@10"} <= set(rec100) and "HR@10" in rec100["ci95"]
    assert list(evaluate_rankings(rankings, targets, 100))[:7] == [
        "n", "HR@3", "HR@5", "HR@10", "NDCG@3", "NDCG@5", "NDCG@10"]
    with pytest.raises(ValueError):
        make_record("pop", "x", "test", 10, rankings, targets, extra={"n": 3})

    path = tmp_path / "eval" / "pop.json"
    write_record(path, rec)
    assert json.loads(path.read_text())["HR@3"] == 0.75
    table = format_table([rec, rec100])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "0.7500 [" in table and "HR@10" in lines[0] and " - " in lines[2]


def _write_samples(path, rows):
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("sample_id", pa.string()), ("user_id", pa.string()), ("split", pa.string()),
        ("history", pa.list_(pa.string())), ("target", pa.string()),
        ("candidates", pa.list_(pa.string())), ("candidates_100", pa.list_(pa.string()))]))
    atomic_write_parquet(table, path)


def test_load_split_picks_candidate_column(tmp_path):
    items = [str(i) for i in range(1, 201)]
    rows = []
    for u, split in enumerate(["train", "test", "test"]):
        target = items[u]
        rows.append({"sample_id": f"u{u}", "user_id": str(u), "split": split,
                     "history": items[10:19], "target": target,
                     "candidates": [target] + items[100:109],
                     "candidates_100": items[100:199] + [target]})
    _write_samples(tmp_path / "samples.parquet", rows)
    atomic_write_parquet(pa.table({"item_id": items, "title": items}), tmp_path / "items.parquet")

    s10, it = load_split(tmp_path, "test", 10)
    assert s10["sample_id"].tolist() == ["u1", "u2"] and len(it) == 200
    assert isinstance(s10["history"][0], list) and len(s10["candidates"][0]) == 10
    s100, _ = load_split(tmp_path, "test", 100)
    assert len(s100["candidates"][0]) == 100 and s100["candidates"][0][-1] == "2"
    with pytest.raises(ValueError):
        load_split(tmp_path, "test", 20)

    rows[1]["candidates"] = items[100:110]  # target missing: must be refused
    _write_samples(tmp_path / "samples.parquet", rows)
    with pytest.raises(ValueError, match="bad candidates"):
        load_split(tmp_path, "test", 10)


def test_rank_moves_sign_test_matches_hand_binomials():
    """benchmarks/rank_moves.py's sign test: 2 * P(X >= k), X ~ Bin(up + down, 1/2), capped at 1."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rank_moves", Path(__file__).resolve().parents[1] / "benchmarks" / "rank_moves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.sign_test(3, 0) == pytest.approx(2 * 1 / 8)       # 3 of 3 up: 2 * (1/2)^3
    assert mod.sign_test(2, 1) == 1.0                              # 2 * P(X >= 2) = 2 * 4/8, capped
    assert mod.sign_test(29, 13) == pytest.approx(mod.sign_test(13, 29)) == pytest.approx(0.01952, abs=1e-5)
    assert mod.sign_test(0, 0) == 1.0
