"""What every stage entrypoint shares: joining or starting the Ray cluster, the `--config` /
`--set` options and their validation, and the checks of input and output paths.

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


# ----------------------------------------------------------------------------- config and failures


class CommandError(Exception):
    """A failure the user can fix (a bad or missing path, an unusable option value). The CLI prints
    `error: <message>` as one line and exits 2; raise it before anything is written."""


def add_config_arguments(parser) -> None:
    """`--config` / `--set` of every stage that reads the pipeline config (jobs.cli adds
    them to each such stage; a stage that declares its own `--config` keeps it)."""
    options = getattr(parser, "_option_string_actions", {})
    if "--config" not in options:
        parser.add_argument("--config",
                            help="pipeline YAML (default: the built-in defaults of mllmrec_ray.config)")
    if "--set" not in options:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="config override, repeatable, e.g. --set sft.lr=1e-5 (validated like the YAML)")


def stage_config(args, flags: dict[str, str] | None = None, path=..., defaults: dict | None = None):
    """The validated config of a stage: `--config` (or `path`), then every `--set`, then the stage's
    own flags given on the command line (`flags`: argparse dest -> dotted key, e.g.
    {"steps": "grpo.steps"}), each checked like a YAML value. Raises ConfigError naming the key.

    defaults: dotted key -> value, the stage's own defaults where they differ from the config
    classes' (e.g. {"data.seed": 0}); used only without a config file, under the `--set`s, so a
    command keeps its historical defaults unless a config is given."""
    import json

    from mllmrec_ray.config import load_config, set_value

    config = getattr(args, "config", None) if path is ... else path
    overrides = list(getattr(args, "set", None) or [])
    if config is None and defaults:
        overrides = [f"{key}={json.dumps(value)}" for key, value in defaults.items()] + overrides
    cfg = load_config(config, overrides)
    for dest, key in (flags or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            set_value(cfg, key, value, source=f"--{dest.replace('_', '-')} {value}")
    return cfg


def check_input(path, what: str, kind: str = "file") -> Path:
    """An input that must exist: `kind` "file" or "dir"; CommandError names the option and the path."""
    p = Path(path)
    if not p.exists():
        raise CommandError(f"{what} {p}: not found")
    if kind == "dir" and not p.is_dir():
        raise CommandError(f"{what} {p}: not a directory")
    if kind == "file" and not p.is_file():
        raise CommandError(f"{what} {p}: not a file")
    return p


def check_output_dir(path, what: str) -> Path:
    """An output directory this command will create or fill: not an existing file, and its nearest
    existing ancestor writable. Checked before any work, so a bad path fails with nothing written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CommandError(f"{what} {p}: exists and is not a directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{what} {p}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{what} {p}: {parent} is not writable")
    return p
