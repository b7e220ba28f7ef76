"""`mllmrec` command line: a thin dispatcher onto the stage entrypoints in `jobs/`.

Each job module exposes `add_arguments(parser)` and `main(args) -> int`; heavy
imports (torch, vllm, ray) happen inside `main` so `mllmrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("jobs.data", "fetch or prepare a dataset (data fetch | data prepare)"),
    "models": ("jobs.models", "fetch a model into the local cache (models fetch smollm2-135m)"),
    "baseline": ("jobs.baseline", "train and score a classic baseline (pop | sasrec)"),
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
}
# clients of a cluster's HTTP API: they start or join no Ray node
CLIENT_COMMANDS = {"submit", "jobs"}


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllmrec", description=__doc__.splitlines()[0])
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    if args.command not in CLIENT_COMMANDS:
        from jobs.common import use_loopback_if_local

        # a cluster started here (no RAY_ADDRESS) or a 127.0.0.1 one: every Ray node binds 127.0.0.1
        use_loopback_if_local(getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS"))
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
