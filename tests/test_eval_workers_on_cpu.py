"""`mllmrec eval --workers 2` on a real local Ray cluster: two one-thread scorer actors rank exactly what
the job's own scorer ranks, sample for sample, and the record says how many scored."""

from __future__ import annotations

import json

import ray

from jobs.cli import main
from jobs.common import start_local_ray
from mllmrec_ray.ranking.evaluation import rankings_path, read_rankings


def test_eval_workers_rank_as_the_job_does(tmp_path, tiny_llama):
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_text("item,name\n" + "".join(f"i{i},Item {i}\n" for i in range(40)))
    (src / "interactions.csv").write_text("user,item,ts\n" + "".join(
        f"u{u},i{(u * 7 + j * 3) % 40},{100 + j}\n" for u in range(120) for j in range(6 + u % 9)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"name": "tiny", "runs_dir": str(tmp_path / "runs"), "data": {
        "dataset": None, "format": "csv", "path": str(src), "min_inter": 5, "negatives_large": 0,
        "columns": {"user": "user", "item": "item", "timestamp": "ts", "title": "name"}},
        "eval": {"readout": "id"}}))
    data = tmp_path / "runs" / "tiny" / "data"
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(data)]) == 0

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2)
    try:
        records = {}
        for workers in (1, 2):
            # --batch 2: chunks of 8 samples, so the two actors share several chunks
            out = tmp_path / f"w{workers}" / "m.json"
            assert main(["eval", "--config", str(cfg), "--data", str(data), "--model", str(tiny_llama),
                         "--split", "test", "--batch", "2", "--captions", "none", "--workers", str(workers),
                         "--out", str(out)]) == 0
            ids, rankings = read_rankings(rankings_path(out))
            records[workers] = (json.loads(out.read_text()), {i: list(r) for i, r in zip(ids, rankings)})
    finally:
        if started:
            ray.shutdown()
    (one, r1), (two, r2) = records[1], records[2]
    assert one["workers"] == 1 and two["workers"] == 2
    assert one["n"] == two["n"] > 16 and len(r1) == one["n"]
    assert r1 == r2  # every sample, every candidate in the same place
    assert one["NDCG@3"] == two["NDCG@3"]
