"""Sliding training windows (data.train_windows) and the baselines fitted on the same windows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from jobs.cli import main as cli_main
from mllmrec_ray.config import ConfigError, load_config
from mllmrec_ray.data import DataError, build_samples
from mllmrec_ray.data.prepare import SCHEMAS
from mllmrec_ray.data.windows import training_sequences
from mllmrec_ray.io import atomic_write_json, atomic_write_parquet

MIN_INTER = 4


def make_tables(n_users=40, n_items=200, seed=5):
    """Users with 2..30 distinct items at strictly increasing times: the sequences are known."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [str(i) for i in range(1, n_items + 1)]})
    seqs, rows = {}, []
    for u in range(1, n_users + 1):
        seq = [str(i + 1) for i in rng.choice(n_items, size=int(rng.integers(2, 31)), replace=False)]
        seqs[str(u)] = seq
        rows += [(str(u), item, 100 * t) for t, item in enumerate(seq)]
    rng.shuffle(rows)  # file order is not time order
    return items, pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), seqs


def build(**kw):
    items, inter, seqs = make_tables()
    samples, stats = build_samples(items, inter, min_inter=MIN_INTER, negatives=9, negatives_large=50, seed=11, **kw)
    return samples, stats, seqs


def _last_split(samples):
    last = samples[~samples["sample_id"].str.contains("_t")]
    return dict(zip(last["user_id"], last["split"]))


def test_sliding_windows_only_for_training_users():
    samples, stats, _ = build(train_windows="sliding")
    split_of = _last_split(samples)
    extra = samples[samples["sample_id"].str.contains("_t")]
    assert len(extra) == stats["extra_windows"] > 0
    assert set(extra["split"]) == {"train"}
    assert {split_of[u] for u in extra["user_id"]} == {"train"}  # never a valid/test user
    per_user = samples.groupby("user_id").size()
    for split in ("valid", "test"):
        users = [u for u, s in split_of.items() if s == split]
        assert users and (per_user[users] == 1).all()
    assert stats["train"] == int((samples["split"] == "train").sum())


def test_last_windows_identical_with_sliding_on_or_off():
    # spawn(n)'s first children do not depend on n: the last-window streams stay put
    for a, b in zip(np.random.SeedSequence(11).spawn(3), np.random.SeedSequence(11).spawn(5)[:3]):
        assert np.random.default_rng(a).bit_generator.state == np.random.default_rng(b).bit_generator.state
    last, _, _ = build()
    for kw in ({"train_windows": "sliding"}, {"train_windows": "sliding", "window_stride": 3,
                                              "max_windows_per_user": 2}):
        sliding, _, _ = build(**kw)
        assert sliding.iloc[:len(last)].equals(last)  # same rows, same order, same candidate lists
        assert not sliding.iloc[len(last):]["sample_id"].isin(last["sample_id"]).any()


def test_windows_are_slices_of_the_user_sequence():
    samples, _, seqs = build(train_windows="sliding")
    assert samples["position"].dtype == np.int64
    for s in samples.itertuples():
        seq, p = seqs[s.user_id], s.position
        assert s.sample_id == (f"u{s.user_id}" if p == len(seq) - 1 else f"u{s.user_id}_t{p}")
        assert s.target == seq[p] and s.history == seq[p - MIN_INTER + 1:p]
    split_of = _last_split(samples)
    for user, group in samples.groupby("user_id"):
        n = len(seqs[user])
        want = range(MIN_INTER - 1, n) if split_of[user] == "train" else [n - 1]
        assert sorted(group["position"]) == list(want)  # stride 1, no cap: every window


def test_window_negatives_never_interacted():
    samples, _, seqs = build(train_windows="sliding")
    extra = samples[samples["sample_id"].str.contains("_t")]
    for s in extra.itertuples():
        for cands, k in ((s.candidates, 10), (s.candidates_100, 51)):
            assert len(cands) == k and len(set(cands)) == k and s.target in cands
            assert not (set(cands) - {s.target}) & set(seqs[s.user_id])
    assert len({s.candidates.index(s.target) for s in extra.itertuples()}) > 3  # shuffled
    # without 100-lists the window 10-lists do not change (their own stream)
    small, _ = build_samples(*make_tables()[:2], min_inter=MIN_INTER, negatives=9, negatives_large=0, seed=11,
                             train_windows="sliding")
    assert small["candidates"].tolist() == samples["candidates"].tolist() and small["candidates_100"].isna().all()


@pytest.mark.parametrize("stride,cap", [(1, 3), (3, None), (2, 2), (5, 1)])
def test_stride_and_cap(stride, cap):
    samples, _, seqs = build(train_windows="sliding", window_stride=stride, max_windows_per_user=cap)
    split_of = _last_split(samples)
    for user, group in samples.groupby("user_id"):
        n = len(seqs[user])
        want = list(range(n - 1, MIN_INTER - 2, -stride))  # most recent first
        if split_of[user] != "train":
            want = want[:1]
        elif cap is not None:
            want = want[:cap]
        assert sorted(group["position"], reverse=True) == want
    if cap == 1:
        assert samples.equals(build()[0])


def test_training_sequences_last_and_sliding():
    last, _, seqs = build()
    train_users = {u for u, s in _last_split(last).items() if s == "train"}
    got = training_sequences(last.to_dict("records"))
    assert set(got) == train_users
    assert all(got[u] == seqs[u][-MIN_INTER:] for u in train_users)
    sliding, _, _ = build(train_windows="sliding")
    assert training_sequences(sliding.to_dict("records")) == {u: seqs[u] for u in train_users}
    capped, _, _ = build(train_windows="sliding", max_windows_per_user=3)
    assert training_sequences(capped.to_dict("records")) == {u: seqs[u][-(MIN_INTER + 2):] for u in train_users}


def test_bad_window_options():
    items, inter, _ = make_tables(n_users=5)
    with pytest.raises(DataError, match="window_stride=0"):
        build_samples(items, inter, min_inter=MIN_INTER, train_windows="sliding", window_stride=0)
    with pytest.raises(DataError, match="max_windows_per_user=0"):
        build_samples(items, inter, min_inter=MIN_INTER, train_windows="sliding", max_windows_per_user=0)
    with pytest.raises(DataError, match="train_windows='all'"):
        build_samples(items, inter, min_inter=MIN_INTER, train_windows="all")


def test_config_window_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {train_windows: sliding, window_stride: 2, max_windows_per_user: 5}\n"
                 "eval: {models: [pop, sasrec, sasrec-full]}\n")
    d = load_config(p).data
    assert (d.train_windows, d.window_stride, d.max_windows_per_user) == ("sliding", 2, 5)
    for text, match in (("data: {train_windows: all}\n", r"data\.train_windows.*'last', 'sliding'"),
                        ("data: {window_stride: 0}\n", r"data\.window_stride: 0 is out of range \(allowed: an integer >= 1\)"),
                        ("data: {max_windows_per_user: 0}\n", r"data\.max_windows_per_user: 0 is out of range \(allowed: an integer >= 1, or null\)")):
        p.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(p)


def test_prepare_cli_records_windows(tmp_path, capsys):
    from mllmrec_ray.data import load_prepared

    items, inter, _ = make_tables()
    src = tmp_path / "src"
    src.mkdir()
    items.assign(title=items["item_id"]).to_csv(src / "items.csv", index=False, columns=["item_id", "title"])
    inter.to_csv(src / "interactions.csv", index=False)
    argv = ["data", "prepare", "--format", "csv", "--path", str(src), "--columns",
            "user=user_id,item=item_id,timestamp=timestamp,title=title", "--min-inter", str(MIN_INTER),
            "--negatives-large", "50", "--seed", "11"]
    assert cli_main([*argv, "--out", str(tmp_path / "last")]) == 0
    assert cli_main([*argv, "--out", str(tmp_path / "sliding"), "--train-windows", "sliding",
                     "--window-stride", "2", "--max-windows-per-user", "3"]) == 0
    assert "earlier windows" in capsys.readouterr().out
    last, sliding = load_prepared(tmp_path / "last"), load_prepared(tmp_path / "sliding")
    assert last.manifest["config"]["train_windows"] == "last" and last.manifest["counts"]["extra_windows"] == 0
    conf, counts = sliding.manifest["config"], sliding.manifest["counts"]
    assert (conf["train_windows"], conf["window_stride"], conf["max_windows_per_user"]) == ("sliding", 2, 3)
    assert counts["train"] == counts["train_users"] + counts["extra_windows"] == int(
        (sliding.samples["split"] == "train").sum())
    assert counts["train_users"] == last.manifest["counts"]["train"] and counts["extra_windows"] > 0
    n = len(last.samples)
    assert sliding.samples.iloc[:n].reset_index(drop=True).equals(last.samples)
    assert sliding.samples["position"].tolist()[:n] == last.samples["position"].tolist()


def test_pipeline_prepare_and_baseline_stages(tmp_path):
    from jobs.pipeline import plan

    p = tmp_path / "c.yaml"
    p.write_text("data: {train_windows: sliding, window_stride: 2, max_windows_per_user: 5}\n"
                 "eval: {models: [pop, sasrec, sasrec-full]}\n")
    stages = {name: argv for name, argv, _ in plan(load_config(p), p, tmp_path / "run")}
    prep = stages["prepare"]
    assert prep[prep.index("--train-windows") + 1] == "sliding" and prep[prep.index("--window-stride") + 1] == "2"
    assert prep[prep.index("--max-windows-per-user") + 1] == "5"
    assert "--train-data" not in stages["sasrec"]  # windows, the default
    full = stages["sasrec-full"]
    assert full[full.index("--train-data") + 1] == "full" and full[full.index("--name") + 1] == "sasrec-full"
    assert full[full.index("--out") + 1].endswith("eval/sasrec-full.json")
    p.write_text("eval: {models: [pop, sasrec]}\n")  # the extra row only where listed
    assert "sasrec-full" not in {name for name, _, _ in plan(load_config(p), p, tmp_path / "run")}


def _hot_item_data(d):
    """Train users all touched `hot` before their last window; `t` is the target of half of them.

    Test samples offer hot and t: on all interactions hot is the more popular, on the
    last windows hot was never seen.
    """
    rows, inter = [], []
    others = [f"r{k}" for k in range(8)]
    for u in range(10):
        window = [f"a{u}_{j}" for j in range(MIN_INTER - 1)] + ["t" if u < 5 else "s"]
        rows.append({"sample_id": f"u{u}", "user_id": str(u), "split": "train", "history": window[:-1],
                     "target": window[-1], "candidates": [window[-1], "hot", *others], "candidates_100": None,
                     "position": MIN_INTER})
        inter += [{"user_id": str(u), "item_id": it, "timestamp": ts} for ts, it in enumerate(["hot", *window])]
    for u, split in ((10, "valid"), (11, "test"), (12, "test")):
        window = [f"b{u}_{j}" for j in range(MIN_INTER - 1)] + ["t"]
        rows.append({"sample_id": f"u{u}", "user_id": str(u), "split": split, "history": window[:-1],
                     "target": "t", "candidates": ["hot", *others[:4], "t", *others[4:]], "candidates_100": None,
                     "position": MIN_INTER - 1})
        inter += [{"user_id": str(u), "item_id": it, "timestamp": ts} for ts, it in enumerate(window)]
    item_ids = sorted({"hot", "s", "t", *others, *(i for r in rows for i in r["history"])})
    atomic_write_parquet(pa.Table.from_pylist(rows, schema=SCHEMAS["samples"]), d / "samples.parquet")
    atomic_write_parquet(pa.Table.from_pylist(inter), d / "interactions.parquet")
    atomic_write_parquet(pa.table({"item_id": item_ids, "title": item_ids}), d / "items.parquet")
    atomic_write_json(d / "manifest.json", {"dataset": "hot"})


def test_baselines_fit_on_the_windows_by_default(tmp_path, capsys):
    from mllmrec_ray.baselines.popularity import fit_popularity_sequences

    _hot_item_data(tmp_path)
    records = {}
    for name, extra in (("pop", []), ("pop-full", ["--train-data", "full", "--name", "pop-full"])):
        out = tmp_path / "eval" / f"{name}.json"
        assert cli_main(["baseline", "--data", str(tmp_path), "--model", "pop", "--out", str(out), *extra]) == 0
        records[name] = json.loads(out.read_text())
    assert records["pop"]["model"] == "pop" and records["pop"]["train_data"] == "windows"
    assert records["pop-full"]["model"] == "pop-full" and records["pop-full"]["train_data"] == "full"
    # windows: t (5 users) beats the never-seen hot; full: hot (10 users) beats t
    assert records["pop"]["NDCG@3"] == pytest.approx(1.0)
    assert records["pop-full"]["NDCG@3"] == pytest.approx(1 / np.log2(3))
    counts = fit_popularity_sequences({"1": ["a", "b"], "2": ["b", "b", "c"]})
    assert counts == {"a": 1, "b": 2, "c": 1}  # each (user, item) once

    out = tmp_path / "eval" / "sasrec-full.json"
    argv = ["baseline", "--data", str(tmp_path), "--model", "sasrec", "--epochs", "1", "--max-seconds", "0"]
    assert cli_main([*argv, "--train-data", "full", "--name", "sasrec-full", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["model"] == "sasrec-full" and rec["train_data"] == "full" and rec["n"] == 2
    assert cli_main([*argv, "--out", str(tmp_path / "eval" / "sasrec.json")]) == 0
    assert json.loads((tmp_path / "eval" / "sasrec.json").read_text())["train_data"] == "windows"
