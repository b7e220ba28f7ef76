"""`mllmrec serve --model PATH --data DIR [--port N] [--host 127.0.0.1] [--config YAML]`.

Deploys the ranker (`actors/ranker.py`) on Ray Serve and stays in the foreground until
Ctrl-C or SIGTERM, then shuts down what it started: the Serve application, Serve itself
and the Ray cluster when this command started them, only its own application when it
joined an existing cluster (`--ray-address`, or RAY_ADDRESS as inside a Ray Job).
HTTP binds 127.0.0.1 by default (`serve.host` / `serve.port` in the config, or the flags).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="trained model dir (e.g. runs/quickstart/models/grpo) or cache alias")
    p.add_argument("--data", required=True, help="prepared data dir (e.g. runs/quickstart/data)")
    p.add_argument("--config", help="pipeline YAML: serve.* (replicas, batching, retrieval) and prompt.* "
                                    "(default: the run's <data>/../config.yaml when there is one)")
    p.add_argument("--host", help="HTTP host (default serve.host = 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default serve.port = 8000)")
    p.add_argument("--captions", help="Stage I captions.parquet (default <data>/../stage1/captions.parquet if present)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or "local",
                   help="Ray cluster to join; `local` (default outside a Ray Job) starts a private one")


def main(args: argparse.Namespace) -> int:
    from mllmrec_ray.config import ConfigError, load_config

    config = args.config
    run_config = Path(args.data).resolve().parent / "config.yaml"  # what `mllmrec pipeline` ran with
    if config is None and run_config.exists():
        config = run_config
        print(f"[mllmrec serve] using the run's config {run_config} (prompt and serve settings)", flush=True)
    try:
        cfg = load_config(config, getattr(args, "set", None))  # --set: added by jobs.cli
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = args.host or cfg.serve.host
    port = args.port if args.port is not None else cfg.serve.port

    import ray
    from ray import serve

    from actors.ranker import APP_NAME, build_app
    from jobs.common import start_local_ray, use_loopback_if_local

    own_cluster = args.ray_address == "local"
    if own_cluster:  # a private cluster on 127.0.0.1 only (node, agents, workers; Serve binds `host`)
        start_local_ray(cfg.ray_num_cpus, log_to_driver=True)
    else:
        use_loopback_if_local(args.ray_address)  # joining a 127.0.0.1 cluster needs the loopback node IP
        ray.init(address=args.ray_address, log_to_driver=True)
    # after ray.init, which installs its own SIGTERM handler (it would exit without cleaning up)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            application = build_app(cfg, args.model, args.data, args.captions)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except Exception as e:  # e.g. a replica failed to load the model
            print(f"error: the ranker did not start: {e}", file=sys.stderr)
            return 1
        print(f"[mllmrec serve] ranker ready on http://{host}:{port} "
              f"(POST /recommend, GET /healthz, API schema on /docs; retrieval {cfg.serve.retrieval}); "
              "Ctrl-C or SIGTERM stops it",
              flush=True)
        while not stop.wait(1.0):
            pass
        print("[mllmrec serve] stopping", flush=True)
        return 0
    finally:
        try:
            if own_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception as e:
            print(f"warning: Serve shutdown: {e}", file=sys.stderr)
        ray.shutdown()
