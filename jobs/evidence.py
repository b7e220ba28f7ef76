"""Train the sequence-model evidence of `prompt.collab_seq` into a prepared data dir.

Usage: mllmrec evidence --data DIR [--seed N] [--folds 2]

Writes DIR/seq_evidence.pt (a SASRec on every training user plus one per fold without that
fold's users; see mllmrec_ray.data.seq_evidence) atomically, so a stopped run leaves no
half-written file. Every stage that builds prompts loads it when prompt.collab_seq is on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data dir (mllmrec data prepare)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default data.seed)")
    parser.add_argument("--folds", type=int, default=2, help="cross-fitting folds of the training users (>= 2)")
    parser.add_argument("--epochs", type=int, default=30, help="SASRec max epochs (early stopping on valid)")


def main(args: argparse.Namespace) -> int:
    import io

    import pyarrow.parquet as pq
    import torch

    from jobs.common import CommandError, stage_config
    from mllmrec_ray.data.run_data import SEQ_EVIDENCE, load_samples
    from mllmrec_ray.data.seq_evidence import fit_seq_evidence
    from mllmrec_ray.data.windows import training_sequences
    from mllmrec_ray.io import atomic_write_bytes

    seed = stage_config(args, flags={"seed": "data.seed"}).data.seed
    data = Path(args.data)
    if args.folds < 2:
        raise CommandError(f"--folds {args.folds}: need >= 2 (a fold model must leave its users out)")
    if not (data / "samples.parquet").exists():
        raise CommandError(f"{data}/samples.parquet: not found; run `mllmrec data prepare` first")
    sequences = training_sequences(load_samples(data, "train"))
    if not sequences:
        raise CommandError(f"{data}/samples.parquet has no train samples to fit the evidence models on")
    items = pq.read_table(data / "items.parquet", columns=["item_id"]).column("item_id").to_pylist()
    seen = pq.read_table(data / "interactions.parquet", columns=["item_id"]).column("item_id").to_pylist()
    item_ids = sorted(set(map(str, items)) | set(map(str, seen)))
    valid = load_samples(data, "valid")
    early = ([[str(h) for h in s["history"]] for s in valid], [[str(c) for c in s["candidates"]] for s in valid],
             [str(s["target"]) for s in valid]) if valid else None
    t0 = time.perf_counter()
    evidence = fit_seq_evidence(sequences, item_ids, early, folds=args.folds, seed=seed, epochs=args.epochs,
                                log=lambda line: print(line, flush=True))
    buf = io.BytesIO()
    torch.save(evidence.state(), buf)
    out = atomic_write_bytes(data / SEQ_EVIDENCE, buf.getvalue())
    print(f"[seqrec] wrote {out} ({time.perf_counter() - t0:.0f} s; full model best epoch "
          f"{evidence.full.info.get('best_epoch')}, valid NDCG@5 {evidence.full.info.get('best_valid_NDCG@5')})",
          flush=True)
    return 0
