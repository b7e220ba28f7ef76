"""`mllmrec sft`: LoRA supervised fine-tuning on Ray Train (TorchTrainer workers, each a DeepSpeed engine).

Usage: mllmrec sft --data DIR --model NAME_OR_PATH --out DIR [--config YAML] [--epochs N]
                   [--max-steps N] [--max-samples N] [--lr LR] [--workers N] [--grad-accum N]
                   [--stage1 DIR | --captions PATH --cot PATH --mda PATH] [--force]

Writes to --out a merged HF model (loadable by path, e.g. by vLLM) with `adapter/` inside;
a marker file written last makes a finished --out skip on the next run (unless --force).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data dir (samples.parquet, items.parquet)")
    parser.add_argument("--model", help="base model: local dir, cache alias or hub name (default: config model.name)")
    parser.add_argument("--out", help="output dir of the merged SFT model (e.g. runs/NAME/models/sft); required "
                        "unless --write-prompts")
    parser.add_argument("--config", help="pipeline YAML; its sft/model/prompt sections are used (flags override)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (quick runs)")
    parser.add_argument("--max-samples", type=int, help="use at most this many train samples")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--workers", type=int, help="Ray Train workers (data parallel)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--stage1", help="Stage I dir: captions/cot/mda.parquet default to the files in it")
    parser.add_argument("--captions", help="captions.parquet (item_id, caption), used when prompt.with_captions")
    parser.add_argument("--cot", help="cot.parquet (sample_id, refined_cot); needs --mda")
    parser.add_argument("--mda", help="mda.parquet (sample_id, selected_sft); only selected samples get reasoning")
    parser.add_argument("--force", action="store_true", help="retrain even if --out holds a finished model")
    parser.add_argument("--write-prompts", metavar="PATH",
                        help="write the training examples (sample_id, prompt, answer, has_reasoning, token counts) "
                             "to this Parquet file and stop before training")


def train_loop(config: dict) -> None:
    """One Ray Train worker: LoRA model + DeepSpeed engine over this rank's share of the examples."""
    import ray
    import ray.train
    import torch

    from mllmrec_ray.config import LoraConfig, SFTConfig, from_dict
    from mllmrec_ray.policy import build_policy, deepspeed_engine, load_tokenizer, save_merged
    from mllmrec_ray.sft_data import collate, completion_loss

    # Ray Train tees a patched print() into its logger too (every line twice) and logs each
    # report at INFO: print to the raw stdout (forwarded once) and keep only Train's warnings.
    say = functools.partial(print, file=sys.__stdout__, flush=True)
    try:  # that logger is named after its file (Ray 2.60 internals): quiet it where it exists
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sft = from_dict(SFTConfig, config["sft"])
    examples = ray.get(config["examples"])
    torch.manual_seed(sft.seed)
    tokenizer = load_tokenizer(config["model_path"])
    model = build_policy(config["model_path"], from_dict(LoraConfig, config["lora"]),
                         dtype=torch.bfloat16 if sft.bf16 else torch.float32)
    engine = deepspeed_engine(model, zero_stage=sft.zero_stage, bf16=sft.bf16, lr=sft.lr,
                              micro_batch_size=sft.micro_batch_size, grad_accum=sft.grad_accum)
    engine.train()

    # Every rank runs the same number of micro-batches (gradients are all-reduced in lockstep).
    per_rank = len(examples) // world
    micro_per_epoch = -(-per_rank // sft.micro_batch_size)
    steps_per_epoch = max(micro_per_epoch // sft.grad_accum, 1)
    total = sft.epochs * steps_per_epoch
    if config["max_steps"]:
        total = min(total, config["max_steps"])
    epochs = -(-total * sft.grad_accum // micro_per_epoch)  # enough passes to reach `total` steps
    if rank == 0:
        say(f"[sft] {len(examples)} examples, {world} worker(s), {per_rank} per worker, "
            f"micro-batch {sft.micro_batch_size} x accum {sft.grad_accum}: {total} optimizer steps")

    step, window, first_loss, t0 = 0, [], None, time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(sft.seed + epoch)).tolist()
        mine = order[: per_rank * world][rank::world]
        for i in range(0, len(mine), sft.micro_batch_size):
            batch = collate([examples[j] for j in mine[i : i + sft.micro_batch_size]], tokenizer.pad_token_id)
            loss = completion_loss(engine, {k: v.to(engine.device) for k, v in batch.items()})
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window.append(float(loss.detach()))
            if not boundary:
                continue
            step += 1
            step_loss = sum(window) / len(window)
            window = []
            first_loss = step_loss if first_loss is None else first_loss
            metrics = {"step": step, "epoch": epoch + 1, "loss": step_loss, "first_loss": first_loss,
                       "seconds": time.perf_counter() - t0}
            if rank == 0:
                say(f"[sft] step {step}/{total} epoch {epoch + 1} loss {step_loss:.4f} "
                    f"({metrics['seconds'] / step:.1f} s/step)")
            ray.train.report(metrics)
            if step >= total:
                break
        if step >= total:
            break

    import deepspeed

    # ZeRO-3 keeps parameters partitioned: every rank joins the gather, rank 0 writes.
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=sft.zero_stage == 3):
        if rank == 0:
            save_merged(engine.module, tokenizer, config["out"],
                        info={"base_model": config["model_path"], "steps": step, "first_loss": first_loss,
                              "last_loss": metrics["loss"] if step else None, "examples": len(examples),
                              "sft": config["sft"], "lora": config["lora"]}, dtype=config["save_dtype"])
            say(f"[sft] merged model and adapter written to {config['out']}")


def main(args: argparse.Namespace) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mllmrec_ray.config import PipelineConfig, load_config
    from mllmrec_ray.models import resolve_model
    from mllmrec_ray.policy import MERGED_MARKER, is_complete, load_tokenizer
    from mllmrec_ray.run_data import load_collab, load_items, load_reasoning, load_samples, pick_samples
    from mllmrec_ray.sft_data import sft_texts, tokenize_example

    cfg = load_config(args.config) if args.config else PipelineConfig()
    overrides = {"epochs": args.epochs, "max_samples": args.max_samples, "lr": args.lr,
                 "num_workers": args.workers, "grad_accum": args.grad_accum}
    sft = dataclasses.replace(cfg.sft, **{k: v for k, v in overrides.items() if v is not None})
    if not args.out and not args.write_prompts:
        raise SystemExit("mllmrec sft needs --out DIR (or --write-prompts PATH to only build the training examples)")
    out = Path(args.out).resolve() if args.out else None
    if out is not None and not args.write_prompts and is_complete(out) and not args.force:
        print(f"[sft] {out} already holds a finished SFT model; skipping (use --force to retrain)")
        return 0

    stage1 = Path(args.stage1) if args.stage1 else None
    captions = args.captions or (stage1 / "captions.parquet" if stage1 else None)
    cot = args.cot or (stage1 / "cot.parquet" if stage1 else None)
    mda = args.mda or (stage1 / "mda.parquet" if stage1 else None)
    if bool(args.cot) != bool(args.mda):
        raise SystemExit("--cot and --mda go together (MDA decides which samples carry their CoT)")
    for path in (args.captions, args.cot, args.mda):
        if path and not Path(path).exists():
            raise SystemExit(f"file not found: {path}")

    model_path = resolve_model(args.model or cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    items = load_items(args.data, captions if cfg.prompt.with_captions else None)
    samples = load_samples(args.data, "train")
    reasoning = load_reasoning(cot, mda, "selected_sft", cfg.stage1.cot_source)
    if sft.max_samples is not None and sft.max_samples < len(samples):
        samples = pick_samples(samples, set(reasoning), sft.max_samples, sft.seed)
    texts = sft_texts(samples, items, tokenizer, reasoning, with_captions=cfg.prompt.with_captions,
                      think_first=cfg.prompt.think_first, n_candidates=cfg.prompt.n_candidates,
                      collab=load_collab(args.data, cfg.prompt))
    examples, tokenized, dropped, truncated = [], [], 0, 0
    for t in texts:
        ex = tokenize_example(tokenizer, t["prompt"], t["answer"], sft.max_len, sft.completion_only)
        tokenized.append(ex)
        if ex is None:
            dropped += 1
            continue
        truncated += ex.pop("truncated")
        examples.append(ex)
    if len(examples) < sft.num_workers:
        raise SystemExit(f"{len(examples)} usable examples for {sft.num_workers} workers")
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(f"[sft] model {model_path}; {len(examples)} examples ({sum(t['has_reasoning'] for t in texts)} with "
          f"reasoning, {truncated} prompt-truncated, {dropped} dropped: answer longer than max_len "
          f"{sft.max_len}); tokens median {lengths[len(lengths) // 2]} max {lengths[-1]}", flush=True)
    if args.write_prompts:  # what the model would be trained on, for inspection and audits
        import pyarrow as pa

        from mllmrec_ray.io import atomic_write_parquet

        table = pa.Table.from_pylist([{
            "sample_id": t["sample_id"], "prompt": t["prompt"], "answer": t["answer"],
            "has_reasoning": t["has_reasoning"], "kept": ex is not None,
            "tokens": len(ex["input_ids"]) if ex is not None else None} for t, ex in zip(texts, tokenized)])
        atomic_write_parquet(table, args.write_prompts)
        print(f"[sft] wrote {len(texts)} training examples to {args.write_prompts}; not training", flush=True)
        return 0

    from jobs.common import init_ray

    init_ray(cfg.ray_num_cpus)  # the pipeline's head, a Ray Job's cluster, or a private loopback one
    use_gpu = sft.resources.num_gpus > 0
    resources = {"CPU": sft.resources.num_cpus, **({"GPU": sft.resources.num_gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"examples": ray.put(examples), "model_path": model_path, "out": str(out),
                           "sft": dataclasses.asdict(sft), "lora": dataclasses.asdict(cfg.model.lora),
                           "save_dtype": cfg.model.save_dtype,
                           "max_steps": args.max_steps},
        scaling_config=ScalingConfig(num_workers=sft.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"sft-{out.parent.name}-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    t0 = time.perf_counter()
    trainer.fit()
    if not is_complete(out):
        raise SystemExit(f"[sft] training ended but {out} is not complete")
    # Ray Train V2 keeps no metrics reported without a checkpoint: the marker has the summary.
    info = json.loads((out / MERGED_MARKER).read_text())
    print(f"[sft] done in {time.perf_counter() - t0:.0f} s: {info['steps']} steps, loss "
          f"{info['first_loss']:.4f} -> {info['last_loss']:.4f}; model at {out}", flush=True)
    return 0
