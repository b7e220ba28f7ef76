"""The pixel-stats captioner: deterministic, different for different images, grounded in the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mllmrec_ray.stage1 import captions
from stage1_fixtures import make_image


def solid(rgb, size=(60, 90)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_same_image_same_caption_and_different_images_differ(tmp_path):
    paths = [make_image(tmp_path / f"{i}.jpg", seed=i) for i in range(12)]
    first = [captions.pixel_caption(p) for p in paths]
    again = [captions.pixel_caption(p) for p in paths]
    assert first == again  # deterministic
    assert len(set(first)) == len(first)  # every synthetic cover gets its own description
    # the same pixels from a file or as a PIL image give the same text
    assert captions.pixel_caption(Image.open(paths[0])) == first[0]


def test_caption_reflects_colour_and_brightness():
    red = captions.pixel_caption(solid((220, 20, 20)))
    blue = captions.pixel_caption(solid((20, 40, 200)))
    black = captions.pixel_caption(solid((5, 5, 5)))
    white = captions.pixel_caption(solid((250, 250, 250)))
    assert "red (100%)" in red and "blue (100%)" in blue
    assert "black (100%)" in black and "very dark" in black
    assert "white (100%)" in white and "bright" in white
    assert "near-monochrome" in black and "near-monochrome" in white


def test_layout_brightest_third_and_orientation():
    img = np.zeros((90, 60, 3), dtype=np.uint8)
    img[60:] = 255  # bright bottom third
    text = captions.pixel_caption(Image.fromarray(img))
    assert text.startswith("Portrait cover")
    assert "brightest area is the bottom third" in text
    wide = captions.pixel_caption(solid((120, 120, 120), size=(200, 100)))
    assert wide.startswith("Landscape cover")


def test_faces_reported_only_when_haar_cascades_exist():
    stats = captions.image_stats(solid((128, 100, 90)))
    if captions._face_cascade() is None:
        assert stats["faces"] is None and "face" not in captions.describe(stats)
        assert captions.model_name() == "pixel-stats"
    else:
        assert stats["faces"] == [] and "No clear frontal face" in captions.describe(stats)
        assert captions.model_name() == "pixel-stats+haar-faces"


def test_real_posters_all_distinct_and_deterministic(posters_dir):
    paths = sorted(posters_dir.glob("*.jpg"))[:40]
    texts = [captions.pixel_caption(p) for p in paths]
    assert len(set(texts)) == len(texts)
    assert texts[:5] == [captions.pixel_caption(p) for p in paths[:5]]


@pytest.mark.parametrize("text,title,expected", [
    ("A poster of Toy Story with two toys.", "Toy Story", "A poster of the film with two toys."),
    ("  The GODFATHER title in gold\non black ", "Godfather, The", "the film title in gold on black"),
    ("Heat (1995) shows two men.", "Heat (1995)", "the film shows two men."),
    ("   ", "Heat", None),
])
def test_clean_vlm_caption_drops_the_title(text, title, expected):
    assert captions.clean_vlm_caption(text, title) == expected
