"""Learner -> rollout weight sync: one function, `sync_weights`, over these transports.

- `lora` (adapter only; what `auto` picks when the rollout engines run vLLM's LoRA): the rollout
  engines keep the base weights they started with, frozen; the learner's `export_adapter()`
  returns the LoRA A/B tensors (safetensors buckets + adapter_config); its ObjectRef goes to every
  rollout actor's `update_adapter`, which loads it as a new adapter version. The bytes are the
  adapter's (~1-4% of the model's), and no update is lost to rounding a merged bf16 weight.
- Merged weights (the fallback for engines without LoRA):
  - `object_store` (`auto` on CPU without LoRA): the learner's `export_weights(full)` returns
    safetensors buckets (list[bytes]); its ObjectRef goes to every rollout actor's
    `update_weights` as a top-level argument, so Ray resolves it from the object store.
  - `gloo` / `nccl` (collective; `auto` on GPU without LoRA): the learner broadcasts the same
    buckets over a process group made of the learner (rank 0) and every rollout actor (ranks 1..N).

Why not `ray.util.collective` for gloo: in Ray 2.60 its gloo group is torch's *default*
process group, and both a vLLM engine running in-process and a DeepSpeed learner have
already initialised that group (world size 1), so `init_collective_group` fails with
"the new group's world size should be less or equal to the world size set by
init_process_group". We build a standalone torch c10d group (`ProcessGroupGloo` /
`ProcessGroupNCCL` over its own TCPStore), which leaves the default group alone.

What the learner must provide (inherit `WeightSenderMixin`):
  `export_adapter() -> {"buckets": list[bytes], "config": dict}` for `lora`: the PEFT-named A/B
  tensors and the adapter_config.json of an adapter over the base the rollout engines hold.
  `export_weights(full: bool) -> list[bytes]`: buckets from `mllmrec_ray.rl.weights.to_buckets`
  of the merged policy with Hugging Face parameter names (LoRA merged in, no `base_layer`
  names), preferably in the engine dtype (bf16 halves the bytes; the engine casts anyway).
  `full=True` sends every tensor; `full=False` may send a subset, but every vLLM fused layer
  must be complete (q/k/v together, gate/up together) - other layers keep their weights.
"""

from __future__ import annotations

import datetime
import socket
import time
import uuid
import warnings

import ray
import torch

TRANSPORTS = ("auto", "lora", "object_store", "gloo", "nccl")


class _WeightGroupMixin:
    """A broadcast group of the learner (rank 0) and the rollout actors, independent of torch's default group."""

    _weight_pg = None
    _weight_store = None
    _weight_device = "cpu"
    _weight_group_id = None

    def weight_group_id(self) -> tuple[str, int] | None:
        """(group key, world size) of the current group, None without one."""
        return self._weight_group_id

    def init_weight_group(self, address: tuple[str, int], world_size: int, rank: int, backend: str,
                          key: str, timeout_s: float = 1800.0) -> bool:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        # Rank 0 hosts the store; keep a reference so it outlives this call.
        self._weight_store = dist.TCPStore(address[0], address[1], world_size, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self._weight_pg = dist.ProcessGroupGloo(self._weight_store, rank, world_size, timeout)
            self._weight_device = "cpu"
        elif backend == "nccl":
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError("weight_transport nccl needs a CUDA build of torch; use object_store or gloo")
            self._weight_pg = dist.ProcessGroupNCCL(self._weight_store, rank, world_size)
            self._weight_device = f"cuda:{torch.cuda.current_device()}"
        else:
            raise ValueError(f"unknown collective backend {backend!r}; allowed: gloo, nccl")
        self._weight_group_id = (key, world_size)
        return True

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self._weight_device)
        self._weight_pg.broadcast(tensor, 0).wait()
        return tensor.cpu()


class WeightSenderMixin(_WeightGroupMixin):
    """For the learner actor; requires `self.export_weights(full: bool) -> list[bytes]`."""

    def weight_group_address(self) -> tuple[str, int]:
        """A free port on this node for the group's store (rank 0 lives here)."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def broadcast_weights(self, full: bool = True) -> dict:
        """Send the exported buckets: their count, their sizes, then each bucket as bytes."""
        t0 = time.perf_counter()
        buckets = self.export_weights(full)
        self._broadcast(torch.tensor([len(buckets)], dtype=torch.int64))
        self._broadcast(torch.tensor([len(b) for b in buckets], dtype=torch.int64))
        for blob in buckets:
            with warnings.catch_warnings():  # read-only buffer: the sender only reads it
                warnings.simplefilter("ignore")
                self._broadcast(torch.frombuffer(blob, dtype=torch.uint8))
        return {"seconds": time.perf_counter() - t0, "bytes": sum(map(len, buckets))}


class WeightReceiverMixin(_WeightGroupMixin):
    """For the rollout actor; requires `self.update_weights(buckets, version)`."""

    def receive_weights(self, version: int) -> dict:
        count = int(self._broadcast(torch.zeros(1, dtype=torch.int64))[0])
        sizes = self._broadcast(torch.zeros(count, dtype=torch.int64)).tolist()
        buckets = [self._broadcast(torch.empty(n, dtype=torch.uint8)).numpy().tobytes() for n in sizes]
        return self.update_weights(buckets, version)


def resolve_transport(transport: str, use_gpu: bool, lora: bool = False) -> str:
    """`auto` -> `lora` when the rollout engines take adapters (`lora`), else nccl on GPU and
    object_store on CPU; anything else is checked and returned."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {transport!r}; allowed: {', '.join(TRANSPORTS)}")
    if transport == "auto":
        return "lora" if lora else ("nccl" if use_gpu else "object_store")
    return transport


def sync_weights(learner, rollout_actors: list, transport: str, version: int, full: bool = True,
                 use_gpu: bool = False, lora: bool = False) -> dict:
    """Push the learner's current weights into every rollout actor; blocks until all have loaded them.

    `lora`: the rollout engines take adapters (what `auto` resolves with); `full` only matters to
    the merged transports. Returns `{"transport", "version", "seconds", "bytes", "load_s"}` (bytes:
    one copy; load_s: the slowest actor's engine load). A collective group is (re)built unless
    every member already shares one group of exactly these members (after an actor restart, or
    a sync of a subset of actors).
    """
    transport = resolve_transport(transport, use_gpu, lora)
    t0 = time.perf_counter()
    if transport == "lora":
        ref = learner.export_adapter.remote()
        results = ray.get([a.update_adapter.remote(ref, version) for a in rollout_actors])
        nbytes = results[0]["bytes"] if results else 0
    elif transport == "object_store":
        ref = learner.export_weights.remote(full)
        results = ray.get([a.update_weights.remote(ref, version) for a in rollout_actors])
        nbytes = results[0]["bytes"] if results else 0
    else:
        members = [learner, *rollout_actors]
        ids = ray.get([m.weight_group_id.remote() for m in members])
        if ids[0] is None or ids[0][1] != len(members) or any(i != ids[0] for i in ids):
            address = ray.get(learner.weight_group_address.remote())
            key = uuid.uuid4().hex
            ray.get([m.init_weight_group.remote(address, len(members), rank, transport, key)
                     for rank, m in enumerate(members)])
        sent = learner.broadcast_weights.remote(full)
        results = ray.get([a.receive_weights.remote(version) for a in rollout_actors])
        nbytes = ray.get(sent)["bytes"]
    return {"transport": transport, "version": version, "seconds": time.perf_counter() - t0,
            "bytes": nbytes, "load_s": max((r["seconds"] for r in results), default=0.0)}
