"""What the Stage I jobs share: config + flag resolution and the Ray Data pool pipeline.

Each generation step is: rows still to do -> Parquet -> `ray.data.read_parquet` ->
`map_batches` into a pool of generator actors (fractional CPUs, one engine each) ->
`map_batches(store_generations)` which writes every finished batch as an atomic part
file -> the driver counts finished rows and prints progress.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any


def add_common_arguments(parser) -> None:
    parser.add_argument("--config", help="pipeline YAML; its stage1/model sections are used (flags override)")
    parser.add_argument("--pool-size", type=int, help="generator actors (default: stage1.pool_size)")
    parser.add_argument("--batch-size", type=int, help="rows per actor call (default: stage1.batch_size)")
    parser.add_argument("--num-cpus", type=float, help="CPUs per actor (default: stage1.resources.num_cpus)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per actor (default: stage1.resources.num_gpus)")
    parser.add_argument("--ray-num-cpus", type=int, help="logical CPUs of a local Ray cluster (default: config or 8)")


def load_cfg(args):
    from mllmrec_ray.config import load_config

    cfg = load_config(getattr(args, "config", None), getattr(args, "set", None))  # --set: added by jobs.cli
    s = cfg.stage1
    if args.pool_size is not None:
        s.pool_size = args.pool_size
    if args.batch_size is not None:
        s.batch_size = args.batch_size
    if args.num_cpus is not None:
        s.resources.num_cpus = args.num_cpus
    if args.num_gpus is not None:
        s.resources.num_gpus = args.num_gpus
    return cfg


def start_ray(cfg, args):
    from jobs.common import init_ray

    return init_ray(getattr(args, "ray_num_cpus", None) or cfg.ray_num_cpus)


def run_pool(rows: list[dict], fn_cls, fn_kwargs: dict, store_root: str | Path, stage1, *, desc: str,
             targets: dict | None = None, constants: dict | None = None) -> dict[str, Any]:
    """Send `rows` through a Ray Data actor pool of `fn_cls`; every finished batch lands in the part store.

    Returns {"rows": rows stored, "seconds": wall time, "rows_per_s"}.
    """
    import pyarrow as pa
    import ray

    from mllmrec_ray.stage1.store import store_generations
    from mllmrec_ray.io import atomic_write_parquet

    if not rows:
        print(f"[{desc}] nothing to do: every row is already finished", flush=True)
        return {"rows": 0, "seconds": 0.0, "rows_per_s": None}
    store_root = Path(store_root).resolve()  # Ray Data tasks run in the job's working_dir, not our cwd
    store_root.mkdir(parents=True, exist_ok=True)
    todo = store_root / "todo.parquet"
    atomic_write_parquet(pa.Table.from_pylist(rows), todo)
    bs = stage1.batch_size
    ds = ray.data.read_parquet(str(todo)).repartition(math.ceil(len(rows) / bs))  # one block per batch
    resources = {"num_cpus": stage1.resources.num_cpus}
    if stage1.resources.num_gpus:
        resources["num_gpus"] = stage1.resources.num_gpus
    ds = ds.map_batches(fn_cls, fn_constructor_kwargs=fn_kwargs, batch_size=bs,
                        compute=ray.data.ActorPoolStrategy(size=stage1.pool_size), **resources)
    ds = ds.map_batches(store_generations, batch_size=None, num_cpus=0.1,
                        fn_kwargs={"store_root": str(store_root), "targets": targets, "constants": constants})
    print(f"[{desc}] {len(rows)} rows -> {stage1.pool_size} actor(s) x batch {bs}", flush=True)
    t0, done = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=None):
        done += int(sum(batch["n"]))
        dt = time.perf_counter() - t0
        print(f"[{desc}] {done}/{len(rows)} rows finished ({done / dt:.2f} rows/s)", flush=True)
        sys.stdout.flush()
    seconds = time.perf_counter() - t0
    todo.unlink(missing_ok=True)
    return {"rows": done, "seconds": round(seconds, 2), "rows_per_s": round(done / seconds, 3) if seconds else None}


def engine_dict(engine_cfg, min_model_len: int = 0) -> dict:
    import dataclasses

    d = dataclasses.asdict(engine_cfg)
    d["max_model_len"] = max(d["max_model_len"], min_model_len)
    return d
