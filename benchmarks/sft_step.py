"""Where an SFT step's time goes on this box: the quickstart's LoRA model in the dtype `auto` picks
(bf16 where native, else fp32), one micro-batch.

Usage: python benchmarks/sft_step.py [--model smollm2-135m] [--rows 4] [--tokens 610] [--repeats 3]
           [--json OUT.json]

Measures, on rows of random token ids with completion-only labels on the last 10 tokens (the SFT
loss `sft_data.completion_loss`, no padding):
- forward + backward + optimizer step through DeepSpeed (as `jobs/sft.py` builds it: ZeRO-2, that dtype)
  and through a bare PyTorch loop (PEFT model in that dtype, torch AdamW), interleaved, best of --repeats;
- forward + backward with each attention implementation: sdpa (its CPU flash kernel, the default),
  sdpa forced onto its math kernel, and transformers' eager attention;
- a torch.profiler breakdown of one bare forward + backward by operator (self CPU time): attention
  forward / backward, matmuls, element-wise ops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ELEMENTWISE = ("aten::mul", "aten::add", "aten::add_", "aten::copy_", "aten::pow", "aten::silu", "aten::silu_backward",
               "aten::neg", "aten::div", "aten::fill_", "aten::cat", "aten::rsqrt", "aten::mean", "aten::sum")


def best(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def profile_shares(run) -> dict[str, float]:
    """Self-CPU-time shares of one call of `run` by operator group."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    parts = {"attention backward": 0.0, "attention forward": 0.0, "matmul": 0.0, "element-wise": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6
        if "flash_attention" in ev.key:
            parts["attention backward" if "backward" in ev.key else "attention forward"] += t
        elif ev.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            parts["matmul"] += t
        elif ev.key in ELEMENTWISE:
            parts["element-wise"] += t
        else:
            parts["other"] += t
    total = sum(parts.values()) or 1.0
    return {k: v / total for k, v in parts.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=4, help="rows per micro-batch (quickstart sft.micro_batch_size)")
    p.add_argument("--tokens", type=int, default=610, help="tokens per row (the demo's median prompt is ~603)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29535"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mllmrec_ray.config import load_config
    from mllmrec_ray.prompting.sft_data import IGNORE, completion_loss
    from mllmrec_ray.runtime.models import resolve_dtype, resolve_model
    from mllmrec_ray.runtime.policy import build_policy, deepspeed_engine

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    model_path = resolve_model(args.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.rows, args.tokens), generator=gen)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -10:] = ids[:, -10:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tokens = args.rows * args.tokens

    dtype = getattr(torch, resolve_dtype("auto"))  # as jobs/sft.py: bf16 where native, else fp32
    engine = deepspeed_engine(build_policy(model_path, cfg.model.lora, dtype=dtype),
                              zero_stage=cfg.sft.zero_stage, bf16=dtype == torch.bfloat16, lr=cfg.sft.lr, micro_batch_size=args.rows,
                              grad_accum=1)
    engine.train()
    model = build_policy(model_path, cfg.model.lora, dtype=dtype)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.sft.lr)

    def deepspeed_step():
        engine.backward(completion_loss(engine, batch))
        engine.step()

    def bare_step():
        completion_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()

    def attention(name: str):
        backends = [SDPBackend.MATH] if name == "sdpa-math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

        def run():
            model.config._attn_implementation = "eager" if name == "eager" else "sdpa"
            with sdpa_kernel(backends):
                completion_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
            model.config._attn_implementation = "sdpa"
        return run

    out: dict = {"model": model_path, "rows": args.rows, "tokens_per_row": args.tokens, "threads": torch.get_num_threads()}
    steps = {"deepspeed": best(deepspeed_step, args.repeats), "bare": best(bare_step, args.repeats)}
    fwd_bwd = {name: best(attention(name), args.repeats) for name in ("sdpa", "sdpa-math", "eager")}
    out.update(step_s=steps, step_tok_s={k: tokens / v for k, v in steps.items()}, fwd_bwd_s_by_attention=fwd_bwd,
               profile_share=profile_shares(attention("sdpa")))

    print(f"SFT micro-batch {args.rows} x {args.tokens} tokens, {dtype}, {out['threads']} threads, best of {args.repeats}")
    print(f"  step (fwd+bwd+optimizer): DeepSpeed {steps['deepspeed']:.2f} s ({out['step_tok_s']['deepspeed']:.0f} tok/s), "
          f"bare PyTorch {steps['bare']:.2f} s ({out['step_tok_s']['bare']:.0f} tok/s)")
    print("  fwd+bwd by attention: " + ", ".join(f"{k} {v:.2f} s ({v / fwd_bwd['sdpa']:.2f}x)" for k, v in fwd_bwd.items()))
    print("  profile of one fwd+bwd (sdpa): " + ", ".join(f"{k} {v:.0%}" for k, v in out["profile_share"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
