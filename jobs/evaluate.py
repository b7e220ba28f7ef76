"""`mllmrec eval`: evaluate an LLM ranker on the stored candidate lists.

Usage: mllmrec eval --data DIR --model PATH_OR_ALIAS [--name NAME] [--split test]
                    [--candidates 10|100] [--mode score|generate] [--scorer hf|vllm]
                    [--max-samples N] [--out FILE]

score:    rank every candidate by the model's log-likelihood of its answer line
          (mllmrec_ray.scoring); every sample gets a full ranking.
generate: ask for a top-K list (K = 5 for 10 candidates, 10 for 100), parse it strictly;
          a sample with no valid item is a miss (valid_ratio in the record).
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
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=8, help="prompts per scoring / generation batch")
    parser.add_argument("--cache-dir", default=None, help="model cache root")
    parser.add_argument("--seed", type=int, default=0, help="engine and bootstrap seed")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mllmrec_ray.config import EngineConfig
    from mllmrec_ray.evaluation import format_table, load_split, make_record, write_record
    from mllmrec_ray.models import resolve_model
    from mllmrec_ray.parsing import parse_ranking
    from mllmrec_ray.prompts import answer_text, render_prompt, sample_messages
    from mllmrec_ray.run_data import load_items
    from mllmrec_ray.scoring import answer_ids, rank_by_scores, ranking_messages

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

    model_path = resolve_model(args.model, args.cache_dir)
    samples, _ = load_split(data, args.split, args.candidates)
    if args.max_samples is not None:
        samples = samples.head(args.max_samples)
    items = load_items(data, captions if with_captions else None)
    rows = samples.to_dict("records")
    k = 5 if args.candidates == 10 else 10

    engine = None
    if args.mode == "generate" or args.scorer == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: faster start
        from mllmrec_ray.engine import Engine

        # 100-candidate prompts with captions run to a few thousand tokens.
        engine = Engine(model_path, EngineConfig(dtype=args.dtype, seed=args.seed, max_model_len=4096))
        tokenizer = engine.tokenizer
    if args.mode == "score":
        if args.scorer == "vllm":
            from mllmrec_ray.scoring import VLLMScorer

            scorer = VLLMScorer(engine, prompts_per_batch=args.batch)
        else:
            from mllmrec_ray.scoring import HFScorer

            scorer = HFScorer(model_path, dtype=args.dtype)
            tokenizer = scorer.tokenizer

    def prompt_ids(row: dict, ranking: bool) -> list[int]:
        messages = sample_messages(row, items, with_captions=with_captions, think_first=args.think_first,
                                   n_candidates=args.candidates)
        if ranking:
            messages = ranking_messages(messages, k)
        return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]

    rankings: list[list[str] | None] = []
    t0 = time.perf_counter()
    with tqdm(total=len(rows), desc=f"eval {name} ({args.mode})", unit="sample") as bar:
        for start in range(0, len(rows), args.batch):
            batch = rows[start:start + args.batch]
            ids = [prompt_ids(r, args.mode == "generate") for r in batch]
            if args.mode == "score":
                answers = [answer_ids(tokenizer, [answer_text(c, items[c]["title"]) for c in r["candidates"]])
                           for r in batch]
                for r, scores in zip(batch, scorer.score(ids, answers)):
                    rankings.append(rank_by_scores(r["candidates"], scores))
            else:
                groups = engine.generate(ids, n=1, temperature=0.0, top_p=1.0, max_tokens=24 * k)
                for r, group in zip(batch, groups):
                    rankings.append(parse_ranking(group[0].text, r["candidates"], k))
            bar.update(len(batch))
    seconds = time.perf_counter() - t0

    extra = {"mode": args.mode, "model_path": model_path, "with_captions": with_captions,
             "think_first": args.think_first, "dtype": args.dtype, "seconds": round(seconds, 2),
             "samples_per_s": round(len(rows) / seconds, 3) if seconds else None}
    if args.mode == "score":
        extra["scorer"] = args.scorer
        extra["candidates_per_s"] = round(len(rows) * args.candidates / seconds, 3) if seconds else None
    else:
        extra["top_k"] = k
    record = make_record(name, dataset, args.split, args.candidates, rankings, samples["target"].tolist(),
                         extra=extra, seed=args.seed)
    write_record(out, record)
    print(format_table([record]))
    print(f"wrote {out}")
    return 0
