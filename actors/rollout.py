"""`RolloutActor`: one vLLM engine in a Ray actor; samples groups, takes new weights.

Rollout actors only generate: rewards are scored on the controller (jobs/grpo.py), so reward
terms, weights and the template can change without touching the actors. Each response carries
the sampler's log-probs of its tokens (`sampler_logp`, temperature and top-p applied: see
`mllmrec_ray.engine.ROLLOUT_LOGPROBS_MODE`).

The caller sets resources: `RolloutActor.options(num_cpus=..., num_gpus=...).remote(...)`
(from `GRPOConfig.rollout_resources`). Weights arrive either as safetensors buckets
(`update_weights`, object store) or by broadcast (`WeightReceiverMixin`, see weight_sync.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from actors.weight_sync import WeightReceiverMixin
from mllmrec_ray.config import EngineConfig, GRPOConfig


@ray.remote
class RolloutActor(WeightReceiverMixin):
    """Holds one `mllmrec_ray.engine.Engine`.

    model: local directory or cache alias (resolved on the actor's node).
    engine: vLLM settings; grpo: group_size / temperature / top_p / new_tokens are used.
    think_first: accepted for compatibility; unused (rewards are scored on the controller).
    """

    def __init__(self, model: str, engine: EngineConfig | None = None, grpo: GRPOConfig | None = None,
                 think_first: bool = False, cache_dir: str | None = None):
        engine = engine or EngineConfig()
        if engine.tensor_parallel_size == 1:
            # In-process engine: ~4 s start instead of ~22 s, and no extra process per actor.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from mllmrec_ray.engine import ROLLOUT_LOGPROBS_MODE, Engine, restore_thread_budget
        from mllmrec_ray.models import resolve_model

        self.grpo = grpo or GRPOConfig()
        self.think_first = think_first
        self.engine = Engine(resolve_model(model, cache_dir), engine, logprobs_mode=ROLLOUT_LOGPROBS_MODE)
        restore_thread_budget()
        self.version = 0
        self.totals = {"calls": 0, "prompts": 0, "completions": 0, "prompt_tokens": 0,
                       "completion_tokens": 0, "generate_s": 0.0}
        self.last: dict[str, Any] = {}

    def ping(self) -> bool:
        return True

    def weights_version(self) -> int:
        return self.version

    def generate_groups(self, prompts: list[dict], seed: int | None = None) -> list[dict]:
        """Sample G responses per prompt (no scoring: the controller computes rewards).

        Each prompt dict: `sample_id`, `prompt` (chat-rendered text) or `prompt_ids` (token ids;
        used as is, else `prompt` is tokenized without adding special tokens); other keys are
        ignored. `seed` re-seeds the engine's sampler for this call (reproducible rollouts on
        resume). Returns, per prompt in order: `{sample_id, prompt_ids, version, responses:
        [{text, token_ids, sampler_logp, finish_reason}]}`; `token_ids` ends with EOS when the
        response stopped on EOS; `sampler_logp[i]` is the sampler's log-prob of `token_ids[i]`
        (NaN where vLLM reported none).
        """
        g = self.grpo
        prompt_ids = [p.get("prompt_ids") or self.engine.encode(p["prompt"]) for p in prompts]
        t0 = time.perf_counter()
        groups = self.engine.generate(prompt_ids, g.group_size, g.temperature, g.top_p, g.new_tokens, seed=seed,
                                      logprobs=True)
        seconds = time.perf_counter() - t0
        out = []
        for p, ids, group in zip(prompts, prompt_ids, groups):
            responses = [{"text": c.text, "token_ids": c.token_ids, "sampler_logp": c.logprobs,
                          "finish_reason": c.finish_reason} for c in group]
            out.append({"sample_id": p["sample_id"], "prompt_ids": list(ids), "version": self.version,
                        "responses": responses})
        completion_tokens = sum(c.completion_tokens for grp in groups for c in grp)
        self.last = {"prompts": len(prompts), "completions": sum(map(len, groups)),
                     "prompt_tokens": sum(map(len, prompt_ids)), "completion_tokens": completion_tokens,
                     "generate_s": seconds, "tokens_per_s": completion_tokens / seconds if seconds else 0.0}
        for key in ("prompts", "completions", "prompt_tokens", "completion_tokens", "generate_s"):
            self.totals[key] += self.last[key]
        self.totals["calls"] += 1
        return out

    def stats(self) -> dict:
        """`{"last": stats of the last generate_groups call, "totals": cumulative, "version"}`;
        tokens_per_s counts generated tokens over engine wall time."""
        totals = dict(self.totals)
        totals["tokens_per_s"] = totals["completion_tokens"] / totals["generate_s"] if totals["generate_s"] else 0.0
        import torch

        # Ray gives an actor floor(num_cpus) (at least 1) OpenMP threads: the engine's compute width.
        return {"last": dict(self.last), "totals": totals, "version": self.version,
                "torch_threads": torch.get_num_threads()}

    def update_weights(self, buckets: list[bytes], version: int) -> dict:
        """Load a full (or per-layer complete) state dict given as safetensors buckets; returns timing."""
        seconds = self.engine.load_buckets(buckets)
        self.version = version
        return {"version": version, "seconds": seconds, "bytes": sum(len(b) for b in buckets)}

    def score(self, requests: list[dict]) -> list[dict]:
        """Score mode: each request `{sample_id, prompt (text) | prompt_ids, candidates, answers}`
        (answers[i] = answer_text of candidates[i]); returns `{sample_id, scores, ranking}` per request,
        scores = summed answer-token log-probabilities, ranking = candidates best first."""
        from mllmrec_ray.scoring import VLLMScorer, answer_ids, rank_by_scores

        scorer = VLLMScorer(self.engine)
        prompt_ids = [r.get("prompt_ids") or self.engine.encode(r["prompt"]) for r in requests]
        scores = scorer.score(prompt_ids, [answer_ids(self.engine.tokenizer, r["answers"]) for r in requests])
        return [{"sample_id": r["sample_id"], "scores": s, "ranking": rank_by_scores(r["candidates"], s)}
                for r, s in zip(requests, scores)]
