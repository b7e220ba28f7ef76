"""`mllmrec sft`: LoRA supervised fine-tuning on Ray Train (TorchTrainer workers, each a DeepSpeed engine).

Usage: mllmrec sft --data DIR --model NAME_OR_PATH --out DIR [--config YAML] [--set KEY=VALUE] [--epochs N]
                   [--max-steps N] [--max-samples N] [--lr LR] [--workers N] [--grad-accum N]
                   [--stage1 DIR | --captions PATH --cot PATH --mda PATH] [--work-dir DIR] [--force]

Writes to --out a merged HF model (loadable by path, e.g. by vLLM) with `adapter/` inside;
a marker file written last makes a finished --out skip on the next run (unless --force).

The work dir (`<run>/sft` for `--out <run>/models/sft`, beside `<run>/grpo`) gets the TensorBoard
events (`sft/loss`, `sft/lr`, `sft/grad_norm`, `sft/step_s`), `metrics.jsonl`, and every
`sft.checkpoint_every` optimizer steps a checkpoint: the LoRA adapter, the optimizer state, the
step and the RNG, written to a temporary dir and renamed into `checkpoints/step_<N>`, `latest`
rewritten last. A rerun continues from it only when its fingerprint (`mllmrec_ray.fingerprint`:
the config keys SFT reads, the model, --max-steps and the tokenized training examples) equals
this run's; otherwise, or with --force, it starts over. The checkpoints go once the model is saved.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

# stage flags -> the config keys they set (validated like --set)
FLAGS = {"epochs": "sft.epochs", "max_samples": "sft.max_samples", "lr": "sft.lr", "workers": "sft.num_workers",
         "grad_accum": "sft.grad_accum"}
CHECKPOINTS, LATEST, META, DS_TAG = "checkpoints", "latest", "meta.json", "state"
# config keys that do not change what training computes: a checkpoint made under other values resumes
RESUME_IGNORES = ("sft.checkpoint_every", "sft.resources")
# Test hook: a worker raises right after this optimizer step (and its checkpoint), like a crash.
FAULT_ENV = "MLLMREC_FAULT_FAIL_SFT_AT_STEP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --config / --set come from jobs.cli (the same for every stage)
    parser.add_argument("--data", required=True, help="prepared data dir (samples.parquet, items.parquet)")
    parser.add_argument("--model", help="base model: local dir, cache alias or hub name (default: config model.name)")
    parser.add_argument("--out", help="output dir of the merged SFT model (e.g. runs/NAME/models/sft); required "
                        "unless --write-prompts")
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
    parser.add_argument("--work-dir", help="TensorBoard events, metrics.jsonl and mid-run checkpoints "
                        "(default <run>/sft for --out <run>/models/sft, else <out>.train)")
    parser.add_argument("--force", action="store_true",
                        help="retrain from scratch even if --out holds a finished model or a checkpoint exists")
    parser.add_argument("--write-prompts", metavar="PATH",
                        help="write the training examples (sample_id, prompt, answer, has_reasoning, token counts) "
                             "to this Parquet file and stop before training")


# ----------------------------------------------------------------------------- work dir and checkpoints


def default_work_dir(out: Path) -> Path:
    """`<run>/sft` for `<run>/models/sft` (TensorBoard beside `<run>/grpo`), else `<out>.train`."""
    out = Path(out)
    if out.parent.name == "models":
        return out.parent.parent / "sft"
    return out.with_name(out.name + ".train")


def examples_digest(examples: list[dict]) -> str:
    """Hash of the tokenized training examples: data, prompt, reasoning and tokenizer in one."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return h.hexdigest()[:16]


def resume_fingerprint(config: dict, model_path: str, max_steps: int | None, examples: list[dict]) -> str:
    """What a checkpoint must have been made with to be resumed: the config keys the `sft` stage
    reads (as the pipeline's fingerprints; execution-only keys left out), the model, --max-steps and
    the training examples."""
    from mllmrec_ray import fingerprint as fp

    keys = {k: v for k, v in fp.config_keys_read("sft", config).items()
            if not any(k == i or k.startswith(i + ".") for i in RESUME_IGNORES)}
    settings = {"config": keys, "model": model_path, "max_steps": max_steps}
    return fp.fingerprint(json.loads(json.dumps(settings, default=str)), {"examples": examples_digest(examples)})


def latest_checkpoint(work_dir: Path) -> dict | None:
    """meta.json of the checkpoint `latest` names (with its `path`), or None (none, or torn)."""
    ckpts = Path(work_dir) / CHECKPOINTS
    try:
        name = (ckpts / LATEST).read_text().strip()
        meta = json.loads((ckpts / name / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "fingerprint" not in meta or "step" not in meta:
        return None
    return dict(meta, path=str(ckpts / name))


def _clear_work_dir(work_dir: Path) -> None:
    """Remove what an earlier attempt left (only the files this job writes there)."""
    shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
    (work_dir / "metrics.jsonl").unlink(missing_ok=True)
    for f in work_dir.glob("events.out.tfevents.*"):
        f.unlink(missing_ok=True)


def prepare_work_dir(work_dir: Path, fingerprint: str, force: bool = False) -> tuple[dict | None, str]:
    """(checkpoint to resume from or None, what was decided). A checkpoint is resumed only when its
    fingerprint is this run's; otherwise the work dir's earlier checkpoints, metrics and events are
    cleared so the curves of another attempt do not mix with this one's."""
    from mllmrec_ray.io import drop_steps_after

    work_dir = Path(work_dir)
    meta = latest_checkpoint(work_dir)
    if meta is not None and not force and meta["fingerprint"] == fingerprint:
        drop_steps_after(work_dir / "metrics.jsonl", meta["step"])  # rows past the checkpoint are redone
        return meta, f"resuming from step {meta['step']} ({meta['path']}, same fingerprint)"
    if meta is None:
        reason = "no checkpoint: starting at step 0"
    elif force:
        reason = f"--force: discarding the checkpoint at step {meta['step']}; starting at step 0"
    else:
        reason = (f"the checkpoint at step {meta['step']} was made with other settings or data "
                  f"(fingerprint {meta['fingerprint']} != {fingerprint}); starting at step 0")
    _clear_work_dir(work_dir)
    return None, reason


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(ds_engine, work_dir: Path, step: int, state: dict, fingerprint: str, rank: int) -> Path:
    """Adapter + optimizer (DeepSpeed, every rank its partition) into a temporary dir, renamed to
    `checkpoints/step_<N>` once complete; `latest` is rewritten after, and older checkpoints go."""
    from mllmrec_ray.io import atomic_write_json, atomic_write_text

    ckpts = Path(work_dir) / CHECKPOINTS
    name = f"step_{step:06d}"
    tmp, final = ckpts / f".{name}.tmp", ckpts / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash mid-save
        tmp.mkdir(parents=True)
    _barrier()
    ds_engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"mllmrec": state}, save_latest=False,
                           exclude_frozen_parameters=True)
    _barrier()
    if rank == 0:
        atomic_write_json(tmp / META, {"step": step, "fingerprint": fingerprint,
                                       "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(ckpts / LATEST, name + "\n")
        for old in ckpts.glob("step_*"):  # the model of a finished run supersedes them all
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ds_engine, path: str | Path) -> dict:
    """Restore adapter, optimizer and step into `engine`; returns the saved client state."""
    # Not strict: the frozen base is not in the checkpoint, it comes from the model path.
    loaded, client = ds_engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the SFT checkpoint in {path}")
    return client.get("mllmrec", {})


# ----------------------------------------------------------------------------- the training loop


def log_step(metrics: dict, total: int, say, writer=None, metrics_file=None) -> None:
    """Rank 0's record of one optimizer step: a console line, TensorBoard scalars, metrics.jsonl."""
    say(f"[sft] step {metrics['step']}/{total} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
        f"lr {metrics['lr']:.2e} grad-norm {metrics['grad_norm'] or 0:.3f} ({metrics['step_s']:.1f} s/step)")
    if writer is not None:
        for key in ("loss", "lr", "grad_norm", "step_s"):
            if metrics[key] is not None:
                writer.add_scalar(f"sft/{key}", metrics[key], metrics["step"])
        writer.flush()
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()


def train_steps(ds_engine, examples: list[dict], pad_id: int, sft, *, rank: int = 0, world: int = 1,
                max_steps: int | None = None, work_dir: str | Path | None = None, resume: str | None = None,
                fingerprint: str = "", say=print, fail_at_step: int | None = None) -> dict:
    """Optimizer steps over this rank's share of `examples`; returns {"steps", "first_loss", "last_loss"}.

    Rank 0 writes TensorBoard scalars and metrics.jsonl to `work_dir`; every rank joins the
    checkpoint every `sft.checkpoint_every` steps. `resume`: a checkpoint dir to continue from.
    A checkpoint is taken at a gradient-accumulation boundary, so `step * grad_accum` micro-batches
    were consumed: the resumed run skips exactly those of the same seeded epoch orders and continues
    as the uninterrupted run would (bit-exact on one worker: rank 0's RNG is restored everywhere).
    """
    import torch

    from mllmrec_ray.prompting.sft_data import collate, completion_loss

    # Every rank runs the same number of micro-batches (gradients are all-reduced in lockstep).
    per_rank = len(examples) // world
    micro_per_epoch = -(-per_rank // sft.micro_batch_size)
    steps_per_epoch = max(micro_per_epoch // sft.grad_accum, 1)
    total = sft.epochs * steps_per_epoch
    if max_steps:
        total = min(total, max_steps)
    epochs = -(-total * sft.grad_accum // micro_per_epoch)  # enough passes to reach `total` steps
    if rank == 0:
        say(f"[sft] {len(examples)} examples, {world} worker(s), {per_rank} per worker, "
            f"micro-batch {sft.micro_batch_size} x accum {sft.grad_accum}: {total} optimizer steps")

    step, first_loss, last_loss = 0, None, None
    if resume:
        state = load_checkpoint(ds_engine, resume)
        step, first_loss, last_loss = state["step"], state.get("first_loss"), state.get("last_loss")
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            say(f"[sft] resumed at step {step}/{total} from {resume}")
    done_micro = step * sft.grad_accum
    writer = metrics_file = None
    if rank == 0 and work_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        Path(work_dir).mkdir(parents=True, exist_ok=True)
        # purge_step: events an interrupted attempt wrote past the checkpoint are hidden
        writer = SummaryWriter(str(work_dir), purge_step=step + 1 if resume else None)
        metrics_file = open(Path(work_dir) / "metrics.jsonl", "a")
    window, t0 = [], time.perf_counter()
    t_step = t0
    try:
        for epoch in range(epochs):
            if step >= total:
                break
            if (epoch + 1) * micro_per_epoch <= done_micro:
                continue  # finished before the checkpoint
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(sft.seed + epoch)).tolist()
            mine = order[: per_rank * world][rank::world]
            for k, i in enumerate(range(0, len(mine), sft.micro_batch_size)):
                if epoch * micro_per_epoch + k < done_micro:
                    continue
                batch = collate([examples[j] for j in mine[i : i + sft.micro_batch_size]], pad_id)
                loss = completion_loss(ds_engine, {key: v.to(ds_engine.device) for key, v in batch.items()})
                ds_engine.backward(loss)
                boundary = ds_engine.is_gradient_accumulation_boundary()
                ds_engine.step()
                window.append(float(loss.detach()))
                if not boundary:
                    continue
                step += 1
                last_loss = sum(window) / len(window)
                window = []
                first_loss = last_loss if first_loss is None else first_loss
                now = time.perf_counter()
                grad_norm = ds_engine.get_global_grad_norm()  # before clipping, as DeepSpeed computed it
                metrics = {"step": step, "epoch": epoch + 1, "loss": last_loss, "first_loss": first_loss,
                           "lr": float(ds_engine.get_lr()[0]),
                           "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "step_s": now - t_step, "seconds": now - t0}
                t_step = now
                if rank == 0:
                    log_step(metrics, total, say, writer, metrics_file)
                if work_dir is not None and sft.checkpoint_every and step % sft.checkpoint_every == 0 and step < total:
                    save_checkpoint(ds_engine, Path(work_dir), step,
                                    {"step": step, "first_loss": first_loss, "last_loss": last_loss,
                                     "torch_rng": torch.get_rng_state()}, fingerprint, rank)
                if fail_at_step is not None and step == fail_at_step:
                    raise RuntimeError(f"{FAULT_ENV}: failing after step {step} (test hook)")
                if step >= total:
                    break
    finally:
        if writer is not None:
            writer.close()
            metrics_file.close()
    return {"steps": step, "first_loss": first_loss, "last_loss": last_loss}


def train_loop(config: dict) -> None:
    """One Ray Train worker: LoRA model + DeepSpeed engine over this rank's share of the examples."""
    import ray
    import ray.train
    import torch

    from mllmrec_ray.config import LoraConfig, SFTConfig, from_dict
    from mllmrec_ray.runtime.models import bf16_enabled
    from mllmrec_ray.runtime.policy import build_policy, deepspeed_engine, load_tokenizer, save_merged

    # Ray Train tees a patched print() into its logger too (every line twice) and logs at INFO:
    # print to the raw stdout (forwarded once) and keep only Train's warnings.
    # No ray.train.report per step: Train V2 keeps no metrics without a checkpoint, and a report waits
    # for the controller's 2 s poll to take the previous one (steps of 0.2 s: 1.85 s a call here; of
    # 7.5 s: 0.02 s), so fast GPU steps would be held to 2 s. Rank 0 writes metrics.jsonl.
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
    bf16 = bf16_enabled(sft.bf16)
    say(f"[sft] rank {rank}: {'bf16' if bf16 else 'fp32'} (sft.bf16: {sft.bf16})")
    model = build_policy(config["model_path"], from_dict(LoraConfig, config["lora"]),
                         dtype=torch.bfloat16 if bf16 else torch.float32)
    ds_engine = deepspeed_engine(model, zero_stage=sft.zero_stage, bf16=bf16, lr=sft.lr,
                              micro_batch_size=sft.micro_batch_size, grad_accum=sft.grad_accum)
    ds_engine.train()
    result = train_steps(ds_engine, examples, tokenizer.pad_token_id, sft, rank=rank, world=world,
                         max_steps=config["max_steps"], work_dir=config["work_dir"], resume=config["resume"],
                         fingerprint=config["fingerprint"], say=say,
                         fail_at_step=config.get("fail_at_step"))

    import deepspeed

    # ZeRO-3 keeps parameters partitioned: every rank joins the gather, rank 0 writes.
    with deepspeed.zero.GatheredParameters(list(ds_engine.module.parameters()), enabled=sft.zero_stage == 3):
        if rank == 0:
            save_merged(ds_engine.module, tokenizer, config["out"], base_dir=config["model_path"],
                        info={"base_model": config["model_path"], "steps": result["steps"],
                              "first_loss": result["first_loss"], "last_loss": result["last_loss"],
                              "examples": len(examples), "sft": config["sft"], "lora": config["lora"],
                              "fingerprint": config["fingerprint"], "resumed_from": config["resume"]},
                        dtype=config["save_dtype"])
            say(f"[sft] merged model and adapter written to {config['out']}")


def write_prompts(path, texts: list[dict], tokenized: list[dict | None]) -> None:
    """The SFT examples as a parquet table (prompt, answer, kept, tokens), written atomically."""
    import pyarrow as pa

    from mllmrec_ray.io import atomic_write_parquet

    table = pa.Table.from_pylist([{
        "sample_id": t["sample_id"], "prompt": t["prompt"], "answer": t["answer"],
        "has_reasoning": t["has_reasoning"], "kept": ex is not None,
        "tokens": len(ex["input_ids"]) if ex is not None else None} for t, ex in zip(texts, tokenized)])
    atomic_write_parquet(table, path)
    print(f"[sft] wrote {len(texts)} training examples to {path}; not training", flush=True)


def check_paths(args: argparse.Namespace) -> tuple:
    """(data, stage1 or None, out or None, work_dir or None), every input and output checked before any
    work, so a bad path fails with one error naming it and nothing written."""
    from jobs.common import CommandError, check_input, check_output_dir

    data = check_input(args.data, "--data", "dir")
    check_input(data / "samples.parquet", "--data", "file")
    check_input(data / "items.parquet", "--data", "file")
    stage1 = check_input(args.stage1, "--stage1", "dir") if args.stage1 else None
    if bool(args.cot) != bool(args.mda):
        raise CommandError("--cot and --mda go together (MDA decides which samples carry their CoT)")
    for flag in ("captions", "cot", "mda"):
        if getattr(args, flag):
            check_input(getattr(args, flag), f"--{flag}", "file")
    out = Path(args.out).resolve() if args.out else None
    work_dir = Path(args.work_dir).resolve() if args.work_dir else (default_work_dir(out) if out else None)
    if args.write_prompts:
        check_output_dir(Path(args.write_prompts).resolve().parent, "--write-prompts")
    else:
        check_output_dir(out, "--out")
        check_output_dir(work_dir, "--work-dir")
    return data, stage1, out, work_dir


def training_examples(cfg, data: Path, tokenizer, captions=None, cot=None, mda=None) -> tuple[list[dict], list]:
    """(sft_texts rows, their tokenized examples or None where dropped) of the run's training samples."""
    from mllmrec_ray.data.run_data import load_collab, load_items, load_reasoning, load_samples, pick_samples
    from mllmrec_ray.prompting.sft_data import sft_texts, tokenize_example

    sft = cfg.sft
    items = load_items(data, captions if cfg.prompt.with_captions else None)
    samples = load_samples(data, "train")
    reasoning = load_reasoning(cot, mda, "selected_sft", cfg.stage1.cot_source)
    if sft.max_samples is not None and sft.max_samples < len(samples):
        samples = pick_samples(samples, set(reasoning), sft.max_samples, sft.seed)
    texts = sft_texts(samples, items, tokenizer, reasoning, with_captions=cfg.prompt.with_captions,
                      think_first=cfg.prompt.think_first, n_candidates=cfg.prompt.n_candidates,
                      collab=load_collab(data, cfg.prompt), reasoning_in=sft.reasoning_in,
                      compact=cfg.prompt.instructions == "compact")
    return texts, [tokenize_example(tokenizer, t["prompt"], t["answer"], sft.max_len, sft.completion_only)
                   for t in texts]


def trainer_class():
    """TorchTrainer, without Ray Train's placement-group cleaner where the cluster has no state API.

    The cleaner (a detached actor) asks the state API, which the dashboard serves, once a second whether
    the controller lives; the clusters this project starts run no dashboard, so every ask failed and
    logged a warning (1,780 lines in a 30-minute SFT log). Nothing is lost without it here: each stage
    is a Ray job of its own, and a job's placement groups go with it.
    """
    from ray.train.torch import TorchTrainer
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=5, raise_on_missing_output=False)
        return TorchTrainer  # a dashboard answers: the cleaner works, keep it
    except Exception:  # no API server (RayStateApiException), or its address not found (ConnectionError)
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def main(args: argparse.Namespace) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig

    from jobs.common import CommandError, stage_config
    from mllmrec_ray.config import to_dict
    from mllmrec_ray.runtime.models import resolve_model
    from mllmrec_ray.runtime.policy import MERGED_MARKER, is_complete, load_tokenizer
    cfg = stage_config(args, FLAGS)  # --config, --set, then the flags above, all validated
    sft = cfg.sft
    if not args.out and not args.write_prompts:
        raise CommandError("mllmrec sft needs --out DIR (or --write-prompts PATH to only build the training examples)")
    if args.max_steps is not None and args.max_steps < 1:
        raise CommandError(f"--max-steps {args.max_steps}: must be >= 1")
    data, stage1, out, work_dir = check_paths(args)
    if out is not None and not args.write_prompts and is_complete(out) and not args.force:
        print(f"[sft] {out} already holds a finished SFT model; skipping (use --force to retrain)")
        return 0

    captions = args.captions or (stage1 / "captions.parquet" if stage1 else None)
    cot = args.cot or (stage1 / "cot.parquet" if stage1 else None)
    mda = args.mda or (stage1 / "mda.parquet" if stage1 else None)
    model_path = resolve_model(args.model or cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    texts, tokenized = training_examples(cfg, data, tokenizer, captions, cot, mda)
    examples, dropped, truncated = [], 0, 0
    for ex in tokenized:
        if ex is None:
            dropped += 1
            continue
        truncated += ex.pop("truncated")
        examples.append(ex)
    if len(examples) < sft.num_workers:
        raise CommandError(f"--data {data}: {len(examples)} usable training examples for "
                           f"{sft.num_workers} workers (sft.num_workers)")
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(f"[sft] model {model_path}; {len(examples)} examples ({sum(t['has_reasoning'] for t in texts)} with "
          f"reasoning, {truncated} prompt-truncated, {dropped} dropped: answer longer than max_len "
          f"{sft.max_len}); tokens median {lengths[len(lengths) // 2]} max {lengths[-1]}", flush=True)
    if args.write_prompts:  # what the model would be trained on, for inspection and audits
        write_prompts(args.write_prompts, texts, tokenized)
        return 0

    fingerprint = resume_fingerprint(to_dict(cfg), model_path, args.max_steps, examples)
    resume, decision = prepare_work_dir(work_dir, fingerprint, force=args.force)
    print(f"[sft] {work_dir}: {decision}", flush=True)

    from jobs.common import init_ray

    init_ray(cfg.ray_num_cpus)  # the pipeline's head, a Ray Job's cluster, or a private loopback one
    use_gpu = sft.resources.num_gpus > 0
    resources = {"CPU": sft.resources.num_cpus, **({"GPU": sft.resources.num_gpus} if use_gpu else {})}
    fault = os.environ.get(FAULT_ENV)
    trainer = trainer_class()(
        train_loop,
        train_loop_config={"examples": ray.put(examples), "model_path": model_path, "out": str(out),
                           "sft": to_dict(sft), "lora": to_dict(cfg.model.lora),
                           "save_dtype": cfg.model.save_dtype, "max_steps": args.max_steps,
                           "work_dir": str(work_dir), "fingerprint": fingerprint,
                           "resume": resume["path"] if resume else None,
                           "fail_at_step": int(fault) if fault else None},
        scaling_config=ScalingConfig(num_workers=sft.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"sft-{out.parent.name}-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    t0 = time.perf_counter()
    trainer.fit()
    if not is_complete(out):
        raise RuntimeError(f"[sft] training ended but {out} is not complete")
    shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)  # the finished model supersedes them
    # Ray Train V2 keeps no metrics reported without a checkpoint: the marker has the summary.
    info = json.loads((out / MERGED_MARKER).read_text())
    print(f"[sft] done in {time.perf_counter() - t0:.0f} s: {info['steps']} steps, loss "
          f"{info['first_loss']:.4f} -> {info['last_loss']:.4f}; model at {out}; "
          f"TensorBoard: tensorboard --logdir {work_dir.parent}", flush=True)
    return 0
