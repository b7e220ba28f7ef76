"""Stage I end to end on a local Ray cluster: textualize -> cot -> mda with a tiny Llama, then the
refiner swapped for an OpenAI-compatible fake on 127.0.0.1 that names every catalogue title and id
(so the target is in every refined CoT it writes): the sanitiser must mask it before anything is stored.
"""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from mllmrec_ray.prompting.parsing import mentions_item
from stage1_fixtures import TITLES, long_context, make_data_dir, mllmrec
from test_cot_openai_refiner import GOOD_JUDGE, FakeOpenAI

CONFIG = """\
ray_num_cpus: 8
model:
  engine: {kv_cache_gib: 0.25, max_model_len: 1024}
stage1:
  pool_size: 2
  batch_size: 4
  max_cot_samples: 8
  resources: {num_cpus: 0.5}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("stage1")
    model = long_context(make_tiny_model(root / "tiny", "llama"))
    data = make_data_dir(root, users=30)
    config = root / "stage1.yaml"
    config.write_text(CONFIG)
    return {"root": root, "model": model, "data": data, "stage1": root / "stage1", "config": config}


def counts(stdout: str) -> dict[str, tuple[int, int]]:
    """step -> (already finished, generated now) from the job's progress lines."""
    out = {}
    for step, done, todo in re.findall(r"^\[(\w+)\] \d+ rows, (\d+) already finished, (\d+) to generate", stdout, re.M):
        out[step] = (int(done), int(todo))
    return out


def test_local_generator_end_to_end(run):
    data, stage1, cfg = run["data"], run["stage1"], run["config"]
    mllmrec("textualize", "--data", data, "--out", stage1, "--config", cfg)
    proc = mllmrec("cot", "--data", data, "--stage1", stage1, "--config", cfg, "--model", run["model"],
                   "--max-new-tokens", "24", "--judge-samples", "2", "--judge-max-new-tokens", "64",
                   "--max-model-len", "8192")
    assert counts(proc.stdout) == {"pseudo": (0, 8), "refined": (0, 8), "judge": (0, 4)}
    samples = {s["sample_id"]: s for s in pq.read_table(data / "samples.parquet").to_pylist()}
    cot = pq.read_table(stage1 / "cot.parquet").to_pylist()
    assert len(cot) == 8 and all(samples[r["sample_id"]]["split"] == "train" for r in cot)
    assert all(r["pseudo_cot"] for r in cot) and all(r["refined_cot"] for r in cot)
    audit = json.loads((stage1 / "audit.json").read_text())
    assert audit["leakage"]["clean"] and audit["leakage"]["texts_checked"] == 16
    # A 0.5-CPU actor generates with Ray's one OpenMP thread, not the one-per-core vLLM leaves behind.
    assert all(audit["timings"][step]["torch_threads"] == [1] for step in ("pseudo", "refined", "judge"))
    judge = audit["judge"]["per_source"]
    assert judge["pseudo_cot"]["judged"] == 2 and judge["refined_cot"]["judged"] == 2
    for rec in audit["judge"]["records"]:  # valid with five 1-5 scores, or recorded invalid with its raw text
        assert (rec["valid"] and set(rec["scores"]) == set(judge["pseudo_cot"]["mean_scores"])) or \
               (not rec["valid"] and rec["scores"] is None and rec["attempts"] == 3)
    # a rerun generates nothing
    again = mllmrec("cot", "--data", data, "--stage1", stage1, "--config", cfg, "--model", run["model"],
                    "--max-new-tokens", "24", "--judge-samples", "2", "--judge-max-new-tokens", "64",
                    "--max-model-len", "8192")
    assert counts(again.stdout) == {"pseudo": (8, 0), "refined": (8, 0), "judge": (4, 0)}
    assert pq.read_table(stage1 / "cot.parquet").to_pylist() == cot

    mllmrec("mda", "--data", data, "--stage1", stage1, "--config", cfg)
    mda = pq.read_table(stage1 / "mda.parquet").to_pylist()
    assert sum(r["s_u"] is not None for r in mda) == 8
    assert sum(r["selected_sft"] for r in mda) == 1 and sum(r["selected_grpo"] for r in mda) == 1  # round(0.8), min 1


def test_openai_refiner_never_sees_the_target_and_its_leaks_are_masked(run):
    data, stage1, cfg = run["data"], run["stage1"], run["config"]
    catalogue = " ".join(f"{t} [ITEM_{i}] item {i}" for i, t in enumerate(TITLES))
    leaky = f"Step 1: bright covers.\nStep 2: {catalogue}.\nStep 3: more of the same.\nStep 4: maybe {catalogue}"

    def script(n, body):
        content = body["messages"][-1]["content"]
        if content.startswith("Role. You are an evaluator"):
            return 200, GOOD_JUDGE
        return (429, {"error": "busy"}) if n % 5 == 1 else (200, leaky)

    server = FakeOpenAI(script)
    try:
        proc = mllmrec("cot", "--data", data, "--stage1", stage1, "--config", cfg, "--model", run["model"],
                       "--max-new-tokens", "24", "--max-model-len", "8192", "--refiner", "openai",
                       "--endpoint", server.url, "--refiner-model", "fake-r1", "--requests-per-second", "50",
                       "--judge-samples", "2")
    finally:
        server.close()
    # refinement and judging went to the endpoint (with retries on 429); the pseudo-CoTs are the first
    # test's when it ran before this one (the module's shared run), else generated here
    got = counts(proc.stdout)
    assert got["refined"] == (0, 8) and got["judge"] == (0, 4) and got["pseudo"] in ((8, 0), (0, 8))
    samples = {s["sample_id"]: s for s in pq.read_table(data / "samples.parquet").to_pylist()}
    items = {r["item_id"]: r for r in pq.read_table(data / "items.parquet").to_pylist()}
    refine_requests = [r for r in server.requests if r["body"]["messages"][0]["role"] == "system"]
    assert len({json.dumps(r["body"]) for r in refine_requests}) == 8
    for req in refine_requests:  # prompts carry history only: no item tag at all (titles are neutralised)
        assert "[ITEM_" not in req["body"]["messages"][-1]["content"]
    cot = pq.read_table(stage1 / "cot.parquet").to_pylist()
    assert all(r["refiner_model"] == "openai:fake-r1" for r in cot)
    for r in cot:
        s = samples[r["sample_id"]]
        target = s["target"]
        assert r["refined_masks"] >= 2  # the fake named the target's title and id: both masked
        assert not mentions_item(r["refined_cot"], target, items[target]["title"])
        for c in s["candidates"]:
            assert not mentions_item(r["refined_cot"], c, None)
    audit = json.loads((stage1 / "audit.json").read_text())
    assert audit["leakage"]["clean"] and audit["leakage"]["refined_samples_masked"] == 8
    assert audit["judge"]["per_source"]["refined_cot"]["valid"] == 2
    assert audit["judge"]["per_source"]["refined_cot"]["mean_scores"]["leakage_risk"] == 4.0
