"""`mllmrec grpo`: the GRPO controller (one driver, N vLLM rollout actors, one DeepSpeed learner).

Per step: shard prompts over rollout actors (the G samples of a prompt stay on one
actor), collect the sampled groups, score them here with the named reward terms
(`grpo.reward`), compute group-relative advantages (optionally dropping zero-variance
groups: `grpo.dynamic_sampling`), let the learner update, then push the new weights to
every rollout actor before the next rollout. Checkpoints carry the adapter, optimizer,
step, data cursor and RNG, so `--resume` continues where a run stopped; a dead rollout
actor is replaced, re-synced and its prompts re-issued. With `grpo.action: rank` no rollout actor
runs: the learner scores each prompt's candidates, samples rankings and rewards their NDCG itself
(`Learner.rank_step`, mllmrec_ray.rl.listwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from mllmrec_ray.config import PipelineConfig
from mllmrec_ray.rl.prompt_pool import build_prompts, next_batch, shard

# Test hook: kill rollout actor 0 right after it was handed its prompts at this step,
# so actor-failure recovery is exercised by a real process death mid-request.
FAULT_ENV = "MLLMREC_FAULT_KILL_ROLLOUT_AT_STEP"


def rotate_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` `step_*` checkpoints (never the one `latest` names); returns
    the names deleted. Runs after `latest` moved on, so a crash mid-delete leaves a usable one."""
    import shutil

    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    steps = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
    gone = [name for name in steps[: max(len(steps) - keep, 0)] if name != latest]
    for name in gone:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    return gone


class Controller:
    def __init__(self, cfg: PipelineConfig, data_dir: Path, stage1_dir: Path, model_path: str, out_dir: Path,
                 model_out: Path):
        import ray
        from transformers import AutoTokenizer

        from actors.learner import LearnerActor
        from actors.rollout import RolloutActor

        self.ray = ray
        self.cfg, self.g = cfg, cfg.grpo
        self.model_path, self.out_dir, self.model_out = model_path, out_dir, model_out
        self.ckpt_dir = out_dir / "checkpoints"
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer = tokenizer  # think-length metrics
        self.prompts = build_prompts(cfg, data_dir, stage1_dir, tokenizer)
        self.RolloutActor = RolloutActor
        g = self.g
        self.learner = LearnerActor.options(num_cpus=g.learner_resources.num_cpus,
                                            num_gpus=g.learner_resources.num_gpus).remote(model_path, g, cfg.model.lora)
        self.version = 0
        self.restarts = 0
        self.model_bytes = ray.get(self.learner.model_bytes.remote())  # sync_frac's denominator
        if g.action == "rank":  # the learner samples rankings from its own scores: no engine, no sync
            from mllmrec_ray.ranking.scoring import readout_tokens

            self.actors, self.transport = [], "none"
            for p in self.prompts:  # the evaluation's id readout: `[ITEM_` after the prompt, then `<id>]`
                cands = [str(c) for c in p["candidates"]]
                extra, p["readout"] = readout_tokens(tokenizer, cands, [None] * len(cands), "id")
                p["readout_prompt"] = p["prompt_ids"] + extra
            reward = (f"{1 - g.rank_teacher:g} x NDCG@{g.rank_k} + {g.rank_teacher:g} x NDCG@{g.rank_k} against the "
                      f"prompt's sequence-model ranks" if g.rank_teacher else f"NDCG@{g.rank_k}")
            print(f"[grpo] action: rank (Plackett-Luce over the id readout, reward {reward})", flush=True)
            return
        self.actors = [self._new_actor(i) for i in range(g.rollout_actors)]
        from actors.weight_sync import resolve_transport

        # `auto` ships the adapter alone when every engine took LoRA, merged weights otherwise
        lora = all(ray.get([a.supports_lora.remote() for a in self.actors]))
        self.transport = resolve_transport(g.weight_transport, g.rollout_resources.num_gpus > 0, lora)
        print(f"[grpo] weight sync: {self.transport}", flush=True)

    def _new_actor(self, index: int):
        g = self.g
        engine = replace(self.cfg.model.engine, seed=g.seed + 1000 * index)
        lora = self.cfg.model.lora if g.weight_transport in ("auto", "lora") else None
        return self.RolloutActor.options(num_cpus=g.rollout_resources.num_cpus,
                                         num_gpus=g.rollout_resources.num_gpus).remote(
            self.model_path, engine, g, think_first=self.cfg.prompt.think_first, lora=lora,
            require_lora=g.weight_transport == "lora")

    def sync(self, actors=None) -> dict:
        """Push the learner's weights; returns sync_weights' info (`seconds`, `bytes` of one copy, ...)."""
        from actors.weight_sync import sync_weights

        # `lora`: the adapter alone; merged transports: only the LoRA targets, never the frozen rest
        return sync_weights(self.learner, actors or self.actors, self.transport, self.version, full=False,
                            use_gpu=self.g.rollout_resources.num_gpus > 0)

    def score_groups(self, groups: list[dict]) -> dict:
        """Score every response on the controller with the named reward terms (mllmrec_ray.rl.reward).

        Adds `reward` (weighted total), `terms`, `well_formed`, `hit` to each response dict and
        returns per-step reward metrics: `reward/<term>` (unweighted term means), think rate/length.
        """
        from mllmrec_ray.rl.reward import reward_terms, think_text, weighted_reward

        rcfg, think_first = self.g.reward, self.cfg.prompt.think_first
        weights = rcfg.weights()
        by_id = {p["sample_id"]: p for p in self.prompts}
        sums: dict[str, float] = {}
        thinks: list[int] = []
        n = 0
        for grp in groups:
            p = by_id[grp["sample_id"]]
            for r in grp["responses"]:
                terms, parsed = reward_terms(r["text"], p["target"], p["candidates"], think_first=think_first,
                                             require_think=rcfg.require_think)
                r.update(reward=weighted_reward(terms, weights), terms=terms, well_formed=parsed.well_formed,
                         hit=parsed.well_formed and parsed.item_id == str(p["target"]))
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                t = think_text(r["text"])
                if t is not None:
                    thinks.append(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]))
                n += 1
        out = {f"reward/{k}": v / max(n, 1) for k, v in sums.items()}
        out["think_rate"] = len(thinks) / max(n, 1)
        out["think_len"] = sum(thinks) / len(thinks) if thinks else 0.0  # tokens inside <think>, thinking responses
        return out

    def rollout(self, indices: list[int], step: int, round_: int = 0) -> tuple[list[dict], float]:
        """Generate groups on every actor; replace any actor that dies and re-issue its shard."""
        from ray.exceptions import RayActorError

        shards = shard(indices, len(self.actors))
        payload = lambda ids: [{k: self.prompts[i][k] for k in ("sample_id", "prompt_ids", "target", "candidates")}
                               for i in ids]  # noqa: E731
        # per-(step, shard) sampling seed: a resumed run draws the same responses
        seed = lambda a: self.g.seed * 1_000_003 + step * 7919 + round_ * 257 + a  # noqa: E731
        t0 = time.perf_counter()
        pending = {}
        for a, ids in enumerate(shards):
            if ids:
                pending[self.actors[a].generate_groups.remote(payload(ids), seed=seed(a))] = a
        if os.environ.get(FAULT_ENV) == str(step) and pending:
            self.ray.kill(self.actors[0], no_restart=True)
        groups = []
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            a = pending.pop(ready[0])
            try:
                result = self.ray.get(ready[0])
            except RayActorError:
                self.restarts += 1
                if self.restarts > self.g.max_actor_restarts:
                    raise
                print(f"[grpo] rollout actor {a} died at step {step}; replacing it "
                      f"(restart {self.restarts}/{self.g.max_actor_restarts}) and re-issuing {len(shards[a])} prompts",
                      flush=True)
                self.actors[a] = self._new_actor(a)
                if self.version > 0:
                    self.sync([self.actors[a]])
                pending[self.actors[a].generate_groups.remote(payload(shards[a]), seed=seed(a))] = a
                continue
            groups.extend(result)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r["token_ids"]) for grp in groups for r in grp["responses"])
        order = {sid: k for k, sid in enumerate(self.prompts[i]["sample_id"] for i in indices)}
        groups.sort(key=lambda grp: order[grp["sample_id"]])
        return groups, tokens / max(seconds, 1e-9)

    def save_checkpoint(self, step: int, cursor: int) -> None:
        from mllmrec_ray.io import atomic_write_text

        path = self.ckpt_dir / f"step_{step:06d}"
        client_state = {"step": step, "cursor": cursor, "version": self.version,
                        "python_rng": list(random.getstate()[1]), "config": asdict(self.g)}
        self.ray.get(self.learner.save_checkpoint.remote(str(path), client_state))
        # `latest` is rewritten only after the checkpoint is complete
        atomic_write_text(self.ckpt_dir / "latest", path.name + "\n")
        rotate_checkpoints(self.ckpt_dir, self.g.keep_checkpoints)

    def load_latest(self) -> dict | None:
        latest = self.ckpt_dir / "latest"
        if not latest.exists():
            return None
        path = self.ckpt_dir / latest.read_text().strip()
        state = self.ray.get(self.learner.load_checkpoint.remote(str(path)))
        self.version = state["version"]
        return state

    def collect(self, step: int, cursor: int) -> tuple:
        """One step's rollouts, scored: (groups, rewards [B, G], advantages, zero_var [B], kept group
        indices, reward stats, rollout tok/s, new cursor, rollout rounds).

        `dynamic_sampling: refill` rolls out more prompts (the deficit, at least one per actor) for up
        to `refill_rounds` more rounds until `prompts_per_step` groups with reward variance are kept;
        the rest of the last round is dropped. Stats cover every group generated, so `hit_rate` and
        `zero_var_groups` still describe the policy, not the filtered batch.
        """
        import torch

        from mllmrec_ray.rl.grpo import group_advantages, kept_groups, zero_variance_groups

        g = self.g
        groups, keep, speeds, need, rounds = [], [], [], g.prompts_per_step, 0
        while True:
            indices, cursor = next_batch(len(self.prompts), g.seed, cursor, need)
            new, tok_s = self.rollout(indices, step, round_=rounds)
            self.score_groups(new)  # sets each response's reward; the step's stats are taken below
            rounds += 1
            speeds.append(tok_s)
            rewards = torch.tensor([[r["reward"] for r in grp["responses"]] for grp in new], dtype=torch.float32)
            keep += [len(groups) + i for i in kept_groups(zero_variance_groups(rewards), g.dynamic_sampling)]
            groups += new
            missing = g.prompts_per_step - len(keep)
            if g.dynamic_sampling != "refill" or missing <= 0 or rounds > (3 if g.refill_rounds is None else g.refill_rounds):
                break
            need = max(missing, len(self.actors))
        keep = keep[: g.prompts_per_step]
        reward_stats = self.score_groups(groups)  # idempotent: stats over every round
        rewards = torch.tensor([[r["reward"] for r in grp["responses"]] for grp in groups], dtype=torch.float32)
        adv = group_advantages(rewards, std_normalize=g.std_normalize)
        return (groups, rewards, adv, zero_variance_groups(rewards), keep, reward_stats,
                sum(speeds) / len(speeds), cursor, rounds)

    def generate_step(self, step: int, cursor: int) -> tuple[dict, int]:
        """One step of the paper's GRPO: roll out, score, update, sync; (metrics row, new cursor)."""
        from mllmrec_ray.rl.grpo import logprob_gap

        groups, rewards, adv, zero_var, keep, reward_stats, tok_s, cursor, rounds = self.collect(step, cursor)
        rows = [(i, j) for i in keep for j in range(len(groups[i]["responses"]))]
        batch = [{"prompt_ids": groups[i]["prompt_ids"], "response_ids": groups[i]["responses"][j]["token_ids"],
                  "advantage": float(adv[i, j]), "sampler_logp": groups[i]["responses"][j].get("sampler_logp")}
                 for i, j in rows]
        gap = None
        if batch:
            stats = self.ray.get(self.learner.train_step.remote(batch))
            gap = logprob_gap(stats.pop("old_logp"), [b["sampler_logp"] for b in batch])
            self.version += 1
            sync = self.sync()
        else:  # every group skipped (dynamic_sampling: skip): no update, nothing to sync
            stats, sync = {}, {"seconds": 0.0, "bytes": 0, "transport": self.transport}
        responses = [r for grp in groups for r in grp["responses"]]
        sync_s = sync["seconds"]
        row = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "hit_rate": sum(r["hit"] for r in responses) / len(responses),
            "valid_rate": sum(r["well_formed"] for r in responses) / len(responses),
            **reward_stats,
            # groups whose rewards are all equal have zero advantage: they carry no gradient
            "zero_var_groups": float(zero_var.float().mean()),
            "skipped_groups": len(groups) - len(keep),
            "rollout_rounds": rounds,  # > 1 only with dynamic_sampling: refill
            # mean |log p_learner - log p_sampler| per token (old policy, before this update)
            "logprob_gap": gap, "tis_weight_mean": stats.get("tis_weight_mean"),
            "kl": stats.get("kl"), "loss": stats.get("loss"), "clip_frac": stats.get("clip_frac"),
            "response_len": sum(len(r["token_ids"]) for r in responses) / len(responses),
            "rollout_tok_s": tok_s, "sync_s": sync_s, "sync_bytes": sync["bytes"],
            # one sync's bytes over the base model's (learner dtype); adapter-only sync: ~1-4%
            "sync_frac": sync["bytes"] / max(self.model_bytes, 1), "sync_transport": sync["transport"],
            "learner_s": stats.get("seconds"), "ref_s": stats.get("ref_s"),
            "sample_ids": [grp["sample_id"] for grp in groups],
        }
        return row, cursor

    def rank_step(self, step: int, cursor: int) -> tuple[dict, int]:
        """One step of GRPO over rankings (`grpo.action: rank`): the learner scores each prompt's
        candidates, samples G top-k rankings, rewards their NDCG@k and updates; (metrics row, new cursor)."""
        g = self.g
        indices, cursor = next_batch(len(self.prompts), g.seed, cursor, g.prompts_per_step)
        batch = [{"prompt_ids": self.prompts[i]["readout_prompt"], "candidates": self.prompts[i]["readout"],
                  "target": [str(c) for c in self.prompts[i]["candidates"]].index(str(self.prompts[i]["target"])),
                  "teacher": self.prompts[i].get("seq_ranks")}
                 for i in indices]
        # per-step seed: a resumed run draws the same rankings
        stats = self.ray.get(self.learner.rank_step.remote(batch, seed=g.seed * 1_000_003 + step * 7919))
        self.version += 1
        return {**stats, "valid_rate": 1.0, "logprob_gap": None, "rollout_tok_s": None, "sync_s": 0.0,
                "sync_bytes": 0, "sync_frac": 0.0, "sync_transport": self.transport,
                "sample_ids": [self.prompts[i]["sample_id"] for i in indices]}, cursor

    def run(self, resume: bool = False) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        from mllmrec_ray.io import drop_steps_after

        g = self.g
        self.out_dir.mkdir(parents=True, exist_ok=True)
        step, cursor = 0, 0
        if resume:
            state = self.load_latest()
            if state is None:
                print(f"[grpo] --resume: no checkpoint in {self.ckpt_dir}; starting from step 0", flush=True)
            else:
                step, cursor = state["step"], state["cursor"]
                print(f"[grpo] resumed at step {step} (cursor {cursor}, weights v{self.version})", flush=True)
                if self.actors:
                    self.sync()
        writer = SummaryWriter(str(self.out_dir))
        metrics_path = self.out_dir / "metrics.jsonl"
        drop_steps_after(metrics_path, step)  # rows logged past the checkpoint are redone now
        first = None
        while step < g.steps:
            t0 = time.perf_counter()
            row, cursor = (self.rank_step if g.action == "rank" else self.generate_step)(step + 1, cursor)
            step += 1
            row = {"step": step, **row, "step_s": time.perf_counter() - t0, "weights_version": self.version,
                   "actor_restarts": self.restarts}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(f"grpo/{k}", v, step)
            writer.flush()
            first = first or row
            kl = "n/a" if row["kl"] is None else f"{row['kl']:.4f}"  # None: beta 0, KL not measured
            teacher = f" teacher {row['greedy_teacher_ndcg']:.3f}" if row.get("greedy_teacher_ndcg") is not None else ""
            tail = (f"greedy-ndcg {row['greedy_ndcg']:.3f}{teacher}" if g.action == "rank" else
                    f"valid {row['valid_rate']:.2f} gap {row['logprob_gap'] or 0:.4f} "
                    f"rollout {row['rollout_tok_s'] or 0:.0f} tok/s sync {row['sync_s']:.2f}s")
            print(f"[grpo] step {step}/{g.steps} reward {row['reward_mean']:.3f}±{row['reward_std']:.3f} "
                  f"hit {row['hit_rate']:.2f} zero-var {row['zero_var_groups']:.2f} kl {kl} "
                  f"loss {row['loss'] or 0:.4f} {tail} step {row['step_s']:.1f}s", flush=True)
            if g.checkpoint_every and (step % g.checkpoint_every == 0 or step == g.steps):
                self.save_checkpoint(step, cursor)
        writer.close()
        self.ray.get(self.learner.save_merged.remote(str(self.model_out), self.cfg.model.save_dtype))
        print(f"[grpo] merged policy written to {self.model_out}", flush=True)
        return {"steps": step, "first": first, "restarts": self.restarts}


def run_grpo(cfg: PipelineConfig, data_dir: Path, stage1_dir: Path, model_path: str, out_dir: Path,
             model_out: Path, resume: bool = False) -> dict:
    controller = Controller(cfg, data_dir, stage1_dir, model_path, out_dir, model_out)
    try:
        return controller.run(resume=resume)
    finally:
        for actor in [controller.learner, *controller.actors]:
            controller.ray.kill(actor)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --config / --set come from jobs.cli (the same for every stage)
    p.add_argument("--run-dir", type=Path, help="run directory (default runs/<config name>)")
    p.add_argument("--data", type=Path, help="prepared data dir (default RUN_DIR/data)")
    p.add_argument("--model", help="starting policy, normally the SFT model (default RUN_DIR/models/sft)")
    p.add_argument("--steps", type=int)
    p.add_argument("--rollout-actors", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--prompts-per-step", type=int)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/grpo/checkpoints/latest")


def main(args: argparse.Namespace) -> int:
    from jobs.common import CommandError, init_ray, stage_config
    from mllmrec_ray.runtime.models import resolve_model

    # --config, --set, then these flags, each validated like a YAML value
    cfg = stage_config(args, {flag: f"grpo.{flag}" for flag in ("steps", "rollout_actors", "group_size",
                                                                  "prompts_per_step")})
    # Absolute: the learner writes checkpoints from a worker whose cwd is the job's working_dir.
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    data_dir = Path(args.data).resolve() if args.data else run_dir / "data"
    model = args.model or str(run_dir / "models" / "sft")
    if not (data_dir / "samples.parquet").exists():
        raise CommandError(f"{data_dir}/samples.parquet not found; run `mllmrec data prepare --out {data_dir}` first")
    init_ray(cfg.ray_num_cpus)
    summary = run_grpo(cfg, data_dir, run_dir / "stage1", resolve_model(model), run_dir / "grpo",
                       run_dir / "models" / "grpo", resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "first"}))
    return 0
