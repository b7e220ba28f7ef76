"""`mllmrec pipeline --config X`: every stage in order into `runs/<name>/`.

prepare -> baselines -> textualize -> cot -> mda -> sft -> grpo -> eval -> report.
Each stage runs as its own `mllmrec <stage>` process (so a vLLM engine or a
DeepSpeed engine frees its memory when the stage ends) against one Ray cluster:
the one named by RAY_ADDRESS (a Ray Job on a cluster), or a local head on 127.0.0.1
this command starts (when a stage needs Ray) and stops.

Config-aware skipping (`mllmrec_ray.fingerprint`): after a stage succeeds, its
settings (command line + the config keys it reads) and the upstream outputs it
consumed are recorded in `fingerprints/<stage>.json`. A stage runs when forced, when
its output or record is missing, when its settings changed, or when anything upstream
runs or ran since; otherwise it is skipped. `--dry-run` prints that decision per
stage and writes nothing. The console gets one line per stage (plus progress with
rate and ETA for long stages); each stage's full output goes to `logs/<stage>.log`.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mllmrec_ray.config import ConfigError, PipelineConfig, load_config, to_dict
from mllmrec_ray.data.run_data import SEQ_EVIDENCE
from mllmrec_ray.io import atomic_write_json, atomic_write_text
from mllmrec_ray.runtime.models import native_bf16

# Stages that run the policy model (where `dtype: auto` decides bf16 or fp32).
MODEL_STAGES = {"textualize", "cot", "sft", "grpo", "eval-base", "eval-sft", "eval-grpo"}

# the marker a merged model dir gets last (mllmrec_ray.runtime.policy.MERGED_MARKER; kept import-free here)
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
    seq = cfg.prompt.collab and cfg.prompt.collab_seq
    if seq:
        # the prompt's next-item ranks: cross-fitted SASRec models beside the data they were trained on
        stages.append(("seqrec", ["evidence", "--data", str(data), "--seed", str(d.seed), *conf],
                       data / SEQ_EVIDENCE))
    for baseline in ("pop", "sasrec"):
        if baseline in cfg.eval.models:
            # the SASRec row on the shared windows is the evidence's model on every training user, not a retrain
            reuse = ["--from-evidence"] if seq and baseline == "sasrec" else []
            stages.append((baseline, ["baseline", "--data", str(data), "--model", baseline, "--split", cfg.eval.split,
                                      "--candidates", str(cfg.prompt.n_candidates), "--seed", str(d.seed), "--max-seconds", "0",
                                      *reuse, "--out", str(evals / f"{baseline}.json")], evals / f"{baseline}.json"))
    if "sasrec-full" in cfg.eval.models:
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


# ----------------------------------------------------------------------------- running stages

# Directories (relative to the run dir) a stage resumes from. They are kept only when the interrupted
# attempt had exactly the settings and upstream outputs of this one; otherwise cleared before it runs.
RESUMABLE = {"grpo": ("grpo",)}
# Stages that never touch Ray (the local head is started only when another stage runs; evaluations
# keep it: vLLM with tensor parallelism joins the cluster named by RAY_ADDRESS).
RAY_FREE = ("prepare", "pop", "sasrec", "sasrec-full", "random", "min-id", "collab", "seqrec", "mda", "report")
PROGRESS_EVERY_S = 120.0  # console not a terminal: at most one progress line per stage this often
TAIL_LINES = 20           # of a failed stage's log

# `i/N` lines the stages already print: `[sft] step 3/12`, `[grpo] step 2/5`, Stage I pools
# (`[pseudo] 12/24 rows finished`) and tqdm bars (`eval sft (score):  40%|####  | 76/189 [...]`).
_PROGRESS = (
    (re.compile(r"\[(?P<tag>[\w-]+)\] step (?P<i>\d+)/(?P<n>\d+)\b"), "step"),
    (re.compile(r"\[(?P<tag>[\w-]+)\] (?P<i>\d+)/(?P<n>\d+) rows finished"), "row"),
    (re.compile(r"(?P<tag>[^\r\n|:]*?):\s+\d+%\|[^|]*\|\s*(?P<i>\d+)/(?P<n>\d+)\b"), "it"),
)


def parse_progress(line: str) -> tuple[str, int, int, str] | None:
    """(tag, i, N, unit) of a progress line, else None."""
    for pattern, unit in _PROGRESS:
        m = pattern.search(line)
        if m and int(m["n"]) > 0:
            tag = m["tag"].strip()
            if unit == "it" and "sample" in line:
                unit = "sample"
            return tag, int(m["i"]), int(m["n"]), unit
    return None


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Rate and ETA of one stage from its `i/N` lines (measured from the first one seen, so model
    loading does not count); starts over when the tag or N changes (e.g. pseudo -> refined CoT)."""

    def __init__(self):
        self.key, self.t0, self.i0 = None, 0.0, 0

    def update(self, tag: str, i: int, n: int, unit: str, now: float) -> str:
        """`i/N[, rate][, ETA]`."""
        if self.key != (tag, n) or i < self.i0:
            self.key, self.t0, self.i0 = (tag, n), now, i
        text = f"{i}/{n}"
        if i > self.i0 and now > self.t0:
            rate = (i - self.i0) / (now - self.t0)
            speed = f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"
            text += f", {speed}" + (f", ETA {_duration((n - i) / rate)}" if i < n else "")
        return text


class Console:
    """Stage lines on stdout; on a terminal the progress line is rewritten in place."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.live = False

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.live = False

    def line(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[K" + text[:width])
            self.stream.flush()
            self.live = True
        else:
            self.line(text)


class StageFailed(Exception):
    def __init__(self, name: str, rc: int, seconds: float, log: Path, why: str = ""):
        super().__init__(name)
        self.name, self.rc, self.seconds, self.log, self.why = name, rc, seconds, log, why


def stage_command(argv: list[str]) -> list[str]:
    """The process that runs one stage (tests swap it for a cheap stand-in)."""
    return [sys.executable, "-m", "jobs.cli", *argv]


def log_tail(log: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        text = log.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [s.rstrip() for s in re.split(r"[\r\n]", text) if s.strip()]
    return lines[-n:]


def run_stage(name: str, argv: list[str], log_dir: Path, console: Console | None = None) -> float:
    """Run one stage; its whole output goes to `log_dir/<name>.log`, the console gets progress only."""
    console = console or Console()
    cmd = stage_command(argv)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    last_shown = t0
    progress = Progress()
    with open(log_path, "wb") as log:
        log.write(f"$ mllmrec {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            fd, pending = proc.stdout.fileno(), b""
            while chunk := os.read(fd, 1 << 16):
                log.write(chunk)
                log.flush()
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                text = None
                for raw in lines:
                    parsed = parse_progress(raw.decode("utf-8", errors="replace"))
                    if parsed:
                        tag, unit = parsed[0], parsed[3]
                        text = (unit if tag == name else tag) + " " + progress.update(*parsed, now=time.perf_counter())
                now = time.perf_counter()
                every = 0.5 if console.tty else PROGRESS_EVERY_S
                if text and now - last_shown >= every:
                    console.progress(f"{name}: {text} ({_duration(now - t0)} so far)")
                    last_shown = now
            rc = proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM: stop the stage too; its finished outputs stay, so a rerun resumes
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise StageFailed(name, rc, seconds, log_path)
    return seconds


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. grpo.steps=2")
    p.add_argument("--only", help="comma-separated stage names to run if stale (others are left as they are)")
    p.add_argument("--force", help="comma-separated stage names to rerun, with everything downstream of them")
    p.add_argument("--dry-run", action="store_true",
                   help="print `<stage>: run (<reason>)` or `<stage>: skip (<reason>)` per stage; write nothing")


def _stage_names(value: str | None, option: str, names: list[str]) -> set[str] | None:
    if value is None:
        return None
    wanted = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in names]
    if unknown or not wanted:
        what = f"unknown stage {unknown[0]!r}" if unknown else "no stage named"
        raise ValueError(f"{option}: {what}; stages of this run: {', '.join(names)}")
    return set(wanted)


def _needs_ray(name: str) -> bool:
    return not any(fnmatch.fnmatchcase(name, p) for p in RAY_FREE)


def _results_table(path: Path) -> str:
    """The first table of results.md (the paired comparisons stay in the file)."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(line)
        elif out:
            break
    return "\n".join(out)


def decide(cfg, config: dict, stages: list, run_dir: Path, only: set[str] | None, force: set[str]) -> tuple:
    """(stage states, fingerprint records, run/skip decisions, stages that resume an interrupted attempt).

    A resumable stage that runs keeps what an interrupted attempt left when that attempt had the same
    fingerprint and nothing upstream reruns; otherwise its state is cleared (the reason says so)."""
    from mllmrec_ray import fingerprint as fp

    names = [name for name, _, _ in stages]
    ancestors = fp.dependencies(names, with_captions=cfg.prompt.with_captions)
    states = [fp.StageState(name, fp.stage_settings(name, argv, config, run_dir), ancestors[name],
                            has_marker=done is not None, output_exists=done is not None and done.exists())
              for name, argv, done in stages]
    records = fp.read_records(run_dir, names)
    decisions = fp.decide(states, records, only, force)
    running = {d.name for d in decisions if d.run}
    resume: set[str] = set()
    for d, s in zip(decisions, states):
        if d.run and s.name in RESUMABLE:
            attempt = fp.attempt_for(s.name, s.settings, s.ancestors, records)
            has_state = any((run_dir / r).exists() for r in RESUMABLE[s.name])
            prior = fp.read_attempt(run_dir, s.name)
            usable = s.name not in force and not set(s.ancestors) & running
            # an attempt that only raised grpo.steps continues the finished (or interrupted) one
            raised = fp.extends(prior or records.get(s.name), attempt) if usable and has_state else ()
            if usable and fp.same_inputs(prior, attempt):
                resume.add(s.name)
                d.reason += "; resuming the interrupted attempt (same fingerprint)"
            elif raised:
                resume.add(s.name)
                d.reason += f"; continuing from its last checkpoint (only {', '.join(raised)} raised)"
            elif has_state:
                d.reason += f"; clearing {', '.join(RESUMABLE[s.name])}/ (made by another attempt)"
    return states, records, decisions, resume


def main(args: argparse.Namespace) -> int:
    import yaml

    from mllmrec_ray import fingerprint as fp

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Absolute paths for every stage: Ray workers of a submitted job run in its working_dir.
    run_dir = cfg.run_dir.resolve()
    # the resolved config (overrides applied) is what the stages read; written only when one of them runs
    resolved = run_dir / "config.yaml"
    stages = plan(cfg, resolved, run_dir)
    names = [name for name, _, _ in stages]
    try:
        only = _stage_names(args.only, "--only", names)
        force = _stage_names(args.force, "--force", names) or set()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.data.images and not Path(cfg.data.images).is_dir():
        print(f"NOTE: image folder {cfg.data.images} not found: running WITHOUT images "
              f"(no captions; every prompt is text only)", flush=True)

    config = to_dict(cfg)
    states, records, decisions, resume = decide(cfg, config, stages, run_dir, only, force)
    running = {d.name for d in decisions if d.run}
    if args.dry_run:
        for d in decisions:
            print(d.line())
        return 0

    console = Console()
    log_dir = run_dir / "logs"
    console.line(f"[pipeline] {run_dir}: {len(running)} of {len(stages)} stages to run; "
                 f"full stage output in {log_dir}/<stage>.log")
    if "auto" in (cfg.model.engine.dtype, cfg.sft.bf16, cfg.grpo.bf16) and running & MODEL_STAGES:
        console.line(f"[pipeline] dtype auto: {'bf16 (native here)' if native_bf16() else 'fp32 (bf16 is emulated here)'}"
                     "; each worker decides for its own hardware")
    # SIGTERM (e.g. `mllmrec jobs stop`) unwinds like Ctrl-C, so the stage and the local head stop too
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started_head, wrote_config = None, False
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for (name, argv, done), state, d in zip(stages, states, decisions):
            if not d.run:
                console.line(d.line())
                continue
            if str(resolved) in argv and not wrote_config:
                atomic_write_text(resolved, CONFIG_HEADER + yaml.safe_dump(config, sort_keys=False))
                wrote_config = True
            if _needs_ray(name) and started_head is None and not os.environ.get("RAY_ADDRESS"):
                started_head = _start_head(cfg, console, log_dir)
            console.line(d.line())
            attempt = fp.attempt_for(name, state.settings, state.ancestors, records)
            # stale output first stops looking complete: record, then marker, then resumable state
            fp.record_path(run_dir, name).unlink(missing_ok=True)
            if done is not None:
                done.unlink(missing_ok=True)
            if name not in resume:
                for rel in RESUMABLE.get(name, ()):
                    shutil.rmtree(run_dir / rel, ignore_errors=True)
            atomic_write_json(fp.attempt_path(run_dir, name), attempt)
            seconds = run_stage(name, argv, log_dir, console)
            if done is not None and not done.exists():
                raise StageFailed(name, 0, seconds, log_dir / f"{name}.log", why=f"it did not write {done}")
            records[name] = fp.make_record(attempt, seconds)
            atomic_write_json(fp.record_path(run_dir, name), records[name])
            fp.attempt_path(run_dir, name).unlink(missing_ok=True)
            timings[name] = seconds
            console.line(f"{name}: done in {seconds:.1f} s")
    except StageFailed as e:
        what = e.why or f"exit code {e.rc}"
        console.line(f"{e.name}: FAILED ({what}) after {e.seconds:.0f} s; last lines of {e.log}:")
        for line in log_tail(e.log):
            console.line(f"    {line}")
        print(f"error: stage {e.name} failed ({what}); full output in {e.log}; "
              f"rerun the same command to continue from there", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        console.line("[pipeline] interrupted: finished stages are recorded; rerun the same command to continue")
        return 130
    finally:
        if started_head is not None:
            started_head.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
        signal.signal(signal.SIGTERM, previous)
    total = time.perf_counter() - t0
    skipped = len(stages) - len(timings)
    console.line(f"[pipeline] finished in {total:.0f} s: ran {len(timings)} stage(s)"
                 + (f" ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})" if timings else "")
                 + f", {skipped} skipped")
    results = run_dir / "results.md"
    if "report" in timings and results.exists():
        console.line(_results_table(results))
        console.line(f"[pipeline] results: {results} (paired comparisons there too)")
    return 0


CONFIG_HEADER = ("# Resolved config of the last `mllmrec pipeline` that ran a stage reading it.\n"
                 "# What each output was made with: fingerprints/<stage>.json "
                 "(`mllmrec pipeline --dry-run` lists stale stages).\n")


def _start_head(cfg: PipelineConfig, console: Console, log_dir: Path):
    """One local cluster for every stage process of this run, on 127.0.0.1 only."""
    import logging

    import ray._private.worker as ray_worker

    from jobs.common import start_local_ray

    num_cpus = cfg.ray_num_cpus or 8
    ctx = start_local_ray(num_cpus, log_to_driver=False, logging_level=logging.ERROR)
    # The pipeline is a Ray driver only to hold the head: the raylet's cluster-wide warnings, which
    # Ray prints on every driver whatever log_to_driver says ("N PYTHON worker processes have been
    # started..."), go to logs/ray.log, not the console.
    ray_log = log_dir / "ray.log"

    def to_log(data: dict, ignore_prefix: bool = False, *args, **kwargs) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(ray_log, "a") as f:
            f.writelines(f"({data.get('pid')}) {line}\n" for line in data.get("lines", []))

    ray_worker.print_to_stdstream = to_log
    os.environ["RAY_ADDRESS"] = ctx.address_info["address"]
    console.line(f"[pipeline] local Ray cluster at {ctx.address_info['address']} ({num_cpus} logical CPUs)")
    # ray.init installs its own SIGTERM handler (stack dump, then exit): a `kill` would then leave the
    # stage running and skip the head's shutdown, so SIGTERM unwinds like Ctrl-C again
    signal.signal(signal.SIGTERM, _interrupt)
    import ray

    return ray
