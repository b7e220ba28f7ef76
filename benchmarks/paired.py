"""Paired bootstrap of A - B for any two evaluation records on the same split (common samples).

usage: python benchmarks/paired.py A.json B.json --data RUN/data [--json OUT]

Each record's rankings file (`<name>.rankings.parquet` beside it) is checked against the data's
targets and candidates (it must reproduce the record's metrics), then the per-sample metrics of
the samples both models ranked are resampled together (2,000 resamples, seed 0).
"""

import argparse
import json
from pathlib import Path

from mllmrec_ray.ranking.evaluation import check_rankings, load_split, rankings_path, read_rankings
from mllmrec_ray.ranking.metrics import paired_bootstrap_diff

METRICS = ("HR@3", "NDCG@3", "HR@5", "NDCG@5")


def load(path: str, data: str) -> tuple[dict, list, dict]:
    """(record, sample ids, per-sample metrics) of one evaluation record, its rankings checked against the data."""
    rec = json.loads(Path(path).read_text())
    samples = load_split(data, rec["split"], int(rec["candidates"]))[0]
    sids, rankings = read_rankings(rankings_path(path))
    return rec, sids, check_rankings(rec, sids, rankings, samples, source=path)


def bootstrap(label: str, split: str, metric: str, a, b) -> dict:
    """`paired_bootstrap_diff` of two aligned per-sample arrays (2,000 resamples, seed 0), printed as one line."""
    d = paired_bootstrap_diff(a, b, n_resamples=2000, seed=0)
    star = "*" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else ""
    print(f"{label} ({split}, n={len(a)}) {metric}: {d['diff']:+.4f} [{d['ci95'][0]:.3f},{d['ci95'][1]:.3f}]{star}")
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--data", required=True, help="the prepared data dir both records were evaluated on")
    p.add_argument("--json", help="also write the differences here")
    args = p.parse_args()
    (ra, sa, va), (rb, sb, vb) = load(args.a, args.data), load(args.b, args.data)
    if (ra["split"], ra["candidates"]) != (rb["split"], rb["candidates"]):
        raise SystemExit(f"error: {args.a} and {args.b} are on different splits or candidate sets")
    where = {s: i for i, s in enumerate(sb)}
    common = [(i, where[s]) for i, s in enumerate(sa) if s in where]
    ia, ib = [i for i, _ in common], [j for _, j in common]
    rows = []
    for m in METRICS:
        if m in va and m in vb:
            d = bootstrap(f"{ra['model']} - {rb['model']}", ra["split"], m, va[m][ia], vb[m][ib])
            rows.append({"a": ra["model"], "b": rb["model"], "split": ra["split"], "n": len(common), "metric": m, **d})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
