"""`mllmrec mda`: score every training CoT and select the confident ones (paper §3.2, Eq. 6-7).

Usage: mllmrec mda --data DIR --stage1 DIR [--config YAML] [--p-sft 0.1] [--p-grpo 0.05]
                   [--embedder all-MiniLM-L6-v2] [--cot-source refined|pseudo]

Writes STAGE1/mda.parquet, one row per training sample: sample_id, s_modality, s_prediction,
s_u (null where the sample has no CoT), selected_sft, selected_grpo, n_modality_items,
profile_from, image_side ("caption_text" with a text embedder, "image" with a CLIP-style one).
The training prompt builders attach the CoT only to selected samples (joined by sample_id).
p = 1 keeps every CoT (ablation w/o MDA); p = 0 keeps none (w/o MCoT).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data dir (samples.parquet, items.parquet)")
    parser.add_argument("--stage1", required=True, help="Stage I dir (captions.parquet, cot.parquet in; mda out)")
    parser.add_argument("--config", help="pipeline YAML; its stage1 section is used (flags override)")
    parser.add_argument("--p-sft", type=float, help="fraction kept for SFT (default: stage1.p_sft)")
    parser.add_argument("--p-grpo", type=float, help="fraction kept for GRPO (default: stage1.p_grpo)")
    parser.add_argument("--embedder", help="sentence-transformers model (default: stage1.embedder)")
    parser.add_argument("--cot-source", choices=["refined", "pseudo"], help="default: stage1.cot_source")


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mllmrec_ray.config import load_config
    from mllmrec_ray.io import atomic_write_json, atomic_write_parquet
    from mllmrec_ray.stage1.mda import Embedder, score_samples, top_fraction

    cfg = load_config(args.config, getattr(args, "set", None))  # --set: added by jobs.cli
    s1 = cfg.stage1
    p_sft = s1.p_sft if args.p_sft is None else args.p_sft
    p_grpo = s1.p_grpo if args.p_grpo is None else args.p_grpo
    source = args.cot_source or s1.cot_source
    data, stage1 = Path(args.data), Path(args.stage1)
    for name, p in (("--p-sft", p_sft), ("--p-grpo", p_grpo)):
        if not 0 <= p <= 1:
            raise SystemExit(f"{name}={p}: must be between 0 and 1")

    items = {r["item_id"]: dict(r, caption=None) for r in pq.read_table(data / "items.parquet").to_pylist()}
    if (stage1 / "captions.parquet").exists():
        for r in pq.read_table(stage1 / "captions.parquet", columns=["item_id", "caption"]).to_pylist():
            if r["item_id"] in items:
                items[r["item_id"]]["caption"] = r["caption"]
    samples = sorted(pq.read_table(data / "samples.parquet", filters=[("split", "==", "train")]).to_pylist(),
                     key=lambda s: s["sample_id"])
    column = {"refined": "refined_cot", "pseudo": "pseudo_cot"}[source]
    cot_path = stage1 / "cot.parquet"
    cots = ({r["sample_id"]: r[column] for r in pq.read_table(cot_path, columns=["sample_id", column]).to_pylist()}
            if cot_path.exists() else {})
    if not cots:
        print(f"[mda] no CoT in {cot_path}: every sample stays a plain prompt", flush=True)

    t0 = time.perf_counter()
    embedder = Embedder(args.embedder or s1.embedder)
    rows = score_samples(samples, items, cots, embedder.texts, embedder.images if embedder.has_images else None)
    ids, scores = [r["sample_id"] for r in rows], [r["s_u"] for r in rows]
    sft, grpo = top_fraction(ids, scores, p_sft), top_fraction(ids, scores, p_grpo)
    table = pa.table({
        "sample_id": pa.array(ids, pa.string()),
        "s_modality": pa.array([r["s_modality"] for r in rows], pa.float64()),
        "s_prediction": pa.array([r["s_prediction"] for r in rows], pa.float64()),
        "s_u": pa.array(scores, pa.float64()),
        "selected_sft": pa.array([i in sft for i in ids], pa.bool_()),
        "selected_grpo": pa.array([i in grpo for i in ids], pa.bool_()),
        "n_modality_items": pa.array([r["n_modality_items"] for r in rows], pa.int32()),
        "profile_from": pa.array([r["profile_from"] for r in rows], pa.string()),
        "image_side": pa.array([r["image_side"] for r in rows], pa.string()),
    })
    atomic_write_parquet(table, stage1 / "mda.parquet")
    scored = [s for s in scores if s is not None]
    summary = {"train_samples": len(ids), "scored": len(scored), "cot_source": source, "embedder": embedder.name,
               "image_side": "image" if embedder.has_images else "caption_text", "p_sft": p_sft, "p_grpo": p_grpo,
               "selected_sft": len(sft), "selected_grpo": len(grpo),
               "s_u_min": min(scored, default=None), "s_u_max": max(scored, default=None),
               "profile_from_step4": sum(r["profile_from"] == "step4" for r in rows),
               "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(stage1 / "mda_summary.json", summary)
    print(f"[mda] wrote {stage1 / 'mda.parquet'}: {json.dumps(summary)}", flush=True)
    return 0
