"""The pixel-stats captioner: a deterministic description computed from the image itself.

This is NOT a neural caption. It is the offline fallback for machines without a
vision-language model: it measures the pixels (dominant colour names, brightness,
saturation, contrast, warm/cool balance, where light and detail sit in the frame)
and, when OpenCV ships its Haar cascades, counts frontal faces. The same image
always gives the same text. Its name (`CAPTIONER`) and feature set (`model_name()`)
are stored with every caption, so nobody mistakes it for a VLM caption.

`clean_vlm_caption` post-processes a VLM caption (paper Eq. 3: one grounded
caption that does not repeat the title).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np

CAPTIONER = "pixel-stats"
VERSION = "pixel-v1"  # bump when the description changes: stored keys change with it
_SIDE = 128  # images are measured at this longest side (fast, and scale-independent)

# Hue ranges in degrees for saturated, not-too-dark pixels.
_HUES = [(15, "red"), (40, "orange"), (68, "yellow"), (160, "green"), (200, "teal"),
         (255, "blue"), (290, "purple"), (340, "pink"), (361, "red")]
_WARM = {"red", "orange", "yellow", "pink", "brown"}
_COOL = {"green", "teal", "blue", "purple"}


@lru_cache(maxsize=1)
def _face_cascade():
    """OpenCV's frontal-face Haar cascade, or None where OpenCV or its cascades are missing.

    (opencv-python 5.x no longer ships `CascadeClassifier`; 4.x does.)
    """
    try:
        import cv2
    except ImportError:
        return None
    path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), "haarcascade_frontalface_default.xml")
    if not hasattr(cv2, "CascadeClassifier") or not os.path.exists(path):
        return None
    cascade = cv2.CascadeClassifier(path)
    return None if cascade.empty() else cascade


def model_name() -> str:
    """The captioner's feature set: `pixel-stats+haar-faces` when face detection is available."""
    return f"{CAPTIONER}+haar-faces" if _face_cascade() is not None else CAPTIONER


def _load(image) -> "Any":
    from PIL import Image, ImageOps

    img = image if isinstance(image, Image.Image) else Image.open(image)
    return ImageOps.exif_transpose(img).convert("RGB")


def _resized(img, side: int):
    from PIL import Image

    w, h = img.size
    scale = side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


def _colour_names(hsv: np.ndarray) -> np.ndarray:
    """Per-pixel colour name from HSV in [0, 1] (h in degrees)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    names = np.empty(h.shape, dtype=object)
    hue_names = np.select([h < lim for lim, _ in _HUES], [n for _, n in _HUES], default="red")
    names[:] = hue_names
    brown = (h >= 10) & (h < 50) & (v < 0.6) & (s >= 0.25)
    names[brown] = "brown"
    grey = s < 0.18
    names[grey & (v >= 0.85)] = "white"
    names[grey & (v < 0.85)] = "grey"
    names[v < 0.16] = "black"
    return names


def _hsv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = mx - mn
    safe = np.where(d == 0, 1, d)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    h = np.where(d == 0, 0, h)
    s = np.where(mx == 0, 0, d / np.where(mx == 0, 1, mx))
    return np.stack([h, s, mx], -1)


def image_stats(image) -> dict:
    """Measurements of one image (a path or a PIL image). Deterministic."""
    full = _load(image)
    w, h = full.size
    rgb = np.asarray(_resized(full, _SIDE), dtype=np.float64) / 255.0
    hsv = _hsv(rgb)
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    names = _colour_names(hsv)
    values, counts = np.unique(names, return_counts=True)
    order = sorted(zip(values, counts), key=lambda t: (-t[1], t[0]))
    colours = [(str(n), float(c) / names.size) for n, c in order]
    gy, gx = np.gradient(lum)
    edges = np.hypot(gx, gy)
    thirds = np.array_split(np.arange(lum.shape[0]), 3)
    band_lum = [float(lum[rows].mean()) for rows in thirds]
    band_edge = [float(edges[rows].mean()) for rows in thirds]
    half = lum.shape[1] // 2
    sat_mask = (hsv[..., 1] >= 0.25) & (hsv[..., 2] >= 0.2)
    warm = float(np.isin(names[sat_mask], list(_WARM)).mean()) if sat_mask.any() else 0.0
    stats = {
        "width": w, "height": h,
        "brightness": float(lum.mean()),
        "saturation": float(hsv[..., 1].mean()),
        "contrast": float(lum.std()),
        "colourful_fraction": float(sat_mask.mean()),
        "warm_fraction": warm,
        "colours": colours,
        "band_brightness": band_lum,
        "band_detail": band_edge,
        "detail": float(edges.mean()),
        "left_right": float(lum[:, :half].mean() - lum[:, half:].mean()) if half else 0.0,
        "faces": None,
    }
    cascade = _face_cascade()
    if cascade is not None:
        stats["faces"] = _faces(cascade, full)
    return stats


def _faces(cascade, img) -> list[tuple[float, float, float]]:
    """Frontal faces as (centre x, centre y, width), all as fractions of the image size."""
    import cv2

    big = _resized(img, 384)  # the same scale for every image: same detections for the same picture
    gray = cv2.equalizeHist(np.asarray(big.convert("L")))
    W, H = big.size
    found = cascade.detectMultiScale(gray, scaleFactor=1.15, minNeighbors=5, minSize=(max(12, W // 12),) * 2)
    faces = [((x + fw / 2) / W, (y + fh / 2) / H, fw / W) for x, y, fw, fh in (found if len(found) else [])]
    return sorted(faces, key=lambda f: -f[2])


def _level(x: float, cuts: list[tuple[float, str]], top: str) -> str:
    for cut, word in cuts:
        if x < cut:
            return word
    return top


def _where(x: float, y: float) -> str:
    col = "left" if x < 0.36 else "right" if x > 0.64 else "centre"
    row = "upper" if y < 0.36 else "lower" if y > 0.64 else "middle"
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}" if col != "centre" else f"{row} centre"


def describe(stats: dict) -> str:
    """Plain-English description of `image_stats` output."""
    w, h = stats["width"], stats["height"]
    shape = "Portrait" if h > 1.1 * w else "Landscape" if w > 1.1 * h else "Square"
    bright = _level(stats["brightness"], [(0.25, "very dark"), (0.4, "dark"), (0.6, "mid-toned")], "bright")
    contrast = _level(stats["contrast"], [(0.2, "low-contrast"), (0.28, "medium-contrast")], "high-contrast")
    sat = stats["saturation"]
    palette = ("near-monochrome" if stats["colourful_fraction"] < 0.08 else
               _level(sat, [(0.2, "muted"), (0.45, "moderately saturated")], "vivid"))
    warmth = ""
    if stats["colourful_fraction"] >= 0.08:
        warmth = " warm" if stats["warm_fraction"] >= 0.65 else " cool" if stats["warm_fraction"] <= 0.35 else " mixed"
    main = [(n, f) for n, f in stats["colours"] if f >= 0.08][:3] or stats["colours"][:1]
    colour_text = ", ".join(f"{n} ({round(100 * f)}%)" for n, f in main)
    parts = [f"{shape} cover, {bright} and {contrast}, with a {palette}{warmth} palette dominated by {colour_text}."]
    bands = ["top", "middle", "bottom"]
    lum, det = stats["band_brightness"], stats["band_detail"]
    layout = f"The brightest area is the {bands[int(np.argmax(lum))]} third"
    if max(lum) - min(lum) < 0.05:
        layout = "Light is spread evenly from top to bottom"
    layout += f"; the most detailed area is the {bands[int(np.argmax(det))]} third"
    busy = _level(stats["detail"], [(0.055, "clean and sparse"), (0.085, "moderately detailed")], "busy and highly detailed")
    parts.append(f"{layout}, and the image is {busy} overall.")
    if abs(stats["left_right"]) >= 0.08:
        parts.append(f"The {'left' if stats['left_right'] > 0 else 'right'} side is noticeably lighter.")
    faces = stats["faces"]
    if faces is not None:
        if not faces:
            parts.append("No clear frontal face is visible.")
        else:
            x, y, fw = faces[0]
            size = "a large close-up" if fw >= 0.3 else "a medium-sized" if fw >= 0.15 else "a small"
            count = "One frontal face is" if len(faces) == 1 else f"{len(faces)} frontal faces are"
            parts.append(f"{count} visible, the largest {size} face in the {_where(x, y)}.")
    return " ".join(parts)


def pixel_caption(image) -> str:
    """Deterministic pixel-stats description of one image (path or PIL image)."""
    return describe(image_stats(image))


def clean_vlm_caption(text: str, title: str | None, max_chars: int = 600) -> str | None:
    """One-line caption with the item's title forms replaced by "the film" (Eq. 3: no title repeat)."""
    from mllmrec_ray.prompting.parsing import MASK, sanitize_cot

    out = " ".join((text or "").split())
    if title:
        out = sanitize_cot(out, "", title)[0].replace(MASK, "the film")
    out = out[:max_chars].strip()
    return out or None
