"""Distributed GRPO on a real local Ray cluster: 2 vLLM rollout actors + 1 DeepSpeed learner,
tiny random Llama. Covers the step loop, weight sync, metrics, actor death and resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllmrec_ray.rl.prompt_pool import data_order, next_batch, shard
from mllmrec_ray.config import PipelineConfig

REPO = Path(__file__).resolve().parent.parent


def make_data_dir(root: Path, n_train: int = 6) -> Path:
    rng = random.Random(0)
    data = root / "data"
    data.mkdir(parents=True)
    ids = [str(i) for i in range(1, 41)]
    pq.write_table(pa.table({"item_id": ids, "title": [f"Movie {i}" for i in ids],
                             "year": pa.array([1990] * 40, pa.int32()), "genres": [["Drama"]] * 40,
                             "image_path": pa.array([None] * 40, pa.string())}), data / "items.parquet")
    rows = []
    for u in range(n_train + 2):
        seq = rng.sample(ids, 10)
        cands = [seq[-1], *rng.sample([i for i in ids if i not in seq], 9)]
        rng.shuffle(cands)
        rows.append({"sample_id": f"u{u}", "user_id": str(u), "split": "train" if u < n_train else "test",
                     "history": seq[:-1], "target": seq[-1], "candidates": cands, "candidates_100": cands})
    pq.write_table(pa.Table.from_pylist(rows), data / "samples.parquet")
    return data


def tiny_config(steps: int, name: str = "t") -> PipelineConfig:
    cfg = PipelineConfig(name=name)
    cfg.prompt.with_captions = False
    cfg.model.engine.max_model_len = 1024
    g = cfg.grpo
    g.steps, g.prompts_per_step, g.group_size, g.max_new_tokens = steps, 2, 2, 6
    g.rollout_actors, g.checkpoint_every, g.micro_batch_size, g.lr = 2, 1, 4, 1e-3
    g.rollout_resources.num_cpus = 0.5
    g.learner_resources.num_cpus = 0.5
    return cfg


def test_batches_cover_epochs_in_a_seeded_order_and_shard_evenly():
    picked, cursor = next_batch(5, seed=3, cursor=0, size=7)
    assert cursor == 7 and picked[:5] == data_order(5, 3, 0) and sorted(picked[:5]) == list(range(5))
    assert picked[5:] == data_order(5, 3, 1)[:2]
    again, _ = next_batch(5, seed=3, cursor=5, size=2)
    assert again == picked[5:]  # the cursor alone restores the order
    assert shard([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]] and shard([1], 3) == [[1], [], []]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_grpo_steps_sync_and_survive_a_killed_rollout_actor(ray_cluster, tiny_llama, tmp_path, monkeypatch):
    from jobs.grpo import FAULT_ENV, run_grpo
    from mllmrec_ray.runtime.policy import is_complete

    data = make_data_dir(tmp_path)
    cfg = tiny_config(steps=3)
    monkeypatch.setenv(FAULT_ENV, "2")  # rollout actor 0 is killed mid-request at step 2
    summary = run_grpo(cfg, data, tmp_path / "stage1", str(tiny_llama), tmp_path / "grpo", tmp_path / "models" / "grpo")
    assert summary["steps"] == 3 and summary["restarts"] == 1
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert len(r["sample_ids"]) == 2  # every prompt of the step came back, including the re-issued ones
        assert r["weights_version"] == r["step"] and r["sync_s"] > 0 and r["rollout_tok_s"] > 0
        assert -1.0 <= r["reward_mean"] <= 1.3 and 0.0 <= r["valid_rate"] <= 1.0
        assert r["kl"] is not None and r["loss"] is not None
        assert 0 < r["ref_s"] < r["learner_s"]  # the KL reference forward, inside the learner's step
        # reward terms by name, scored on the controller; sampler vs learner gap; sync traffic
        assert {"reward/format", "reward/hit", "think_rate", "think_len", "skipped_groups"} <= set(r)
        assert r["reward_mean"] == pytest.approx(r["reward/format"] + r["reward/hit"])  # weights 1 / 1
        assert 0.0 <= r["zero_var_groups"] <= 1.0 and r["skipped_groups"] == 0  # dynamic_sampling: none
        assert r["logprob_gap"] is not None and 0.0 <= r["logprob_gap"] < 1.0 and r["sync_bytes"] > 0
    assert rows[1]["actor_restarts"] == 1
    expected, _ = next_batch(6, cfg.grpo.seed, 0, 6)
    assert [s for r in rows for s in r["sample_ids"]] == [f"u{i}" for i in expected]
    assert is_complete(tmp_path / "models" / "grpo")
    assert (tmp_path / "grpo" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert list((tmp_path / "grpo").glob("events.out.tfevents.*"))  # TensorBoard beside the JSONL


def test_grpo_over_rankings_needs_no_rollout_engine(ray_cluster, tiny_llama, tmp_path):
    """`grpo.action: rank`: the learner samples rankings from its own id-readout scores; no vLLM actor,
    no weight sync, the same prompt schedule, metrics and saved model as the paper's GRPO."""
    from jobs.grpo import run_grpo
    from mllmrec_ray.runtime.policy import is_complete

    data = make_data_dir(tmp_path)
    cfg = tiny_config(steps=2)
    cfg.grpo.action, cfg.grpo.group_size, cfg.grpo.micro_batch_size = "rank", 4, 10
    summary = run_grpo(cfg, data, tmp_path / "stage1", str(tiny_llama), tmp_path / "grpo", tmp_path / "models" / "grpo")
    assert summary["steps"] == 2 and summary["restarts"] == 0
    rows = _metrics(tmp_path)
    expected, _ = next_batch(6, cfg.grpo.seed, 0, 4)
    assert [s for r in rows for s in r["sample_ids"]] == [f"u{i}" for i in expected]
    for r in rows:
        assert r["sync_transport"] == "none" and r["sync_bytes"] == 0 and r["rollout_tok_s"] is None
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["greedy_ndcg"] <= 1.0 and 0.0 <= r["zero_var_groups"] <= 1.0
        assert r["sequences"] == 2 and r["weights_version"] == r["step"] and r["kl"] is not None
    assert is_complete(tmp_path / "models" / "grpo")


def test_resume_after_killing_the_controller(tiny_llama, tmp_path):
    """Kill the whole `mllmrec grpo` process group after its first checkpoint, then --resume."""
    import yaml

    from mllmrec_ray.config import to_dict

    run = tmp_path / "run"
    make_data_dir(run)
    cfg = tiny_config(steps=4)
    cfg.grpo.rollout_actors = 1  # the multi-actor path is covered above; one engine keeps this test light
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    cmd = [sys.executable, "-m", "jobs.cli", "grpo", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run),
           "--model", str(tiny_llama)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    latest = run / "grpo" / "checkpoints" / "latest"
    deadline = time.time() + 900
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert latest.exists(), (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray cluster, every actor
    proc.wait()
    done_before = {r["step"] for r in _metrics(run)}
    assert done_before and max(done_before) < 4
    ckpt_step = int(latest.read_text().strip().split("_")[1])
    out = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed at step {ckpt_step}" in out.stdout
    rows = _metrics(run)
    last = {r["step"]: r for r in rows}  # a step run twice (after the checkpoint) keeps its latest row
    assert sorted(last) == [1, 2, 3, 4]
    expected, _ = next_batch(6, cfg.grpo.seed, 0, 8)
    assert [s for k in sorted(last) for s in last[k]["sample_ids"]] == [f"u{i}" for i in expected]
    assert last[4]["weights_version"] == 4  # the version counter came back from the checkpoint
