"""How far the prompt's printed evidence alone can rank: a conditional logit over the evidence levels.

Usage: python benchmarks/evidence_ranker.py DATA_DIR --config RUN/config.yaml --out DIR [--train-windows 5000]
       [--item-bias]

Every prompt prints, per candidate, a popularity level, a follows level and (with `prompt.collab_seq`) the
candidate's rank under a cross-fitted SASRec. An LLM that only reads that evidence cannot rank better than the
best function of it. This fits one (score = w_pop[level] + w_fol[level] + w_rank[rank], a softmax over the
candidates) on a random subset of the training windows, with exactly the levels and ranks those windows'
prompts print (the user's own interactions left out, ranks from the fold model that never saw the user),
and writes for the valid and test splits an evaluation record and its rankings (`evidence-logit`), and
the same for ordering by the printed ranks alone (`printed-ranks`), so `benchmarks/paired.py` can pair them.
`--item-bias` adds a learned bias per candidate item (`evidence-item-logit`): a stand-in for the item priors an
LLM could pick up from ids and titles over the training windows.
Nothing is chosen on test: the fit sees training windows only and has no setting to tune.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(stats, row: dict) -> tuple[list[str], list[tuple[int, int, int]]]:
    """(candidates, (pop level, fol level, printed rank) per candidate) exactly as the row's prompt prints them."""
    hist = [str(h) for h in row["history"]]
    cands = [str(c) for c in row["candidates"]]
    levels = stats.levels_of(stats.counts(hist, cands, row["user_id"]))
    ranks = stats.seq.ranks(hist, cands, row["user_id"]) if stats.seq is not None else [0] * len(cands)
    return cands, [(p, f, r) for (p, f), r in zip(levels, ranks)]


def scores(weights, feats):
    """Sum over the feature columns of each column's weight at the candidate's value."""
    return sum(w[feats[..., k]] for k, w in enumerate(weights))


def fit(rows: list[tuple[list, int]], sizes: list[int], steps: int = 300):
    """Weights of the conditional logit by full-batch L-BFGS (a convex problem), MAP under a N(0, 1) prior on
    each weight: the L2 term is scaled by the window count, as the loss is a mean over windows."""
    import torch

    feats = torch.tensor([f for f, _ in rows])            # (windows, candidates, columns)
    target = torch.tensor([t for _, t in rows])
    weights = [torch.zeros(n, requires_grad=True) for n in sizes]
    opt = torch.optim.LBFGS(weights, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        l2 = sum((w ** 2).sum() for w in weights) / (2 * len(rows))
        loss = torch.nn.functional.cross_entropy(scores(weights, feats), target) + l2
        loss.backward()
        return loss

    opt.step(closure)
    return [w.detach() for w in weights]


def main() -> int:
    import torch

    from mllmrec_ray.config import load_config
    from mllmrec_ray.data.run_data import load_collab
    from mllmrec_ray.ranking.evaluation import load_split, make_record, rankings_path, write_rankings, write_record

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--config", required=True, help="the run's config (its prompt section sets the evidence)")
    p.add_argument("--out", type=Path, required=True, help="folder for <split>/<name>.json + rankings")
    p.add_argument("--train-windows", type=int, default=5000, help="random training windows to fit on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--item-bias", action="store_true", help="add a learned bias per candidate item")
    args = p.parse_args()
    cfg = load_config(args.config)
    stats = load_collab(args.data, cfg.prompt)
    if stats is None:
        raise SystemExit(f"{args.config}: prompt.collab is off, so the prompts print no evidence")
    n = cfg.prompt.n_candidates
    train, _ = load_split(args.data, "train", n)
    rows = train.to_dict("records")
    random.Random(args.seed).shuffle(rows)
    item_index = {c: i + 1 for i, c in enumerate(sorted({str(c) for r in rows for c in r["candidates"]}))}

    def encode(row: dict) -> tuple[list[str], list[tuple]]:
        cands, f = features(stats, row)
        if args.item_bias:  # 0: an item no training window offers as a candidate
            f = [x + (item_index.get(c, 0),) for x, c in zip(f, cands)]
        return cands, f

    data = []
    for row in rows[: args.train_windows]:
        cands, f = encode(row)
        data.append((f, cands.index(str(row["target"]))))
    # rank 0: no history item known to the sequence model
    sizes = [stats.levels + 1, stats.levels, n + 1] + ([len(item_index) + 1] if args.item_bias else [])
    w = fit(data, sizes)
    name = "evidence-item-logit" if args.item_bias else "evidence-logit"
    weights = {"pop": w[0].tolist(), "fol": w[1].tolist(), "rank": w[2].tolist(), "train_windows": len(data)}
    print(f"{name} weights (pop levels 0..{stats.levels}, fol levels 0..{stats.levels - 1}, printed rank 0..{n}):")
    for k in ("pop", "fol", "rank"):
        print(f"  {k}: " + " ".join(f"{v:+.2f}" for v in weights[k]))
    dataset = json.loads((Path(args.data) / "manifest.json").read_text()).get("dataset", "")
    for split in ("valid", "test"):
        samples, _ = load_split(args.data, split, n)
        ids, logit_rank, printed = [], [], []
        for row in samples.to_dict("records"):
            cands, f = encode(row)
            score = scores(w, torch.tensor(f)).tolist()
            ids.append(row["sample_id"])
            logit_rank.append([cands[i] for i in sorted(range(n), key=lambda i: -score[i])])  # stable: ties keep list order
            printed.append([cands[i] for i in sorted(range(n), key=lambda i: f[i][2] or n + 1)])
        targets = [str(t) for t in samples["target"]]
        for model, rankings in ((name, logit_rank), ("printed-ranks", printed)):
            rec = make_record(model, dataset, split, n, rankings, targets,
                              extra={"fit": weights} if model == name else None)
            path = write_record(args.out / split / f"{model}.json", rec)
            write_rankings(rankings_path(path), ids, rankings)
            print(f"{split} {model}: HR@3 {rec['HR@3']:.4f} NDCG@3 {rec['NDCG@3']:.4f} (n = {rec['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
