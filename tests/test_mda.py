"""MDA (Eq. 6-7): scores, s_u = sigmoid(s' + s''), top-p selection, and `mllmrec mda` end to end."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllmrec_ray.stage1.mda import Embedder, item_text, profile_of, score_samples, sigmoid, top_fraction


def test_top_fraction_counts_and_order():
    ids = [f"u{i:02d}" for i in range(48)]
    scores = [i / 100 for i in range(48)]
    sft, grpo = top_fraction(ids, scores, 0.1), top_fraction(ids, scores, 0.05)
    assert sft == {f"u{i}" for i in range(43, 48)}  # round(4.8) = 5, the highest scores
    assert grpo == {"u46", "u47"}  # round(2.4) = 2
    assert top_fraction(ids, scores, 0.0) == set()
    assert top_fraction(ids, scores, 1.0) == set(ids)
    assert top_fraction(ids, [None] * 48, 0.5) == set()
    with_none = scores[:10] + [None] * 38
    assert top_fraction(ids, with_none, 0.1) == {"u09"}  # fraction of the 10 scored ones, at least one
    assert top_fraction(["b", "a", "c"], [0.5, 0.5, 0.1], 0.34) == {"a"}  # ties broken by sample_id


def test_profile_of():
    assert profile_of("Step 1: x\nStep 4: A bright family film.") == ("A bright family film.", "step4")
    assert profile_of("They like comedies.\nNext: a comedy.") == ("Next: a comedy.", "last_line")
    assert profile_of(None) == (None, None) and profile_of("") == (None, None)


def fake_embedder(vectors: dict[str, list[float]]):
    def embed(texts):
        out = np.array([vectors[t] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)
    return embed


def test_score_samples_follows_eq_6_and_7():
    items = {
        "1": {"title": "A", "year": 1990, "genres": [], "caption": "cap A"},
        "2": {"title": "B", "year": None, "genres": [], "caption": None},  # no image: skipped in Eq. 6
        "3": {"title": "C", "year": 1995, "genres": ["Drama"], "caption": "cap C"},
    }
    vec = {"A (1990)": [1, 0, 0], "cap A": [1, 1, 0], "C (1995), Drama. cap C": [0, 0, 1],
           "close profile": [0, 0.2, 1], "far profile": [1, 0, 0]}
    samples = [{"sample_id": "u1", "history": ["1", "2"], "target": "3"},
               {"sample_id": "u2", "history": ["1", "2"], "target": "3"},
               {"sample_id": "u3", "history": ["2"], "target": "3"},
               {"sample_id": "u4", "history": ["1"], "target": "3"}]
    cots = {"u1": "Step 4: close profile", "u2": "Step 4: far profile", "u3": "Step 4: close profile", "u4": None}
    rows = {r["sample_id"]: r for r in score_samples(samples, items, cots, fake_embedder(vec))}
    s_mod = 1 / math.sqrt(2)  # cos([1,0,0], [1,1,0])
    assert rows["u1"]["s_modality"] == pytest.approx(s_mod) and rows["u1"]["n_modality_items"] == 1
    assert rows["u1"]["s_prediction"] == pytest.approx(1 / math.sqrt(1.04))
    assert rows["u2"]["s_prediction"] == pytest.approx(0.0, abs=1e-6)
    assert rows["u1"]["s_u"] == pytest.approx(sigmoid(rows["u1"]["s_modality"] + rows["u1"]["s_prediction"]))
    assert rows["u3"]["s_modality"] == 0.0 and rows["u3"]["n_modality_items"] == 0
    assert rows["u4"]["s_u"] is None  # no CoT: not scored, never selected
    assert {r["image_side"] for r in rows.values()} == {"caption_text"}
    ranked = sorted((r for r in rows.values() if r["s_u"] is not None), key=lambda r: -r["s_u"])
    assert [r["sample_id"] for r in ranked] == ["u1", "u3", "u2"]
    assert item_text(items["3"]) == "C (1995), Drama. cap C"


@pytest.fixture(scope="module")
def minilm():
    return Embedder("all-MiniLM-L6-v2")


def test_minilm_from_the_wheel_scores_a_matching_profile_higher(minilm):
    assert not minilm.has_images
    items = {"t": {"title": "Toy Story", "year": 1995, "genres": ["Animation", "Children's", "Comedy"],
                   "caption": None}}
    samples = [{"sample_id": "good", "history": [], "target": "t"}, {"sample_id": "bad", "history": [], "target": "t"}]
    cots = {"good": "Step 4: An animated family comedy about toys that come to life.",
            "bad": "Step 4: A grim war documentary about trench warfare."}
    rows = {r["sample_id"]: r for r in score_samples(samples, items, cots, minilm.texts)}
    assert rows["good"]["s_prediction"] > rows["bad"]["s_prediction"] + 0.2
    assert top_fraction(list(rows), [r["s_u"] for r in rows.values()], 0.5) == {"good"}


def test_mda_job_selects_fractions_and_ranks_by_s_u(tmp_path):
    from stage1_fixtures import make_data_dir, mllmrec

    data = make_data_dir(tmp_path, users=30)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    samples = pq.read_table(data / "samples.parquet").to_pylist()
    train = sorted(s["sample_id"] for s in samples if s["split"] == "train")
    profiles = ["a tense crime thriller", "a light romantic comedy", "an epic space adventure", "a silent film"]
    with_cot = train[:20]
    pa_table = pa.table({"sample_id": with_cot,
                         "pseudo_cot": [f"Step 4: {profiles[i % 4]}" for i in range(20)],
                         "refined_cot": [f"Step 1: x\nStep 4: {profiles[i % 4]} {i}" if i != 3 else None
                                         for i in range(20)]})
    pq.write_table(pa_table, stage1 / "cot.parquet")
    mllmrec("mda", "--data", data, "--stage1", stage1, "--p-sft", "0.25", "--p-grpo", "0.1")
    mda = pq.read_table(stage1 / "mda.parquet").to_pylist()
    assert sorted(r["sample_id"] for r in mda) == train  # every training sample, no valid/test sample
    scored = [r for r in mda if r["s_u"] is not None]
    assert len(scored) == 19  # one refined CoT is null
    assert sum(r["selected_sft"] for r in mda) == 5 and sum(r["selected_grpo"] for r in mda) == 2  # round(4.75), round(1.9)
    best = sorted(scored, key=lambda r: (-r["s_u"], r["sample_id"]))
    assert {r["sample_id"] for r in best[:5]} == {r["sample_id"] for r in mda if r["selected_sft"]}
    assert {r["sample_id"] for r in best[:2]} == {r["sample_id"] for r in mda if r["selected_grpo"]}
    assert all(r["s_u"] == pytest.approx(sigmoid(r["s_modality"] + r["s_prediction"])) for r in scored)
    assert {r["image_side"] for r in mda} == {"caption_text"}
    assert all(not r["selected_sft"] for r in mda if r["s_u"] is None)
    # ablation switches: p = 1 keeps every CoT (w/o MDA), p = 0 keeps none (w/o MCoT); pseudo as the source
    mllmrec("mda", "--data", data, "--stage1", stage1, "--p-sft", "1", "--p-grpo", "0", "--cot-source", "pseudo")
    mda = pq.read_table(stage1 / "mda.parquet").to_pylist()
    assert sum(r["selected_sft"] for r in mda) == 20 and not any(r["selected_grpo"] for r in mda)
