"""Adapter-only weight sync (`weight_transport: lora`) and the GRPO model's save, on a real local Ray
cluster: the DeepSpeed learner actor (bf16) and a vLLM rollout actor (bf16, LoRA enabled) over a
tiny random Llama (SmolLM2's architecture) built here.

- After a learner step, the engine's per-token log-probs on a fixed prompt + answer move by what
  transformers computes for base + the learner's adapter, within bf16 noise; the sync ships the
  adapter only (< 5% of the model's bytes); a second version replaces the first.
- The merged GRPO model (fp32 save) differs from the SFT model by exactly the update: at lr 1e-5,
  most entries of layer 0's q_proj differ, by B @ A * scale, and nothing else changes.
"""

import os

import pytest
import ray
import torch

from actors.weight_sync import resolve_transport, sync_weights
from mllmrec_ray.config import EngineConfig, GRPOConfig, LoraConfig
from mllmrec_ray.rl.weights import from_bucket
from tiny_models import make_tiny_model

PROMPT = "<|im_start|>user\nCandidates: [ITEM_7] Heat [ITEM_42] Star Wars [ITEM_99] Fargo<|im_end|>\n" \
         "<|im_start|>assistant\n"
ANSWER = "[ITEM_42] Star Wars <think> The user likes adventure films. </think><|im_end|>"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the quickstart's LoRA targets


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # hidden 128: an r=8 attention adapter is ~2% of the model, as r=16 is of SmolLM2-135M
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_lora"), "llama", hidden=128, layers=2))


def _ids(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in (PROMPT, ANSWER)]


def _batch(prompt, answer):
    # one group: the full answer above the group mean, a truncated one below it
    return [{"prompt_ids": prompt, "response_ids": answer, "advantage": 1.0},
            {"prompt_ids": prompt, "response_ids": answer[:5] + answer[-1:], "advantage": -1.0}]


def _hf_logprobs(tiny, seq, adapter=None) -> torch.Tensor:
    """transformers' per-token log-probs of `seq` (fp32) for the base, or base + `adapter` (export_adapter())."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    if adapter is not None:
        c = adapter["config"]
        model = get_peft_model(model, PeftLoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0,
                                                     target_modules=c["target_modules"],
                                                     layers_to_transform=c["layers_to_transform"]))
        state = {}
        for blob in adapter["buckets"]:
            state.update(from_bucket(blob))
        assert not set_peft_model_state_dict(model, {k: v.float() for k, v in state.items()}).unexpected_keys
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]


def test_adapter_sync_moves_engine_logprobs_as_transformers_does(cluster, tiny):
    from actors.learner import LearnerActor
    from actors.rollout import RolloutActor

    prompt, answer = _ids(tiny)
    seq = prompt + answer
    # lr 1e-3, not the paper's 1e-5: on this random tiny model one Adam step at 1e-5 moves these
    # log-probs by ~2e-4 nats, under the ~3e-3 nats that vLLM bf16 and transformers differ by on the
    # same weights, so the comparison could not fail; 1e-3 moves them ~2e-2 (10x that noise). The
    # lr-1e-5 update is checked exactly, through the fp32 save, in the test below.
    cfg = GRPOConfig(lr=1e-3, bf16=True, micro_batch_size=4)
    # layer 1 only: vLLM must take adapters that touch some layers (model.lora.layers)
    lora = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=ATTENTION, layers=[1])
    learner = LearnerActor.options(num_cpus=1).remote(tiny, cfg, lora)
    rollout = RolloutActor.options(num_cpus=0.5).remote(
        tiny, EngineConfig(dtype="bfloat16", max_model_len=512, kv_cache_gib=0.25), GRPOConfig(),
        lora=lora, require_lora=True)
    try:
        assert ray.get(rollout.supports_lora.remote())
        assert resolve_transport("auto", use_gpu=False, lora=True) == "lora"
        assert resolve_transport("auto", use_gpu=False, lora=False) == "object_store"  # merged fallback
        engine_base = torch.tensor(ray.get(rollout.sequence_logprobs.remote([seq]))[0])
        hf_base = _hf_logprobs(tiny, seq)
        noise = (engine_base - hf_base).abs()  # vLLM bf16 vs transformers fp32, same weights
        assert noise.max() < 0.02

        model_bytes = ray.get(learner.model_bytes.remote())
        for version in (1, 2):
            ray.get(learner.train_step.remote(_batch(prompt, answer)))
            info = sync_weights(learner, [rollout], "lora", version)
            assert info["transport"] == "lora" and info["version"] == version
            assert ray.get(rollout.weights_version.remote()) == version
            adapter = ray.get(learner.export_adapter.remote())
            assert info["bytes"] == sum(map(len, adapter["buckets"]))
            assert info["bytes"] < 0.05 * model_bytes  # adapter only, not the model
            assert adapter["config"]["layers_to_transform"] == [1]
            assert all(".layers.1." in k for blob in adapter["buckets"] for k in from_bucket(blob))

            engine = torch.tensor(ray.get(rollout.sequence_logprobs.remote([seq]))[0])
            hf = _hf_logprobs(tiny, seq, adapter)
            hf_move, engine_move = hf - hf_base, engine - engine_base
            assert hf_move.abs().mean() > 5 * noise.mean()  # the update is visible above bf16 noise
            # the engine moves as transformers says the adapted model does, within bf16 noise
            assert (engine_move - hf_move).abs().max() < 2 * noise.max() + 1e-3
            assert (engine_move - hf_move).abs().mean() < 0.2 * hf_move.abs().mean()
            assert (engine - hf).abs().max() < 2 * noise.max() + 1e-3

            stats = ray.get(rollout.stats.remote())
            assert stats["lora"]["current"] is not None and len(stats["lora"]["loaded"]) == 1  # old one removed
            assert stats["lora"]["one_adapter_ops"]  # the matches above ran through engine._patch_cpu_lora
        # the answer's log-likelihood, what the scorers read through the same Engine.prompt_logprobs, moved
        assert abs(float(engine[len(prompt) - 1:].sum()) - float(engine_base[len(prompt) - 1:].sum())) > 0.1
        # what a merged sync of the same update would ship: the adapted layer's whole q/k/v/o
        merged = sum(map(len, ray.get(learner.export_weights.remote(False))))
        assert info["bytes"] < 0.25 * merged
        # the rollout still generates (with the adapter) after two versions
        (group,) = ray.get(rollout.generate_groups.remote([{"sample_id": "u", "prompt_ids": prompt}]))
        assert group["version"] == 2 and all(r["token_ids"] for r in group["responses"])
    finally:
        ray.kill(rollout)
        ray.kill(learner)


def test_grpo_save_differs_from_sft_by_exactly_the_update(cluster, tiny, tmp_path):
    """The issue's check on the pipeline's save path: models/grpo (fp32, merged) vs models/sft."""
    from safetensors.torch import load_file

    from actors.learner import LearnerActor

    prompt, answer = _ids(tiny)
    # the pipeline's precision: bf16 learner over an fp32 SFT model, the paper's lr
    learner = LearnerActor.options(num_cpus=1).remote(tiny, GRPOConfig(lr=1e-5, bf16=True, micro_batch_size=4),
                                                      LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=ATTENTION))
    try:
        ray.get(learner.train_step.remote(_batch(prompt, answer)))
        out = ray.get(learner.save_merged.remote(str(tmp_path / "grpo"), "float32"))
    finally:
        ray.kill(learner)
    sft = load_file(os.path.join(tiny, "model.safetensors"))
    grpo = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            grpo.update(load_file(os.path.join(out, name)))
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert sft[key].dtype == grpo[key].dtype == torch.float32
    assert (grpo[key] != sft[key]).float().mean() >= 0.5
    # ... and the difference is the update, B @ A * alpha / r from the saved adapter (the bf16
    # learner's own copy of the SFT weights would differ from them by ~1e-4 relative: 30x more)
    prefix = "base_model.model." + key.removesuffix(".weight")
    delta = adapter[f"{prefix}.lora_B.weight"].float() @ adapter[f"{prefix}.lora_A.weight"].float() * (16 / 8)
    assert delta.abs().max() > 0
    assert torch.allclose(grpo[key] - sft[key], delta, rtol=0, atol=0.02 * float(delta.abs().max()))
    # every tensor LoRA does not touch is the SFT model's, bit for bit
    for name, t in sft.items():
        if not any(f"{m}.weight" in name for m in ATTENTION):
            assert torch.equal(grpo[name], t), name


def test_one_adapter_lora_ops_equal_vllms_own(tiny):
    """engine._patch_cpu_lora (two GEMMs per layer) against vLLM's own CPU LoRA method, in fp32 where
    both should agree to rounding: prompt log-probs of sequences of mixed lengths, and sampled tokens."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from mllmrec_ray.runtime.engine import Engine
    from mllmrec_ray.runtime.policy import adapter_config, adapter_state, build_policy
    from mllmrec_ray.rl.weights import to_buckets

    lora = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=ATTENTION, layers=[1])
    engine = Engine(tiny, EngineConfig(dtype="float32", max_model_len=512, kv_cache_gib=0.25), lora_rank=8,
                    lora_targets=ATTENTION)
    assert engine.fast_lora_ops
    policy = build_policy(tiny, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a large adapter: it moves log-probs by ~1 nat
    engine.load_adapter(to_buckets(adapter_state(policy).items(), 1 << 20), adapter_config(policy))
    seqs = [list(range(5, 5 + n)) for n in (30, 55, 12)]
    patched = (PunicaWrapperCPU.update_metadata, PunicaWrapperCPU.add_lora_linear)
    fused_layers = set()

    def watched(self, *args, **kwargs):  # records that the two-GEMM path (not vLLM's) ran
        out = patched[1](self, *args, **kwargs)
        fused_layers.update(getattr(self, "_mllmrec_fused", {}))
        return out

    try:
        PunicaWrapperCPU.add_lora_linear = watched
        fast = engine.sequence_logprobs(seqs)
        fast_samples = engine.generate([s[:10] for s in seqs], 2, 1.0, 1.0, 8, seed=3)
    finally:
        PunicaWrapperCPU.add_lora_linear = patched[1]
    assert len(fused_layers) == 4  # q/k/v and o of both layers (vLLM wraps layer 0 too, with zeros)
    try:
        PunicaWrapperCPU.update_metadata, PunicaWrapperCPU.add_lora_linear = PunicaWrapperCPU._mllmrec_originals
        own = engine.sequence_logprobs(seqs)
        own_samples = engine.generate([s[:10] for s in seqs], 2, 1.0, 1.0, 8, seed=3)
    finally:
        PunicaWrapperCPU.update_metadata, PunicaWrapperCPU.add_lora_linear = patched
    ids = torch.tensor([seqs[1]])
    with torch.no_grad():
        hf = torch.log_softmax(policy.eval()(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        with policy.disable_adapter():
            hf_base = torch.log_softmax(policy(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert (hf - hf_base).abs().max() > 0.1  # the adapter matters here
    assert torch.allclose(torch.tensor(fast[1]), hf, atol=1e-4)
    for f, o in zip(fast, own):
        assert torch.allclose(torch.tensor(f), torch.tensor(o), atol=1e-5)
    assert [c.token_ids for g in fast_samples for c in g] == [c.token_ids for g in own_samples for c in g]


def test_lora_support_decides_the_transport(tiny):
    from mllmrec_ray.runtime.engine import lora_rank_slot, lora_unsupported

    assert [lora_rank_slot(r) for r in (1, 8, 9, 16, 200, 512, 513)] == [1, 8, 16, 16, 256, 512, None]
    assert lora_unsupported(tiny, 16) is None  # LlamaForCausalLM: vLLM serves adapters over it
    assert "above" in lora_unsupported(tiny, 1024)  # then `auto` falls back to merged weights
    assert resolve_transport("auto", use_gpu=True, lora=False) == "nccl"
    assert resolve_transport("lora", use_gpu=False) == "lora"
    with pytest.raises(ValueError):
        resolve_transport("pigeon", use_gpu=False)
