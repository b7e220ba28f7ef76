"""Weights as bytes: bucketed safetensors blobs for the learner -> rollout sync.

One bucket is one safetensors file in memory, so it needs no pickle, carries
dtypes and shapes, and loads into a dict of tensors on the receiving side.
Buckets bound the size of one message (object store entry or broadcast).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def to_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[bytes]:
    """Pack (name, tensor) pairs into safetensors blobs of at most `bucket_bytes` of tensor data each.

    A single tensor larger than `bucket_bytes` gets a bucket of its own (tensors are never split).
    Buckets follow the input order (names inside one bucket may come back reordered); names must be unique. Tensors are detached and copied to contiguous CPU memory.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[bytes] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[str] = set()
    storages: set[int] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        t = tensor.detach().to("cpu").contiguous()
        n = _tensor_bytes(t)
        if current and size + n > bucket_bytes:
            buckets.append(_st_save(current))
            current, size, storages = {}, 0, set()
        # safetensors refuses tensors sharing memory (tied embeddings): copy the second one.
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        current[name] = t
        size += n
    if current:
        buckets.append(_st_save(current))
    return buckets


def from_bucket(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of one `to_buckets` entry: name -> tensor (CPU)."""
    return _st_load(bytes(data))
