"""`mllmrec pipeline --config X`: every stage in order into `runs/<name>/`.

prepare -> baselines -> textualize -> cot -> mda -> sft -> grpo -> eval -> report.
Each stage runs as its own `mllmrec <stage>` process (so a vLLM engine or a
DeepSpeed engine frees its memory when the stage ends) against one Ray cluster:
the one named by RAY_ADDRESS (a Ray Job on a cluster), or a local head this
command starts and stops. A stage whose outputs are complete is skipped, so a
rerun after a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mllmrec_ray.config import PipelineConfig, load_config, to_dict
from mllmrec_ray.io import atomic_write_text

# the marker a merged model dir gets last (mllmrec_ray.policy.MERGED_MARKER; kept import-free here)
SFT_DONE = "mllmrec_complete.json"


def plan(cfg: PipelineConfig, config_path: Path, run_dir: Path) -> list[tuple[str, list[str], Path | None]]:
    """(stage name, mllmrec arguments, output that marks it complete) in order."""
    data, stage1, models, evals = run_dir / "data", run_dir / "stage1", run_dir / "models", run_dir / "eval"
    d = cfg.data
    if d.dataset:
        source = ["--dataset", d.dataset]
    else:
        source = ["--format", str(d.format), "--path", str(d.path)]
        if d.columns:
            source += ["--columns", ",".join(f"{k}={v}" for k, v in d.columns.items())]
    images = ["--images", d.images] if d.images and Path(d.images).is_dir() else []
    conf = ["--config", str(config_path)]
    stages: list[tuple[str, list[str], Path | None]] = [
        ("prepare", ["data", "prepare", *source, "--out", str(data), *images, "--seed", str(d.seed),
                     "--min-inter", str(d.min_inter), "--negatives", str(d.negatives),
                     "--negatives-large", str(d.negatives_large), "--train-windows", d.train_windows,
                     "--window-stride", str(d.window_stride),
                     *(["--max-windows-per-user", str(d.max_windows_per_user)]
                       if d.max_windows_per_user is not None else [])], data / "manifest.json"),
    ]
    for baseline in ("pop", "sasrec"):
        if baseline in cfg.eval.models:
            stages.append((baseline, ["baseline", "--data", str(data), "--model", baseline, "--split", cfg.eval.split,
                                      "--candidates", str(cfg.prompt.n_candidates), "--seed", str(d.seed), "--max-seconds", "0",
                                      "--out", str(evals / f"{baseline}.json")], evals / f"{baseline}.json"))
    if "sasrec" in cfg.eval.models:
        # the labelled extra row: SASRec on the training users' full sequences, not the shared windows
        stages.append(("sasrec-full", ["baseline", "--data", str(data), "--model", "sasrec", "--name", "sasrec-full",
                                       "--train-data", "full", "--split", cfg.eval.split,
                                       "--candidates", str(cfg.prompt.n_candidates), "--seed", str(d.seed),
                                       "--max-seconds", "0", "--out", str(evals / "sasrec-full.json")],
                       evals / "sasrec-full.json"))
    # trivial rankers (chance level, id shortcut) as rows beside the baselines; they train nothing
    for trivial in ("random", "min-id"):
        if trivial in cfg.eval.models:
            stages.append((trivial, ["baseline", "--data", str(data), "--model", trivial, "--split", cfg.eval.split,
                                     "--candidates", str(cfg.prompt.n_candidates), "--seed", str(d.seed),
                                     "--out", str(evals / f"{trivial}.json")], evals / f"{trivial}.json"))
    if "collab" in cfg.eval.models:
        pc = cfg.prompt  # the prompt's evidence alone, at the levels the LLM sees
        stages.append(("collab", ["baseline", "--data", str(data), "--model", "collab", "--split", cfg.eval.split,
                                  "--candidates", str(cfg.prompt.n_candidates), "--seed", str(d.seed),
                                  "--collab", f"{pc.collab_window},{pc.collab_recent},{pc.collab_levels}",
                                  "--out", str(evals / "collab.json")], evals / "collab.json"))
    stages += [
        ("textualize", ["textualize", "--data", str(data), "--out", str(stage1), *conf], stage1 / "captions.parquet"),
        ("cot", ["cot", "--data", str(data), "--stage1", str(stage1), *conf], stage1 / "cot.parquet"),
        ("mda", ["mda", "--data", str(data), "--stage1", str(stage1), *conf], stage1 / "mda.parquet"),
        ("sft", ["sft", "--data", str(data), "--out", str(models / "sft"), "--stage1", str(stage1), *conf],
         models / "sft" / SFT_DONE),
    ]
    if cfg.grpo.steps > 0:
        stages.append(("grpo", ["grpo", *conf, "--run-dir", str(run_dir), "--resume"], models / "grpo" / SFT_DONE))
    llms = {"base": cfg.model.name, "sft": str(models / "sft"), "grpo": str(models / "grpo")}
    for name, model in llms.items():
        if name in cfg.eval.models and (name != "grpo" or cfg.grpo.steps > 0):
            # evaluation prompts are built exactly like the training prompts (captions, answer order)
            shape = ["--captions", str(stage1 / "captions.parquet") if cfg.prompt.with_captions else "none",
                     *(["--think-first"] if cfg.prompt.think_first else [])]
            stages.append((f"eval-{name}", ["eval", "--data", str(data), "--model", model, "--name", name,
                                            "--split", cfg.eval.split, "--candidates", str(cfg.prompt.n_candidates),
                                            "--mode", cfg.eval.mode, *shape, "--dtype", cfg.model.engine.dtype,
                                            "--seed", str(d.seed), "--out", str(evals / f"{name}.json"), *conf,
                                            # GRPO's small update would be rounded away by the bf16 merge:
                                            # its base (the merged SFT model) + its adapter, unmerged
                                            *(["--weights", "adapter"] if name == "grpo" else []),
                                            *(["--max-samples", str(cfg.eval.max_samples)]
                                              if cfg.eval.max_samples else [])],
                           evals / f"{name}.json"))
    stages.append(("report", ["report", str(run_dir)], None))
    return stages


def run_stage(name: str, argv: list[str], log_dir: Path) -> float:
    cmd = [sys.executable, "-m", "mllmrec_ray.cli", *argv]
    print(f"\n=== [{name}] {' '.join(cmd[2:])}", flush=True)
    t = time.perf_counter()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:  # stream to the console and keep a per-stage log
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM: stop the stage too; its finished outputs stay, so a rerun resumes
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    seconds = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"stage {name} failed with exit code {rc} after {seconds:.0f} s; "
                         f"log: {log_dir / (name + '.log')}; rerun the same command to resume")
    print(f"=== [{name}] done in {seconds:.1f} s", flush=True)
    return seconds


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. grpo.steps=2")
    p.add_argument("--only", help="comma-separated stage names to run (others are skipped)")
    p.add_argument("--force", help="comma-separated stage names to rerun even if complete")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")


def main(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.set)
    # Absolute paths for every stage: Ray workers of a submitted job run in its working_dir.
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # the resolved config (overrides applied) is what every stage reads
    resolved = run_dir / "config.yaml"
    atomic_write_text(resolved, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.data.images and not Path(cfg.data.images).is_dir():
        print(f"NOTE: image folder {cfg.data.images} not found: running WITHOUT images "
              f"(no captions; every prompt is text only)", flush=True)
    stages = plan(cfg, resolved, run_dir)
    only = set(args.only.split(",")) if args.only else None
    force = set(args.force.split(",")) if args.force else set()
    if args.dry_run:
        for name, argv, done in stages:
            state = "complete" if done is not None and done.exists() else "to run"
            print(f"{name:12s} {state:9s} mllmrec {' '.join(argv)}")
        return 0
    # SIGTERM (e.g. `mllmrec jobs stop`) unwinds like Ctrl-C, so the stage and the local head stop too
    signal.signal(signal.SIGTERM, _interrupt)
    started_head = None
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        # one local cluster for every stage process of this run
        ctx = ray.init(address="local", num_cpus=cfg.ray_num_cpus or 8, include_dashboard=False)
        os.environ["RAY_ADDRESS"] = ctx.address_info["address"]
        started_head = ray
    timings = {}
    t0 = time.perf_counter()
    try:
        for name, argv, done in stages:
            if only is not None and name not in only:
                continue
            if done is not None and done.exists() and name not in force:
                print(f"=== [{name}] complete ({done}), skipped", flush=True)
                continue
            timings[name] = run_stage(name, argv, run_dir / "logs")
    finally:
        if started_head is not None:
            started_head.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
    total = time.perf_counter() - t0
    print("\nstage timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f} s")
    results = run_dir / "results.md"
    if results.exists():
        print(f"\nResults ({run_dir}):\n{results.read_text()}")
    return 0
