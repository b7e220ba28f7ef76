"""SFT training examples: prompt text + answer text -> token ids and labels (no Ray, no model).

Prompt = the chat-templated instruction (SPEC section 4) with the MDA-selected reasoning
block for selected samples only; answer = the target's answer line + EOS. Prompt and answer
are tokenized separately and concatenated, so the answer tokens are exactly what the model
must generate after the prompt at inference (the same split GRPO rollouts use).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mllmrec_ray.prompting.prompts import render_prompt, sample_messages, sft_target

IGNORE = -100  # label value the loss skips (PyTorch cross-entropy's ignore_index)


def sft_texts(
    samples: Sequence[Mapping],
    items: Mapping[str, Mapping],
    tokenizer,
    reasoning: Mapping[str, str] | None = None,
    with_captions: bool = False,
    think_first: bool = False,
    n_candidates: int = 10,
    collab=None,
    reasoning_in: str | None = None,
    compact: bool = False,
) -> list[dict]:
    """One {"sample_id", "prompt", "answer", "has_reasoning"} per sample (answer without EOS).

    A sample's reasoning goes into its prompt (`reasoning_in` None / "prompt") or, "target", into
    its completion as the paper's `<think>` block (then the prompt has no reference block).
    """
    if reasoning_in not in (None, "prompt", "target"):
        raise ValueError(f"reasoning_in must be 'prompt' or 'target', got {reasoning_in!r}")
    reasoning = reasoning or {}
    in_target = reasoning_in == "target"
    out = []
    for s in samples:
        text = reasoning.get(s["sample_id"])
        messages = sample_messages(s, items, reasoning=None if in_target else text, with_captions=with_captions,
                                   think_first=think_first, n_candidates=n_candidates, collab=collab,
                                   compact=compact)
        out.append({
            "sample_id": s["sample_id"],
            "prompt": render_prompt(tokenizer, messages),
            "answer": sft_target(s, items, think=text if in_target else None, think_first=think_first),
            "has_reasoning": text is not None,
        })
    return out


def tokenize_example(tokenizer, prompt: str, answer: str, max_len: int, completion_only: bool = True) -> dict | None:
    """{"input_ids", "labels", "truncated"}; None when the answer (+EOS) alone exceeds max_len.

    Over-long examples lose tokens from the left of the prompt; the answer is never cut.
    completion_only: labels are IGNORE on every prompt token, else the whole sequence is trained.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; SFT answers end with it")
    # The chat template already placed any BOS: no special tokens are added here.
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(a) >= max_len:  # leave at least one prompt token as context
        return None
    truncated = len(p) + len(a) > max_len
    if truncated:
        p = p[len(p) + len(a) - max_len :]
    labels = ([IGNORE] * len(p) if completion_only else list(p)) + a
    return {"input_ids": p + a, "labels": labels, "truncated": truncated}


def collate(examples: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (padding labelled IGNORE)."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_only(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """None when every row is right-padded (real tokens first): the causal mask alone then keeps each
    real token from seeing any padding, which sits after it, and attention runs its causal kernel.

    With the explicit padding mask, sdpa on CPU took the masked path: 602 vs 736 tokens/s for a
    bf16 LoRA SFT step of 4 x ~710 tokens on this box (DeepSpeed, 2 threads). Padded positions
    compute garbage either way and carry no label. Any other mask is returned as it is.
    """
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()) and bool(attention_mask[:, 0].all())
    return None if right_padded else attention_mask


def completion_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, projecting to the vocabulary only where a label is.

    The same value as the model's own `labels=` loss, but with completion-only labels the answer is
    ~10 of ~600 positions: a 49k-entry vocabulary projection (and its fp32 softmax) at every prompt
    position was most of the memory traffic of an SFT step on CPU. `logits_to_keep` takes the union
    of labelled positions over the micro-batch, so it goes through the model's (and DeepSpeed's)
    own forward.
    """
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero()[:, 0]  # positions whose next token is labelled
    if len(keep) == 0:
        raise ValueError("a micro-batch with no labelled token")
    logits = model(input_ids=batch["input_ids"], attention_mask=causal_only(batch["attention_mask"]),
                   logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE)
