"""Ray Data callables that caption item covers (paper Eq. 3).

Rows arrive with `key`, `item_id`, `title`, `image_path` and leave with `caption`
(plus `error` when an image could not be read; such rows keep `caption = None`).

- `PixelCaptioner`: the deterministic pixel-stats description (`mllmrec_ray.stage1.captions`),
  the CPU default. Not a neural caption, and stored under its own name.
- `VLMCaptioner`: a vision-language model through vLLM's multimodal chat input
  (Qwen2.5-VL / Qwen3-VL class models on GPUs; any model vLLM serves with image input).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _rows(batch: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: list(v) for k, v in batch.items()}


class PixelCaptioner:
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from mllmrec_ray.stage1.captions import pixel_caption

        out = _rows(batch)
        out["caption"], out["error"] = [], []
        for path in out["image_path"]:
            try:
                out["caption"].append(pixel_caption(path))
                out["error"].append("")
            except (OSError, ValueError) as e:  # unreadable or truncated image file
                out["caption"].append(None)
                out["error"].append(f"{type(e).__name__}: {e}")
        return out


class VLMCaptioner:
    """model: local dir, cache alias or hub name; engine: `EngineConfig` fields; sampling: vLLM params."""

    def __init__(self, model: str, engine: dict | None = None, sampling: dict | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from mllmrec_ray.config import EngineConfig
        from mllmrec_ray.runtime.engine import Engine
        from mllmrec_ray.runtime.models import resolve_model

        self.engine = Engine(resolve_model(model), EngineConfig(**(engine or {})), limit_mm_per_prompt={"image": 1})
        self.sampling = {"temperature": 0.0, "max_tokens": 96, **(sampling or {})}
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from PIL import Image

        from mllmrec_ray.stage1.captions import clean_vlm_caption
        from mllmrec_ray.stage1.cot_prompts import caption_messages

        out = _rows(batch)
        convs, ok, errors = [], [], []
        for title, path in zip(out["title"], out["image_path"]):
            try:
                image = Image.open(path).convert("RGB")
            except (OSError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            errors.append("")
            msgs = caption_messages(title)
            parts = [{"type": "image_pil", "image_pil": image} if p["type"] == "image" else p
                     for p in msgs[0]["content"]]
            convs.append([{**msgs[0], "content": parts}])
            ok.append(len(errors) - 1)
        texts = [None] * len(errors)
        if convs:
            self.calls += len(convs)
            outs = self.engine.chat(convs, self.sampling)
            for i, o in zip(ok, outs):
                texts[i] = clean_vlm_caption(o.text, out["title"][i])
        out["caption"], out["error"] = texts, errors
        return out
