import copy

import pytest
import torch

from mllmrec_ray.config import LoraConfig
from mllmrec_ray.runtime.policy import (build_policy, group_logprobs, is_complete, load_tokenizer, merged_lora_state, pad_batch,
                                save_merged, token_logprobs)
from tiny_models import make_tiny_model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp(request.param), request.param))


def _randomise_lora_b(model, seed=1):
    # peft initialises B to zero (merged == base); random B makes the merge non-trivial.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_pad_batch_aligns_response_positions():
    ids, attn, rmask = pad_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rmask.shape == (2, 4)
    # Column j of the log-probs scores token j+1: the masked columns' targets are the responses.
    targets = ids[:, 1:]
    assert targets[0][rmask[0].bool()].tolist() == [9, 10]
    assert targets[1][rmask[1].bool()].tolist() == [11, 12, 13]


def test_token_logprobs_match_manual_gather(tiny):
    model = build_policy(tiny, LoraConfig(dropout=0.0)).eval()
    ids, attn, rmask = pad_batch([[3, 4, 5, 6], [7, 8]], [[9, 10], [11, 12, 13]], pad_id=0)
    got = token_logprobs(model, ids, attn)
    assert got.shape == (2, ids.shape[1] - 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
    for i in range(2):
        for j in range(ids.shape[1] - 1):
            if attn[i, j + 1]:
                assert torch.allclose(got[i, j], logp[i, j, ids[i, j + 1]], atol=1e-5)
    # Skipping the shared prompt columns gives the same numbers for the columns kept.
    assert torch.allclose(token_logprobs(model, ids, attn, start=1), got[:, 1:], atol=1e-5)
    # Right padding never changes the real tokens' log-probs: row 1 alone gives the same numbers.
    ids1, attn1, rmask1 = pad_batch([[7, 8]], [[11, 12, 13]], pad_id=0)
    alone = token_logprobs(model, ids1, attn1)
    assert torch.allclose(alone[0][rmask1[0].bool()], got[1][rmask[1].bool()], atol=1e-5)


def test_group_logprobs_equal_full_rows_in_value_and_gradient(tiny):
    """Several prompts of different lengths in one call, their responses packed over the prompt cache
    (empty and one-token responses included): the numbers and LoRA gradients of one full row each."""
    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    _randomise_lora_b(model)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [21, 22, 23, 24, 25, 26, 27, 28]]
    responses = [[[9, 10, 11], [12], [13, 14, 15, 16]], [[30, 31], []], [[40, 41, 42, 43, 44, 45], [46]]]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    flat_p = [p for p, resp in zip(prompts, responses) for _ in resp]
    flat_r = [r for resp in responses for r in resp]
    ids, attn, rmask = pad_batch(flat_p, flat_r, pad_id=0)
    full = token_logprobs(model, ids, attn)
    want_grads = torch.autograd.grad((full * rmask).sum(), lora)

    shared, mask = group_logprobs(model, prompts, responses, pad_id=0)
    assert mask.shape == (7, 6) and mask.sum(1).tolist() == [len(r) for r in flat_r]
    for i, r in enumerate(flat_r):  # the same per-token numbers, response by response
        assert torch.allclose(shared[i, : len(r)], full[i][rmask[i].bool()], atol=1e-5), i
    got_grads = torch.autograd.grad((shared * mask).sum(), lora)
    for g_want, g_got in zip(want_grads, got_grads):  # and the same gradient through the shared prompts
        assert torch.allclose(g_got, g_want, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in got_grads)

    one, one_mask = group_logprobs(model, [prompts[0]], [responses[0]], pad_id=0)  # one prompt alone
    assert torch.allclose(one[one_mask.bool()], shared[:3][mask[:3].bool()], atol=1e-5)
    with pytest.raises(ValueError, match="empty prompt"):
        group_logprobs(model, [[]], [responses[0]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        group_logprobs(model, prompts[:2], responses[:1], pad_id=0)


def test_merged_lora_state_equals_merge_and_unload(tiny):
    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0))
    _randomise_lora_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = merged_lora_state(model)
    full = merged_lora_state(model, full=True)
    # Not mutated: every tensor of the training model is unchanged and LoRA is still active.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    targets = {k for k in reference if k.rsplit(".", 2)[-2] in LoraConfig().target_modules}
    assert set(changed) == targets and len(targets) == 2 * 7  # 2 layers x 7 projections
    for k in targets:
        assert torch.allclose(changed[k], reference[k], atol=1e-6), k
        assert not torch.equal(changed[k], before[f"base_model.model.{k[:-len('.weight')]}.base_layer.weight"])
    assert set(full) == set(reference)  # base names only, lm_head (tied) included
    assert not any(".base_layer" in k or "lora_" in k or k.startswith("base_model") for k in full)
    for k in reference:
        assert torch.allclose(full[k], reference[k], atol=1e-6), k


def test_save_merged_writes_a_loadable_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    _randomise_lora_b(model, seed=2)
    out = tmp_path / "merged"
    (out).mkdir()
    (out / "stale.txt").write_text("an older save is replaced whole")
    save_merged(model, load_tokenizer(tiny), out)
    assert is_complete(out) and not (out / "stale.txt").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, attn, _ = pad_batch([[3, 4, 5]], [[6, 7]], pad_id=0)
    with torch.no_grad():
        assert torch.allclose(token_logprobs(loaded, ids, attn), token_logprobs(model, ids, attn), atol=1e-5)


def test_partial_state_completes_fused_groups(tiny):
    base = build_policy(tiny, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    _randomise_lora_b(base)
    state = merged_lora_state(base)
    full = merged_lora_state(base, full=True)
    layer = "model.layers.0"
    # q is trained; k and v ride along unchanged so vLLM's fused qkv tensor is whole; same for gate/up.
    assert {f"{layer}.self_attn.{p}_proj.weight" for p in "qkv"} <= set(state)
    assert {f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"} <= set(state)
    assert not any("o_proj" in k or "down_proj" in k or "norm" in k for k in state)
    assert all(torch.equal(state[k], full[k]) for k in state)


def test_temperature_scales_logits_in_both_logprob_paths(tiny):
    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    _randomise_lora_b(model)
    prompt, responses = [3, 4, 5, 6], [[9, 10], [12, 13, 14]]
    ids, attn, rmask = pad_batch([prompt] * 2, responses, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        full = token_logprobs(model, ids, attn, temperature=0.7)
        grp, gmask = group_logprobs(model, [prompt], [responses], pad_id=0, temperature=0.7)
        plain = token_logprobs(model, ids, attn)
    assert torch.allclose(full[rmask.bool()], want[rmask.bool()], atol=1e-5)
    assert torch.allclose(grp[gmask.bool()], want[rmask.bool()], atol=1e-5)
    assert not torch.allclose(full[rmask.bool()], plain[rmask.bool()], atol=1e-3)
    # temperature 1 and greedy (<= 0, no distribution) both leave the logits as they are
    assert torch.equal(token_logprobs(model, ids, attn, temperature=1.0), plain)
    assert torch.equal(token_logprobs(model, ids, attn, temperature=0.0), plain)


def test_fp32_save_keeps_an_update_that_bf16_rounds_away(tiny, tmp_path):
    from safetensors.torch import load_file

    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0), dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a delta of ~1e-5 per entry, far below bf16's step on weights of ~0.02
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-6)
    key = "model.layers.0.self_attn.q_proj.weight"
    base_w = merged_lora_state(model, full=True)  # default: back to the base dtype (bf16), as synced
    exact = merged_lora_state(model, full=True, dtype=torch.float32)
    orig = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.float()
    assert base_w[key].dtype == torch.bfloat16 and exact[key].dtype == torch.float32
    kept_bf16 = (base_w[key].float() != orig).float().mean()
    kept_fp32 = (exact[key] != orig).float().mean()
    assert kept_fp32 > 0.9 and kept_bf16 < 0.5 * kept_fp32
    # tied embeddings stay one tensor through the cast
    assert exact["lm_head.weight"].data_ptr() == exact["model.embed_tokens.weight"].data_ptr() or \
        "lm_head.weight" not in exact
    for name in ("float32", "bfloat16"):
        out = save_merged(model, load_tokenizer(tiny), tmp_path / name, dtype=name)
        saved = {}
        for f in out.glob("*.safetensors"):
            saved.update(load_file(f))
        assert saved[key].dtype == getattr(torch, name)
        assert torch.equal(saved[key].float(), (exact if name == "float32" else base_w)[key].float())
        assert (out / "adapter" / "adapter_config.json").exists()
    with pytest.raises(ValueError):
        save_merged(model, load_tokenizer(tiny), tmp_path / "x", dtype="float16")


def test_scoring_from_the_adapter_matches_the_merged_model(tiny, tmp_path):
    """`mllmrec eval --weights adapter` (the GRPO model's evaluation): base + unmerged adapter scores as
    the fp32-merged model does, and in bf16 the adapter runs in bf16 (no fp32 casts of activations)."""
    from mllmrec_ray.ranking.scoring import HFScorer

    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    _randomise_lora_b(model, seed=3)
    save_merged(model, load_tokenizer(tiny), tmp_path / "m", base_dir=tiny)
    prompts, answers = [[3, 4, 5, 6], [7, 8, 9]], [[[10, 11], [12]], [[13], [14, 15, 16]]]
    merged = HFScorer(str(tmp_path / "m"), dtype="float32").score(prompts, answers)
    unmerged = HFScorer(str(tmp_path / "m"), dtype="float32", adapter=True).score(prompts, answers)
    assert torch.allclose(torch.tensor(sum(unmerged, [])), torch.tensor(sum(merged, [])), atol=1e-4)
    base = HFScorer(tiny, dtype="float32").score(prompts, answers)
    assert not torch.allclose(torch.tensor(sum(base, [])), torch.tensor(sum(merged, [])), atol=1e-3)  # B != 0
    bf16 = HFScorer(str(tmp_path / "m"), dtype="bfloat16", adapter=True)
    assert {p.dtype for n, p in bf16.model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert torch.allclose(torch.tensor(sum(bf16.score(prompts, answers), [])), torch.tensor(sum(merged, [])), atol=0.1)
