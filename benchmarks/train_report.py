"""What a per-step `ray.train.report(metrics)` costs a Ray Train worker (why SFT reports no metrics per step).

Usage: python benchmarks/train_report.py [--reports 8] [--step-s 0.2 7.5] [--json OUT.json]

One TorchTrainer worker on a local 127.0.0.1 cluster calls `ray.train.report` after each of --reports
"steps" (a sleep of --step-s seconds) and times every call. Train V2 hands reports to its controller
through a one-slot queue that the controller empties at its health-check poll (2 s by default), so a
report after a step shorter than the poll waits for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def loop(cfg: dict) -> None:
    import ray.train

    times = []
    for i in range(cfg["reports"]):
        time.sleep(cfg["step_s"])
        t0 = time.perf_counter()
        ray.train.report({"step": i})
        times.append(time.perf_counter() - t0)
    Path(cfg["out"]).write_text(json.dumps(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reports", type=int, default=8)
    p.add_argument("--step-s", type=float, nargs="+", default=[0.2, 7.5])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    out = {"ray": ray.__version__, "reports": args.reports, "by_step_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for step_s in args.step_s:
            path = Path(tmp) / f"{step_s}.json"
            TorchTrainer(loop, train_loop_config={"reports": args.reports, "step_s": step_s, "out": str(path)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=f"report-{time.time_ns()}", storage_path=tmp)).fit()
            times = json.loads(path.read_text())
            # the first report finds the queue empty; the rest show the steady cost
            out["by_step_s"][str(step_s)] = {"first_s": times[0], "rest_mean_s": sum(times[1:]) / max(len(times) - 1, 1)}
    ray.shutdown()
    for step_s, r in out["by_step_s"].items():
        print(f"steps of {step_s} s: first report {r['first_s']:.3f} s, then {r['rest_mean_s']:.3f} s a report")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
