import json

import numpy as np
import pyarrow as pa
import pytest

from jobs.report import PAIRED_TITLE, collect_results, read_metrics, write_report
from mllmrec_ray.baselines.trivial import rank_min_id, rank_random
from mllmrec_ray.ranking.evaluation import make_record, rankings_path, read_rankings, write_rankings, write_record
from mllmrec_ray.io import atomic_write_parquet
from mllmrec_ray.ranking.metrics import paired_bootstrap_diff, per_sample


def _record(model, hr3):
    return {"model": model, "dataset": "ml-100k", "split": "test", "candidates": 10, "n": 189,
            "HR@3": hr3, "HR@5": hr3 + 0.1, "NDCG@3": hr3 - 0.1, "NDCG@5": hr3 - 0.05,
            "ci95": {"HR@3": [hr3 - 0.05, hr3 + 0.05]}, "valid_ratio": 1.0}


def test_report_writes_curve_tables_and_orders_models(tmp_path):
    (tmp_path / "grpo").mkdir()
    (tmp_path / "eval").mkdir()
    with open(tmp_path / "grpo" / "metrics.jsonl", "w") as f:
        for step, r in [(1, 0.1), (2, 0.4), (2, 0.5), (3, 0.7)]:  # step 2 repeated after a resume
            f.write(json.dumps({"step": step, "reward_mean": r, "reward_std": 0.2, "hit_rate": r / 2,
                                "valid_rate": 0.9, "sync_s": 0.5, "step_s": 10.0}) + "\n")
    for m, hr in [("sasrec", 0.7), ("grpo", 0.6), ("base", 0.3), ("pop", 0.62)]:
        (tmp_path / "eval" / f"{m}.json").write_text(json.dumps(_record(m, hr)))
    out = write_report(tmp_path)
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    assert out["grpo"]["steps"] == 3 and out["grpo"]["reward_start"] == 0.1 and out["grpo"]["reward_end"] == 0.7
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in results] == ["base", "grpo", "pop", "sasrec"]
    md = (tmp_path / "results.md").read_text()
    assert "0.6200 [0.57,0.67]" in md
    assert "| 2 | 0.5 " in (tmp_path / "grpo" / "metrics.md").read_text()  # latest row of a repeated step
    # no rankings files (an old run): the main table only
    assert PAIRED_TITLE not in md and not (tmp_path / "paired.json").exists()


def test_torn_metrics_line_is_named(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "reward_mean": 0.1}\n{"step": 2, "rew')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(p)


def test_non_record_in_eval_is_rejected(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="x.json"):
        collect_results(tmp_path)


def test_rankings_round_trip_keeps_invalid_answers_null(tmp_path):
    path = write_rankings(tmp_path / "m.rankings.parquet", ["u1", "u2", "u3"], [["3", "1", "2"], None, []])
    assert read_rankings(path) == (["u1", "u2", "u3"], [["3", "1", "2"], None, []])
    assert rankings_path(tmp_path / "eval" / "pop.json") == tmp_path / "eval" / "pop.rankings.parquet"
    with pytest.raises(ValueError, match="appears more than once"):
        write_rankings(tmp_path / "x.rankings.parquet", ["u1", "u1"], [None, None])


def test_paired_bootstrap_diff_by_hand():
    same = np.array([1.0, 0.0, 1.0, 0.5])
    d = paired_bootstrap_diff(same, same)
    assert d == {"diff": 0.0, "ci95": [0.0, 0.0], "p_le_0": 1.0}
    a, b = np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0])
    d = paired_bootstrap_diff(a, b, n_resamples=500, seed=1)
    assert d["diff"] == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert 0.0 <= d["ci95"][0] <= 0.5 <= d["ci95"][1] <= 1.0  # every resampled mean lies in [0, 1]
    better = paired_bootstrap_diff(np.ones(50), np.r_[np.zeros(25), np.ones(25)])
    assert better["ci95"][0] > 0 and better["p_le_0"] == 0.0
    assert paired_bootstrap_diff(a, b, seed=4) == paired_bootstrap_diff(a, b, seed=4)
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap_diff(a, b[:3])


def _run_with_rankings(tmp_path, n=40, n_sft=30):
    """A run dir with test samples and base/sft/pop/min-id records + rankings (sft on the first n_sft)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n):
        cands = [str(i) for i in rng.choice(np.arange(1, 200), 10, replace=False)]
        rows.append({"sample_id": f"u{u}", "user_id": str(u), "split": "test", "history": ["500"] * 9,
                     "target": cands[int(rng.integers(10))], "candidates": cands, "candidates_100": None})
    rows.append({"sample_id": "t0", "user_id": "t0", "split": "train", "history": ["500"] * 9,
                 "target": "1", "candidates": [str(i) for i in range(1, 11)], "candidates_100": None})
    schema = pa.schema([("sample_id", pa.string()), ("user_id", pa.string()), ("split", pa.string()),
                        ("history", pa.list_(pa.string())), ("target", pa.string()),
                        ("candidates", pa.list_(pa.string())), ("candidates_100", pa.list_(pa.string()))])
    data = tmp_path / "data"
    atomic_write_parquet(pa.Table.from_pylist(rows, schema=schema), data / "samples.parquet")
    atomic_write_parquet(pa.table({"item_id": [str(i) for i in range(1, 501)]}), data / "items.parquet")
    test = [r for r in rows if r["split"] == "test"]
    oracle = [[r["target"]] + [c for c in r["candidates"] if c != r["target"]] for r in test]
    models = {
        "base": (test, [rank_random(r["candidates"], 0, r["sample_id"]) for r in test]),
        "sft": (test[:n_sft], [None] + oracle[1:n_sft]),  # max_samples=n_sft, one invalid answer
        "pop": (test, [rank_min_id(r["candidates"]) for r in test]),
    }
    for model, (subset, rankings) in models.items():
        record = make_record(model, "toy", "test", 10, rankings, [r["target"] for r in subset])
        path = write_record(tmp_path / "eval" / f"{model}.json", record)
        write_rankings(rankings_path(path), [r["sample_id"] for r in subset], rankings)
    # a record without rankings (saved before rankings existed): a table row, no pairs
    (tmp_path / "eval" / "sasrec.json").write_text(json.dumps(_record("sasrec", 0.7)))
    return test, models


def test_report_checks_rankings_and_writes_paired_differences(tmp_path):
    test, models = _run_with_rankings(tmp_path)
    out = write_report(tmp_path)
    assert [r["model"] for r in json.loads((tmp_path / "results.json").read_text())] == ["base", "sft", "pop",
                                                                                           "sasrec"]
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert {(p["a"], p["b"]) for p in paired} == {("sft", "base"), ("base", "pop"), ("sft", "pop")}
    assert {p["metric"] for p in paired} == {"HR@3", "NDCG@3", "HR@5", "NDCG@5"}
    hits = {m: per_sample(r, [t["target"] for t in s], (3,))["HR@3"] for m, (s, r) in models.items()}
    sft_base = next(p for p in paired if (p["a"], p["b"], p["metric"]) == ("sft", "base", "HR@3"))
    assert sft_base["n"] == 30  # only the samples both were evaluated on
    assert sft_base["diff"] == pytest.approx(float(np.mean(hits["sft"] - hits["base"][:30])))
    assert sft_base["ci95"][0] > 0  # an oracle on 29 of 30 samples beats random beyond noise
    base_pop = next(p for p in paired if (p["a"], p["b"], p["metric"]) == ("base", "pop", "HR@3"))
    assert base_pop["n"] == 40
    assert base_pop["diff"] == pytest.approx(float(np.mean(hits["base"] - hits["pop"])))
    md = (tmp_path / "results.md").read_text()
    assert PAIRED_TITLE in md and out["paired"] in md
    sft_row = next(line for line in md.splitlines() if line.startswith("| sft − base"))
    assert f"{sft_base['diff']:+.4f} [" in sft_row and "]*" in sft_row and "| 30 " in sft_row


def test_tampered_ranking_fails_naming_the_file(tmp_path):
    test, models = _run_with_rankings(tmp_path)
    path = tmp_path / "eval" / "pop.rankings.parquet"
    ids, rankings = read_rankings(path)
    # move the target of a sample the pop ranking has in its top 3 to the end: HR@3 no longer matches
    i = next(i for i, (r, t) in enumerate(zip(rankings, test)) if r.index(t["target"]) < 3)
    rankings[i] = [c for c in rankings[i] if c != test[i]["target"]] + [test[i]["target"]]
    write_rankings(path, ids, rankings)
    with pytest.raises(ValueError, match=r"pop\.rankings\.parquet: HR@3"):
        write_report(tmp_path)
    rankings[i] = rankings[i][:-1] + ["999"]  # an id that is not a candidate of the sample
    write_rankings(path, ids, rankings)
    with pytest.raises(ValueError, match=r"pop\.rankings\.parquet: ranking of 'u\d+' is not distinct"):
        write_report(tmp_path)


def test_order_sensitivity_table(tmp_path):
    (tmp_path / "eval").mkdir()
    rec = _record("sft", 0.7)
    rec["order_sensitivity"] = {"shuffles": 2, "n": 40, "original": {"HR@3": 0.725, "NDCG@3": 0.586},
                                "shuffled": [{"HR@3": 0.7, "NDCG@3": 0.55}, {"HR@3": 0.675, "NDCG@3": 0.557}],
                                "top1_agreement": [0.525, 0.475]}
    (tmp_path / "eval" / "sft.json").write_text(json.dumps(rec))
    (tmp_path / "eval" / "pop.json").write_text(json.dumps(_record("pop", 0.62)))
    write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| sft | 40 | 0.725 | 0.700, 0.675 | 0.586 | 0.550, 0.557 | 0.53, 0.47 |" in md
    assert md.count("Candidate-order sensitivity") == 1


def test_factorial_effects_are_paired_means_over_common_samples(tmp_path):
    """benchmarks/factorial.py: main effects and interaction of a 2 x 2 equal the per-sample arithmetic."""
    import subprocess
    import sys
    from pathlib import Path

    test, models = _run_with_rankings(tmp_path)
    ev = tmp_path / "eval"
    # cells A0B0, A1B0, A0B1, A1B1 = base, sft, pop, pop: A is "sft vs base" where B is off and 0 where B is on
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "factorial.py"
    cells = [ev / f"{m}.json" for m in ("base", "sft", "pop", "pop")]
    out = tmp_path / "effects.json"
    subprocess.run([sys.executable, str(script), *map(str, cells), "--data", str(tmp_path / "data"),
                    "--a", "sft", "--b", "pop", "--json", str(out)], check=True, capture_output=True)
    rows = {(r["effect"], r["metric"]): r for r in json.loads(out.read_text())}
    hr = {m: per_sample(r, [t["target"] for t in s], (3,))["HR@3"][:30] for m, (s, r) in models.items()}
    assert rows[("main sft", "HR@3")]["n"] == 30  # sft ranked only the first 30
    assert rows[("main sft", "HR@3")]["diff"] == pytest.approx(float(np.mean(hr["sft"] - hr["base"])) / 2)
    main_pop = float(np.mean(2 * hr["pop"] - hr["base"] - hr["sft"])) / 2
    assert rows[("main pop", "HR@3")]["diff"] == pytest.approx(main_pop)
    assert rows[("sft x pop", "HR@3")]["diff"] == pytest.approx(float(np.mean(hr["base"] - hr["sft"])))
