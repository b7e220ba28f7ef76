import json

import pytest

from jobs.report import collect_results, read_metrics, write_report


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
