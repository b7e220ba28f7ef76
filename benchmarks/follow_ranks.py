"""How far each model's saved rankings follow the sequence-model ranks its prompts print (`prompt.collab_seq`).

Usage: python benchmarks/follow_ranks.py DATA_DIR SPLIT NAME=A.rankings.parquet [NAME=B.rankings.parquet ...]

Per model: NDCG@3 of its top 3 against the printed ranks (graded 3/2/1, the reward of `grpo.rank_teacher`),
how often its first choice is the rank-1 candidate and its top-3 set the ranks 1-3. Also the NDCG@3 that
ordering by the printed ranks alone reaches on the split: what a model that copied them would score.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from mllmrec_ray.data.run_data import load_seq_evidence
    from mllmrec_ray.ranking.evaluation import load_split, read_rankings
    from mllmrec_ray.rl.listwise import teacher_ndcg_reward

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("split")
    p.add_argument("models", nargs="+", help="NAME=PATH of a rankings parquet")
    args = p.parse_args()
    ev = load_seq_evidence(args.data)
    samples, _ = load_split(args.data, args.split)
    ranks, ndcg = {}, 0.0
    for s in samples.itertuples():
        cands = [str(c) for c in s.candidates]
        ranks[s.sample_id] = (cands, ev.ranks([str(h) for h in s.history], cands, s.user_id))
        order = sorted(cands, key=lambda c: (ranks[s.sample_id][1][cands.index(c)] or len(cands) + 1))
        place = order.index(str(s.target))
        ndcg += 1 / math.log2(place + 2) if place < 3 else 0.0
    print(f"{args.split}, n = {len(samples)}: ordering by the printed ranks alone: NDCG@3 {ndcg / len(samples):.3f}")
    for spec in args.models:
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"{spec!r}: give NAME=PATH")
        ids, rankings = read_rankings(path)
        agree, first, top3 = 0.0, 0, 0
        for sid, ranking in zip(ids, rankings):
            cands, r = ranks[sid]
            top = [str(c) for c in list(ranking)[:3]]
            agree += float(teacher_ndcg_reward(torch.tensor([[cands.index(c) for c in top]]), torch.tensor(r))[0])
            first += r[cands.index(top[0])] == 1
            top3 += sorted(r[cands.index(c)] for c in top) == [1, 2, 3]
        n = max(len(ids), 1)
        print(f"  {name}: NDCG@3 against the printed ranks {agree / n:.3f}; first choice = rank 1 in {first / n:.2f}, "
              f"top-3 set = ranks 1-3 in {top3 / n:.2f} (n = {len(ids)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
