"""`RolloutActor`: one vLLM engine in a Ray actor; samples groups, takes new weights.

Rollout actors only generate: rewards are scored on the controller (jobs/grpo.py), so reward
terms, weights and the template can change without touching the actors. Each response carries
the sampler's log-probs of its tokens (`sampler_logp`, temperature and top-p applied: see
`mllmrec_ray.runtime.engine.ROLLOUT_LOGPROBS_MODE`).

The caller sets resources: `RolloutActor.options(num_cpus=..., num_gpus=...).remote(...)`
(from `GRPOConfig.rollout_resources`). Weights arrive as a LoRA adapter over the frozen base
(`update_adapter`, engines built with the policy's `lora`), or merged: as safetensors buckets
(`update_weights`, object store) or by broadcast (`WeightReceiverMixin`, see weight_sync.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from actors.weight_sync import WeightReceiverMixin
from mllmrec_ray.config import EngineConfig, GRPOConfig, LoraConfig, from_dict


@ray.remote
class RolloutActor(WeightReceiverMixin):
    """Holds one `mllmrec_ray.runtime.engine.Engine`.

    model: local directory or cache alias (resolved on the actor's node).
    engine: vLLM settings; grpo: group_size / temperature / top_p / new_tokens are used.
    think_first: accepted for compatibility; unused (rewards are scored on the controller).
    lora: the policy's LoraConfig (or its dict): accept adapters of its rank and target modules
        (adapter-only sync) when vLLM supports LoRA for the model; with `require_lora` an
        unsupported model is an error, else the engine is built without LoRA (`supports_lora()`
        says which) and takes merged weights.
    """

    def __init__(self, model: str, engine: EngineConfig | None = None, grpo: GRPOConfig | None = None,
                 think_first: bool = False, cache_dir: str | None = None, lora: LoraConfig | dict | None = None,
                 require_lora: bool = False):
        engine = engine or EngineConfig()
        if engine.tensor_parallel_size == 1:
            # In-process engine: ~4 s start instead of ~22 s, and no extra process per actor.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from mllmrec_ray.runtime.engine import ROLLOUT_LOGPROBS_MODE, Engine, lora_unsupported, restore_thread_budget
        from mllmrec_ray.runtime.models import resolve_model

        self.grpo = grpo or GRPOConfig()
        self.think_first = think_first
        path = resolve_model(model, cache_dir)
        lora = from_dict(LoraConfig, lora) if isinstance(lora, dict) else lora
        self.lora_fallback = None  # why a requested LoRA engine was not built
        if lora is not None and not require_lora:
            self.lora_fallback = lora_unsupported(path, lora.r)
            if self.lora_fallback:
                print(f"[rollout] merged weight sync: {self.lora_fallback}", flush=True)
                lora = None
        self.engine = Engine(path, engine, lora_rank=lora.r if lora else None,
                             lora_targets=list(lora.target_modules) if lora else None,
                             logprobs_mode=ROLLOUT_LOGPROBS_MODE)
        restore_thread_budget()
        self.version = 0
        self.totals = {"calls": 0, "prompts": 0, "completions": 0, "prompt_tokens": 0,
                       "completion_tokens": 0, "generate_s": 0.0}
        self.last: dict[str, Any] = {}

    def ping(self) -> bool:
        return True

    def weights_version(self) -> int:
        return self.version

    def supports_lora(self) -> bool:
        """True when the engine takes adapters (`update_adapter`), False when it needs merged weights."""
        return self.engine.lora_rank is not None

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
        out = {"last": dict(self.last), "totals": totals, "version": self.version,
               "torch_threads": torch.get_num_threads()}
        if self.engine.lora_rank is not None:  # the adapter requests run with, and every one vLLM holds
            req = self.engine.lora_request
            out["lora"] = {"current": req.lora_name if req else None,
                           "loaded": self.engine.loaded_adapters(),
                           "one_adapter_ops": self.engine.fast_lora_ops}
        return out

    def update_adapter(self, adapter: dict, version: int) -> dict:
        """Run every later request with this adapter over the frozen base. `adapter`: the learner's
        `export_adapter()` (`buckets` of A/B tensors, `config`). Returns timing and bytes received."""
        seconds = self.engine.load_adapter(adapter["buckets"], adapter["config"])
        self.version = version
        return {"version": version, "seconds": seconds, "bytes": sum(len(b) for b in adapter["buckets"])}

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per token sequence, log p(token i | earlier tokens) for i >= 1 under the current weights
        (adapter included), temperature 1: what a sync changed, seen from the engine."""
        return self.engine.sequence_logprobs(sequences)

    def update_weights(self, buckets: list[bytes], version: int) -> dict:
        """Load a full (or per-layer complete) state dict given as safetensors buckets; returns timing."""
        seconds = self.engine.load_buckets(buckets)
        self.version = version
        return {"version": version, "seconds": seconds, "bytes": sum(len(b) for b in buckets)}

