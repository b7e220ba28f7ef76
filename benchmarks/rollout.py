"""Rollout throughput: RolloutActor pools (1 and 2 actors) vs the raw vLLM engine on the same prompts,
and learner -> rollout weight sync per transport: adapter only (`lora`) vs merged weights.

Usage: python benchmarks/rollout.py [--model smollm2-135m] [--data RUN/data] [--prompts 16]
           [--group-size 8] [--max-new-tokens 32] [--actors 1,2] [--repeats 3]
           [--sync lora,object_store,gloo] [--sync-actors 2] [--lora-r 16] [--lora-targets q_proj,k_proj,v_proj,o_proj]
Without --data the prompts are synthetic recommendation prompts of the same shape
(9 watched + 10 candidates). Tokens/s counts generated tokens over wall time.

Sync: the real learner actor (DeepSpeed, bf16) takes one GRPO step, then sends what the pipeline
sends: the adapter (`lora`, to engines built with vLLM's LoRA) or the merged LoRA targets (merged
transports, full=False, to plain engines). Per transport: seconds and bytes of a sync (after a
first, warm-up sync), its share of the model's bytes, and the engines' tokens/s after it (the
LoRA engines then generate through the adapter: the price of adapter-only sync on the rollout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def make_prompts(tokenizer, data: str | None, n: int) -> list[dict]:
    from mllmrec_ray.prompting.prompts import build_messages, render_prompt, sample_messages

    if data:
        from mllmrec_ray.data.run_data import load_items, load_samples

        items = load_items(data)
        rows = load_samples(data, "train")[:n]
        return [{"sample_id": r["sample_id"], "prompt": render_prompt(tokenizer, sample_messages(r, items)),
                 "target": r["target"], "candidates": list(r["candidates"])} for r in rows]
    prompts = []
    for i in range(n):
        history = [{"item_id": str(100 + 20 * i + j), "title": f"Synthetic Movie {j} of User {i} (199{j})"}
                   for j in range(9)]
        cands = [{"item_id": str(5000 + 10 * i + j), "title": f"Candidate Film Number {j} ({1980 + j})"}
                 for j in range(10)]
        prompts.append({"sample_id": f"u{i}", "prompt": render_prompt(tokenizer, build_messages(history, cands)),
                        "target": cands[0]["item_id"], "candidates": [c["item_id"] for c in cands]})
    return prompts


def measure_sync(args, model: str, engine_cfg, grpo, prompts: list[dict], ids: list[list[int]]) -> dict:
    """Sync seconds / bytes per transport from the real learner after one GRPO step, and the
    rollout tokens/s of the synced engines."""
    import ray

    from actors.learner import LearnerActor
    from actors.rollout import RolloutActor
    from actors.weight_sync import sync_weights
    from mllmrec_ray.config import GRPOConfig, LoraConfig

    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target_modules=args.lora_targets.split(","))
    learner = LearnerActor.options(num_cpus=1).remote(model, GRPOConfig(lr=1e-4, micro_batch_size=8), lora)
    # one step on a real group so B != 0: a merged sync then carries a real update
    batch = [{"prompt_ids": ids[0][:-32], "response_ids": ids[0][-32:-16], "advantage": 1.0},
             {"prompt_ids": ids[0][:-32], "response_ids": ids[0][-16:], "advantage": -1.0}]
    ray.get(learner.train_step.remote(batch))
    model_bytes = ray.get(learner.model_bytes.remote())
    cpus = max(1.0, float((os.cpu_count() or 1) // args.sync_actors))
    out: dict = {"model_bytes": model_bytes, "lora_config": {"r": lora.r, "targets": lora.target_modules},
                 "actors": args.sync_actors}
    for version, transport in enumerate(args.sync.split(","), start=1):
        actors = [RolloutActor.options(num_cpus=cpus).remote(model, engine_cfg, grpo, lora=lora if transport == "lora"
                                                             else None, require_lora=transport == "lora")
                  for _ in range(args.sync_actors)]
        sync_weights(learner, actors, transport, 10 * version, full=False)  # first sync builds any group
        info = sync_weights(learner, actors, transport, 10 * version + 1, full=False)
        shards = [prompts[i::len(actors)] for i in range(len(actors))]
        ray.get([a.generate_groups.remote(s[:1]) for a, s in zip(actors, shards) if s])  # warm-up
        t0 = time.perf_counter()
        ray.get([a.generate_groups.remote(s) for a, s in zip(actors, shards) if s])
        seconds = time.perf_counter() - t0
        tokens = sum(ray.get(a.stats.remote())["last"]["completion_tokens"] for a in actors)
        out[transport] = {"seconds": info["seconds"], "load_s": info["load_s"], "bytes": info["bytes"],
                          "frac_of_model": info["bytes"] / model_bytes, "rollout_tok_s": tokens / seconds}
        print(f"sync {transport} to {len(actors)} actors: {info['seconds']:.3f} s for {info['bytes'] / 2**20:.2f} MiB "
              f"({100 * info['bytes'] / model_bytes:.2f}% of the model; engine load {info['load_s']:.3f} s); "
              f"rollout after it {tokens / seconds:.0f} tok/s", flush=True)
        for a in actors:
            ray.kill(a)
    ray.kill(learner)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", help="prepared data dir (real prompts from its train split)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--actors", default="1,2", help="pool sizes to measure")
    parser.add_argument("--actor-cpus", type=float,
                        help="CPUs per actor (sets its torch threads); default: this machine's cores / pool size")
    parser.add_argument("--sync", default="lora,object_store,gloo", help="transports to time ('' to skip)")
    parser.add_argument("--sync-actors", type=int, default=2, help="rollout actors a sync goes to")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="the quickstart's targets")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU/GPU computes it natively, else fp32")
    parser.add_argument("--repeats", type=int, default=3, help="alternating raw / pool measurements")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import ray

    from actors.rollout import RolloutActor
    from mllmrec_ray.config import EngineConfig, GRPOConfig
    from mllmrec_ray.runtime.engine import Engine
    from mllmrec_ray.runtime.models import resolve_model

    model = resolve_model(args.model)
    engine_cfg = EngineConfig(dtype=args.dtype, kv_cache_gib=1.0)
    grpo = GRPOConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    results: dict = {"model": args.model, "prompts": args.prompts, "group_size": args.group_size,
                     "max_new_tokens": args.max_new_tokens, "data": args.data or "synthetic"}

    # Raw engine in this process: the ceiling the actors are measured against. Raw and pool runs
    # alternate (--repeats) so a drifting background load hits both alike; ratios are medians.
    engine = Engine(model, engine_cfg)
    prompts = make_prompts(engine.tokenizer, args.data, args.prompts)
    ids = [engine.encode(p["prompt"]) for p in prompts]
    results["prompt_tokens_mean"] = sum(map(len, ids)) / len(ids)
    engine.generate(ids[:2], 2, grpo.temperature, grpo.top_p, 8)  # warm-up

    def raw_tok_s() -> float:
        t0 = time.perf_counter()
        groups = engine.generate(ids, grpo.group_size, grpo.temperature, grpo.top_p, grpo.max_new_tokens)
        return sum(c.completion_tokens for g in groups for c in g) / (time.perf_counter() - t0)

    ray.init(num_cpus=4, include_dashboard=False)
    sizes = [int(x) for x in args.actors.split(",") if x]
    for n in sizes:
        # The raw engine uses every core; a fair pool splits the same cores over its actors.
        cpus = args.actor_cpus or max(1.0, float((os.cpu_count() or 1) // n))
        actors = [RolloutActor.options(num_cpus=cpus).remote(model, engine_cfg, grpo) for _ in range(n)]
        ray.get([a.generate_groups.remote(prompts[:1]) for a in actors])  # start + warm-up
        shards = [prompts[i::n] for i in range(n)]
        raw, pool = [], []
        for _ in range(args.repeats):
            raw.append(raw_tok_s())
            t0 = time.perf_counter()
            out = ray.get([a.generate_groups.remote(s) for a, s in zip(actors, shards) if s])
            seconds = time.perf_counter() - t0
            assert sum(len(g) for g in out) == len(prompts)
            pool.append(sum(ray.get(a.stats.remote())["last"]["completion_tokens"] for a in actors) / seconds)
        results[f"pool{n}"] = {"raw_tok_s": raw, "pool_tok_s": pool, "actor_cpus": cpus,
                               "actor_threads": ray.get(actors[0].stats.remote())["torch_threads"],
                               "ratio_median": statistics.median(p / r for p, r in zip(pool, raw))}
        print(f"pool of {n}: {[round(x, 1) for x in pool]} tok/s vs raw {[round(x, 1) for x in raw]} tok/s "
              f"-> median ratio {results[f'pool{n}']['ratio_median']:.2f}", flush=True)
        for a in actors:
            ray.kill(a)
    if args.sync:
        results["sync"] = measure_sync(args, model, engine_cfg, grpo, prompts, ids)
    ray.shutdown()
    results["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
