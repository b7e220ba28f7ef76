"""What every stage entrypoint shares: joining or starting the Ray cluster."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | float | None = None):
    """Join the cluster named by RAY_ADDRESS (a Ray Job, or `mllmrec pipeline`'s local head),
    else start a local one with `num_cpus` logical CPUs (more than the 2 physical cores is
    fine and needed: Ray Data LLM stages and actor pools each hold a fractional CPU)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": never join a stranger's head recorded in /tmp/ray
        ray.init(address="local", num_cpus=num_cpus or 8, include_dashboard=False, log_to_driver=True)
    return ray
