"""Trivial rankers that expose shortcuts: a seeded random order and smallest item id first.

Random is the chance level; smallest-id first shows how much a ranker can get from
the id digits alone (ML-100K ids track popularity, SPEC section 10).
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

_NUMERIC = re.compile(r"\d+")


def rank_random(candidates: Sequence[str], seed: int, key: str = "") -> list[str]:
    """A uniform random permutation of `candidates`, fixed by (`seed`, `key`).

    `key` (the sample id) seeds each sample on its own, so a sample's order does not
    depend on which other samples are ranked or in what order.
    """
    rng = np.random.default_rng([int(seed), zlib.crc32(str(key).encode("utf-8"))])
    return [candidates[i] for i in rng.permutation(len(candidates))]


def rank_min_id(candidates: Sequence[str]) -> list[str]:
    """Smallest numeric item id first; non-numeric ids after them, in text order."""

    def key(item: str) -> tuple[int, int, str]:
        s = str(item)
        # text order on ties ("7" vs "007") keeps the result deterministic
        return (0, int(s), s) if _NUMERIC.fullmatch(s) else (1, 0, s)

    return sorted(candidates, key=key)
