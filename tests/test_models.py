"""Model names and the offline cache: resolve_model, fetch idempotence, GGUF -> safetensors conversion."""

import json
import subprocess

import numpy as np
import pytest
import torch

from mllmrec_ray.runtime import models
from mllmrec_ray.runtime.models import convert_gguf, fetch_model, model_dir, resolve_model


def test_resolve_model(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a local dir as is
    monkeypatch.setenv("MLLMREC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="mllmrec models fetch smollm2-135m"):
        resolve_model("smollm2-135m")
    target = model_dir("smollm2-135m")
    assert target == tmp_path / "cache" / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve_model("smollm2-135m") == str(target)
    with pytest.raises(FileNotFoundError):  # an explicit cache_dir wins over $MLLMREC_CACHE
        resolve_model("smollm2-135m", cache_dir=tmp_path / "other")
    assert resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # hub names pass through
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")


def test_fetch_is_idempotent_and_checks_alias(tmp_path, monkeypatch):
    target = model_dir("smollm2-135m", tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    def no_download(*a, **k):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_model("smollm2-135m", tmp_path) == target
    with pytest.raises(ValueError, match="known: smollm2-135m"):
        fetch_model("no-such-model", tmp_path)


def _write_gguf(hf_dir, path) -> None:
    """A float32 GGUF of a Llama checkpoint, laid out as llama.cpp writes it (q/k rows permuted)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer
    from safetensors.torch import load_file

    c = AutoConfig.from_pretrained(hf_dir)
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = [None] * c.vocab_size
    for t, i in [*tj["model"]["vocab"].items(), *added.items()]:
        tokens[i] = t
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(AutoTokenizer.from_pretrained(hf_dir).chat_template)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # tied: no output.weight
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            x = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                x = permute(x, c.num_attention_heads)
            elif gg == "attn_k":
                x = permute(x, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_gguf_round_trip(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _write_gguf(tiny_llama, tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    assert (out / "model.safetensors").exists() and not (out / "tiny.gguf").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 90, 200, 7]])
    assert torch.allclose(original(ids).logits, converted(ids).logits, atol=1e-5)
    tok, tok_c = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\nCandidates: [ITEM_7] Heat<|im_end|>\n"
    assert tok_c(text)["input_ids"] == tok(text)["input_ids"]
    assert tok_c.chat_template == tok.chat_template and tok_c.eos_token == "<|im_end|>"


def test_real_smollm2_cache():
    path = model_dir("smollm2-135m")
    if not (path / "config.json").exists():
        pytest.skip(f"SmolLM2 not cached at {path}; run `mllmrec models fetch smollm2-135m`")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.tie_word_embeddings and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"
    assert models.resolve_model("smollm2-135m") == str(path)


def test_resolve_model_makes_a_relative_dir_absolute(tmp_path, monkeypatch):
    """Actors of a submitted job run in the job's working_dir: a relative model dir must not reach them."""
    from mllmrec_ray.runtime.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    assert resolve_model("runs/m") == str(tmp_path / "runs" / "m")
