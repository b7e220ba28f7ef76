"""Kill `mllmrec cot` midway (SIGKILL, no clean-up), rerun it: finished rows are kept byte for byte and
only the missing ones reach the engine; a third run generates nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from stage1_fixtures import REPO, kill_pids, long_context, make_data_dir, mllmrec, ray_pids_under

CONFIG = """\
ray_num_cpus: 8
model:
  engine: {kv_cache_gib: 0.25, max_model_len: 1024}
stage1:
  pool_size: 1
  batch_size: 1
  max_cot_samples: 16
  resources: {num_cpus: 0.5}
"""


def generated(stdout: str) -> dict[str, tuple[int, int]]:
    return {step: (int(a), int(b)) for step, a, b in
            re.findall(r"^\[(\w+)\] \d+ rows, (\d+) already finished, (\d+) to generate", stdout, re.M)}


def test_kill_midway_and_rerun(tmp_path):
    from tiny_models import make_tiny_model

    model = long_context(make_tiny_model(tmp_path / "tiny", "llama"))
    data = make_data_dir(tmp_path, users=30)
    stage1 = tmp_path / "stage1"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    mllmrec("textualize", "--data", data, "--out", stage1, "--config", cfg)
    args = ["cot", "--data", data, "--stage1", stage1, "--config", cfg, "--model", model, "--max-new-tokens", "48",
            "--max-model-len", "8192", "--judge-samples", "0"]

    parts = stage1 / "parts" / "pseudo"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray puts unix sockets under it
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None and len(list(parts.glob("part-*.parquet"))) < 2:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        time.sleep(1)
        kill_pids(ray_pids_under(ray_tmp))  # that run's Ray processes outside its process group
        shutil.rmtree(ray_tmp, ignore_errors=True)

    kept = {p.name: p.read_bytes() for p in parts.glob("part-*.parquet")}
    n_kept = sum(pq.read_table(parts / name).num_rows for name in kept)
    assert 2 <= n_kept < 16, n_kept
    assert not (stage1 / "cot.parquet").exists()
    assert not list((stage1 / "parts" / "refined").glob("part-*"))  # refinement never started

    rerun = mllmrec(*args)
    assert generated(rerun.stdout) == {"pseudo": (n_kept, 16 - n_kept), "refined": (0, 16)}
    assert re.search(rf"^\[pseudo\] {16 - n_kept}/{16 - n_kept} rows finished", rerun.stdout, re.M)
    for name, blob in kept.items():  # nothing finished was recomputed or rewritten
        assert (parts / name).read_bytes() == blob
    cot = pq.read_table(stage1 / "cot.parquet").to_pylist()
    assert len(cot) == 16 and all(r["pseudo_cot"] is not None for r in cot)

    third = mllmrec(*args)
    assert generated(third.stdout) == {"pseudo": (16, 0), "refined": (16, 0)}
    assert "to generate" in third.stdout and "rows finished" not in third.stdout  # no engine was started
    assert pq.read_table(stage1 / "cot.parquet").to_pylist() == cot
