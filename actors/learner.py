"""The GRPO learner: one Ray actor holding a DeepSpeed engine over the LoRA policy.

Batch format of `train_step` / `logprobs`: a list of dicts, one per response,
    {"prompt_ids": list[int], "response_ids": list[int], "advantage": float}
(`advantage` is not needed by `logprobs`). The reference policy is the same model with
the adapter disabled, so the learner holds one copy of the base weights.

Use `LearnerActor` (= `ray.remote(Learner)`) from a controller:
    learner = LearnerActor.options(num_cpus=1).remote(model_path, grpo_cfg, lora_cfg)
Weights reach rollout actors through `actors.weight_sync.sync_weights` (object store, or a
broadcast via the inherited `WeightSenderMixin`, which calls `export_weights`).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import ray
import torch

from mllmrec_ray.config import GRPOConfig, LoraConfig, from_dict
from mllmrec_ray.grpo import grpo_loss
from mllmrec_ray.io import atomic_write_text
from mllmrec_ray.policy import (build_policy, deepspeed_engine, load_tokenizer, merged_lora_state, pad_batch,
                                save_merged, token_logprobs)
from mllmrec_ray.weights import to_buckets

from actors.weight_sync import WeightSenderMixin


class Learner(WeightSenderMixin):
    def __init__(self, model_path: str, cfg: GRPOConfig | dict | None = None, lora: LoraConfig | dict | None = None):
        """`cfg` / `lora`: the dataclasses or their `asdict` form; only the optimisation fields are used."""
        self.cfg = from_dict(GRPOConfig, cfg) if isinstance(cfg, dict) else (cfg or GRPOConfig())
        lora = from_dict(LoraConfig, lora) if isinstance(lora, dict) else (lora or LoraConfig())
        self.model_path = model_path
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            # A world of one rank: DeepSpeed still wants a process group.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch.manual_seed(self.cfg.seed)
        self.tokenizer = load_tokenizer(model_path)
        dtype = torch.bfloat16 if self.cfg.bf16 else torch.float32
        model = build_policy(model_path, lora, dtype=dtype)
        # Gradient accumulation is driven per step in train_step (batches vary in size).
        self.engine = deepspeed_engine(model, zero_stage=self.cfg.zero_stage, bf16=self.cfg.bf16, lr=self.cfg.lr,
                                       micro_batch_size=self.cfg.micro_batch_size, grad_accum=1)
        # No dropout: log-probs then match the rollout engine's and the ratio is exactly 1 on-policy.
        self.engine.eval()

    def _gathered(self):
        """All parameters materialised (ZeRO-3 partitions them; a no-op for stages 0-2)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                                 enabled=self.cfg.zero_stage == 3)

    def _micro_batches(self, batch: list[dict]):
        """Per micro-batch: (input_ids, attention_mask, response_mask, advantages, start).

        Log-probs are taken from column `start` on (the shortest prompt's last token): the
        response_mask is already sliced to match.
        """
        m = self.cfg.micro_batch_size
        dev = self.engine.device
        out = []
        for i in range(0, len(batch), m):
            mb = batch[i : i + m]
            ids, attn, rmask = pad_batch([b["prompt_ids"] for b in mb], [b["response_ids"] for b in mb],
                                         self.tokenizer.pad_token_id)
            adv = torch.tensor([float(b.get("advantage", 0.0)) for b in mb], dtype=torch.float32)
            start = min(len(b["prompt_ids"]) for b in mb) - 1
            out.append((ids.to(dev), attn.to(dev), rmask[:, start:].to(dev), adv.to(dev), start))
        return out

    def _ref_logprobs(self, ids, attn, start):
        with torch.no_grad(), self.engine.module.disable_adapter():
            return token_logprobs(self.engine, ids, attn, start)

    def train_step(self, batch: list[dict]) -> dict:
        """One GRPO step: `updates_per_step` optimizer updates on this batch; returns float stats.

        The loss of each update is the full-batch loss of grpo_loss: each micro-batch's loss
        is weighted by its share of the batch (responses, or tokens for `token_mean`).
        """
        if not batch:
            raise ValueError("train_step got an empty batch")
        cfg = self.cfg
        t0 = time.perf_counter()
        mbs = self._micro_batches(batch)
        if cfg.loss_agg == "token_mean":
            shares = [float(mb[2].sum()) for mb in mbs]
        else:
            shares = [float((mb[2].sum(1) > 0).sum()) for mb in mbs]
        tokens = [float(mb[2].sum()) for mb in mbs]
        total_share, total_tokens = max(sum(shares), 1.0), max(sum(tokens), 1.0)
        ref = [self._ref_logprobs(ids, attn, start) if cfg.beta != 0 else None for ids, attn, _, _, start in mbs]
        old = None
        if cfg.updates_per_step > 1:  # with a single update old == current, taken from the same forward
            with torch.no_grad():
                old = [token_logprobs(self.engine, ids, attn, start) for ids, attn, _, _, start in mbs]

        per_update = []
        for _ in range(cfg.updates_per_step):
            agg = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}
            for k, (ids, attn, rmask, adv, start) in enumerate(mbs):
                self.engine.set_gradient_accumulation_boundary(k == len(mbs) - 1)
                logp = token_logprobs(self.engine, ids, attn, start)
                old_logp = logp.detach() if old is None else old[k]
                loss, st = grpo_loss(logp, old_logp, ref[k], adv, rmask, clip_eps=cfg.clip_eps,
                                     beta=cfg.beta, loss_agg=cfg.loss_agg)
                w = shares[k] / total_share
                self.engine.backward(loss * w, scale_wrt_gas=False)  # weights sum to 1: the batch mean
                agg["loss"] += w * st["loss"]
                for key in ("kl", "clip_frac", "ratio_mean"):  # per-token statistics
                    agg[key] += tokens[k] / total_tokens * st[key]
            self.engine.step()
            grad_norm = self.engine.get_global_grad_norm()
            agg["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            per_update.append(agg)

        stats = dict(per_update[0])  # the on-policy (first) update is the one comparable across steps
        stats["loss_final"] = per_update[-1]["loss"]
        stats.update(tokens=sum(tokens), sequences=len(batch), optimizer_steps=int(self.engine.global_steps),
                     seconds=time.perf_counter() - t0)
        return stats

    def logprobs(self, batch: list[dict]) -> dict:
        """Per-response token log-probs under the policy and the reference (adapter disabled)."""
        out = {"logp": [], "ref_logp": []}
        for ids, attn, rmask, _, start in self._micro_batches(batch):
            with torch.no_grad():
                logp = token_logprobs(self.engine, ids, attn, start)
            ref = self._ref_logprobs(ids, attn, start)
            for i in range(ids.shape[0]):
                sel = rmask[i].bool()
                out["logp"].append(logp[i][sel].tolist())
                out["ref_logp"].append(ref[i][sel].tolist())
        return out

    def export_weights(self, full: bool = False) -> list[bytes]:
        """Merged weights as safetensors buckets: the LoRA targets (whole fused groups), or (full) the whole model."""
        with self._gathered():
            state = merged_lora_state(self.engine.module, full=full)
            return to_buckets(state.items(), self.cfg.sync_bucket_mb << 20)

    def save_checkpoint(self, ckpt_dir: str, client_state: dict) -> str:
        """DeepSpeed checkpoint (adapter, optimizer, step) + the controller's `client_state`.

        `latest` is rewritten atomically only after the tag dir is complete, so a crash
        mid-save leaves `latest` on the previous good checkpoint. Returns the tag.
        """
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        latest = ckpt / "latest"
        current = latest.read_text().strip() if latest.exists() else None
        tag = f"step{int(self.engine.global_steps)}"
        if tag == current:  # never overwrite what `latest` points to
            tag = f"{tag}-{time.time_ns()}"
        shutil.rmtree(ckpt / tag, ignore_errors=True)  # a half-written leftover of a crash
        self.engine.save_checkpoint(str(ckpt), tag=tag, client_state={"mllmrec": client_state},
                                    save_latest=False, exclude_frozen_parameters=True)
        atomic_write_text(latest, tag)
        return tag

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Restore adapter, optimizer and step from `ckpt_dir/latest`; returns the client_state."""
        if not (Path(ckpt_dir) / "latest").exists():
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
        # Not strict: the frozen base is not in the checkpoint, it comes from model_path.
        path, client = self.engine.load_checkpoint(ckpt_dir, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
        return client.get("mllmrec", {})

    def save_merged(self, out_dir: str) -> str:
        """The current policy as a plain HF model dir (plus `adapter/`), written atomically."""
        with self._gathered():
            return str(save_merged(self.engine.module, self.tokenizer, out_dir,
                                   info={"base_model": self.model_path, "step": int(self.engine.global_steps)}))

    def ping(self) -> dict:
        return {"pid": os.getpid(), "optimizer_steps": int(self.engine.global_steps), "device": str(self.engine.device)}


LearnerActor = ray.remote(Learner)
