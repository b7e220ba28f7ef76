"""Bucketed safetensors blobs: round trip, size limits, tied tensors."""

import pytest
import torch

from mllmrec_ray.rl.weights import from_bucket, to_buckets


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(10, 10, generator=g)),  # 400 bytes
        ("b", torch.randn(5, generator=g).to(torch.bfloat16)),  # 10 bytes
        ("big", torch.randn(300, generator=g)),  # 1200 bytes > bucket
        ("c", torch.arange(20, dtype=torch.int64)),  # 160 bytes
        ("d", torch.randn(3, 4, generator=g).t()),  # non-contiguous, 48 bytes
    ]


def test_round_trip_and_limits():
    named = _tensors()
    buckets = to_buckets(named, bucket_bytes=500)
    out: dict[str, torch.Tensor] = {}
    for blob in buckets:
        part = from_bucket(blob)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 500 or len(part) == 1  # only a lone oversize tensor may exceed
        assert not (out.keys() & part.keys())
        out.update(part)
    assert sorted(out) == sorted(n for n, _ in named)
    for name, t in named:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)
    # Buckets follow the input order (safetensors may reorder names inside one bucket).
    assert [sorted(from_bucket(b)) for b in buckets] == [["a", "b"], ["big"], ["c", "d"]]


def test_one_bucket_when_large_and_tied_tensors():
    emb = torch.randn(8, 4)
    buckets = to_buckets([("embed.weight", emb), ("lm_head.weight", emb)], bucket_bytes=1 << 20)
    assert len(buckets) == 1
    out = from_bucket(buckets[0])
    assert torch.equal(out["embed.weight"], emb) and torch.equal(out["lm_head.weight"], emb)


def test_bad_input():
    with pytest.raises(ValueError):
        to_buckets([("x", torch.zeros(1))], bucket_bytes=0)
    with pytest.raises(ValueError):
        to_buckets([("x", torch.zeros(1)), ("x", torch.zeros(1))], bucket_bytes=10)
    assert to_buckets([], bucket_bytes=10) == []
