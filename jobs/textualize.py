"""`mllmrec textualize`: caption every item cover once (paper Eq. 3) on a Ray Data actor pool.

Usage: mllmrec textualize --data DIR --out STAGE1_DIR [--config YAML] [--captioner pixel|vlm]
                          [--model NAME_OR_PATH] [--pool-size N] [--batch-size N] [--num-cpus X]

Writes STAGE1_DIR/captions.parquet: item_id, caption, captioner, model, prompt_version, key
(one row per item; caption is null for items without an image). Finished captions are kept
in STAGE1_DIR/parts/captions/, so a rerun only captions what is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.stage1_common import add_common_arguments

    parser.add_argument("--data", required=True, help="prepared data dir (items.parquet with image_path)")
    parser.add_argument("--out", required=True, help="Stage I dir (e.g. runs/NAME/stage1)")
    parser.add_argument("--captioner", choices=["pixel", "vlm"], help="default: stage1.captioner")
    parser.add_argument("--model", help="VLM for --captioner vlm (default: stage1.captioner_model)")
    parser.add_argument("--max-tokens", type=int, default=96, help="VLM caption length cap")
    add_common_arguments(parser)


def caption_rows(items: list[dict], captioner: str, model: str, version: str) -> list[dict]:
    """One input row per item with a readable image path, keyed by (item, image bytes [+ title], model, version)."""
    from mllmrec_ray.stage1.store import file_hash, row_key

    rows = []
    for it in items:
        path = it.get("image_path")
        if not path or not Path(path).is_file():
            continue
        inputs = file_hash(path) if captioner == "pixel" else f"{file_hash(path)}|{it.get('title')}"
        rows.append({"key": row_key("caption", it["item_id"], inputs, model, version), "item_id": it["item_id"],
                     "title": it.get("title"), "image_path": str(path)})
    return rows


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.stage1_common import engine_dict, load_cfg, run_pool, start_ray
    from mllmrec_ray.stage1 import captions as pixel
    from mllmrec_ray.stage1.cot_prompts import CAPTION_VERSION
    from mllmrec_ray.io import atomic_write_json, atomic_write_parquet
    from mllmrec_ray.stage1.store import PartStore

    cfg = load_cfg(args)
    s1 = cfg.stage1
    captioner = args.captioner or s1.captioner
    out = Path(args.out)
    items = pq.read_table(Path(args.data) / "items.parquet", columns=["item_id", "title", "image_path"]).to_pylist()
    if captioner == "pixel":
        from actors.captioner import PixelCaptioner

        model, version, name = pixel.model_name(), pixel.VERSION, pixel.CAPTIONER
        fn, fn_kwargs = PixelCaptioner, {}
        if pixel._face_cascade() is None:
            print("[captions] OpenCV Haar cascades not available: captions describe pixels only, no face counts")
    else:
        from actors.captioner import VLMCaptioner

        model = args.model or s1.captioner_model
        if not model:
            raise SystemExit("--captioner vlm needs --model (or stage1.captioner_model in the config)")
        version, name = CAPTION_VERSION, "vlm"
        fn, fn_kwargs = VLMCaptioner, {"model": model, "engine": engine_dict(cfg.model.engine),
                                       "sampling": {"max_tokens": args.max_tokens}}
    rows = caption_rows(items, captioner, model, version)
    store = PartStore(out / "parts" / "captions")
    done = store.finished_keys()
    todo = [r for r in rows if r["key"] not in done]
    print(f"[captions] {len(items)} items, {len(rows)} with an image, {len(rows) - len(todo)} already captioned, "
          f"{len(todo)} to do ({name}, model {model})", flush=True)
    stats = {"rows": 0}
    if todo:
        start_ray(cfg, args)
        stats = run_pool(todo, fn, fn_kwargs, store.root, s1, desc="captions",
                         constants={"captioner": name, "model": model, "prompt_version": version})
    finished = store.select([r["key"] for r in rows])
    by_item = {r["item_id"]: r for r in (finished.to_pylist() if finished is not None else [])}
    table = pa.table({
        "item_id": [it["item_id"] for it in items],
        "caption": [by_item.get(it["item_id"], {}).get("caption") for it in items],
        "captioner": [name if it["item_id"] in by_item else None for it in items],
        "model": [model if it["item_id"] in by_item else None for it in items],
        "prompt_version": [version if it["item_id"] in by_item else None for it in items],
        "key": [by_item.get(it["item_id"], {}).get("key") for it in items],
    }, schema=pa.schema([("item_id", pa.string()), ("caption", pa.string()), ("captioner", pa.string()),
                         ("model", pa.string()), ("prompt_version", pa.string()), ("key", pa.string())]))
    atomic_write_parquet(table, out / "captions.parquet")
    n_caption = sum(c is not None for c in table.column("caption").to_pylist())
    errors = [r for r in by_item.values() if r.get("error")]
    summary = {"items": len(items), "with_image": len(rows), "captioned": n_caption, "errors": len(errors),
               "computed_now": stats["rows"], "captioner": name, "model": model, "prompt_version": version,
               "seconds": stats.get("seconds"), "items_per_s": stats.get("rows_per_s")}
    atomic_write_json(out / "captions_summary.json", summary)
    print(f"[captions] wrote {out / 'captions.parquet'}: {json.dumps(summary)}", flush=True)
    for r in errors[:5]:
        print(f"[captions] item {r['item_id']}: {r['error']}")
    return 0
