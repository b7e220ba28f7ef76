"""Prompt tokens per sample: covers as text (Stage I captions) vs covers as visual tokens (the paper's 196 per image).

    python benchmarks/prompt_tokens.py --data runs/quickstart/data --captions runs/quickstart/stage1/captions.parquet \
        [--tokenizer smollm2-135m] [--split test] [--out-dir benchmarks/results]

Per sample, over the history + candidate items of the real instruction prompt (SPEC section 4,
chat template applied):
- text, no covers: the plain prompt;
- text + captions: the plain prompt plus every caption of a history or candidate item that has one
  (` — <caption>` on its line, measured with the same tokenizer);
- visual, this dataset: the plain prompt plus 196 tokens for each of those items with a cover;
- every item with a cover (the paper's datasets): the plain prompt plus the mean caption length, or
  plus 196 visual tokens, for every history and candidate item.
Writes prompt_tokens.json / .md / .png under --out-dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def measure(samples, items, tokenizer, visual_per_image: int, n_candidates: int = 10) -> dict[str, list[int]]:
    from mllmrec_ray.prompting.prompts import clean_text, render_prompt, sample_messages

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cap_tokens = {i: n_tokens(f" — {clean_text(it['caption'])}") for i, it in items.items() if it.get("caption")}
    mean_caption = statistics.fmean(cap_tokens.values()) if cap_tokens else 0.0
    out = {"text_plain": [], "text_captions": [], "text_captions_all_covers": [], "visual_dataset": [],
           "visual_all_covers": [], "items_with_cover": [], "caption_tokens_per_cover": [round(mean_caption, 1)]}
    for s in samples:
        plain = n_tokens(render_prompt(tokenizer, sample_messages(s, items, n_candidates=n_candidates)))
        shown = list(s["history"]) + list(s["candidates"] if n_candidates == 10 else s["candidates_100"])
        with_cover = [i for i in shown if i in cap_tokens]
        out["text_plain"].append(plain)
        out["text_captions"].append(plain + sum(cap_tokens[i] for i in with_cover))
        out["text_captions_all_covers"].append(round(plain + mean_caption * len(shown)))
        out["visual_dataset"].append(plain + visual_per_image * len(with_cover))
        out["visual_all_covers"].append(plain + visual_per_image * len(shown))
        out["items_with_cover"].append(len(with_cover))
    return out


def summarize(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(values), 1), "median": statistics.median(values),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared data dir")
    p.add_argument("--captions", required=True, help="Stage I captions.parquet")
    p.add_argument("--tokenizer", default="smollm2-135m", help="model dir or cache alias whose tokenizer counts")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--visual-tokens", type=int, default=196, help="visual tokens per image (paper: 196)")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from mllmrec_ray.runtime.models import resolve_model
    from mllmrec_ray.data.run_data import load_items, load_samples

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer))
    items = load_items(args.data, args.captions)
    samples = load_samples(args.data, args.split)
    raw = measure(samples, items, tokenizer, args.visual_tokens)
    rows = {k: summarize(v) for k, v in raw.items()}
    result = {"data": str(args.data), "split": args.split, "samples": len(samples), "tokenizer": args.tokenizer,
              "visual_tokens_per_image": args.visual_tokens, "items_per_prompt": 9 + 10,
              "captioner": _captioner(args.captions), "per_sample_tokens": rows,
              "ratio_visual_all_covers_to_text_captions_all_covers": round(
                  rows["visual_all_covers"]["mean"] / rows["text_captions_all_covers"]["mean"], 2),
              "ratio_visual_dataset_to_text_captions": round(rows["visual_dataset"]["mean"]
                                                             / rows["text_captions"]["mean"], 2)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt_tokens.json").write_text(json.dumps(result, indent=2) + "\n")
    labels = {"text_plain": "text, no covers",
              "text_captions": "text + captions, items that have a cover",
              "visual_dataset": f"visual, {args.visual_tokens}/image, items that have a cover",
              "text_captions_all_covers": "text + captions, every item with a cover (mean caption length)",
              "visual_all_covers": f"visual, {args.visual_tokens}/image, every item with a cover (paper)"}
    lines = [f"Prompt tokens per sample ({args.split} split, {len(samples)} samples, tokenizer {args.tokenizer}, "
             f"captions by {result['captioner']}); covers with an image per prompt: "
             f"mean {rows['items_with_cover']['mean']} of 19; a caption costs "
             f"{rows['caption_tokens_per_cover']['mean']} tokens vs {args.visual_tokens} visual tokens", "",
             "| prompt | mean | median | p95 | max |", "|---|---|---|---|---|"]
    lines += [f"| {labels[k]} | {rows[k]['mean']} | {rows[k]['median']} | {rows[k]['p95']} | {rows[k]['max']} |"
              for k in labels]
    lines += ["", "Visual / textualized prompt tokens, every item with a cover: "
                  f"{result['ratio_visual_all_covers_to_text_captions_all_covers']}x; "
                  f"this dataset's covers only: {result['ratio_visual_dataset_to_text_captions']}x."]
    (out / "prompt_tokens.md").write_text("\n".join(lines) + "\n")
    _plot(rows, labels, out / "prompt_tokens.png")
    print("\n".join(lines))
    return 0


def _captioner(path: str) -> str:
    import pyarrow.parquet as pq

    names = {c for c in pq.read_table(path, columns=["model"]).column("model").to_pylist() if c}
    return ", ".join(sorted(names)) or "none"


def _plot(rows: dict, labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(labels)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh([labels[k] for k in keys], [rows[k]["mean"] for k in keys], color=["#999", "#4a8", "#c84", "#4a8", "#c84"])
    for y, k in enumerate(keys):
        ax.text(rows[k]["mean"], y, f" {rows[k]['mean']:.0f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("prompt tokens per sample (mean)")
    ax.set_xlim(0, max(rows[k]["mean"] for k in keys) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
