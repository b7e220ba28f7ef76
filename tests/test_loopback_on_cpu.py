"""The local Ray cluster this project starts listens on 127.0.0.1 only.

A driver process starts the cluster with the project's own helper (`jobs.common.start_local_ray`,
what `mllmrec pipeline`, `mllmrec serve` and every stage use), runs a task and an actor, lets a
second process join it the way `mllmrec pipeline` runs its stages (RAY_ADDRESS + `init_ray`),
and starts Ray Serve on the configured default host. While all of that is up, the test lists
every listening TCP socket of the driver and of every process it started (GCS, raylet,
dashboard agent, runtime-env agent, workers, Serve proxy, the joining process) and fails on any
that is not bound to the loopback. It stops only what it started: the driver shuts its cluster
down, and any process left over from the listed set is killed by pid.

The one exception Ray 2.60 leaves no option for (README, "Network exposure"): every Serve replica
opens an inter-deployment gRPC server on `[::]:0` (hard-coded in ray/serve/_private/replica.py;
Ray's token-auth interceptor guards it). The test allows exactly that: one wildcard socket per
`ray::ServeReplica` process, nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parent.parent

JOINER = r"""
import os, sys
from jobs.common import init_ray
ray = init_ray()

@ray.remote(num_cpus=0)
def pid():
    return os.getpid()

print("joined", ray.get(pid.remote()), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

DRIVER = r"""
import json, logging, os, subprocess, sys
from jobs.common import start_local_ray
from mllmrec_ray.config import PipelineConfig

port = int(sys.argv[1])
ctx = start_local_ray(2, log_to_driver=False, logging_level=logging.ERROR, object_store_memory=100_000_000)
import ray
from ray import serve

@ray.remote(num_cpus=0)
def task():
    return os.getpid()

@ray.remote(num_cpus=0)
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
pids = [ray.get(task.remote()), ray.get(actor.pid.remote())]
env = dict(os.environ, RAY_ADDRESS=ctx.address_info["address"])
joiner = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
joined = ""
for line in joiner.stdout:  # Ray's own INFO lines come first
    if line.startswith("joined "):
        joined = line.strip()
        break

@serve.deployment(ray_actor_options={"num_cpus": 0})
def hello(request):
    return "ok"

serve.start(http_options={"host": PipelineConfig().serve.host, "port": port})
serve.run(hello.bind(), name="loopback", route_prefix="/")
print(json.dumps({"address": ctx.address_info["address"], "pids": pids, "joined": joined,
                  "joiner": joiner.pid}), flush=True)
sys.stdin.readline()  # the test lists the sockets now
joiner.stdin.write("\n"); joiner.stdin.flush(); joiner.wait(timeout=60)
serve.shutdown()
ray.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60: `add_port_to_grpc_server(self._server, "[::]:0")` in the replica, no setting
REPLICA_PROCESS = "ray::ServeReplica"


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listeners(root: psutil.Process) -> list[tuple[int, str, str, int]]:
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(p.cmdline()[:2])[-80:] or p.name()
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, name, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass  # a worker that exited meanwhile
    return out


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_which_addresses_get_the_loopback_node_ip(monkeypatch, tmp_path):
    from jobs import common

    assert all(map(common.is_local_address, (None, "local", "127.0.0.1:6379", "localhost:1", "http://127.0.0.1:8265")))
    assert not any(map(common.is_local_address, ("10.0.0.5:6379", "auto", "ray://head:10001")))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(common, "bind_to_loopback", lambda: calls.append(1))
    common.use_loopback_if_local("10.0.0.5:6379")  # a real cluster: its nodes keep their IPs
    assert calls == []
    common.use_loopback_if_local("127.0.0.1:6379")
    common.use_loopback_if_local(None)  # a private cluster will be started
    assert calls == [1, 1]
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379\n")
    common.use_loopback_if_local(None)  # ray.init(address=None) joins that recorded head
    assert calls == [1, 1]
    common.use_loopback_if_local("local")  # never joins it
    assert calls == [1, 1, 1]


def test_local_cluster_listens_on_loopback_only():
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}  # as on a fresh shell
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = str(REPO)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(port), JOINER], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    try:
        line = driver.stdout.readline()
        if not line:
            pytest.fail(f"driver failed: {driver.stderr.read()[-3000:]}")
        info = json.loads(line)
        assert info["address"].startswith("127.0.0.1:"), info
        assert info["joined"].startswith("joined "), info
        root = psutil.Process(driver.pid)
        time.sleep(1)  # sockets of workers that just started
        found = listeners(root)
        for p in [root, *root.children(recursive=True)]:
            try:
                seen[p.pid] = p.create_time()
            except psutil.Error:
                pass
        assert found, "no listening socket found at all: the listing is broken"
        pids = {pid for pid, *_ in found}
        assert info["joiner"] in {p.pid for p in root.children(recursive=True)}
        assert len(pids) >= 4, found  # gcs, raylet, agents, workers, the Serve proxy
        assert any(p == port for *_, p in found), f"Serve HTTP port {port} not listening: {found}"
        off = [f for f in found if not is_loopback(f[2])]
        replica = [f for f in off if f[1].startswith(REPLICA_PROCESS) and f[2] in ("::", "0.0.0.0")]
        bad = [f for f in off if f not in replica]
        assert not bad, "listening off the loopback:\n" + "\n".join(map(str, bad))
        # the documented exception: at most one inter-deployment gRPC socket per replica process
        assert len(replica) == len({f[0] for f in replica}) <= 1, replica
        driver.stdin.write("\n")
        driver.stdin.flush()
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        deadline = time.monotonic() + 20
        for pid, created in seen.items():  # leftovers of this test's cluster only (same pid, same start)
            try:
                p = psutil.Process(pid)
                if p.create_time() != created:
                    continue
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                p.kill()
