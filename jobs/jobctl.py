"""`mllmrec jobs list | status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID [--address URL]`.

Thin wrappers over Ray's Job Submission API for jobs started with `mllmrec submit`
(or any other Ray Job). Token authentication is handled as in `mllmrec submit`.
`status` exits with the same codes as `submit` for a finished job (0 SUCCEEDED,
1 FAILED, 3 STOPPED) and 4 while it is still PENDING or RUNNING.
"""

from __future__ import annotations

import argparse
import sys

from jobs.submit import EXIT_CODES, add_address, connect, default_address, wait_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="jobs_command", metavar="{list,status,logs,stop}")
    p = sub.add_parser("list", help="every job of the cluster, newest first")
    add_address(p)
    for name, help_text in (("status", "a job's status and message"), ("logs", "a job's driver logs"),
                            ("stop", "stop a running job")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job_id", help="submission id printed by `mllmrec submit`")
        add_address(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    parser.set_defaults(_jobs_parser=parser)


def main(args: argparse.Namespace) -> int:
    if args.jobs_command is None:
        args._jobs_parser.print_help()
        return 2
    address = getattr(args, "address", None) or default_address()
    try:
        client = connect(address)
        if args.jobs_command == "list":
            jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
            print(f"{'JOB ID':44} {'STATUS':10} {'STAGE':10} ENTRYPOINT")
            for j in jobs:
                stage = (j.metadata or {}).get("mllmrec_stage", "-")
                print(f"{(j.submission_id or j.job_id or '-'):44} {j.status.value:10} {stage:10} "
                      f"{j.entrypoint[-80:]}")
            return 0
        if args.jobs_command == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
            return EXIT_CODES.get(info.status.value, 4)
        if args.jobs_command == "logs":
            if args.follow:
                return EXIT_CODES[wait_for(client, args.job_id)]
            print(client.get_job_logs(args.job_id), end="")
            return 0
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "not running"))
        if args.wait:
            print(f"{args.job_id}: {wait_for(client, args.job_id, stream=False)}")
        return 0
    except (ConnectionError, RuntimeError) as e:
        print(f"error: {address}: {e}", file=sys.stderr)
        return 2
