"""`mllmrec eval`: evaluate an LLM ranker on the stored candidate lists.

Usage: mllmrec eval --data DIR --model PATH_OR_ALIAS [--name NAME] [--split test]
                    [--candidates 10|100] [--mode score|generate] [--scorer hf|vllm]
                    [--max-samples N] [--workers N] [--out FILE]

score:    rank every candidate by the model's log-likelihood of its answer line
          (mllmrec_ray.ranking.scoring); every sample gets a full ranking.
generate: ask for a top-K list (K = 5 for 10 candidates, 10 for 100), parse it strictly;
          a sample with no valid item is a miss (valid_ratio in the record).
--workers N (score mode, hf scorer, CPU): N one-thread Ray actors rank the chunks of samples
          (`actors/eval_scorer.py`), the same rankings sooner than one N-thread scorer.
The record goes to --out, by default `<run>/eval/<name>.json` when DIR is `<run>/data`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data dir (a run's data/ folder)")
    parser.add_argument("--model", required=True, help="model directory, cache alias (smollm2-135m) or hub name")
    parser.add_argument("--name", help="model name in the record (default: the model's folder or alias)")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--candidates", type=int, default=10, choices=[10, 100])
    parser.add_argument("--mode", default="score", choices=["score", "generate"])
    # Measured on SmolLM2-135M, 2 quiet cores, bf16: hf 9-12 candidates/s, vllm 5-8 (naive: ~1-2.6).
    parser.add_argument("--scorer", default="hf", choices=["hf", "vllm"],
                        help="score mode backend: transformers over the prompt's KV cache (default, faster "
                             "here) or vLLM prefix caching")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--out", help="record JSON (default <run>/eval/<name>.json when --data is <run>/data)")
    parser.add_argument("--captions", default="auto",
                        help="captions.parquet for captioned prompts; auto = <run>/stage1/captions.parquet if it exists; none = off")
    parser.add_argument("--think-first", action="store_true", help="prompts ask for <think> before the answer")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bf16 where the device computes it natively, else fp32")
    parser.add_argument("--batch", type=int, default=8, help="prompts per scoring / generation batch")
    parser.add_argument("--workers", type=int, help="score mode, hf scorer, CPU: rank in N one-thread Ray actors, "
                        "each over its own chunks of samples (default eval.workers, else 1 = in this process)")
    parser.add_argument("--cache-dir", default=None, help="model cache root")
    parser.add_argument("--seed", type=int, default=0, help="engine and bootstrap seed")
    parser.add_argument("--config", help="pipeline YAML: prompt.collab* and eval.readout / eval.order_shuffles "
                        "come from it (the flags below override)")
    parser.add_argument("--readout", choices=["answer", "id", "calibrated"],
                        help="score mode: what is scored (default eval.readout, else answer)")
    parser.add_argument("--collab", choices=["on", "off"], help="collaborative evidence in the prompt "
                        "(default prompt.collab, else off)")
    parser.add_argument("--order-shuffles", type=int, help="also score the first --shuffle-samples samples with "
                        "their candidate list shuffled N times and record the sensitivity")
    parser.add_argument("--shuffle-samples", type=int, default=64)
    parser.add_argument("--order-ensemble", type=int, help="score mode: average each candidate's score over the "
                        "stored order and N shuffled candidate orders (default eval.order_ensemble, else 0)")
    parser.add_argument("--votes", type=int, default=0,
                        help="generate mode: sample N answers per prompt and rank candidates by how often they "
                             "are chosen, ties by their score-mode score (0 = parse one generated top-K list)")
    parser.add_argument("--weights", default="merged", choices=["merged", "adapter"],
                        help="hf scorer: the merged model dir, or its base + saved LoRA adapter unmerged (keeps "
                             "updates that bf16 merging rounds away)")


def eval_settings(args: argparse.Namespace, data: Path) -> tuple:
    """(readout, order shuffles, order ensemble, collab evidence or None, compact instructions, workers): the
    flags, else the config's eval.* and prompt.collab / prompt.instructions when --config is given, else answer
    readout, no shuffles, no evidence, full instructions, one scorer in this process."""
    from mllmrec_ray.config import load_config
    from mllmrec_ray.data.run_data import load_collab

    cfg = load_config(args.config, getattr(args, "set", None))  # --set: added by jobs.cli
    readout = args.readout or (cfg.eval.readout if args.config else "answer")
    shuffles = args.order_shuffles if args.order_shuffles is not None else (cfg.eval.order_shuffles if args.config else 0)
    ensemble = args.order_ensemble if args.order_ensemble is not None else (cfg.eval.order_ensemble if args.config else 0)
    if shuffles < 0 or ensemble < 0:
        raise SystemExit(f"error: --order-shuffles {shuffles} and --order-ensemble {ensemble} must be >= 0")
    if args.collab is not None:
        cfg.prompt.collab = args.collab == "on"
    elif not args.config:
        cfg.prompt.collab = False
    workers = args.workers if args.workers is not None else (cfg.eval.workers if args.config else 1)
    if workers < 1:
        raise SystemExit(f"error: --workers {workers} must be >= 1")
    if workers > 1 and (args.mode != "score" or args.scorer != "hf"):
        workers = 1  # the vLLM engine and generate mode run in this process
    return readout, shuffles, ensemble, load_collab(data, cfg.prompt), cfg.prompt.instructions == "compact", workers


def backends(args: argparse.Namespace, model_path: str, local_scorer: bool = True) -> tuple:
    """(vLLM engine or None, scorer or None, tokenizer): generate mode and the vllm scorer need the
    engine, score mode and voting a scorer (transformers by default; none when `local_scorer` is False:
    Ray actors score)."""
    from mllmrec_ray.config import EngineConfig

    engine = scorer = tokenizer = None
    if args.mode == "generate" or args.scorer == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: faster start
        from mllmrec_ray.runtime.engine import Engine

        # 100-candidate prompts with captions run to a few thousand tokens.
        engine = Engine(model_path, EngineConfig(dtype=args.dtype, seed=args.seed, max_model_len=4096))
        tokenizer = engine.tokenizer
    if (args.mode == "score" and local_scorer) or args.votes:
        if args.scorer == "vllm":
            from mllmrec_ray.ranking.scoring import VLLMScorer

            scorer = VLLMScorer(engine, prompts_per_batch=args.batch)
        else:
            from mllmrec_ray.ranking.scoring import HFScorer

            scorer = HFScorer(model_path, dtype=args.dtype, adapter=args.weights == "adapter", batch=args.batch)
            tokenizer = scorer.tokenizer
    return engine, scorer, tokenizer


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mllmrec_ray.ranking.evaluation import (format_table, load_split, make_record, rankings_path, write_rankings,
                                        write_record)
    from mllmrec_ray.runtime.models import resolve_dtype, resolve_model
    from mllmrec_ray.prompting.parsing import parse_answer, parse_ranking
    from mllmrec_ray.prompting.prompts import EvalMessages, render_prompt
    from mllmrec_ray.data.run_data import load_items
    from mllmrec_ray.ranking.scoring import rank_samples, rank_samples_over_orders, ranking_messages, vote_ranking

    data = Path(args.data)
    name = args.name or Path(args.model.rstrip("/")).name
    out = Path(args.out) if args.out else (data.parent / "eval" / f"{name}.json" if data.name == "data" else None)
    if out is None:
        raise SystemExit(f"--data {data} is not a run's data/ folder: give --out FILE")
    captions = {"auto": data.parent / "stage1" / "captions.parquet", "none": None}.get(args.captions, args.captions)
    with_captions = captions is not None and Path(captions).exists()
    if args.captions not in ("auto", "none") and not with_captions:
        raise SystemExit(f"--captions {args.captions} does not exist")
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").exists() else {}
    dataset = manifest.get("dataset") or data.resolve().name

    readout, shuffles, ensemble, collab, compact, workers = eval_settings(args, data)
    model_path = resolve_model(args.model, args.cache_dir)
    samples, _ = load_split(data, args.split, args.candidates)
    if args.max_samples is not None:
        samples = samples.head(args.max_samples)
    items = load_items(data, captions if with_captions else None)
    rows = samples.to_dict("records")
    k = 5 if args.candidates == 10 else 10

    if args.votes < 0:
        raise SystemExit(f"error: --votes {args.votes} must be >= 0")
    engine, scorer, tokenizer = backends(args, model_path, local_scorer=workers == 1 or shuffles > 0)
    # the target never reaches a prompt: only ids, history and candidates are passed on
    messages_of = EvalMessages(items, with_captions, args.think_first, args.candidates, collab, compact)

    def prompt_ids(row: dict, ranking: bool) -> list[int]:
        messages = messages_of(row)
        if ranking:
            messages = ranking_messages(messages, k)
        return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]

    titles = {i: it.get("title") for i, it in items.items()}
    rankings: list[list[str] | None] = []
    t0 = time.perf_counter()
    with tqdm(total=len(rows), desc=f"eval {name} ({args.mode})", unit="sample") as bar:
        # score mode hands the scorer several batches at once: it groups prompts of similar length
        step = args.batch * (4 if args.mode == "score" else 1)
        if workers > 1:
            chunks = [rows[i:i + step] for i in range(0, len(rows), step)]
            rankings = rank_in_workers(args, model_path, workers, chunks, messages_of, titles, readout, ensemble, bar)
        else:
            for start in range(0, len(rows), step):
                batch = rows[start:start + step]
                if args.mode == "score":
                    rankings += rank_samples_over_orders(scorer, tokenizer, batch, messages_of, titles, readout,
                                                         ensemble, args.seed)[0]
                elif args.votes:
                    groups = engine.generate([prompt_ids(r, False) for r in batch], n=args.votes, temperature=1.0,
                                             top_p=1.0, max_tokens=32)
                    scores = rank_samples(scorer, tokenizer, batch, messages_of, titles, readout)[1]
                    for r, group, sc in zip(batch, groups, scores):
                        chosen = [parse_answer(c.text, r["candidates"], think_first=args.think_first).item_id
                                  for c in group]
                        rankings.append(vote_ranking([str(c) for c in r["candidates"]], chosen, sc))
                else:
                    ids = [prompt_ids(r, True) for r in batch]
                    groups = engine.generate(ids, n=1, temperature=0.0, top_p=1.0, max_tokens=24 * k)
                    for r, group in zip(batch, groups):
                        rankings.append(parse_ranking(group[0].text, r["candidates"], k))
                bar.update(len(batch))
    seconds = time.perf_counter() - t0

    extra = {"mode": args.mode, "model_path": model_path, "with_captions": with_captions,
             "think_first": args.think_first, "dtype": resolve_dtype(args.dtype), "seconds": round(seconds, 2),
             "samples_per_s": round(len(rows) / seconds, 3) if seconds else None}
    if args.mode == "score":
        extra.update(scorer=args.scorer, readout=readout, collab=collab is not None, weights=args.weights,
                     order_ensemble=ensemble, workers=workers)
        if shuffles:
            extra["order_sensitivity"] = order_sensitivity(scorer, tokenizer, rows[:args.shuffle_samples],
                                                           messages_of, titles, readout, shuffles, args.seed,
                                                           args.candidates)
        extra["candidates_per_s"] = round(len(rows) * args.candidates / seconds, 3) if seconds else None
    elif args.votes:
        extra.update(votes=args.votes, readout=readout, collab=collab is not None)
    else:
        extra["top_k"] = k
    record = make_record(name, dataset, args.split, args.candidates, rankings, samples["target"].tolist(),
                         extra=extra, seed=args.seed)
    # rankings first: the record marks the stage complete
    write_rankings(rankings_path(out), samples["sample_id"].tolist(), rankings)
    write_record(out, record)
    print(format_table([record]))
    print(f"wrote {out}")
    return 0


def rank_in_workers(args: argparse.Namespace, model_path: str, workers: int, chunks: list[list[dict]], messages_of,
                    titles: dict, readout: str, ensemble: int, bar) -> list[list[str]]:
    """Rankings of every chunk, in order, from `workers` one-thread `EvalScorer` actors that take the next
    chunk as they finish one (on CPU: see actors/eval_scorer.py for why this beats one N-thread scorer)."""
    import torch
    from ray.util import ActorPool

    from actors.eval_scorer import EvalScorer
    from jobs.common import CommandError, init_ray

    if torch.cuda.is_available():
        raise CommandError(f"--workers {workers}: one-thread CPU scorers on a host with a GPU; use --workers 1")
    ray = init_ray()
    shared = ray.put(messages_of)  # items and evidence once in the object store, not once per actor
    actors = [ray.remote(num_cpus=1)(EvalScorer).remote(model_path, shared, titles, readout, ensemble, args.seed,
                                                           dtype=args.dtype, adapter=args.weights == "adapter",
                                                           batch=args.batch, threads=1) for _ in range(workers)]
    rankings: list[list[str]] = []
    try:
        for ranked in ActorPool(actors).map(lambda actor, chunk: actor.rank.remote(chunk), chunks):
            rankings += ranked
            bar.update(len(ranked))
    finally:
        for actor in actors:
            ray.kill(actor)
    return rankings


def order_sensitivity(scorer, tokenizer, rows: list[dict], messages_of, titles: dict, readout: str,
                      shuffles: int, seed: int, n_candidates: int) -> dict:
    """Metrics of the same samples scored with the candidate list in the prompt shuffled `shuffles` times.

    A ranker that reads the evidence gives the same ranking whatever the order; position bias shows
    as metrics that move and top-1 choices that change.
    """
    import random

    from mllmrec_ray.ranking.evaluation import evaluate_rankings
    from mllmrec_ray.ranking.scoring import rank_samples

    targets = [r["target"] for r in rows]
    base = rank_samples(scorer, tokenizer, rows, messages_of, titles, readout)[0]
    out = {"shuffles": shuffles, "n": len(rows), "original": {}, "shuffled": [], "top1_agreement": []}
    metrics = ("HR@3", "NDCG@3")
    out["original"] = {m: round(v, 4) for m, v in evaluate_rankings(base, targets, n_candidates).items() if m in metrics}
    rng = random.Random(seed)
    for _ in range(shuffles):
        moved = [{**r, "candidates": rng.sample(list(r["candidates"]), len(r["candidates"]))} for r in rows]
        ranks = rank_samples(scorer, tokenizer, moved, messages_of, titles, readout)[0]
        res = evaluate_rankings(ranks, targets, n_candidates)
        out["shuffled"].append({m: round(res[m], 4) for m in metrics})
        out["top1_agreement"].append(round(sum(a[0] == b[0] for a, b in zip(base, ranks)) / len(rows), 4))
    return out
