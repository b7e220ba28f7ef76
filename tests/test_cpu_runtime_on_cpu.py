"""The CPU runtime of every command: jemalloc instead of glibc's malloc on request (`jobs.cli.preload_env`),
inherited by the Ray workers a command starts, and denormals flushed where models are built."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env_json(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLLMREC_MALLOC")}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "env", "--json"], cwd=ROOT, env={**env, **extra},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_preload_env_adds_ray_jemalloc_once_and_keeps_other_preloads():
    from jobs.cli import jemalloc_path, preload_env

    lib = jemalloc_path()
    assert lib and lib.endswith("ray/core/libjemalloc.so") and Path(lib).is_file()
    env = preload_env({"PATH": "/bin", "LD_PRELOAD": "/opt/other.so", "MLLMREC_MALLOC": "jemalloc"})
    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so" and env["PATH"] == "/bin"
    assert preload_env({"LD_PRELOAD": lib, "MLLMREC_MALLOC": "jemalloc"}) is None  # the re-run: no second exec
    assert preload_env({"MLLMREC_MALLOC": "system"}) is None
    assert preload_env({"PATH": "/bin"}) is None  # glibc's by default


def test_malloc_setting_is_checked():
    from jobs.cli import UsageError, preload_env

    with pytest.raises(UsageError, match="MLLMREC_MALLOC='tcmalloc'"):
        preload_env({"MLLMREC_MALLOC": "tcmalloc"})
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "env"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "MLLMREC_MALLOC": "tcmalloc"}, timeout=120)
    assert out.returncode == 2 and "error: MLLMREC_MALLOC='tcmalloc'" in out.stderr


def test_commands_run_on_jemalloc_when_asked():
    assert _env_json()["malloc"] == "glibc"
    assert _env_json(MLLMREC_MALLOC="jemalloc")["malloc"] == "jemalloc"


SCRIPT = """
import json
import ray
from jobs.common import start_local_ray
start_local_ray(2, log_to_driver=False)

@ray.remote
def worker_malloc():
    from jobs.env import malloc_in_use
    return malloc_in_use()

from jobs.env import malloc_in_use
print(json.dumps({"driver": malloc_in_use(), "worker": ray.get(worker_malloc.remote())}))
ray.shutdown()
"""


def test_ray_workers_started_by_a_command_inherit_jemalloc():
    """What `mllmrec <stage>` does after its re-run: the local cluster it starts runs every worker on jemalloc."""
    from jobs.cli import preload_env

    env = preload_env({**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "MLLMREC_MALLOC": "jemalloc"})
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"driver": "jemalloc", "worker": "jemalloc"}


FLUSH = """
import sys, torch
from mllmrec_ray.config import LoraConfig
tiny = torch.tensor([1e-39], dtype=torch.float32)
before = float(tiny * 1.0)
from mllmrec_ray.runtime.policy import build_policy
build_policy(sys.argv[1], LoraConfig(r=4, alpha=8), dtype=torch.float32)
print(before, float(tiny * 1.0))
"""


@pytest.mark.parametrize("setting", ["flush", "keep"])
def test_building_a_policy_flushes_denormals(tiny_llama, setting):
    env = {**os.environ, "MLLMREC_DENORMALS": setting}
    out = subprocess.run([sys.executable, "-c", FLUSH, str(tiny_llama)], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = map(float, out.stdout.split()[-2:])
    assert before == pytest.approx(1e-39, rel=1e-3)
    assert after == (0.0 if setting == "flush" else before)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                        (False, False, "float32")])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch, amx, avx512_bf16, expected):
    """An AVX2-only CPU emulates bf16 (4-5x slower than fp32 there): `auto` must pick fp32 on it."""
    import torch

    from mllmrec_ray.runtime.models import bf16_enabled, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_dtype("auto") == expected
    assert bf16_enabled("auto") is (expected == "bfloat16")
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"  # asked: kept
    assert bf16_enabled(True) is True and bf16_enabled(False) is False
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of 'auto', 'bfloat16', 'float32'"):
        resolve_dtype("fp8")


@pytest.mark.parametrize("native", [True, False])
def test_scorer_loads_the_auto_dtype(monkeypatch, tiny_llama, native):
    """The default (`auto`) reaches the model: the HF scorer (evaluation, serving) loads in the resolved dtype."""
    import torch

    import mllmrec_ray.runtime.models as models
    from mllmrec_ray.ranking.scoring import HFScorer

    monkeypatch.setattr(models, "native_bf16", lambda: native)
    want = torch.bfloat16 if native else torch.float32
    scorer = HFScorer(str(tiny_llama))
    assert scorer.dtype == ("bfloat16" if native else "float32")
    assert {p.dtype for p in scorer.model.parameters()} == {want}
