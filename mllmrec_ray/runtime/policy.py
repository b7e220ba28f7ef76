"""The LoRA policy: building it, per-token log-probs, adapter / merged weights for vLLM, saving, DeepSpeed engine.

One model serves as both policy and reference: the reference is the same module with the
adapter disabled (`with model.disable_adapter():`), so no second copy of the base is held.
No Ray here; DeepSpeed is imported only by `deepspeed_engine`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

# Written last into a merged model dir: its presence means the directory is complete.
MERGED_MARKER = "mllmrec_complete.json"
# Shared JIT cache so DeepSpeed's comm op (about 75 s to build) compiles once for tests and jobs.
TORCH_EXTENSIONS_DIR = Path.home() / ".cache" / "mllmrec" / "torch_extensions"
# vLLM loads these projections as one fused tensor, so a partial update must carry whole groups.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def build_policy(model_path: str, lora, dtype: torch.dtype = torch.float32):
    """A peft LoRA model over the HF causal LM at `model_path`; `lora` is our config.LoraConfig."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from mllmrec_ray.runtime.models import flush_denormals

    flush_denormals()  # before the first op: the learner's and SFT's threads start flushing
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    base.config.use_cache = False  # training never reuses a KV cache
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=list(lora.layers) if lora.layers is not None else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, peft_cfg)


def load_tokenizer(model_path: str):
    """The model's tokenizer with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_batch(prompt_ids_list, response_ids_list, pad_id: int):
    """Right-padded prompt+response rows.

    Returns input_ids [N, T], attention_mask [N, T] and response_mask [N, T-1]: the mask is
    aligned with `token_logprobs` output, whose column j is the log-prob of input token j+1,
    so it is 1 exactly where a response token is predicted.
    """
    if len(prompt_ids_list) != len(response_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(response_ids_list)} responses")
    rows = [list(p) + list(r) for p, r in zip(prompt_ids_list, response_ids_list)]
    width = max(max(len(r) for r in rows), 2)  # at least one predicted position
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width - 1), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids_list, response_ids_list)):
        if len(p) == 0:
            raise ValueError(f"row {i}: empty prompt (the first response token needs a context)")
        input_ids[i, : len(p) + len(r)] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
        response_mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1
    return input_ids, attention_mask, response_mask


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, as vLLM's sampler applies it (in fp32) before top-p and sampling.

    The learner scores responses at the rollout temperature so policy, reference and sampler
    are the same distribution. temperature <= 0 (greedy rollouts) has no distribution: 1 is used.
    """
    if temperature <= 0 or temperature == 1.0:
        return logits
    return logits / temperature


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
                   temperature: float = 1.0) -> torch.Tensor:
    """[N, T-1-start] float32 log-prob of each next token (column j scores input token start+j+1).

    `temperature`: log-probs of softmax(logits / temperature), the distribution a sampler at that
    temperature draws from (before any top-p truncation); see `scale_logits`.

    `start` > 0 skips the columns of a shared prompt prefix: the LM head and softmax then run
    only on the positions that are scored (with a ~400-token prompt and ~32 response tokens
    this is most of the vocabulary-sized work). Slice a `pad_batch` response_mask as [:, start:].
    """
    keep = input_ids.shape[1] - start  # logits at positions start..T-1; the last predicts nothing
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1].float()
    logits = scale_logits(logits, temperature)
    targets = input_ids[:, start + 1 :].unsqueeze(-1)
    # gather - logsumexp is log_softmax at the target without keeping a second [N, T, V] tensor.
    return torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def packed_rows(lens: list[int], width: int, pieces: list[list[list[int]]], pad_id: int, dtype: torch.dtype):
    """Row b packs the token lists `pieces[b]` after its prompt's KV cache (`lens[b]` real tokens of a
    `width`-wide cache): (input ids [n, q], position ids [n, q], additive attention mask [n, 1, q, width + q]).

    Each piece's tokens continue the prompt's positions and see the prompt's real tokens and their own
    piece's earlier tokens only, so many continuations share one prompt without copying its cache.
    Padding columns see their row's prompt (no empty softmax row). Used by the scorer (answers) and
    the learner (responses).
    """
    n, q = len(pieces), max((sum(len(p) for p in row) for row in pieces), default=0)
    inputs = torch.full((n, q), pad_id, dtype=torch.long)
    pos = torch.zeros((n, q), dtype=torch.long)
    own = torch.full((n, q), -1, dtype=torch.long)  # which piece a column belongs to; -1: padding
    for b, row in enumerate(pieces):
        at = 0
        for k, piece in enumerate(row):
            if piece:
                inputs[b, at : at + len(piece)] = torch.tensor(piece, dtype=torch.long)
                pos[b, at : at + len(piece)] = torch.arange(lens[b], lens[b] + len(piece))
                own[b, at : at + len(piece)] = k
                at += len(piece)
    allowed = torch.zeros((n, q, width + q), dtype=torch.bool)
    allowed[:, :, :width] = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None])[:, None, :]
    allowed[:, :, width:] = ((own[:, :, None] == own[:, None, :]) & (own[:, :, None] >= 0)
                             & (pos[:, None, :] <= pos[:, :, None]))
    mask = torch.zeros((n, 1, q, width + q), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return inputs, pos, mask


def group_logprobs(model, prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the responses to one or more prompts in two forwards, each prompt run once.

    `responses[b]` are the responses to `prompts[b]`; `temperature` scales the logits as in
    `token_logprobs`. The prompts run right-padded in one batch without a mask (causal attention
    alone keeps each real token from the padding after it, so sdpa takes its causal kernel). Each
    prompt's responses are then packed into that prompt's row over its KV cache, a mask letting each
    response token see its prompt's real tokens and the earlier tokens of its own response only:
    no copy of the cache per response. Gradients flow back through the prompts. Same numbers as one
    full row per response (`token_logprobs`) for ~G times fewer tokens. Measured on 2 cores (beside a
    running SFT), a learner step of 4 prompts of ~700 tokens x G = 4: 7.8 s with the 4 groups in one
    call, 13.6 s with one prompt per call and its cache repeated G times (the previous version).

    Returns ([N, C] float32 log-prob of each response token, [N, C] mask of real tokens): rows are
    the responses in order (prompt 0's, then prompt 1's, ...), C = the longest response (at least 1).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    if not prompts or any(not p for p in prompts):
        raise ValueError("empty prompt (the first response token needs a context)")
    dev = next(model.parameters()).device
    n, lens = len(prompts), [len(p) for p in prompts]
    width = max(lens)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    last = sorted({k - 1 for k in lens})  # logits only where a first response token is predicted
    prefix = model(input_ids=ids.to(dev), use_cache=True, logits_to_keep=torch.tensor(last, device=dev))
    first = prefix.logits[torch.arange(n), torch.tensor([last.index(k - 1) for k in lens])]  # [n, V]

    # Row b of the packed forward: every response of prompt b but its last token (that one predicts nothing).
    q = max(sum(max(len(r) - 1, 0) for r in resp) for resp in responses)
    packed = None
    if q > 0:
        inputs, pos, mask = packed_rows(lens, width, [[r[:-1] for r in resp] for resp in responses], pad_id,
                                        next(model.parameters()).dtype)
        packed = model(input_ids=inputs.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       past_key_values=prefix.past_key_values, use_cache=True).logits  # [n, q, V]

    # Response token j is predicted at its prompt's last position (j = 0) or at its own token j-1.
    # One index_select picks the real tokens' logits (per-response slices each cost a full-size zero
    # gradient in the backward) and one fused cross-entropy gives their log-probs: a padded [N, C, V]
    # tensor, slices and a separate logsumexp were ~1.5 s of a 4-prompt step here.
    flat = [r for resp in responses for r in resp]
    c = max(max((len(r) for r in flat), default=0), 1)
    pick, targets, where = [], [], []
    for b, resp in enumerate(responses):
        at = 0
        for r in resp:
            pick += [b] + [n + b * q + at + j for j in range(len(r) - 1)] if r else []
            at += max(len(r) - 1, 0)
    for i, r in enumerate(flat):
        targets += r
        where += range(i * c, i * c + len(r))
    real = torch.zeros((len(flat), c), dtype=torch.long, device=first.device)
    logp = torch.zeros((len(flat), c), dtype=torch.float32, device=first.device)
    if targets:
        rows = first if packed is None else torch.cat([first, packed.flatten(0, 1)])
        logits = scale_logits(rows.index_select(0, torch.tensor(pick, device=rows.device)).float(), temperature)
        token_logp = -torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=logits.device),
                                                        reduction="none")
        index = torch.tensor(where, device=logits.device)
        logp = logp.flatten().index_put((index,), token_logp).view(len(flat), c)
        real.view(-1)[index] = 1
    return logp, real


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA A/B tensors under the names PEFT saves (`adapter_model.safetensors`), in the training dtype.

    What adapter-only weight sync ships: vLLM loads these on top of its frozen base weights.
    """
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(peft_model).items()}


def adapter_config(peft_model) -> dict:
    """The active adapter's PEFT config as `adapter_config.json` holds it (sets as sorted lists)."""
    cfg = peft_model.peft_config[peft_model.active_adapter].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    return json.loads(json.dumps(cfg, default=str))  # enums and paths as strings: JSON-ready


def base_model_bytes(peft_model) -> int:
    """Bytes of the frozen base weights (tied tensors once): the size a full merged sync would ship."""
    seen, total = set(), 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def disk_state(model_dir) -> dict[str, torch.Tensor] | None:
    """Every tensor of the safetensors files in `model_dir` as saved (e.g. the fp32 SFT model), or
    None when `model_dir` is not a local directory with safetensors files (a hub name)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def _exact_base(model_base: dict[str, torch.Tensor], disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved-precision tensor for each in-memory base tensor, checked to be the same weight.

    A tied tensor saved once (lm_head = embed_tokens) takes its twin's disk tensor, so tying survives.
    """
    twin = {v.data_ptr(): disk[k] for k, v in model_base.items() if k in disk}
    out = {}
    for k, v in model_base.items():
        src = disk[k] if k in disk else twin.get(v.data_ptr())
        if src is None:
            raise ValueError(f"base weight {k} is not in the base model's files")
        if src.shape != v.shape or not torch.equal(src.to(v.dtype), v):
            raise ValueError(f"base weight {k} on disk is not the weight the policy holds: wrong base model dir?")
        out[k] = src
    return out


def merged_lora_state(peft_model, full: bool = False, dtype: torch.dtype | None = None,
                      base_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Merged weights W + scale * B @ A of every LoRA target, under the base model's HF names.

    The merge runs in fp32; the result is cast to `dtype`, or (None) back to each base weight's
    dtype. A bf16 cast loses small updates (a delta of 1e-5 on weights of ~0.02 mostly rounds
    away), so final models are saved in fp32 by default (`save_merged`).

    `base_state` (`disk_state` of the policy's base dir): W is taken from it, at its saved precision,
    instead of the in-memory copy. A bf16 learner over an fp32 SFT model otherwise moves every
    weight by bf16 rounding (~1e-4 relative), far more than one GRPO update changes it.

    Does not touch the model (no merge/unmerge). `full=False` returns what training changes:
    the LoRA targets, plus the untouched siblings of a vLLM fused group (q/k/v, gate/up) so
    every fused tensor arrives whole. `full=True` returns every tensor of the merged model
    (tied `lm_head.weight` included, as vLLM's loader wants it): a complete HF state dict.
    """
    from peft.tuners.lora import LoraLayer

    def base_name(peft_name: str) -> str:
        return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")

    with torch.no_grad():
        base = {base_name(k): v.detach() for k, v in peft_model.state_dict().items() if "lora_" not in k}
        if base_state is not None:
            base = _exact_base(base, base_state)
        merged: dict[str, torch.Tensor] = {}
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            w = module.get_base_layer().weight
            m = base[base_name(name) + ".weight"].float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    m = m + module.get_delta_weight(adapter).float()
            merged[base_name(name) + ".weight"] = m.to(dtype or w.dtype)
    if full:
        if dtype is not None:
            # one cast per storage: tied tensors (embed_tokens / lm_head) stay one tensor
            cast: dict[int, torch.Tensor] = {}
            base = {k: cast.setdefault(v.data_ptr(), v.to(dtype)) if v.is_floating_point() else v
                    for k, v in base.items()}
        return {**base, **merged}
    keys = set(merged)
    for key in merged:
        prefix, leaf = key.removesuffix(".weight").rsplit(".", 1)
        for group in FUSED_GROUPS:
            if leaf in group:
                keys.update(k for k in (f"{prefix}.{g}.weight" for g in group) if k in base)
    return {k: merged.get(k, base.get(k)) for k in sorted(keys)}


def save_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """`float32` / `bfloat16` (config `model.save_dtype`) as a torch dtype; None = float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"save dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def save_merged(peft_model, tokenizer, out_dir, info: dict | None = None,
                dtype: str | torch.dtype | None = None, base_dir: str | os.PathLike | None = None) -> Path:
    """Write `out_dir` as a plain HF model (merged weights) + `adapter/` + tokenizer, atomically.

    The merge runs in fp32 and the model is saved in `dtype` (`save_dtype`; default float32, so an
    update smaller than bf16's rounding step survives); the adapter beside it is exact either way.
    `base_dir`: the policy's base model dir; its saved tensors are the W of the merge (see
    `merged_lora_state`), so the saved model differs from the base by exactly the update. Without
    it, or when it holds no safetensors files, the in-memory base is used (the marker says which).

    Everything goes to a temp dir beside `out_dir`, the marker file last, then one rename
    swaps it in; the training model is left untouched. Returns the output path.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    base = peft_model.get_base_model()
    dtype = save_dtype(dtype)
    base_state = disk_state(base_dir) if base_dir is not None else None
    merge_base = "base_dir files" if base_state is not None else "in-memory weights"
    state = {k: v.contiguous() for k, v in
             merged_lora_state(peft_model, full=True, dtype=dtype, base_state=base_state).items()}
    del base_state
    base.config.use_cache = True  # an inference model; training turned the cache off
    train_dtype = getattr(base.config, "dtype", None)
    base.config.dtype = dtype  # config.json names the saved dtype (loaders with dtype="auto" read it)
    try:
        base.save_pretrained(tmp, state_dict=state)
    finally:
        base.config.use_cache = False
        base.config.dtype = train_dtype
    peft_model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp)
    marker = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "merge_base": merge_base, **(info or {})}
    (tmp / MERGED_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True, default=str) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def is_complete(model_dir) -> bool:
    """True when `model_dir` holds a merged model whose save finished (the marker exists)."""
    return (Path(model_dir) / MERGED_MARKER).is_file()


def deepspeed_engine(model, *, zero_stage: int, bf16: bool, lr: float, micro_batch_size: int,
                     grad_accum: int, grad_clip: float = 1.0):
    """A DeepSpeed engine over the trainable (LoRA) parameters of `model`.

    torch.distributed must be set up already (Ray Train does it) or the env vars of a
    single-rank world (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) must be set.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # torch_adam: DeepSpeed's fused CPU Adam would need another compiled op.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,  # we print our own progress lines
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine
