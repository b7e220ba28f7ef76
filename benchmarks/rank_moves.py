"""Where one model moves the target against another, sample by sample, from saved rankings.

Usage: python benchmarks/rank_moves.py DATA_DIR SPLIT A.rankings.parquet B.rankings.parquet [--candidates 10]

Prints how many samples A ranks the target higher than B ("up"), lower ("down") or the same, by B's rank
of the target, and the two-sided exact sign test over the samples that moved. @K metrics only see moves
that cross rank K; this shows the moves they miss (e.g. GRPO vs SFT, where most moves happen below rank 3). Also
how often the two share their first choice and their top-3 set, and each one's HR@1.
"""

from __future__ import annotations

import argparse
import sys
from math import comb
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read(path: str) -> dict:
    """sample_id -> ranking (candidate ids as strings, best first)."""
    from mllmrec_ray.ranking.evaluation import read_rankings

    ids, rankings = read_rankings(path)
    return {i: [str(x) for x in r] for i, r in zip(ids, rankings)}


def sign_test(up: int, down: int) -> float:
    """Two-sided exact binomial p of a split at least as uneven as up:down under p = 1/2."""
    n, k = up + down, max(up, down)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k, n + 1)) / 2 ** n) if n else 1.0


def main() -> int:
    from mllmrec_ray.ranking.evaluation import load_split

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("split")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--candidates", type=int, default=10)
    args = p.parse_args()
    samples, _ = load_split(args.data, args.split, args.candidates)
    targets = dict(zip(samples.sample_id, samples.target))
    ra, rb = read(args.a), read(args.b)
    common = [i for i in ra if i in rb]
    a = {i: ra[i].index(str(targets[i])) + 1 for i in common}
    b = {i: rb[i].index(str(targets[i])) + 1 for i in common}
    up = sum(a[i] < b[i] for i in common)
    down = sum(a[i] > b[i] for i in common)
    print(f"{args.split}, n = {len(common)}: A ranks the target higher in {up}, lower in {down}, the same in "
          f"{len(common) - up - down}; sign test p = {sign_test(up, down):.3f} (two-sided)")
    for r in range(1, 6):
        rows = [i for i in common if (b[i] == r if r < 5 else b[i] >= 5)]
        print(f"  B's rank {r if r < 5 else '5+'}: up {sum(a[i] < b[i] for i in rows)}, "
              f"same {sum(a[i] == b[i] for i in rows)}, down {sum(a[i] > b[i] for i in rows)}")
    # Where the two agree: one model can copy another's first choice and still order the rest differently.
    n = max(len(common), 1)
    print(f"  same first choice in {sum(ra[i][0] == rb[i][0] for i in common) / n:.2f} of samples, same top-3 set "
          f"in {sum(set(ra[i][:3]) == set(rb[i][:3]) for i in common) / n:.2f}; HR@1 A {sum(a[i] == 1 for i in common) / n:.3f}, "
          f"B {sum(b[i] == 1 for i in common) / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
