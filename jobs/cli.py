"""`mllmrec` command line: a thin dispatcher onto the stage entrypoints in `jobs/`.

Each job module exposes `add_arguments(parser)` and `main(args) -> int`; heavy
imports (torch, vllm, ray) happen inside `main` so `mllmrec --help` stays fast.

Every stage that reads the pipeline config takes the same `--config FILE` and repeatable
`--set KEY=VALUE` (added here), and the config is validated here before the stage runs, so
a bad value stops it before anything is written. Failures a user can fix (a bad config
value, a usage error, a missing or unusable path) print one `error: ...` line naming the
key or file and exit 2, without a traceback (MLLMREC_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("jobs.data", "fetch or prepare a dataset (data fetch | data prepare)"),
    "models": ("jobs.models", "fetch a model into the local cache (models fetch smollm2-135m)"),
    "baseline": ("jobs.baseline", "train and score a classic baseline (pop | sasrec)"),
    "evidence": ("jobs.evidence", "train the sequence-model evidence of prompt.collab_seq (cross-fitted SASRec)"),
    "textualize": ("jobs.textualize", "Stage I: caption item covers"),
    "cot": ("jobs.cot", "Stage I: pseudo-CoT and refined CoT per training sample"),
    "mda": ("jobs.mda", "Stage I: mixed-grained data augmentation (CoT selection)"),
    "sft": ("jobs.sft", "LoRA supervised fine-tuning on Ray Train"),
    "grpo": ("jobs.grpo", "distributed GRPO: vLLM rollout actors + DeepSpeed learner"),
    "eval": ("jobs.evaluate", "evaluate an LLM ranker on the stored candidate lists"),
    "report": ("jobs.report", "reward curve and metrics table of a run"),
    "pipeline": ("jobs.pipeline", "run every stage of a config into one run directory"),
    "submit": ("jobs.submit", "submit a stage or the pipeline as a Ray Job"),
    "jobs": ("jobs.jobctl", "status | logs | stop of submitted Ray Jobs"),
    "serve": ("jobs.serve", "serve the trained ranker with Ray Serve"),
    "env": ("jobs.env", "versions, cores, malloc, Ray address and model cache of this machine"),
}
# clients of a cluster's HTTP API: they start or join no Ray node
CLIENT_COMMANDS = {"submit", "jobs", "env"}
# stages that read the pipeline config: each gets --config / --set, validated before it runs
# ("data prepare": the `prepare` sub-command of `data`; `data fetch` reads no config)
CONFIG_COMMANDS = {"evidence", "textualize", "cot", "mda", "sft", "grpo", "eval", "serve", "pipeline",
                   "data prepare", "baseline", "report"}
EXIT_USAGE = 2
# system (default): glibc's malloc; jemalloc: every command re-runs itself once with Ray's bundled
# jemalloc preloaded, and the Ray nodes and workers it starts inherit it
MALLOC_ENV = "MLLMREC_MALLOC"
MALLOC_CHOICES = ("jemalloc", "system")


class UsageError(Exception):
    """A command line argparse rejected (printed as one `error:` line)."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors raise UsageError instead of printing usage and exiting,
    so the CLI reports them like every other failure (and `mllmrec submit` can check a
    stage's arguments before submitting). Sub-parsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    from jobs.common import add_config_arguments

    parser = Parser(prog="mllmrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if available_only and e.name == module_name:
                continue  # stage not built in this checkout
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    commands = sub.choices
    for command in sorted(CONFIG_COMMANDS):
        first, *nested = command.split()
        if first not in commands:
            continue
        p = commands[first]
        for part in nested:  # e.g. `data prepare`: the sub-command's own parser
            p = _subcommands(p)[part]
        add_config_arguments(p)
        p.set_defaults(_config_command=command)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser of a parser's sub-commands."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def config_command(args: argparse.Namespace) -> str | None:
    """The CONFIG_COMMANDS entry parsed `args` run (e.g. "sft", "data prepare"), None for a
    command that reads no config (`data fetch`, `models`, `submit`, ...)."""
    return getattr(args, "_config_command", None)


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print one `error: ...` line on stderr; returns the exit code."""
    text = " ".join(str(message).split())
    text = text[len("error:"):].lstrip() if text.lower().startswith("error:") else text
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code


_OS_ERRORS = {FileNotFoundError: "not found", NotADirectoryError: "not a directory",
              IsADirectoryError: "is a directory", PermissionError: "permission denied",
              FileExistsError: "already exists"}


def _os_error(e: OSError) -> str:
    """`<file>: <what>` of a failed file operation."""
    what = e.strerror or _OS_ERRORS.get(type(e))
    name = e.filename
    if name is None and len(e.args) == 1 and isinstance(e.args[0], str) and " " not in e.args[0].strip():
        name = e.args[0]  # FileNotFoundError(path), as pyarrow raises it
    if name is not None and what:
        return f"{name}: {what[:1].lower()}{what[1:]}"
    return str(e)


def jemalloc_path() -> str | None:
    """Ray's own jemalloc (`ray/core/libjemalloc.so`, shipped in its wheel), found without importing ray."""
    spec = importlib.util.find_spec("ray")
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "core" / "libjemalloc.so"
        if lib.is_file():
            return str(lib)
    return None


def preload_env(env: dict[str, str]) -> dict[str, str] | None:
    """With MLLMREC_MALLOC=jemalloc, the environment to re-run a command in so that jemalloc replaces
    glibc's malloc; None when there is nothing to do (the default `system`, already preloaded, not
    Linux, no jemalloc).

    Why offered: PyTorch on CPU allocates and frees tensors of ever-changing sizes, and glibc's bins
    can fragment: a long-running GRPO learner spent ~40% of its time in glibc's `_int_malloc`, and a
    step ran over 12 minutes, 161 s with jemalloc. Why not the default: Ray's jemalloc build spends
    2.5x glibc's system time on page faults in a fresh SFT-like loop (31 vs 12 s of 190 s), and no
    demo has been timed on it. Preloading must happen before the process starts, hence the re-run;
    processes started from it inherit LD_PRELOAD.
    """
    choice = env.get(MALLOC_ENV, "system")
    if choice not in MALLOC_CHOICES:
        raise UsageError(f"{MALLOC_ENV}={choice!r}: expected one of {', '.join(MALLOC_CHOICES)}")
    preloaded = env.get("LD_PRELOAD", "")
    if choice == "system" or "libjemalloc" in preloaded or not sys.platform.startswith("linux"):
        return None
    lib = jemalloc_path()
    if lib is None:
        return None
    return {**env, "LD_PRELOAD": ":".join(p for p in (lib, preloaded) if p)}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `mllmrec` command itself (a call from Python keeps its process as it is)
        try:
            env = preload_env(dict(os.environ))
        except UsageError as e:
            return fail(str(e))
        if env is not None:
            os.execve(sys.executable, [sys.executable, "-m", "jobs.cli", *sys.argv[1:]], env)
    from pydantic import ValidationError

    from jobs.common import CommandError
    from mllmrec_ray.config import ConfigError, config_error

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_module", None):
            parser.print_help()
            return EXIT_USAGE
        if config_command(args):
            from jobs.common import stage_config

            stage_config(args)  # a bad key or value stops here, before the stage writes anything
        if args.command not in CLIENT_COMMANDS:
            from jobs.common import use_loopback_if_local

            # a cluster started here (no RAY_ADDRESS) or a 127.0.0.1 one: every Ray node binds 127.0.0.1
            use_loopback_if_local(getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS"))
        return int(args._module.main(args) or 0)
    except (UsageError, ConfigError, CommandError) as e:
        if os.environ.get("MLLMREC_DEBUG"):
            raise
        return fail(str(e))
    except ValidationError as e:  # a config object built or assigned in code (e.g. from a stage's flag)
        if os.environ.get("MLLMREC_DEBUG"):
            raise
        return fail(str(config_error(e)))
    except tuple(_OS_ERRORS) as e:
        if os.environ.get("MLLMREC_DEBUG"):
            raise
        return fail(_os_error(e))
    except SystemExit as e:  # a stage's `raise SystemExit("message")`; plain exit codes pass through
        if isinstance(e.code, str) and not os.environ.get("MLLMREC_DEBUG"):
            return fail(e.code)
        raise


if __name__ == "__main__":
    sys.exit(main())
