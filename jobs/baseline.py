"""`mllmrec baseline`: train a classic baseline on training users and score a split.

Usage: mllmrec baseline --data DIR --model pop|sasrec [--split test] [--candidates 10|100]
                        --out FILE.json [--seed N] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data dir (samples/items/interactions)")
    parser.add_argument("--model", required=True, choices=["pop", "sasrec"])
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--candidates", type=int, default=10, choices=[10, 100])
    parser.add_argument("--out", required=True, help="evaluation record JSON to write")
    parser.add_argument("--seed", type=int, default=0, help="training and bootstrap seed")
    parser.add_argument("--epochs", type=int, default=30,
                        help="SASRec max epochs (early stopping on valid usually ends sooner)")
    parser.add_argument("--max-seconds", type=float, default=170.0,
                        help="SASRec training time budget in seconds (0 = none); the record's "
                             "stopped_by says whether it cut training short")


def main(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from mllmrec_ray.evaluation import format_table, load_split, make_record, write_record

    data = Path(args.data)
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    dataset = manifest.get("dataset") or data.resolve().name

    # Only training users ever reach a baseline's fit: valid/test users are unseen.
    train_users = set(pq.read_table(data / "samples.parquet", columns=["user_id"],
                                    filters=[("split", "==", "train")]).column("user_id").to_pylist())
    interactions = pq.read_table(data / "interactions.parquet").to_pandas()
    samples, items = load_split(data, args.split, args.candidates)

    t0 = time.perf_counter()
    extra: dict = {"seed": args.seed}
    if args.model == "pop":
        from mllmrec_ray.baselines.popularity import fit_popularity, rank_by_popularity

        counts = fit_popularity(interactions, train_users)
        rankings = [rank_by_popularity(counts, c) for c in samples["candidates"]]
    else:
        from mllmrec_ray.baselines.sasrec import fit_sasrec

        train = interactions[interactions["user_id"].isin(train_users)]
        # Stable sort keeps the file order for equal timestamps (ML-100K has many);
        # groupby keeps that order within each user.
        train = train.sort_values("timestamp", kind="stable")
        sequences = train.groupby("user_id", sort=True)["item_id"].apply(list).tolist()
        item_ids = sorted(set(items["item_id"]) | set(interactions["item_id"]))
        valid, _ = load_split(data, "valid", args.candidates)
        ranker = fit_sasrec(sequences, item_ids,
                            (valid["history"].tolist(), valid["candidates"].tolist(),
                             valid["target"].tolist()),
                            epochs=args.epochs, seed=args.seed, max_seconds=args.max_seconds)
        rankings = ranker.rank(samples["history"].tolist(), samples["candidates"].tolist())
        extra.update(ranker.info)
    extra["seconds"] = round(time.perf_counter() - t0, 2)

    record = make_record(args.model, dataset, args.split, args.candidates, rankings,
                         samples["target"].tolist(), extra=extra, seed=args.seed)
    write_record(args.out, record)
    print(format_table([record]))
    print(f"wrote {args.out}")
    return 0
