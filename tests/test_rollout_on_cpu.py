"""RolloutActor on a real local Ray cluster: sampled groups with sampler log-probs, weight sync (object store, gloo).

A stand-in learner actor (inheriting WeightSenderMixin, as the real learner does) exports
perturbed weights of a tiny Llama; after each sync the rollout engine's greedy output must
equal transformers' greedy output on the new weights and differ from the output before.
"""

import os

import pytest
import ray
import torch

from actors.rollout import RolloutActor
from actors.weight_sync import WeightSenderMixin, sync_weights
from mllmrec_ray.config import EngineConfig, GRPOConfig
from mllmrec_ray.rl.weights import to_buckets

PROMPT = "<|im_start|>user\nCandidates: [ITEM_7] Heat [ITEM_42] Star Wars<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 12
_last_state: dict = {}  # the weights the rollout engine holds after the last sync test


@ray.remote(num_cpus=0.25)
class FakeLearner(WeightSenderMixin):
    """What a learner must provide for both transports: export_weights(full) -> list[bytes]."""

    def __init__(self, state: dict):
        self.state = state

    def export_weights(self, full: bool) -> list[bytes]:
        return to_buckets(self.state.items(), bucket_bytes=64 << 10)  # several buckets for a tiny model


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rollout(cluster, tiny_llama):
    engine = EngineConfig(dtype="float32", max_model_len=512, kv_cache_gib=0.25)
    greedy = GRPOConfig(group_size=1, temperature=0.0, top_p=1.0, max_new_tokens=NEW_TOKENS)
    actor = RolloutActor.options(num_cpus=0.5).remote(str(tiny_llama), engine, greedy)
    assert ray.get(actor.ping.remote())
    return actor


def _hf_greedy(model, tokenizer) -> list[int]:
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)  # stops on EOS like vLLM
    return out[0, ids.shape[1]:].tolist()


def _rollout_greedy(actor) -> list[int]:
    prompt = {"sample_id": "u1", "prompt": PROMPT, "target": "7", "candidates": ["7", "42"]}
    (group,) = ray.get(actor.generate_groups.remote([prompt]))
    return group["responses"][0]["token_ids"]


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_sync_makes_engine_match_new_weights(rollout, tiny_llama, transport):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = _rollout_greedy(rollout)
    # object_store: a full update (every linear layer and the tied embedding perturbed; lm_head left
    # out on purpose: the engine must re-derive it). gloo: a partial update, as LoRA training sends
    # (only the layers' linear weights; embedding and norms must keep their current values).
    full = transport == "object_store"
    kinds = (torch.nn.Linear, torch.nn.Embedding) if full else (torch.nn.Linear,)
    torch.manual_seed({"object_store": 1, "gloo": 2}[transport])
    if _last_state:  # start from what the engine holds now (an earlier test's weights)
        model.load_state_dict(_last_state["state"])
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, kinds) and (full or ".layers." in name):
                module.weight.add_(torch.randn_like(module.weight) * 0.5)
    expected = _hf_greedy(model, tokenizer)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _last_state["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    if not full:
        state = {k: v for k, v in state.items() if k.endswith("proj.weight")}
    learner = FakeLearner.remote(state)
    version = {"object_store": 1, "gloo": 2}[transport]
    info = sync_weights(learner, [rollout], transport, version)
    assert info["transport"] == transport and info["bytes"] > 0 and info["seconds"] > 0
    assert ray.get(rollout.weights_version.remote()) == version
    after = _rollout_greedy(rollout)
    assert after == expected
    assert after != before
    # Same members again: the existing group (or plain object store path) is reused.
    assert sync_weights(learner, [rollout], transport, version + 10)["version"] == version + 10
    assert _rollout_greedy(rollout) == expected
    ray.kill(learner)


def test_generate_groups_with_sampler_logprobs(cluster, tiny_llama):
    # Rollout actors only generate (rewards are scored on the controller) and return the sampler's
    # log-probs, which the learner's temperature-scaled log-probs must match (bf16 engine, top_p 1).
    from transformers import AutoModelForCausalLM

    from mllmrec_ray.rl.grpo import logprob_gap
    from mllmrec_ray.runtime.policy import pad_batch, token_logprobs

    temperature = 0.5
    sampling = GRPOConfig(group_size=4, temperature=temperature, top_p=1.0, max_new_tokens=8)
    actor = RolloutActor.options(num_cpus=0.5).remote(
        str(tiny_llama), EngineConfig(max_model_len=512, kv_cache_gib=0.25), sampling)
    prompts = [{"sample_id": f"u{i}", "prompt": PROMPT, "target": t, "candidates": ["7", "42"]}
               for i, t in enumerate(["7", "42", "7"])]
    groups = ray.get(actor.generate_groups.remote(prompts))
    assert [g["sample_id"] for g in groups] == ["u0", "u1", "u2"]
    for p, g in zip(prompts, groups):
        assert len(g["responses"]) == 4 and g["prompt_ids"] and g["version"] == 0
        for r in g["responses"]:
            assert "reward" not in r
            assert r["token_ids"] and r["finish_reason"] in ("stop", "length")
            assert len(r["sampler_logp"]) == len(r["token_ids"]) and all(x <= 0 for x in r["sampler_logp"] if x == x)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    rows = [(g["prompt_ids"], r["token_ids"], r["sampler_logp"]) for g in groups for r in g["responses"]]
    ids, attn, rmask = pad_batch([x[0] for x in rows], [x[1] for x in rows], pad_id=0)
    gaps = {}
    with torch.no_grad():
        for t in (temperature, 1.0):
            lp = token_logprobs(model, ids, attn, temperature=t)
            gaps[t] = logprob_gap([lp[i][rmask[i].bool()].tolist() for i in range(len(rows))], [x[2] for x in rows])
    assert gaps[temperature] < 0.02, gaps  # same distribution, within bf16 noise
    assert gaps[1.0] > 5 * gaps[temperature], gaps  # unscaled logits are measurably another distribution
    stats = ray.get(actor.stats.remote())
    assert stats["last"]["completions"] == 12 and stats["last"]["tokens_per_s"] > 0
    # A call seed re-seeds the engine: the same seed draws the same samples (resume), another one differs.
    texts = [[r["token_ids"] for g in ray.get(actor.generate_groups.remote(prompts, seed=s)) for r in g["responses"]]
             for s in (5, 5, 6)]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    # Rollout actors only generate: ranking lives in the core (ranking.scoring.rank_samples), not here.
    assert not hasattr(RolloutActor, "score")
    ray.kill(actor)
