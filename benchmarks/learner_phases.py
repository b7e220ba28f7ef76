"""Where a GRPO learner step's time goes, against bare PyTorch on the same tokens, in one process.

Usage: python benchmarks/learner_phases.py [--model smollm2-135m] [--repeats 4] [--overlap] [--json OUT.json]

One synthetic step the size of `grpo_vs_trl.py`'s (4 prompts of 413-383 tokens, G = 4 responses of 30
tokens, default LoraConfig, temperature 0.9, beta 0.05), run through `actors.learner.Learner.train_step`
(DeepSpeed, no Ray) with each phase timed: the reference forward (adapter off, no grad), the policy
forward, the backward and the optimizer step. Beside it, the same prompts and responses through a bare
PEFT model (no DeepSpeed): `group_logprobs` forward+backward (each prompt once, its responses packed over
its cache, as the learner does), and full rows (prompt + one response per row, as `grpo_vs_trl.py`'s
floor measures its rate). `--overlap` also measures what running a reference-sized forward (4 x 413
tokens, no grad) beside a vLLM generate call costs both of them on this box, in two processes: whether
the reference work could hide under the rollout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # jobs/ and actors/ are top-level packages of the repo
    sys.path.insert(0, str(ROOT))

PROMPTS, G, PROMPT_TOKENS, RESPONSE_TOKENS, TEMPERATURE = 4, 4, 413, 30, 0.9


def synthetic_batch(seed: int = 0) -> tuple[list[list[int]], list[dict]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS - 10 * i)] for i in range(PROMPTS)]
    batch = [{"prompt_ids": p, "response_ids": [rng.randrange(100, 40000) for _ in range(RESPONSE_TOKENS)],
              "advantage": rng.gauss(0, 1)} for p in prompts for _ in range(G)]
    return prompts, batch


def learner_phases(model_path: str, repeats: int) -> list[dict]:
    """Per repeat: seconds of the whole train_step and of each phase (the first repeat warms up)."""
    from actors.learner import Learner
    from mllmrec_ray.config import GRPOConfig, LoraConfig

    _, batch = synthetic_batch()
    learner = Learner(model_path, GRPOConfig(micro_batch_size=PROMPTS * G, temperature=TEMPERATURE), LoraConfig())
    acc: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    policy_logprobs = learner._logprobs
    learner._logprobs = lambda p, r, reference=False: timed("reference_fwd" if reference else "policy_fwd",
                                                            policy_logprobs)(p, r, reference)
    engine = learner.ds_engine
    engine.backward, engine.step = timed("backward", engine.backward), timed("optimizer_step", engine.step)
    rows = []
    for _ in range(repeats + 1):
        acc.clear()
        t0 = time.perf_counter()
        stats = learner.train_step(batch)
        rows.append({"step_s": time.perf_counter() - t0, **acc, "tokens": stats["tokens"]})
    return rows


def bare_rates(model_path: str, repeats: int) -> dict:
    """Forward / backward seconds of the bare PEFT model: group_logprobs (packed) and full rows."""
    from mllmrec_ray.config import LoraConfig
    from mllmrec_ray.runtime.policy import build_policy, group_logprobs, pad_batch, token_logprobs

    prompts, batch = synthetic_batch()
    model = build_policy(model_path, LoraConfig(), dtype=torch_dtype()).eval()
    responses = [[b["response_ids"] for b in batch[i * G:(i + 1) * G]] for i in range(PROMPTS)]
    rows = [p + batch[i * G]["response_ids"] for i, p in enumerate(prompts)]
    ids, attn, rmask = pad_batch(rows, [r[-RESPONSE_TOKENS:] for r in rows], 0)
    start = min(map(len, rows)) - 1

    def packed():
        logp, mask = group_logprobs(model, prompts, responses, 0, temperature=TEMPERATURE)
        return -(logp * mask).sum()

    def full():
        return -(token_logprobs(model, ids, attn, start=start, temperature=TEMPERATURE) * rmask[:, start:]).sum()

    out = {"packed_tokens": sum(map(len, prompts)) + PROMPTS * G * RESPONSE_TOKENS, "full_tokens": int(attn.sum())}
    for name, fn in (("packed", packed), ("full", full)):
        fwd, bwd = [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            loss = fn()
            t1 = time.perf_counter()
            loss.backward()
            model.zero_grad(set_to_none=True)
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        out[name] = {"fwd_s": fwd[1:], "bwd_s": bwd[1:]}
    return out


def torch_dtype():
    """The learner's dtype on this machine (`auto`: bf16 where native, else fp32)."""
    import torch

    from mllmrec_ray.runtime.models import resolve_dtype

    return getattr(torch, resolve_dtype("auto"))


def _overlap_worker(kind: str, model_path: str, ready, stop, done, calls: int) -> None:
    """One side of --overlap: `calls` vLLM generate calls ("gen": sets `ready` when warm, `stop` when done),
    or reference-sized no-grad forwards ("fwd", timed from `ready` until `stop`, at least `calls`)."""
    threads = str(os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = threads
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rng = random.Random(1)
    if kind == "gen":
        from mllmrec_ray.config import EngineConfig
        from mllmrec_ray.runtime.engine import Engine

        engine = Engine(model_path, EngineConfig(dtype="auto", max_model_len=1024, kv_cache_gib=1.0))
        batches = [[[rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)] for _ in range(PROMPTS)]
                   for _ in range(calls + 1)]
        engine.generate(batches[0], G, TEMPERATURE, 1.0, 32)  # warm-up
        ready.set()  # the forward side times its calls from here
        times = []
        for batch in batches[1:]:
            t0 = time.perf_counter()
            engine.generate(batch, G, TEMPERATURE, 1.0, 32)
            times.append(time.perf_counter() - t0)
        stop.set()
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(int(threads))
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype()).eval()
        ids = torch.randint(100, 40000, (PROMPTS, PROMPT_TOKENS))
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)  # warm-up
            ready.wait()
            times = []
            while not stop.is_set() or len(times) < calls:
                t0 = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
                if stop.is_set() and len(times) >= calls:
                    break
    done.put((kind, times))


def overlap(model_path: str, calls: int = 5) -> dict:
    """Seconds per call of generate alone, forward alone, and both at once (each in its own process; the
    forward side keeps running while every generate call is timed)."""
    ctx = mp.get_context("spawn")
    out = {}
    for mode in ("gen", "fwd", "both"):
        ready, stop, done = ctx.Event(), ctx.Event(), ctx.Queue()
        kinds = ["gen", "fwd"] if mode == "both" else [mode]
        if mode == "fwd":
            ready.set()
            stop.set()
        procs = [ctx.Process(target=_overlap_worker, args=(k, model_path, ready, stop, done, calls)) for k in kinds]
        for p in procs:
            p.start()
        for _ in procs:
            kind, times = done.get()
            out[f"{kind}_{'alone' if mode != 'both' else 'together'}_s"] = times
        for p in procs:
            p.join()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=4, help="timed repeats after one warm-up")
    p.add_argument("--overlap", action="store_true", help="also measure a forward beside a vLLM generate call")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch

    from mllmrec_ray.runtime.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    model_path = str(resolve_model(args.model))
    phases = learner_phases(model_path, args.repeats)[1:]
    bare = bare_rates(model_path, args.repeats)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    summary = {key: med([r.get(key, 0.0) for r in phases])
               for key in ("step_s", "reference_fwd", "policy_fwd", "backward", "optimizer_step")}
    for name in ("packed", "full"):
        summary[f"bare_{name}_fwd_bwd_s"] = med([f + b for f, b in zip(bare[name]["fwd_s"], bare[name]["bwd_s"])])
    result = {"threads": torch.get_num_threads(), "dtype": str(torch_dtype()), "phases": phases,
              "bare": bare, "median": summary}
    print(f"learner step {summary['step_s']:.2f}s (median of {args.repeats}): reference forward "
          f"{summary['reference_fwd']:.2f}s, policy forward {summary['policy_fwd']:.2f}s, backward "
          f"{summary['backward']:.2f}s, optimizer {summary['optimizer_step']:.2f}s")
    print(f"bare PEFT, same {bare['packed_tokens']} tokens packed as the learner packs them: forward+backward "
          f"{summary['bare_packed_fwd_bwd_s']:.2f}s (learner's policy forward+backward "
          f"{summary['policy_fwd'] + summary['backward']:.2f}s); full rows ({bare['full_tokens']} tokens): "
          f"{summary['bare_full_fwd_bwd_s']:.2f}s")
    if args.overlap:
        result["overlap"] = ov = overlap(model_path)
        print(f"vLLM generate {med(ov['gen_alone_s']):.2f}s alone, {med(ov['gen_together_s']):.2f}s beside a forward; "
              f"forward {med(ov['fwd_alone_s']):.2f}s alone, {med(ov['fwd_together_s']):.2f}s beside generate")
    if args.json:
        from mllmrec_ray.io import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
