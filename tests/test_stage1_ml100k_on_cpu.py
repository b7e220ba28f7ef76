"""Leakage on the real MovieLens-100K with the 253 real posters.

Pseudo-CoT by a tiny Llama; the refiner is a fake OpenAI endpoint on 127.0.0.1 whose every reply
names all 1682 catalogue titles and ids, so each raw refined CoT contains its sample's target.
Proved: no stored CoT mentions its target (title forms or id) or a candidate id, only training
samples carry a CoT, no valid/test prompt gets a reasoning block, and the reasoning block of
every training prompt is free of the target.
"""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from mllmrec_ray.prompting.parsing import mentions_item
from stage1_fixtures import long_context, mllmrec
from test_cot_openai_refiner import FakeOpenAI

CONFIG = """\
ray_num_cpus: 8
model:
  engine: {kv_cache_gib: 0.25, max_model_len: 1024}
stage1:
  pool_size: 1
  batch_size: 6
  max_cot_samples: 12
  p_sft: 0.5
  p_grpo: 0.25
  resources: {num_cpus: 0.5}
"""


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory, posters_dir):
    from mllmrec_ray.data.fetch import TARGETS, _intact, default_cache_dir

    cache = default_cache_dir()
    if not any(_intact(cache / folder) for folder, _ in TARGETS.values()):
        pytest.skip(f"MovieLens-100K is not in {cache}: run `mllmrec data fetch ml-100k` first")
    out = tmp_path_factory.mktemp("ml100k") / "data"
    mllmrec("data", "prepare", "--dataset", "ml-100k", "--cache-dir", cache, "--out", out, "--images", posters_dir)
    return out


def test_no_target_reaches_any_cot_or_test_prompt(ml100k, tmp_path):
    from tiny_models import make_tiny_model

    from mllmrec_ray.prompting.prompts import sample_messages
    from mllmrec_ray.data.run_data import load_items, load_reasoning, load_samples

    data, stage1 = ml100k, tmp_path / "stage1"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    model = long_context(make_tiny_model(tmp_path / "tiny", "llama"))
    items = {r["item_id"]: r for r in pq.read_table(data / "items.parquet").to_pylist()}

    mllmrec("textualize", "--data", data, "--out", stage1, "--config", cfg)
    caps = pq.read_table(stage1 / "captions.parquet").to_pylist()
    assert sum(r["caption"] is not None for r in caps) == sum(r["image_path"] is not None for r in items.values())
    assert all((r["caption"] is None) == (items[r["item_id"]]["image_path"] is None) for r in caps)

    everything = " ; ".join(f"{r['title']} [ITEM_{i}] item {i}" for i, r in items.items() if r["title"])
    server = FakeOpenAI(lambda n, body: (200, f"Step 1: covers.\nStep 2: {everything}\nStep 4: a warm drama."))
    try:
        mllmrec("cot", "--data", data, "--stage1", stage1, "--config", cfg, "--model", model, "--max-new-tokens", "24",
                "--max-model-len", "8192", "--refiner", "openai", "--endpoint", server.url, "--refiner-model", "echo",
                "--requests-per-second", "100", "--judge-samples", "0")
    finally:
        server.close()
    mllmrec("mda", "--data", data, "--stage1", stage1, "--config", cfg)

    samples = {s["sample_id"]: s for s in pq.read_table(data / "samples.parquet").to_pylist()}
    cot = pq.read_table(stage1 / "cot.parquet").to_pylist()
    assert len(cot) == 12 and all(samples[r["sample_id"]]["split"] == "train" for r in cot)
    refined = [r for r in cot if r["refined_cot"]]
    assert len(refined) >= 10 and all(r["refined_masks"] >= 2 for r in refined)  # the echo named every target
    for r in cot:
        s = samples[r["sample_id"]]
        for text in (r["pseudo_cot"], r["refined_cot"]):
            if text is None:
                continue
            assert not mentions_item(text, s["target"], items[s["target"]]["title"])
            assert not re.search(rf"ITEM_{s['target']}(?!\d)", text)
            for c in set(s["candidates"]) | set(s["candidates_100"]):
                assert not mentions_item(text, c, None)
    audit = json.loads((stage1 / "audit.json").read_text())
    assert audit["leakage"]["clean"] and audit["leakage"]["target_mentions"] == 0

    # prompts: reasoning only for MDA-selected training samples; none for valid/test
    items_c = load_items(data, stage1 / "captions.parquet")
    reasoning = load_reasoning(stage1 / "cot.parquet", stage1 / "mda.parquet", "selected_sft")
    assert reasoning and all(samples[sid]["split"] == "train" for sid in reasoning)
    marker = "Reference reasoning about this user's preferences:"
    for split in ("valid", "test"):
        for s in load_samples(data, split):
            text = sample_messages(s, items_c, reasoning=reasoning.get(s["sample_id"]), with_captions=True)[1]["content"]
            assert marker not in text
    for sid, text in reasoning.items():
        s = samples[sid]
        user = sample_messages(s, items_c, reasoning=text, with_captions=True)[1]["content"]
        block = user.split(marker, 1)[1].split("Output format", 1)[0]
        assert not mentions_item(block, s["target"], items[s["target"]]["title"])
