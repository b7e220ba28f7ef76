"""The GRPO prompt pool and its schedule: which training windows become prompts, in which order
each step draws them, and how a step's prompts are split over rollout actors (no Ray here).

The order is a deterministic per-epoch permutation, so the data cursor alone restores it on resume.
"""

from __future__ import annotations

import random
from pathlib import Path

from mllmrec_ray.config import PipelineConfig


def build_prompts(cfg: PipelineConfig, data_dir: Path, stage1_dir: Path, tokenizer) -> list[dict]:
    """Rendered GRPO prompts of the train split, with MDA-selected reasoning where present."""
    from mllmrec_ray.prompting.prompts import render_prompt, sample_messages
    from mllmrec_ray.data.run_data import (candidate_column, load_collab, load_items, load_reasoning, load_samples,
                                           pick_samples)

    items = load_items(data_dir, stage1_dir / "captions.parquet" if cfg.prompt.with_captions else None)
    collab = load_collab(data_dir, cfg.prompt)
    g = cfg.grpo
    if g.rank_teacher > 0 and (g.action != "rank" or collab is None or collab.seq is None):
        raise ValueError(f"grpo.rank_teacher={g.rank_teacher} needs grpo.action: rank (is {g.action!r}) and the "
                         f"sequence-model ranks in the prompt: prompt.collab and prompt.collab_seq on (are "
                         f"{cfg.prompt.collab} and {cfg.prompt.collab_seq})")
    reasoning = load_reasoning(stage1_dir / "cot.parquet", stage1_dir / "mda.parquet", "selected_grpo",
                               cfg.stage1.cot_source)
    key = candidate_column(cfg.prompt.n_candidates)
    budget = cfg.model.engine.max_model_len - cfg.grpo.new_tokens
    prompts = []
    samples = load_samples(data_dir, "train")
    if cfg.grpo.max_prompts is not None and cfg.grpo.max_prompts < len(samples):
        # windows SFT trained on come last: rewards on unseen windows measure what generalises,
        # not how well SFT's answers are recalled (the same seeds would otherwise pick the same windows)
        sft_seen = set()
        if cfg.sft.max_samples is not None and cfg.sft.max_samples < len(samples):
            sft_reasoning = load_reasoning(stage1_dir / "cot.parquet", stage1_dir / "mda.parquet", "selected_sft",
                                           cfg.stage1.cot_source)
            sft_seen = {s["sample_id"] for s in pick_samples(samples, set(sft_reasoning), cfg.sft.max_samples,
                                                             cfg.sft.seed)}
        samples = pick_samples(samples, set(reasoning), cfg.grpo.max_prompts, cfg.grpo.seed, avoid=sft_seen)
    for s in samples:
        messages = sample_messages(
            {k: v for k, v in s.items() if k != "target"}, items, reasoning=reasoning.get(s["sample_id"]),
            with_captions=cfg.prompt.with_captions, think_first=cfg.prompt.think_first,
            n_candidates=cfg.prompt.n_candidates, collab=collab, compact=cfg.prompt.instructions == "compact")
        text = render_prompt(tokenizer, messages)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            raise ValueError(f"sample {s['sample_id']}: the prompt is {len(ids)} tokens, over model.engine.max_model_len "
                             f"({cfg.model.engine.max_model_len}) - the rollout budget ({cfg.grpo.new_tokens}: "
                             f"grpo.max_new_tokens, or grpo.max_new_tokens_think with grpo.reward.require_think); "
                             f"raise model.engine.max_model_len or set prompt.with_captions: false")
        prompts.append({"sample_id": s["sample_id"], "prompt": text, "prompt_ids": ids,
                        "target": s["target"], "candidates": list(s[key])})
        if g.rank_teacher > 0:  # the ranks the prompt prints, the teacher's (checked above: collab.seq is set)
            prompts[-1]["seq_ranks"] = collab.seq.ranks([str(h) for h in s["history"]], [str(c) for c in s[key]],
                                                        s.get("user_id"))
    if not prompts:
        raise ValueError(f"{data_dir}/samples.parquet has no train samples")
    return prompts


def data_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic per-epoch permutation: the data cursor alone restores the order on resume."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def next_batch(n: int, seed: int, cursor: int, size: int) -> tuple[list[int], int]:
    """`size` prompt indices starting at global position `cursor` (epochs wrap), and the new cursor."""
    picked = []
    while len(picked) < size:
        epoch, pos = divmod(cursor, n)
        picked.append(data_order(n, seed, epoch)[pos])
        cursor += 1
    return picked, cursor


def shard(indices: list[int], n_actors: int) -> list[list[int]]:
    """Contiguous, balanced shards; a prompt (and so its whole group) lives on one actor."""
    base, extra = divmod(len(indices), n_actors)
    out, start = [], 0
    for a in range(n_actors):
        end = start + base + (1 if a < extra else 0)
        out.append(indices[start:end])
        start = end
    return out
