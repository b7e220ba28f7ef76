"""What malloc and denormals cost a GRPO learner step on CPU: glibc vs jemalloc, denormals kept vs flushed.

Usage: python benchmarks/cpu_numerics.py --run-dir runs/cpu-full [--checkpoint DIR] [--prompts 4]
           [--reps 2] [--json OUT.json]

Each variant runs in its own process (a malloc is chosen when a process starts): the learner of
`actors/learner.py` (no Ray) is built on RUN_DIR/models/sft, optionally restored from a GRPO
checkpoint (a trained policy is where denormals appear: its vocabulary softmax underflows), and
takes --reps steps over rankings (`Learner.rank_step`) on the first --prompts prompts of the run's
GRPO pool, the same seeds in every variant. Prints seconds per step (the first step included: it is
part of every run) and checks that every variant computed the same loss and KL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = (("glibc", "keep"), ("jemalloc", "keep"), ("glibc", "flush"), ("jemalloc", "flush"))


def child(args) -> None:
    """One variant: build the learner, take the steps, print one JSON line."""
    from transformers import AutoTokenizer

    from actors.learner import Learner
    from mllmrec_ray.config import load_config
    from mllmrec_ray.ranking.scoring import readout_tokens
    from mllmrec_ray.rl.prompt_pool import build_prompts

    run = args.run_dir
    cfg = load_config(run / "config.yaml")
    cfg.grpo.action = "rank"
    model = str(run / "models" / "sft")
    tok = AutoTokenizer.from_pretrained(model)
    batch = []
    for p in build_prompts(cfg, run / "data", run / "stage1", tok)[: args.prompts]:
        cands = [str(c) for c in p["candidates"]]
        extra, readout = readout_tokens(tok, cands, [None] * len(cands), "id")
        batch.append({"prompt_ids": p["prompt_ids"] + extra, "candidates": readout, "target": cands.index(str(p["target"]))})
    learner = Learner(model, cfg.grpo, cfg.model.lora)
    if args.checkpoint:
        learner.load_checkpoint(str(args.checkpoint))
    steps = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        st = learner.rank_step(batch, seed=rep)
        steps.append({"s": time.perf_counter() - t0, "loss": st["loss"], "kl": st["kl"], "tokens": st["tokens"]})
    print("RESULT " + json.dumps(steps), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with config.yaml, data/, stage1/, models/sft")
    p.add_argument("--checkpoint", type=Path, help="a GRPO checkpoint dir (holding `latest`) to start from")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    from jobs.cli import jemalloc_path

    lib = jemalloc_path()
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLLMREC_MALLOC", "MLLMREC_DENORMALS")}
    cmd = [sys.executable, __file__, "--child", "--run-dir", str(args.run_dir), "--prompts", str(args.prompts),
           "--reps", str(args.reps)] + (["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])
    rows = []
    for malloc, denormals in VARIANTS:
        env = {**base, "MLLMREC_DENORMALS": denormals, **({"LD_PRELOAD": lib} if malloc == "jemalloc" else {})}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {malloc}/{denormals} failed (exit {out.returncode})")
        steps = json.loads(lines[-1][len("RESULT "):])
        rows.append({"malloc": malloc, "denormals": denormals, "step_s": [s["s"] for s in steps],
                     "mean_step_s": sum(s["s"] for s in steps) / len(steps), "tokens": steps[0]["tokens"],
                     "loss": [s["loss"] for s in steps], "kl": [s["kl"] for s in steps]})
        print(f"{malloc:9s} denormals {denormals:5s}: " + ", ".join(f"{s['s']:.1f}" for s in steps)
              + f" s/step ({rows[-1]['tokens']} tokens, {args.prompts} prompts)", flush=True)
    ref = rows[0]
    same = all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for r in rows for a, b in zip(r["loss"] + r["kl"], ref["loss"] + ref["kl"]))
    fastest = min(rows, key=lambda r: r["mean_step_s"])
    print(f"glibc+denormals {ref['mean_step_s']:.1f} s/step -> {fastest['malloc']}+{fastest['denormals']} "
          f"{fastest['mean_step_s']:.1f} s/step ({ref['mean_step_s'] / fastest['mean_step_s']:.2f}x); "
          f"loss and KL {'equal' if same else 'DIFFER'} across variants (rel 1e-3)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "checkpoint": str(args.checkpoint or ""),
                                         "prompts": args.prompts, "reps": args.reps, "variants": rows,
                                         "same_loss_kl": same}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
