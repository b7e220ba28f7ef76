"""`mllmrec submit STAGE [stage args] --config ... --address URL [--no-wait]`: run a stage as a Ray Job.

The job goes through Ray's Job Submission API. Its runtime_env is
`cluster/runtime_env.yaml`: the repo is the working_dir (code travels with the job,
without .venv/, runs/, .git/), and the config is validated here, resolved (overlays
merged) and carried in the job's environment, so a config error is reported before
anything is submitted and configs outside the repo work too. The stage's own arguments are
parsed here as the job will parse them and its `--set` overrides validated on top of the
config, so a typo or a bad value fails here (exit 2, one `error:` line), not on the cluster.
The entrypoint is `<python> -m jobs.cli STAGE [--config FILE] [stage args]`.

Where the job runs: against a local head (127.0.0.1 / localhost) it runs in the
current directory with this venv's python, so `runs/<name>/` lands where a local run
would put it; against a remote cluster it runs in the unpacked working_dir with the
image's `python3` (give the config an absolute, shared `runs_dir`). `--cwd` and
`--python` override both.

Token authentication (on by default in Ray 2.60) works without flags: when
RAY_AUTH_MODE is unset and a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), the client sends it.

Exit code = the job's final status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED; 2 for a usage,
config or connection error. `--no-wait` prints the job id and returns 0 once submitted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "MLLMREC_JOB_CONFIG"  # resolved config YAML carried to the job
NOT_SUBMITTABLE = {"submit", "jobs"}  # client-side commands
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=argparse.SUPPRESS,
                   help=f"Ray dashboard URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})")


def enable_token_auth() -> None:
    """Send Ray's auth token when one exists; must run before `ray` is imported."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").exists()):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """A JobSubmissionClient for `address`, with the auth token when there is one."""
    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def is_local(address: str) -> bool:
    return (urlparse(address if "://" in address else f"http://{address}").hostname or "") in LOCAL_HOSTS


def _own_options(p: argparse.ArgumentParser) -> None:
    """Options of `submit` itself; accepted before or after the stage name."""
    add_address(p)
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="pipeline YAML: validated here, resolved, and passed to the stage as --config")
    p.add_argument("--no-wait", action="store_true", default=argparse.SUPPRESS,
                   help="return after submitting (print the job id) instead of streaming logs")
    p.add_argument("--job-id", default=argparse.SUPPRESS, help="submission id (default mllmrec-<stage>-<time>-<rand>)")
    p.add_argument("--python", default=argparse.SUPPRESS,
                   help="python on the cluster (default: this venv's for a local head, else python3)")
    p.add_argument("--cwd", default=argparse.SUPPRESS,
                   help="directory the job runs in (default: the current one for a local head, else the working_dir)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=argparse.SUPPRESS,
                   help="CPUs reserved for the job's driver (default none)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _own_options(parser)
    parser.add_argument("stage", help="a mllmrec sub-command: pipeline, data, sft, grpo, eval, report, ...")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER,
                        help="arguments of the stage (submit's own options may be mixed in)")
    parser.epilog = ("example: mllmrec submit pipeline --config configs/quickstart.yaml "
                     f"--address {DEFAULT_ADDRESS}")


def split_args(args: argparse.Namespace) -> list[str]:
    """Pull submit's own options out of the stage arguments; return what goes to the stage."""
    from jobs.cli import Parser

    inner = Parser(prog="mllmrec submit", add_help=False, allow_abbrev=False)
    _own_options(inner)
    _, rest = inner.parse_known_args(args.stage_args, namespace=args)
    for name, default in (("address", None), ("config", None), ("no_wait", False), ("job_id", None),
                          ("python", None), ("cwd", None), ("entrypoint_num_cpus", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    args.address = args.address or default_address()
    return rest


def load_runtime_env() -> dict:
    import yaml

    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    env["working_dir"] = str((REPO_ROOT / env.get("working_dir", ".")).resolve())  # relative to the repo root
    env["env_vars"] = {k: str(v) for k, v in (env.get("env_vars") or {}).items()}
    return env


def _stage_default_config(path) -> Path | None:
    """A stage's default --config (the pipeline's configs/quickstart.yaml) as the job will see it:
    relative to the current directory, else to the repo (the job's working_dir)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def check_stage(args: argparse.Namespace, stage_args: list[str]):
    """Parse the stage's arguments as the job will and validate its config (--config, then every
    --set), here, before anything is submitted. Returns the validated config (None for a stage
    that reads none). Raises UsageError / ConfigError naming the option or key."""
    from jobs.common import stage_config
    from jobs.cli import build_parser, config_command

    stage_ns = build_parser().parse_args([args.stage, *stage_args])
    if config_command(stage_ns) is None:
        return None
    return stage_config(stage_ns, path=args.config or _stage_default_config(getattr(stage_ns, "config", None)))


def _nested_command_length(stage: str, stage_args: list[str]) -> int:
    """How many of `stage_args` come before the options of the command that reads the config: 0,
    or up to and including `prepare` of `data prepare`."""
    from jobs.cli import build_parser, config_command

    nested = (config_command(build_parser().parse_args([stage, *stage_args])) or stage).split()[1:]
    end = 0
    for part in nested:
        end = stage_args.index(part, end) + 1
    return end


def build_job(args: argparse.Namespace, stage_args: list[str]) -> dict:
    """The submit_job keyword arguments (entrypoint, runtime_env, ids) for parsed args."""
    import yaml

    from jobs.cli import COMMANDS
    from mllmrec_ray.config import load_config, to_dict

    if args.stage not in COMMANDS or args.stage in NOT_SUBMITTABLE:
        allowed = ", ".join(c for c in COMMANDS if c not in NOT_SUBMITTABLE)
        raise ValueError(f"stage {args.stage!r} cannot be submitted; allowed stages: {allowed}")
    checked = check_stage(args, stage_args)
    local = is_local(args.address)
    job_id = args.job_id or f"mllmrec-{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", job_id):
        raise ValueError(f"--job-id {job_id!r}: use letters, digits, '.', '_' and '-' only")
    runtime_env = load_runtime_env()
    python = args.python or (sys.executable if local else "python3")
    command = [python, "-m", "jobs.cli", args.stage]
    shell = ""
    metadata = {"mllmrec_stage": args.stage}
    if args.config:
        # the file as resolved (overlays merged); the stage's --set overrides travel in its arguments
        runtime_env["env_vars"][CONFIG_ENV] = yaml.safe_dump(to_dict(load_config(args.config)), sort_keys=False)
        # written by the job from its environment into Ray's unpacked copy of the working_dir
        shell = f'CFG="$PWD/.mllmrec-config-{job_id}.yaml" && printf "%s" "${CONFIG_ENV}" > "$CFG" && '
        metadata["config"] = str(args.config)
        metadata["run_name"] = checked.name if checked is not None else load_config(args.config).name
        # after the sub-command that takes it (`data prepare --config ...`)
        nested = _nested_command_length(args.stage, stage_args)
        command += [*stage_args[:nested], "--config", "@CFG@"]
        stage_args = stage_args[nested:]
    command += stage_args
    cwd = args.cwd or (os.getcwd() if local else None)
    entry = " ".join('"$CFG"' if c == "@CFG@" else shlex.quote(c) for c in command)
    entrypoint = shell + (f"cd {shlex.quote(cwd)} && " if cwd else "") + "exec " + entry
    job = {"entrypoint": entrypoint, "runtime_env": runtime_env, "submission_id": job_id, "metadata": metadata}
    if args.entrypoint_num_cpus is not None:
        job["entrypoint_num_cpus"] = args.entrypoint_num_cpus
    return job


async def _stream(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def wait_for(client, job_id: str, stream: bool = True, poll_s: float = 1.0) -> str:
    """Stream the job's logs (or poll) until it ends; return its final status name."""
    if stream:
        try:
            asyncio.run(_stream(client, job_id))
        except RuntimeError as e:  # the log socket closed early: fall back to polling
            print(f"[mllmrec submit] log stream ended ({e}); polling the status", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in EXIT_CODES:
            return status
        time.sleep(poll_s)


def main(args: argparse.Namespace) -> int:
    from jobs.cli import UsageError
    from mllmrec_ray.config import ConfigError

    try:
        stage_args = split_args(args)
        job = build_job(args, stage_args)  # the stage's arguments and config are checked first
    except (ValueError, ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        client = connect(args.address)
        job_id = client.submit_job(**job)
    except (ConnectionError, RuntimeError) as e:
        print(f"error: cannot submit to {args.address}: {e}", file=sys.stderr)
        return 2
    print(f"[mllmrec submit] job {job_id} submitted to {args.address}: {job['entrypoint']}", flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        status = wait_for(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[mllmrec submit] stopped following; the job keeps running. "
              f"Stop it with: mllmrec jobs stop {job_id} --address {args.address}", file=sys.stderr)
        return 130
    print(f"[mllmrec submit] job {job_id} {status}", flush=True)
    return EXIT_CODES[status]
