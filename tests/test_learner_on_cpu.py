"""The DeepSpeed learner as a real Ray actor on a local CPU cluster (tiny model)."""

import random

import numpy as np
import pytest
import ray
import torch

from mllmrec_ray.config import GRPOConfig, LoraConfig
from mllmrec_ray.rl.grpo import grpo_loss
from mllmrec_ray.runtime.policy import is_complete, pad_batch, token_logprobs
from mllmrec_ray.rl.weights import from_bucket
from tiny_models import make_tiny_model

PROMPT = [3, 4, 5, 6, 7, 8]
# One prompt, a group of two: the first response is better than the group mean, the second worse.
BATCH = [
    {"prompt_ids": PROMPT, "response_ids": [20, 21, 22], "advantage": 1.0},
    {"prompt_ids": PROMPT, "response_ids": [30, 31], "advantage": -1.0},
    {"prompt_ids": PROMPT[:4], "response_ids": [40, 41, 42, 43], "advantage": 0.0},
]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen3"))


def _surrogate(logp, old, ref, adv):
    """The GRPO loss of per-response log-prob lists (as `logprobs` returns them) vs fixed old/ref."""
    n, t = len(logp), max(map(len, logp))
    tensors = []
    for rows in (logp, old, ref):
        x = torch.zeros(n, t)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        tensors.append(x)
    mask = torch.zeros(n, t)
    for i, r in enumerate(logp):
        mask[i, : len(r)] = 1
    return float(grpo_loss(tensors[0], tensors[1], tensors[2], torch.tensor(adv), mask)[0])


def test_train_step_moves_the_policy_not_the_reference(cluster, tiny, tmp_path):
    from actors.learner import LearnerActor

    from transformers import AutoModelForCausalLM

    cfg = GRPOConfig(lr=1e-2, micro_batch_size=2, updates_per_step=2, bf16=False, beta=0.05, tis_cap=1.5)
    learner = LearnerActor.options(num_cpus=1).remote(tiny, cfg, LoraConfig(r=8, alpha=16))
    try:
        before = ray.get(learner.logprobs.remote(BATCH))
        assert before["logp"] == before["ref_logp"]  # a fresh adapter (B = 0) is the reference
        # Truncated IS: row 0's sampler was 0.1 nats below the learner (weight e^0.1), row 1's 1 nat
        # (e^1 capped at 1.5); row 2 has no sampler log-probs (weight 1).
        sampler = [[x - 0.1 for x in before["logp"][0]], [x - 1.0 for x in before["logp"][1]], None]
        stats = ray.get(learner.train_step.remote([dict(b, sampler_logp=s) for b, s in zip(BATCH, sampler)]))
        # the old policy's per-token log-probs (for logprob_gap) are those before the update
        assert [len(r) for r in stats["old_logp"]] == [3, 2, 4]
        for got_row, want_row in zip(stats["old_logp"], before["logp"]):
            assert got_row == pytest.approx(want_row, abs=1e-5)
        assert stats["tis_weight_mean"] == pytest.approx((3 * np.exp(0.1) + 2 * 1.5 + 4 * 1.0) / 9, abs=1e-4)
        after = ray.get(learner.logprobs.remote(BATCH))

        assert stats["sequences"] == 3 and stats["tokens"] == 9 and stats["optimizer_steps"] == 2
        assert stats["ratio_mean"] == pytest.approx(1.0)  # first update is on-policy
        assert stats["seconds"] > 0 and np.isfinite(stats["grad_norm"])
        assert stats["loss_final"] < stats["loss"]  # the second update sees the first one's gain

        adv = [b["advantage"] for b in BATCH]
        assert _surrogate(after["logp"], before["logp"], before["ref_logp"], adv) < \
            _surrogate(before["logp"], before["logp"], before["ref_logp"], adv)
        assert sum(after["logp"][0]) > sum(before["logp"][0])  # positive advantage: more likely
        assert sum(after["logp"][1]) < sum(before["logp"][1])  # negative advantage: less likely
        assert after["ref_logp"] == before["ref_logp"]  # adapter disabled = the untouched base

        changed = {}
        for blob in ray.get(learner.export_weights.remote()):
            changed.update(from_bucket(blob))
        assert len(changed) == 14 and all(k.startswith("model.layers.") and k.endswith("_proj.weight") for k in changed)
        full = {}
        for blob in ray.get(learner.export_weights.remote(full=True)):
            full.update(from_bucket(blob))
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(full) and set(changed) <= set(full)

        # The merged export is the policy: a plain HF load scores like the learner.
        out = ray.get(learner.save_merged.remote(str(tmp_path / "merged")))
        assert is_complete(out)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        ids, attn, rmask = pad_batch([BATCH[0]["prompt_ids"]], [BATCH[0]["response_ids"]], pad_id=0)
        with torch.no_grad():
            got = token_logprobs(model, ids, attn, temperature=cfg.temperature)[0][rmask[0].bool()].tolist()
        assert got == pytest.approx(after["logp"][0], abs=1e-4)
    finally:
        ray.kill(learner)


def test_checkpoint_resume_gives_identical_next_step(cluster, tiny, tmp_path):
    from actors.learner import LearnerActor

    cfg = GRPOConfig(lr=1e-3, micro_batch_size=2, bf16=True)  # bf16 as on GPUs; otherwise the defaults: ZeRO-2, one update
    first = LearnerActor.options(num_cpus=1).remote(tiny, cfg)
    try:
        ray.get(first.train_step.remote(BATCH))
        random.seed(7)
        client_state = {"step": 1, "cursor": 12, "python_rng": random.getstate(),
                        "numpy_rng": np.random.default_rng(3).bit_generator.state}
        ray.get(first.save_checkpoint.remote(str(tmp_path / "ckpt"), client_state))
        expected = ray.get(first.train_step.remote(BATCH))
        expected_weights = ray.get(first.export_weights.remote())
    finally:
        ray.kill(first)

    # A new actor (new process) starts from the SFT model and restores adapter + optimizer.
    second = LearnerActor.options(num_cpus=1).remote(tiny, cfg)
    try:
        restored = ray.get(second.load_checkpoint.remote(str(tmp_path / "ckpt")))
        assert restored == client_state
        got = ray.get(second.train_step.remote(BATCH))
        for key in ("loss", "kl", "clip_frac", "grad_norm", "tokens", "optimizer_steps"):
            assert got[key] == expected[key], key
        assert ray.get(second.export_weights.remote()) == expected_weights
    finally:
        ray.kill(second)


def test_packing_groups_into_one_forward_changes_nothing(cluster, tiny):
    """micro_batch_size 8 puts both prompts' groups in one forward (responses packed over each prompt's
    cache); micro_batch_size 1 runs one response per forward: same loss, same update, rows in batch order.
    The second runs at beta 0: at the first step the policy is the reference (LoRA B = 0), so the KL term adds
    nothing to the loss or its gradient, and that step must skip the reference forward and report kl as None."""
    from actors.learner import LearnerActor

    batch = BATCH + [{"prompt_ids": PROMPT[:4], "response_ids": [44], "advantage": 0.5}]
    results = []
    for m, beta in ((8, 0.05), (1, 0.0)):
        cfg = GRPOConfig(lr=1e-2, micro_batch_size=m, bf16=False, beta=beta)
        learner = LearnerActor.options(num_cpus=1).remote(tiny, cfg, LoraConfig(r=8, alpha=16))
        try:
            stats = ray.get(learner.train_step.remote(batch))
            results.append((stats, ray.get(learner.logprobs.remote(batch))))
        finally:
            ray.kill(learner)
    (packed, after_packed), (single, after_single) = results
    assert [len(r) for r in packed["old_logp"]] == [3, 2, 4, 1]
    assert 0 < packed["ref_s"] < packed["seconds"]  # beta > 0: the reference forward is timed, inside the step
    assert packed["kl"] == pytest.approx(0.0, abs=1e-7) and single["kl"] is None and single["ref_s"] < 1e-3
    assert packed["loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert packed["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    for a, b in zip(packed["old_logp"], single["old_logp"]):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(after_packed["logp"], after_single["logp"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_rank_step_raises_the_target_among_the_candidates(cluster, tiny):
    """`grpo.action: rank`: a few steps of GRPO over sampled rankings of one prompt's candidates raise the
    target's share of the candidates' scores (what the id readout ranks by); the reference stays put."""
    from actors.learner import LearnerActor

    cands = [[50, 51], [60, 61], [70, 71], [80, 81]]  # equal lengths: comparable summed scores
    target = 2
    as_rows = [{"prompt_ids": PROMPT, "response_ids": c} for c in cands]

    def target_share(out, key):
        scores = torch.tensor([sum(r) for r in out[key]])
        return float(torch.log_softmax(scores, 0)[target])

    cfg = GRPOConfig(lr=1e-2, micro_batch_size=8, bf16=False, beta=0.01, group_size=8, rank_k=2)
    learner = LearnerActor.options(num_cpus=1).remote(tiny, cfg, LoraConfig(r=8, alpha=16))
    try:
        before = ray.get(learner.logprobs.remote(as_rows))
        batch = [{"prompt_ids": PROMPT, "candidates": cands, "target": target}]
        stats = [ray.get(learner.rank_step.remote(batch, seed=s)) for s in range(6)]
        after = ray.get(learner.logprobs.remote(as_rows))
    finally:
        ray.kill(learner)
    assert target_share(after, "logp") > target_share(before, "logp") + 0.1
    assert after["ref_logp"] == before["ref_logp"]
    first = stats[0]
    assert first["sequences"] == 1 and first["tokens"] == len(PROMPT) + 8 and 0 < first["ref_s"] < first["learner_s"]
    assert 0.0 <= first["reward_mean"] <= 1.0 and 0.0 <= first["hit_rate"] <= 1.0 and first["zero_var_groups"] in (0.0, 1.0)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step samples under the reference itself
    assert first["target_ndcg"] == pytest.approx(first["reward_mean"]) and first["greedy_teacher_ndcg"] is None


def test_rank_step_with_a_teacher_follows_the_teacher_ranks(cluster, tiny):
    """`grpo.rank_teacher: 1`: the reward is NDCG against the prompt's sequence-model ranks alone, so the
    candidate the teacher ranks first gains share although the target is another; the target's part is still
    reported. A row without ranks is refused."""
    from actors.learner import LearnerActor

    cands = [[50, 51], [60, 61], [70, 71], [80, 81]]
    teacher, target = [3, 1, 4, 2], 2  # the teacher ranks candidate 1 first
    as_rows = [{"prompt_ids": PROMPT, "response_ids": c} for c in cands]
    share = lambda out: float(torch.log_softmax(torch.tensor([sum(r) for r in out["logp"]]), 0)[1])
    cfg = GRPOConfig(lr=1e-2, micro_batch_size=8, bf16=False, beta=0.0, group_size=8, rank_k=2, rank_teacher=1.0)
    learner = LearnerActor.options(num_cpus=1).remote(tiny, cfg, LoraConfig(r=8, alpha=16))
    try:
        before = ray.get(learner.logprobs.remote(as_rows))
        batch = [{"prompt_ids": PROMPT, "candidates": cands, "target": target, "teacher": teacher}]
        stats = [ray.get(learner.rank_step.remote(batch, seed=s)) for s in range(6)]
        after = ray.get(learner.logprobs.remote(as_rows))
        with pytest.raises(ValueError, match="no 'teacher' ranks"):
            ray.get(learner.rank_step.remote([{**batch[0], "teacher": None}]))
    finally:
        ray.kill(learner)
    assert share(after) > share(before) + 0.1
    assert all(0.0 <= s["greedy_teacher_ndcg"] <= 1.0 and 0.0 <= s["target_ndcg"] <= 1.0 for s in stats)
    assert all(s["kl"] is None and s["ref_s"] == 0.0 for s in stats)  # beta 0: no reference forward, KL not measured
