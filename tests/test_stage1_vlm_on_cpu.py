"""The VLM path on CPU: `textualize --captioner vlm` and an image-seeing pseudo-CoT through vLLM's
multimodal chat input, with a tiny random Idefics3 (SmolVLM architecture) built here.

What the random model writes does not matter; plumbing, batching, keys and storage do.
(Qwen2-VL / Qwen2.5-VL / Qwen3-VL cannot start on this CPU stack: vLLM's model code for them
imports transformers' torchvision-based image processor, and torchvision is removed from the
CPU install. The same VLMCaptioner code serves them on a GPU machine.)
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from stage1_fixtures import make_data_dir, make_tiny_idefics3, mllmrec

CONFIG = """\
ray_num_cpus: 8
model:
  engine: {kv_cache_gib: 0.25, max_model_len: 1024}
stage1:
  pool_size: 1
  batch_size: 4
  max_cot_samples: 3
  resources: {num_cpus: 0.5}
"""


def test_vlm_captions_and_image_pseudo_cot(tmp_path):
    vl = make_tiny_idefics3(tmp_path / "tiny_vl")
    data = make_data_dir(tmp_path, users=14, image_every=3)
    stage1 = tmp_path / "stage1"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    mllmrec("textualize", "--data", data, "--out", stage1, "--config", cfg, "--captioner", "vlm", "--model", vl,
            "--max-tokens", "12")
    items = {r["item_id"]: r for r in pq.read_table(data / "items.parquet").to_pylist()}
    caps = {r["item_id"]: r for r in pq.read_table(stage1 / "captions.parquet").to_pylist()}
    assert set(caps) == set(items)
    with_image = {i for i, r in items.items() if r["image_path"]}
    assert len(with_image) == 10
    for i, r in caps.items():
        if i in with_image:
            assert r["captioner"] == "vlm" and r["model"] == str(vl) and r["prompt_version"] == "caption-v1"
            assert r["key"] and (r["caption"] is None or isinstance(r["caption"], str))
        else:
            assert r["caption"] is None and r["key"] is None
    summary = json.loads((stage1 / "captions_summary.json").read_text())
    assert summary["computed_now"] == 10 and summary["errors"] == 0
    again = mllmrec("textualize", "--data", data, "--out", stage1, "--config", cfg, "--captioner", "vlm",
                    "--model", vl, "--max-tokens", "12")
    assert "10 already captioned, 0 to do" in again.stdout

    proc = mllmrec("cot", "--data", data, "--stage1", stage1, "--config", cfg, "--model", vl, "--with-images",
                   "--max-new-tokens", "16", "--max-model-len", "4096", "--judge-samples", "0")
    assert "[pseudo] 3 rows, 0 already finished, 3 to generate" in proc.stdout
    cot = pq.read_table(stage1 / "cot.parquet").to_pylist()
    assert len(cot) == 3 and all(r["cot_model"] == str(vl) for r in cot)
