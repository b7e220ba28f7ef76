"""`mllmrec baseline`: train a classic baseline on training users and score a split.

Usage: mllmrec baseline --data DIR --model pop|sasrec|random|min-id [--split test] [--candidates 10|100]
                        --out FILE.json [--seed N] [--epochs N] [--train-data windows|full] [--name NAME]
                        [--from-evidence]

pop and sasrec fit on the training samples' windows by default (the LLM's training
data, SPEC section 1); `--train-data full` fits on every interaction of the training users.

`--config FILE` / `--set KEY=VALUE` (added by jobs.cli) supply the defaults of `--split` (eval.split),
`--candidates` (prompt.n_candidates), `--seed` (data.seed) and `--collab` (prompt.collab_window,
collab_recent, collab_levels); a flag given wins. Without a config file the flags keep their own
defaults (`--seed 0`, where data.seed defaults to 42).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# flags that are config keys: argparse dest -> key (a flag given wins over --config)
FLAGS = {"split": "eval.split", "candidates": "prompt.n_candidates", "seed": "data.seed"}
COLLAB_KEYS = ("prompt.collab_window", "prompt.collab_recent", "prompt.collab_levels")
# without --config: the flags' own defaults where the config classes' differ
DEFAULTS = {"data.seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data dir (samples/items/interactions)")
    parser.add_argument("--model", required=True, choices=["pop", "sasrec", "random", "min-id", "collab"],
                        help="collab = the prompt's collaborative evidence alone (mllmrec_ray.data.collab levels)")
    parser.add_argument("--name", help="model name in the record (default: --model), e.g. sasrec-full")
    parser.add_argument("--train-data", choices=["windows", "full"], default="windows",
                        help="pop/sasrec fit on: windows = the training samples' windows, the data the LLM "
                             "trains on (default); full = every interaction of the training users")
    parser.add_argument("--collab", default=None, metavar="WINDOW,RECENT,LEVELS",
                        help="collab: prompt.collab_window, collab_recent, collab_levels (default 3,3,5)")
    parser.add_argument("--split", default=None, choices=["train", "valid", "test"],
                        help="eval.split (default test)")
    parser.add_argument("--candidates", type=int, default=None, choices=[10, 100],
                        help="prompt.n_candidates (default 10)")
    parser.add_argument("--out", required=True, help="evaluation record JSON to write (the per-sample "
                        "rankings go beside it, see evaluation.rankings_path)")
    parser.add_argument("--seed", type=int, default=None,
                        help="training and bootstrap seed (data.seed; default 0 without --config)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="SASRec max epochs (early stopping on valid usually ends sooner)")
    parser.add_argument("--max-seconds", type=float, default=170.0,
                        help="SASRec training time budget in seconds (0 = none); the record's "
                             "stopped_by says whether it cut training short")
    parser.add_argument("--from-evidence", action="store_true",
                        help="sasrec on windows: take the SASRec that `mllmrec evidence` trained on every training "
                             "user (DATA/seq_evidence.pt, the model behind the prompt's ranks: same windows, "
                             "seed and settings) instead of training it again")


def resolve(args: argparse.Namespace) -> None:
    """Fill --split, --candidates, --seed and --collab from `--config` / `--set` where not given on the
    command line, every value validated like the config (ConfigError names the key)."""
    from jobs.common import stage_config
    from mllmrec_ray.config import set_value

    cfg = stage_config(args, flags=FLAGS, defaults=DEFAULTS)
    if args.collab is not None:
        try:
            values = [int(v) for v in args.collab.split(",")]
        except ValueError:
            values = []
        if len(values) != len(COLLAB_KEYS):
            raise SystemExit(f"error: --collab {args.collab!r}: expected WINDOW,RECENT,LEVELS (e.g. 3,3,5)")
        for key, value in zip(COLLAB_KEYS, values):
            set_value(cfg, key, value, source=f"--collab {args.collab}")
    p = cfg.prompt
    args.split, args.candidates, args.seed = cfg.eval.split, p.n_candidates, cfg.data.seed
    args.collab = f"{p.collab_window},{p.collab_recent},{p.collab_levels}"


def evidence_model(data: Path, windows: dict | None, item_ids: list[str]):
    """The seqrec stage's SASRec on every training user, checked to be the model this command would
    train: the same training users' windows and the same item table (the seed and settings are the
    pipeline's, which passes both stages the same data.seed)."""
    from jobs.common import CommandError
    from mllmrec_ray.data.run_data import SEQ_EVIDENCE, load_seq_evidence

    if windows is None:
        raise CommandError("--from-evidence: the evidence models train on the windows; drop --train-data full")
    try:
        evidence = load_seq_evidence(data)
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    users = evidence.trained_on[0] if evidence.trained_on else None
    if users != sorted(windows):
        raise CommandError(f"{data / SEQ_EVIDENCE}: its full model was not trained on this data's "
                           f"{len(windows)} training users; rerun `mllmrec evidence --data {data}`")
    if sorted(evidence.full.index) != sorted(map(str, item_ids)):
        raise CommandError(f"{data / SEQ_EVIDENCE}: its item table differs from {data}/items.parquet; "
                           f"rerun `mllmrec evidence --data {data}`")
    return evidence.full


def main(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    resolve(args)  # before reading anything: a bad value stops here
    if args.from_evidence and args.model != "sasrec":
        from jobs.common import CommandError

        raise CommandError(f"--from-evidence: only --model sasrec has an evidence model, not {args.model}")

    from mllmrec_ray.ranking.evaluation import (format_table, load_split, make_record, rankings_path, write_record,
                                        write_rankings)

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
    windows = None
    if args.model in ("pop", "sasrec"):
        extra["train_data"] = args.train_data
        if args.train_data == "windows":
            from mllmrec_ray.data.windows import training_sequences

            # user -> items of the user's training windows: the same data as the LLM's training samples
            windows = training_sequences(pq.read_table(data / "samples.parquet",
                                                       filters=[("split", "==", "train")]).to_pylist())
            if not windows:
                raise SystemExit(f"{data}/samples.parquet has no train samples to fit {args.model} on")
    if args.model == "pop":
        from mllmrec_ray.baselines.popularity import (fit_popularity, fit_popularity_sequences,
                                                      rank_by_popularity)

        counts = (fit_popularity(interactions, train_users) if windows is None
                  else fit_popularity_sequences(windows))
        rankings = [rank_by_popularity(counts, c) for c in samples["candidates"]]
    elif args.model == "random":
        from mllmrec_ray.baselines.trivial import rank_random

        rankings = [rank_random(c, args.seed, sid) for sid, c in zip(samples["sample_id"], samples["candidates"])]
    elif args.model == "collab":
        from mllmrec_ray.data.collab import fit_collab, rank_by_evidence
        from mllmrec_ray.data.windows import training_sequences

        try:
            window, recent, levels = (int(v) for v in args.collab.split(","))
        except ValueError:
            raise SystemExit(f"error: --collab {args.collab!r}: expected WINDOW,RECENT,LEVELS (e.g. 3,3,5)")
        train = pq.read_table(data / "samples.parquet", filters=[("split", "==", "train")]).to_pylist()
        stats = fit_collab(training_sequences(train), items["item_id"].tolist(), window, recent, levels)
        rankings = [rank_by_evidence(stats, h, c, u) for h, c, u in
                    zip(samples["history"], samples["candidates"], samples["user_id"])]
        extra.update(collab_window=window, collab_recent=recent, collab_levels=levels)
    elif args.model == "min-id":
        from mllmrec_ray.baselines.trivial import rank_min_id

        rankings = [rank_min_id(c) for c in samples["candidates"]]
    else:
        from mllmrec_ray.baselines.sasrec import fit_sasrec

        item_ids = sorted(set(items["item_id"]) | set(interactions["item_id"]))
        if args.from_evidence:
            ranker = evidence_model(data, windows, item_ids)
            extra["from_evidence"] = True
        else:
            if windows is not None:
                sequences = [windows[u] for u in sorted(windows)]
            else:
                train = interactions[interactions["user_id"].isin(train_users)]
                # Stable sort keeps the file order for equal timestamps (ML-100K has many);
                # groupby keeps that order within each user.
                train = train.sort_values("timestamp", kind="stable")
                sequences = train.groupby("user_id", sort=True)["item_id"].apply(list).tolist()
            valid, _ = load_split(data, "valid", args.candidates)
            ranker = fit_sasrec(sequences, item_ids,
                                (valid["history"].tolist(), valid["candidates"].tolist(),
                                 valid["target"].tolist()),
                                epochs=args.epochs, seed=args.seed, max_seconds=args.max_seconds)
        rankings = ranker.rank(samples["history"].tolist(), samples["candidates"].tolist())
        extra.update(ranker.info)
    extra["seconds"] = round(time.perf_counter() - t0, 2)

    record = make_record(args.name or args.model, dataset, args.split, args.candidates, rankings,
                         samples["target"].tolist(), extra=extra, seed=args.seed)
    # rankings first: the record marks the stage complete, so its evidence must already exist
    write_rankings(rankings_path(args.out), samples["sample_id"].tolist(), rankings)
    write_record(args.out, record)
    print(format_table([record]))
    print(f"wrote {args.out}")
    return 0
