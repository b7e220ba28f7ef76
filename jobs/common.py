"""What every stage entrypoint shares: joining or starting the Ray cluster.

A local cluster this project starts listens on the loopback only (`start_local_ray`):
node IP 127.0.0.1, so GCS, raylet, object manager, dashboard agent, runtime-env agent and
every worker bind 127.0.0.1 instead of all interfaces. Ray 2.60 resolves a node IP of
127.0.0.1 to the machine's routable address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(the single-machine mode Ray uses on macOS and Windows), so that variable is set too, for
this process and every process it starts; a process joining a 127.0.0.1 cluster needs it
as well (`use_loopback_if_local`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = "127.0.0.1"
# Ray's single-machine mode: the node IP stays the loopback (ray._private.ray_constants)
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def is_local_address(address: str | None) -> bool:
    """No address / `local` (a private cluster is started) or a loopback host."""
    if not address or address == "local":
        return True
    if address == "auto":
        return False
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return host in _LOOPBACK_HOSTS


def bind_to_loopback() -> None:
    """Make the Ray nodes this process starts or joins use 127.0.0.1 as their IP."""
    os.environ[LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray already imported: the constant was read at import time
        constants.ENABLE_RAY_CLUSTER = False


def _recorded_cluster() -> str | None:
    """The head a `ray start` on this machine recorded (ray.init(address=None) joins it)."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def use_loopback_if_local(address: str | None) -> None:
    """Before any ray.init: bind to the loopback when the cluster is local (started here, or
    a 127.0.0.1 one). A real cluster's address is left alone (its nodes use their own IPs), and
    so is no address when a `ray start` head on a routable IP is recorded (Ray would join it)."""
    if address is None:
        recorded = _recorded_cluster()
        if recorded and not is_local_address(recorded):
            return
    if is_local_address(address):
        bind_to_loopback()


def start_local_ray(num_cpus: int | float | None = None, **kwargs):
    """Start a private local Ray cluster bound to 127.0.0.1; returns ray.init's context.

    num_cpus: logical CPUs (None: Ray's default, the machine's cores).

    address="local": never join a stranger's head recorded in /tmp/ray. No dashboard by
    default; a dashboard asked for (include_dashboard=True) also listens on 127.0.0.1.
    """
    bind_to_loopback()
    import ray

    kwargs.setdefault("include_dashboard", False)
    return ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK,
                    dashboard_host=LOOPBACK, **kwargs)


def init_ray(num_cpus: int | float | None = None):
    """Join the cluster named by RAY_ADDRESS (a Ray Job, or `mllmrec pipeline`'s local head),
    else start a local one with `num_cpus` logical CPUs (more than the 2 physical cores is
    fine and needed: Ray Data LLM stages and actor pools each hold a fractional CPU)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        use_loopback_if_local(address)
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(num_cpus or 8, log_to_driver=True)
    return ray
