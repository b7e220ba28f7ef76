"""The GRPO learner: one Ray actor holding a DeepSpeed engine over the LoRA policy.

Batch format of `train_step` / `logprobs`: a list of dicts, one per response,
    {"prompt_ids": list[int], "response_ids": list[int], "advantage": float,
     "sampler_logp": list[float] (optional; the rollout engine's log-prob of each response token)}
(`advantage` is not needed by `logprobs`). The reference policy is the same model with
the adapter disabled, so the learner holds one copy of the base weights. Policy and reference
are scored at the sampling temperature (`grpo.temperature`), the distribution vLLM drew from.

Use `LearnerActor` (= `ray.remote(Learner)`) from a controller:
    learner = LearnerActor.options(num_cpus=1).remote(model_path, grpo_cfg, lora_cfg)
Weights reach rollout actors through `actors.weight_sync.sync_weights`: the adapter alone
(`export_adapter`, transport `lora`), or merged weights (`export_weights`: object store, or a
broadcast via the inherited `WeightSenderMixin`).
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
from mllmrec_ray.rl.grpo import grpo_loss, tis_weights
from mllmrec_ray.io import atomic_write_text
from mllmrec_ray.runtime.models import bf16_enabled
from mllmrec_ray.runtime.policy import (adapter_config, adapter_state, base_model_bytes, build_policy, deepspeed_engine,
                                group_logprobs, load_tokenizer, merged_lora_state, save_merged)
from mllmrec_ray.rl.weights import to_buckets

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
        self.bf16 = bf16_enabled(self.cfg.bf16)
        model = build_policy(model_path, lora, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        # Gradient accumulation is driven per step in train_step (batches vary in size).
        self.ds_engine = deepspeed_engine(model, zero_stage=self.cfg.zero_stage, bf16=self.bf16, lr=self.cfg.lr,
                                       micro_batch_size=self.cfg.micro_batch_size, grad_accum=1)
        # No dropout: log-probs then match the rollout engine's and the ratio is exactly 1 on-policy.
        self.ds_engine.eval()

    def _gathered(self):
        """All parameters materialised (ZeRO-3 partitions them; a no-op for stages 0-2)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.ds_engine.module.parameters()),
                                                 enabled=self.cfg.zero_stage == 3)

    def _micro_batches(self, batch: list[dict]) -> list[tuple]:
        """Per micro-batch: (row indices into `batch`, prompts, responses per prompt, advantages [n]).

        A micro-batch holds whole groups (every response to a prompt) up to micro_batch_size
        responses; a larger group is split. Each prompt runs once and its responses are packed over
        its KV cache (`group_logprobs`); rows follow the order prompt by prompt.
        """
        by_prompt: dict[tuple, list[int]] = {}
        for i, b in enumerate(batch):
            by_prompt.setdefault(tuple(b["prompt_ids"]), []).append(i)
        m, dev = self.cfg.micro_batch_size, self.ds_engine.device
        chunks = [(prompt, rows[k : k + m]) for prompt, rows in by_prompt.items() for k in range(0, len(rows), m)]
        out, cur = [], []
        for prompt, rows in chunks:
            if cur and sum(len(r) for _, r in cur) + len(rows) > m:
                out.append(cur)
                cur = []
            cur.append((prompt, rows))
        if cur:
            out.append(cur)
        result = []
        for mb in out:
            idx = [i for _, rows in mb for i in rows]
            adv = torch.tensor([float(batch[i].get("advantage", 0.0)) for i in idx], dtype=torch.float32, device=dev)
            result.append((idx, [list(p) for p, _ in mb],
                           [[list(batch[i]["response_ids"]) for i in rows] for _, rows in mb], adv))
        return result

    def _logprobs(self, prompts: list[list[int]], responses: list[list[list[int]]], reference: bool = False):
        """(log-probs [n, C], mask [n, C]) under the policy, or the reference (adapter disabled, no grad),
        both at the sampling temperature."""
        t = self.cfg.temperature
        if not reference:
            return group_logprobs(self.ds_engine, prompts, responses, self.tokenizer.pad_token_id, temperature=t)
        with torch.no_grad(), self.ds_engine.module.disable_adapter():
            return group_logprobs(self.ds_engine, prompts, responses, self.tokenizer.pad_token_id, temperature=t)

    def _sampler_logp(self, batch: list[dict], idx: list[int], like: torch.Tensor) -> torch.Tensor | None:
        """[n, C] sampler log-probs of rows `idx` (NaN where missing), or None when no row has them."""
        rows = [batch[i].get("sampler_logp") for i in idx]
        if all(r is None for r in rows):
            return None
        out = torch.full_like(like, float("nan"), dtype=torch.float32)
        for j, r in enumerate(rows):
            if r is not None:
                out[j, : len(r)] = torch.tensor([float("nan") if v is None else float(v) for v in r])
        return out

    def train_step(self, batch: list[dict]) -> dict:
        """One GRPO step: `updates_per_step` optimizer updates on this batch; returns stats.

        The loss of each update is the full-batch loss of grpo_loss: each micro-batch's loss
        is weighted by its share of the batch (responses, or tokens for `token_mean`).
        Stats are floats, plus `old_logp`: per row (batch order) the old policy's log-prob of
        each response token, taken before the update (for the controller's logprob_gap). With
        `tis_cap` set and rows carrying `sampler_logp`, each token's policy term is weighted by
        min(exp(old_logp - sampler_logp), tis_cap) (`tis_weight_mean` reports the mean weight).
        """
        if not batch:
            raise ValueError("train_step got an empty batch")
        cfg = self.cfg
        t0 = time.perf_counter()
        mbs = self._micro_batches(batch)
        tokens = [float(sum(len(r) for group in resp for r in group)) for _, _, resp, _ in mbs]
        if cfg.loss_agg == "token_mean":
            shares = list(tokens)
        else:
            shares = [float(sum(len(r) > 0 for group in resp for r in group)) for _, _, resp, _ in mbs]
        total_share, total_tokens = max(sum(shares), 1.0), max(sum(tokens), 1.0)
        t_ref = time.perf_counter()
        ref = [self._logprobs(prompts, resp, reference=True)[0] if cfg.beta != 0 else None
               for _, prompts, resp, _ in mbs]
        ref_s = time.perf_counter() - t_ref  # the reference forward: work the KL term adds to every step
        old = None
        if cfg.updates_per_step > 1:  # with a single update old == current, taken from the same forward
            with torch.no_grad():
                old = [self._logprobs(prompts, resp)[0] for _, prompts, resp, _ in mbs]
        old_rows: list = [None] * len(batch)
        tis_sum, tis_n = 0.0, 0

        per_update = []
        for u in range(cfg.updates_per_step):
            agg = {"loss": 0.0, "kl": 0.0 if cfg.beta != 0 else None, "clip_frac": 0.0, "ratio_mean": 0.0}
            for k, (idx, prompts, resp, adv) in enumerate(mbs):
                self.ds_engine.set_gradient_accumulation_boundary(k == len(mbs) - 1)
                logp, rmask = self._logprobs(prompts, resp)
                flat = [r for group in resp for r in group]
                old_logp = logp.detach() if old is None else old[k]
                weights = None
                if u == 0:
                    for j, i in enumerate(idx):
                        old_rows[i] = old_logp[j][: len(flat[j])].float().tolist()
                    if cfg.tis_cap is not None:
                        sampler = self._sampler_logp(batch, idx, old_logp)
                        if sampler is not None:
                            weights = tis_weights(old_logp, sampler, rmask, cfg.tis_cap)
                        # rows without sampler log-probs count with weight 1, as tis_weights gives NaN entries
                        tis_sum += float(rmask.sum()) if weights is None else float((weights * rmask).sum())
                        tis_n += int(rmask.sum())
                elif cfg.tis_cap is not None:
                    sampler = self._sampler_logp(batch, idx, old_logp)
                    weights = None if sampler is None else tis_weights(old_logp, sampler, rmask, cfg.tis_cap)
                loss, st = grpo_loss(logp, old_logp, ref[k], adv, rmask, clip_eps=cfg.clip_eps,
                                     beta=cfg.beta, loss_agg=cfg.loss_agg, token_weights=weights)
                w = shares[k] / total_share
                self.ds_engine.backward(loss * w, scale_wrt_gas=False)  # weights sum to 1: the batch mean
                agg["loss"] += w * st["loss"]
                for key in ("kl", "clip_frac", "ratio_mean"):  # per-token statistics; kl None: not measured
                    if st[key] is not None:
                        agg[key] += tokens[k] / total_tokens * st[key]
            self.ds_engine.step()
            grad_norm = self.ds_engine.get_global_grad_norm()
            agg["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            per_update.append(agg)

        stats = dict(per_update[0])  # the on-policy (first) update is the one comparable across steps
        stats["loss_final"] = per_update[-1]["loss"]
        stats.update(tokens=sum(tokens), sequences=len(batch), optimizer_steps=int(self.ds_engine.global_steps),
                     seconds=time.perf_counter() - t0, ref_s=ref_s, old_logp=old_rows,
                     tis_weight_mean=tis_sum / tis_n if tis_n else None)
        return stats

    def rank_step(self, batch: list[dict], seed: int = 0) -> dict:
        """One GRPO step over rankings (`grpo.action: rank`, mllmrec_ray.rl.listwise); returns stats.

        Rows: {"prompt_ids": the prompt and the readout's shared tokens, "candidates": each candidate's
        readout tokens, "target": the target's index among them, with grpo.rank_teacher "teacher": each
        candidate's sequence-model rank as the prompt prints it}. A candidate's score is the summed
        log-prob of its tokens at grpo.temperature (at 1, the evaluation's score); G = group_size top-rank_k
        rankings are drawn per prompt from those scores (`seed`: the same draws on a resumed run) and
        rewarded with NDCG@rank_k; whole prompts go micro_batch_size candidates to a forward.
        """
        from mllmrec_ray.rl.grpo import group_advantages
        from mllmrec_ray.rl.listwise import (listwise_loss, ndcg_reward, plackett_luce_logprob, sample_rankings,
                                             teacher_ndcg_reward)

        if not batch:
            raise ValueError("rank_step got an empty batch")
        cfg, t0 = self.cfg, time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        per = max(1, cfg.micro_batch_size // max(len(b["candidates"]) for b in batch))
        chunks = [batch[i : i + per] for i in range(0, len(batch), per)]
        rewards, targets, greedy, greedy_teacher, zero_var, tokens, ref_s = [], [], [], [], 0, 0, 0.0
        agg, w = {"loss": 0.0, "kl": 0.0 if cfg.beta != 0 else None}, cfg.rank_teacher
        for c, chunk in enumerate(chunks):
            self.ds_engine.set_gradient_accumulation_boundary(c == len(chunks) - 1)
            prompts, cands = [list(b["prompt_ids"]) for b in chunk], [[list(t) for t in b["candidates"]] for b in chunk]
            logp, mask = self._logprobs(prompts, cands)
            scores = (logp * mask).sum(1)  # [candidates of the chunk], prompt by prompt
            ref = None
            if cfg.beta != 0:
                t_ref = time.perf_counter()
                ref_logp, _ = self._logprobs(prompts, cands, reference=True)
                ref = (ref_logp * mask).sum(1)
                ref_s += time.perf_counter() - t_ref
            loss, at = 0.0, 0
            for b in chunk:
                k = len(b["candidates"])
                s, r = scores[at : at + k], None if ref is None else ref[at : at + k]
                at += k
                ranks = sample_rankings(s, cfg.group_size, min(cfg.rank_k, k), gen)
                rew = target_rew = ndcg_reward(ranks, int(b["target"]))
                if w:  # grpo.rank_teacher: part of the reward for following the prompt's sequence-model ranks
                    if b.get("teacher") is None:
                        raise ValueError("grpo.rank_teacher is set but a rank_step row has no 'teacher' ranks")
                    rew = (1 - w) * target_rew + w * teacher_ndcg_reward(ranks, torch.as_tensor(b["teacher"]))
                adv = group_advantages(rew[None], std_normalize=cfg.std_normalize)[0]
                lp = plackett_luce_logprob(s, ranks)
                term, st = listwise_loss(lp, None if r is None else plackett_luce_logprob(r, ranks), adv, cfg.beta)
                loss = loss + term / len(batch)
                rewards.append(rew)
                targets.append(target_rew)
                top = s.detach().topk(min(cfg.rank_k, k)).indices[None]
                greedy.append(float(ndcg_reward(top, int(b["target"]))[0]))
                if w:
                    greedy_teacher.append(float(teacher_ndcg_reward(top, torch.as_tensor(b["teacher"]))[0]))
                zero_var += int(rew.max() == rew.min())
                for key in agg:
                    if st[key] is not None:  # kl None: beta 0, no reference forward
                        agg[key] += st[key] / len(batch)
            tokens += sum(len(p) for p in prompts) + int(mask.sum())
            self.ds_engine.backward(loss, scale_wrt_gas=False)  # 1/len(batch) per prompt: the batch mean
        self.ds_engine.step()
        grad_norm = self.ds_engine.get_global_grad_norm()
        flat, target_flat = torch.cat(rewards), torch.cat(targets)
        return {**agg, "reward_mean": float(flat.mean()), "reward_std": float(flat.std(unbiased=False)),
                "target_ndcg": float(target_flat.mean()),  # the target's part alone (= reward_mean without a teacher)
                "hit_rate": float((target_flat == 1.0).float().mean()),  # sampled rankings with the target first
                "greedy_ndcg": sum(greedy) / len(greedy),  # NDCG@rank_k of the score ranking, before the update
                # the same ranking against the sequence-model ranks (grpo.rank_teacher): how far it follows them
                "greedy_teacher_ndcg": sum(greedy_teacher) / len(greedy_teacher) if greedy_teacher else None,
                "zero_var_groups": zero_var / len(batch), "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": tokens, "sequences": len(batch), "learner_s": time.perf_counter() - t0, "ref_s": ref_s}

    def logprobs(self, batch: list[dict]) -> dict:
        """Per-response token log-probs under the policy and the reference (adapter disabled), in batch order."""
        out = {"logp": [None] * len(batch), "ref_logp": [None] * len(batch)}
        for idx, prompts, resp, _ in self._micro_batches(batch):
            with torch.no_grad():
                logp, mask = self._logprobs(prompts, resp)
            ref, _ = self._logprobs(prompts, resp, reference=True)
            for j, i in enumerate(idx):
                sel = mask[j].bool()
                out["logp"][i] = logp[j][sel].tolist()
                out["ref_logp"][i] = ref[j][sel].tolist()
        return out

    def export_weights(self, full: bool = False) -> list[bytes]:
        """Merged weights as safetensors buckets: the LoRA targets (whole fused groups), or (full) the whole model."""
        with self._gathered():
            state = merged_lora_state(self.ds_engine.module, full=full)
            return to_buckets(state.items(), self.cfg.sync_bucket_mb << 20)

    def export_adapter(self) -> dict:
        """The LoRA adapter alone, for a vLLM engine holding the same base: `{"buckets": safetensors
        buckets of the A/B tensors (PEFT names, training dtype), "config": adapter_config.json}`."""
        with self._gathered():
            state = adapter_state(self.ds_engine.module)
            return {"buckets": to_buckets(state.items(), self.cfg.sync_bucket_mb << 20),
                    "config": adapter_config(self.ds_engine.module)}

    def model_bytes(self) -> int:
        """Bytes of the frozen base weights in the learner's dtype (what a full merged sync would ship)."""
        with self._gathered():
            return base_model_bytes(self.ds_engine.module)

    def save_checkpoint(self, ckpt_dir: str, client_state: dict) -> str:
        """DeepSpeed checkpoint (adapter, optimizer, step) + the controller's `client_state`.

        `latest` is rewritten atomically only after the tag dir is complete, so a crash
        mid-save leaves `latest` on the previous good checkpoint. Returns the tag.
        """
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        latest = ckpt / "latest"
        current = latest.read_text().strip() if latest.exists() else None
        tag = f"step{int(self.ds_engine.global_steps)}"
        if tag == current:  # never overwrite what `latest` points to
            tag = f"{tag}-{time.time_ns()}"
        shutil.rmtree(ckpt / tag, ignore_errors=True)  # a half-written leftover of a crash
        self.ds_engine.save_checkpoint(str(ckpt), tag=tag, client_state={"mllmrec": client_state},
                                    save_latest=False, exclude_frozen_parameters=True)
        atomic_write_text(latest, tag)
        return tag

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Restore adapter, optimizer and step from `ckpt_dir/latest`; returns the client_state."""
        if not (Path(ckpt_dir) / "latest").exists():
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
        # Not strict: the frozen base is not in the checkpoint, it comes from model_path.
        path, client = self.ds_engine.load_checkpoint(ckpt_dir, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
        return client.get("mllmrec", {})

    def save_merged(self, out_dir: str, dtype: str = "float32") -> str:
        """The current policy as a plain HF model dir (plus `adapter/`), merged in fp32, saved in
        `dtype` (config model.save_dtype), written atomically. The merge adds the update to the base
        model's saved tensors (model_path), not to the learner's bf16 copy of them."""
        with self._gathered():
            return str(save_merged(self.ds_engine.module, self.tokenizer, out_dir, dtype=dtype, base_dir=self.model_path,
                                   info={"base_model": self.model_path, "step": int(self.ds_engine.global_steps),
                                         "dtype": dtype}))

    def ping(self) -> dict:
        return {"pid": os.getpid(), "optimizer_steps": int(self.ds_engine.global_steps), "device": str(self.ds_engine.device)}


LearnerActor = ray.remote(Learner)
