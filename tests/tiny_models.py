"""Tiny randomly initialised models of real architectures, built offline for tests.

The tokenizer is a byte-level BPE trained in-process on a small corpus, wrapped
as a `PreTrainedTokenizerFast` with a ChatML template, so nothing touches a hub.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a movie recommender. Recently watched: 1. [ITEM_12] Toy Story",
    "Candidates: [ITEM_7] Heat [ITEM_42] Star Wars [ITEM_99] Fargo [ITEM_1234] Alien",
    "<think> The user likes animated comedies and adventure films. </think>",
    "Step 1: attributes. Step 2: preferences. Step 3: next item. Step 4: profile.",
    "Answer with exactly one candidate as [ITEM_<id>] <title>. 0123456789",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX",
]


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a random `arch` ("llama" or "qwen3") causal LM + tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    out_dir = Path(out_dir)
    tok = make_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen3":
        cfg = Qwen3Config(head_dim=hidden // 2, **common)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; allowed: llama, qwen3")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir
