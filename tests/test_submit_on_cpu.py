"""`mllmrec submit` / `mllmrec jobs` against a real Ray head started with `ray start --head`.

The head listens on 127.0.0.1 with its own temp dir, ports and auth token (token
auth on, token in RAY_AUTH_TOKEN, so ~/.ray is never touched). It is stopped by
signalling the `ray start --block` process this test started, and then any process
whose command line names this test's temp dir (so only what the test started).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_fixture_dataset(folder: Path, users: int = 20, items: int = 30, per_user: int = 12) -> Path:
    """A small interactions.csv + items.csv (csv format of `mllmrec data prepare`)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user,item,timestamp"]
    for u in range(users):
        for k in range(per_user):
            lines.append(f"u{u},{(u * 7 + k * 3) % items},{1_000_000 + u * 100 + k}")
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    (folder / "items.csv").write_text("item,title\n" + "".join(f"{i},Movie number {i}\n" for i in range(items)))
    return folder


def pids_naming(text: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(proc.name))
            except OSError:
                pass
    return [p for p in out if p != os.getpid()]


@pytest.fixture(scope="module")
def head():
    # short path: Ray's unix sockets live under the temp dir (108-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="mrt", dir="/tmp")
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = free_ports(9)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--object-store-memory=200000000",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run([str(BIN / "mllmrec"), "jobs", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not come up: {r.stderr[-2000:]}\n"
                                   f"{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 20
        while pids_naming(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in pids_naming(temp_dir):  # stragglers of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def mllmrec(env, *args, timeout=300):
    return subprocess.run([str(BIN / "mllmrec"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_submit_data_prepare_succeeds(head, tmp_path):
    address, env = head
    src = write_fixture_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    r = mllmrec(env, "submit", "data", "prepare", "--format", "csv", "--path", src, "--out", out,
                "--negatives-large", "0", "--name", "fixture", "--address", address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    assert "loading csv data" in r.stdout  # the job's own log lines were streamed
    for name in ("items.parquet", "interactions.parquet", "samples.parquet", "manifest.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.dumps(manifest).count("fixture") >= 1

    import pyarrow.parquet as pq

    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(samples) == 20 and all(len(s["candidates"]) == 10 for s in samples)

    job_id = next(line.split()[3] for line in r.stdout.splitlines() if line.startswith("[mllmrec submit] job "))
    status = mllmrec(env, "jobs", "status", job_id, "--address", address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = mllmrec(env, "jobs", "logs", job_id, "--address", address)
    assert logs.returncode == 0 and "loading csv data" in logs.stdout
    listing = mllmrec(env, "jobs", "list", "--address", address)
    assert job_id in listing.stdout and "data" in listing.stdout


def test_failed_job_exit_code_and_no_wait(head, tmp_path):
    address, env = head
    r = mllmrec(env, "submit", "data", "prepare", "--format", "csv", "--path", tmp_path / "missing",
                "--out", tmp_path / "o", "--address", address, "--no-wait")
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.strip().splitlines()[-1]
    f = mllmrec(env, "jobs", "logs", job_id, "--follow", "--address", address)
    assert f.returncode == 1, f.stdout[-2000:] + f.stderr[-2000:]
    s = mllmrec(env, "jobs", "status", job_id, "--address", address)
    assert s.returncode == 1 and "FAILED" in s.stdout


def test_config_travels_with_the_job(head, tmp_path):
    """The resolved config (overlay merged) reaches the job as a --config file."""
    address, env = head
    report = tmp_path / "seen.json"
    fake_python = tmp_path / "fakepy"
    # stands in for the venv python: records the argv and the config file the job received
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, sys\nfrom mllmrec_ray.config import load_config\n"
        "argv = sys.argv[1:]\ncfg = load_config(argv[argv.index('--config') + 1])\n"
        f"json.dump({{'argv': argv, 'name': cfg.name, 'steps': cfg.grpo.steps}}, open({str(report)!r}, 'w'))\n")
    fake_python.chmod(0o755)
    r = mllmrec(env, "submit", "grpo", "--config", REPO / "configs" / "ablations" / "wo-grpo.yaml",
                "--python", fake_python, "--steps", "1", "--address", address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = json.loads(report.read_text())
    assert seen["argv"][:3] == ["-m", "jobs.cli", "grpo"]
    assert seen["argv"][-2:] == ["--steps", "1"]
    assert seen["name"] == "ablation-wo-grpo" and seen["steps"] == 0


def test_bad_config_or_stage_fails_before_submitting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: {stepz: 3}\n")
    env = dict(os.environ)
    r = mllmrec(env, "submit", "pipeline", "--config", bad, "--address", "http://127.0.0.1:9")
    assert r.returncode == 2 and "grpo.stepz" in r.stderr
    r = mllmrec(env, "submit", "jobs", "--address", "http://127.0.0.1:9")
    assert r.returncode == 2 and "allowed stages" in r.stderr


def test_pipeline_dry_run_as_a_job(head, tmp_path):
    """The pipeline entrypoint itself, submitted with the quickstart config and an override."""
    address, env = head
    r = mllmrec(env, "submit", "pipeline", "--config", "configs/quickstart.yaml", "--dry-run",
                "--set", f"runs_dir={tmp_path}", "--address", address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "prepare: run (output missing)" in r.stdout and "report: run (" in r.stdout and "SUCCEEDED" in r.stdout
    assert not (tmp_path / "quickstart").exists()  # --dry-run writes nothing, not even config.yaml
