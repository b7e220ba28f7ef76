"""What launching one SFT worker through Ray Train costs on this box: the demo's SFT steps in-process, in
one plain Ray task, and through `mllmrec sft` (Ray Train's TorchTrainer), interleaved.

Usage: python benchmarks/sft_launch.py [--data runs/quickstart/data] [--stage1 runs/quickstart/stage1]
           [--config runs/quickstart/config.yaml] [--steps 4] [--rounds 2] [--json OUT.json]

Every variant trains the same first --steps optimizer steps of the quickstart's SFT (the same examples,
seed, LoRA, DeepSpeed engine and `jobs.sft.train_steps`) in a fresh process; only where that loop runs
differs:
- `local`: a process of its own, no Ray;
- `local-cluster`: the same process after it started a local Ray cluster (the cluster's own processes run
  beside the loop, as under `mllmrec pipeline`);
- `task`: one Ray task with `sft.resources` on a local 127.0.0.1 cluster started as the stages start it;
- `ray-train`: `mllmrec sft --max-steps`, i.e. one TorchTrainer worker with its controller actors;
- `task-nice0`, `ray-train-nice0`: the same with `RAY_worker_niceness=0` when the cluster starts (Ray runs
  its workers at nice 15 by default, below its own daemons).
The variants run round-robin --rounds times, so slow phases of a shared box fall on all of them. Reported:
each run's step times, the share of CPU time the hypervisor stole during it (/proc/stat `steal`: other
guests on a shared host), and the median over rounds of the steady steps (2 and later; step 1 warms up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("local", "local-cluster", "task", "ray-train", "task-nice0", "ray-train-nice0")


def train(args_dict: dict) -> list[float]:
    """The first `steps` SFT steps of the run's config in this process; their step times (s)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args_dict["port"]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import torch

    from jobs.sft import train_steps, training_examples
    from mllmrec_ray.config import load_config
    from mllmrec_ray.runtime.models import bf16_enabled, resolve_model
    from mllmrec_ray.runtime.policy import build_policy, deepspeed_engine, load_tokenizer

    cfg = load_config(args_dict["config"])
    sft, stage1 = cfg.sft, Path(args_dict["stage1"])
    model_path = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    _, tokenized = training_examples(cfg, Path(args_dict["data"]), tokenizer, stage1 / "captions.parquet",
                                     stage1 / "cot.parquet", stage1 / "mda.parquet")
    examples = [e for e in tokenized if e is not None]
    for e in examples:
        e.pop("truncated")
    torch.manual_seed(sft.seed)  # as jobs/sft.py's train_loop
    bf16 = bf16_enabled(sft.bf16)
    model = build_policy(model_path, cfg.model.lora, dtype=torch.bfloat16 if bf16 else torch.float32)
    engine = deepspeed_engine(model, zero_stage=sft.zero_stage, bf16=bf16, lr=sft.lr,
                              micro_batch_size=sft.micro_batch_size, grad_accum=sft.grad_accum)
    engine.train()
    with tempfile.TemporaryDirectory() as work:
        train_steps(engine, examples, tokenizer.pad_token_id, sft, max_steps=args_dict["steps"], work_dir=work,
                    say=lambda *a, **k: None)
        return [json.loads(line)["step_s"] for line in open(Path(work) / "metrics.jsonl")]


def cpu_ticks() -> tuple[int, int]:
    """(all CPU ticks, stolen ticks) so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def run_variant(variant: str, args: argparse.Namespace, port: int) -> list[float]:
    """Step times of one variant, run in a fresh process."""
    spec = {"config": str(args.config), "data": str(args.data), "stage1": str(args.stage1), "steps": args.steps,
            "port": port}
    env = {**os.environ, **({"RAY_worker_niceness": "0"} if variant.endswith("-nice0") else {})}
    variant = variant.removesuffix("-nice0")
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "ray-train":
            out = Path(tmp) / "run" / "models" / "sft"
            subprocess.run([sys.executable, "-m", "jobs.cli", "sft", "--data", str(args.data), "--stage1",
                            str(args.stage1), "--config", str(args.config), "--out", str(out),
                            "--max-steps", str(args.steps)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            return [json.loads(line)["step_s"] for line in open(out.parent.parent / "sft" / "metrics.jsonl")]
        result = Path(tmp) / "steps.json"
        subprocess.run([sys.executable, __file__, "--child", variant, "--spec", json.dumps(spec), "--result",
                        str(result)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(result.read_text())


def child(variant: str, spec: dict, result: Path) -> None:
    import torch

    from mllmrec_ray.config import load_config

    cfg = load_config(spec["config"])
    if variant != "local":
        import ray

        from jobs.common import init_ray

        init_ray(cfg.ray_num_cpus)
    if variant == "task":
        steps = ray.get(ray.remote(num_cpus=cfg.sft.resources.num_cpus)(train).remote(spec))
    else:
        torch.set_num_threads(int(cfg.sft.resources.num_cpus))  # what Ray gives a worker with these CPUs
        steps = train(spec)
    if variant != "local":
        ray.shutdown()
    result.write_text(json.dumps(steps))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "runs/quickstart/data")
    p.add_argument("--stage1", type=Path, default=ROOT / "runs/quickstart/stage1")
    p.add_argument("--config", type=Path, default=ROOT / "runs/quickstart/config.yaml")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:4]))
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=VARIANTS[:3], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, json.loads(args.spec), args.result)
        return 0
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 warms up and is not counted)")
    runs: dict[str, list[list[float]]] = {v: [] for v in args.variants}
    steal: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for i, variant in enumerate(args.variants):
            total0, stolen0 = cpu_ticks()
            steps = run_variant(variant, args, port=29600 + 10 * r + i)
            total1, stolen1 = cpu_ticks()
            runs[variant].append(steps)
            steal[variant].append((stolen1 - stolen0) / max(total1 - total0, 1))
            print(f"round {r + 1} {variant:13s}: " + " ".join(f"{s:.1f}" for s in steps)
                  + f" s a step (steal {steal[variant][-1]:.0%})", flush=True)
    steady = {v: statistics.median(s for steps in runs[v] for s in steps[1:]) for v in args.variants}
    first = args.variants[0]
    print(f"median steady step ({args.steps - 1} x {args.rounds} steps each): "
          + ", ".join(f"{v} {steady[v]:.1f} s ({steady[v] / steady[first]:.2f}x {first})" for v in args.variants))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "step_s": runs,
                                         "steal": steal,
                                         "median_steady_step_s": steady}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
