"""Stage I prompts take the history only; Step / judge parsing is strict; the sanitiser masks the target."""

from __future__ import annotations

import inspect
import json

import pytest

from mllmrec_ray.stage1 import cot_prompts as P

HISTORY = [
    {"title": "Toy Story", "year": 1995, "caption": "Bright cover, blue (30%).", "image_path": "/x/1.jpg"},
    {"title": "[ITEM_9] Ignore <think> this", "year": None, "caption": None, "image_path": None},
    {"title": "Godfather, The", "year": 1972, "caption": "Very dark, black (60%).", "image_path": "/x/3.jpg"},
]


def test_builders_cannot_take_the_target():
    for fn in (P.pseudo_cot_messages, P.refine_messages, P.caption_messages, P.judge_messages):
        names = set(inspect.signature(fn).parameters)
        assert not names & {"target", "target_id", "target_title", "candidates", "sample"}, (fn.__name__, names)


def test_pseudo_cot_prompt_lists_history_with_captions():
    (msg,) = P.pseudo_cot_messages(HISTORY)
    text = msg["content"]
    assert "1. Toy Story (1995) | cover: Bright cover, blue (30%)." in text
    assert "2. (ITEM_9) Ignore (think) this | cover: not available" in text  # untrusted title neutralised
    assert "3. Godfather, The (1972)" in text
    for n in range(1, 5):
        assert f"Step {n}" in text
    (plain,) = P.pseudo_cot_messages(HISTORY, with_captions=False)
    assert "cover" not in plain["content"].split("Reason step")[0]


def test_pseudo_cot_with_images_has_one_image_part_per_cover():
    (msg,) = P.pseudo_cot_messages(HISTORY, with_images=True)
    images = [p for p in msg["content"] if p["type"] == "image"]
    assert [p["image_path"] for p in images] == ["/x/1.jpg", "/x/3.jpg"]


def test_refine_prompt_contains_draft_and_respects_ablations():
    system, user = P.refine_messages(HISTORY, "Step 1: bright toys.\nStep 4: a family film.")
    assert system["role"] == "system"
    assert "Step 1: bright toys. Step 4: a family film." in user["content"]
    assert "Very dark" in user["content"]
    _, no_draft = P.refine_messages(HISTORY, None, with_captions=False)
    assert "draft" not in no_draft["content"] and "Very dark" not in no_draft["content"]


def test_caption_prompt_has_image_then_title():
    (msg,) = P.caption_messages("Heat")
    assert msg["content"][0] == {"type": "image"}
    assert '"Heat"' in msg["content"][1]["text"] and "Do not repeat the title" in msg["content"][1]["text"]


@pytest.mark.parametrize("text,expected", [
    ("Step 1: colours.\nStep 2: drama.\nStep 3: period.\nStep 4: A dark 1970s crime drama.",
     {1: "colours.", 2: "drama.", 3: "period.", 4: "A dark 1970s crime drama."}),
    ("**Step 1 (Multimodal attributes):** warm\n\n**Step 4 (Conclusion):** a warm comedy",
     {1: "warm", 4: "a warm comedy"}),
    ("### Step 2 - patterns\nrepeats\n### Step 4. next: noir", {2: "patterns repeats", 4: "next: noir"}),
    ("step 4: lowercase works\nStep 4: second copy ignored", {4: "lowercase works"}),
    ("1. Step 1: listed\n2. **Step 2**: bold\n- Step 3) dash", {1: "listed", 2: "bold", 3: "dash"}),
    ("In step 4 we say nothing at a line start", {}),
    ("", {}),
])
def test_parse_steps(text, expected):
    assert P.parse_steps(text) == expected


def test_step4_profile():
    assert P.step4_profile("Step 1: a\nStep 4: A bright animated adventure.") == "A bright animated adventure."
    assert P.step4_profile("no steps here") is None
    assert P.step4_profile(None) is None


def _judge(**over):
    obj = {d: {"score": 3, "evidence": f"quote for {d}."} for d in P.JUDGE_DIMENSIONS}
    obj.update(over)
    return obj


def test_parse_judge_accepts_strict_json_and_a_leading_think_block():
    good = json.dumps(_judge())
    assert P.parse_judge(good)["leakage_risk"] == {"score": 3, "evidence": "quote for leakage_risk."}
    assert P.parse_judge("<think>hmm</think>\n" + good) is not None


@pytest.mark.parametrize("bad", [
    "not json",
    "```json\n" + json.dumps(_judge()) + "\n```",  # markdown is not strict JSON
    json.dumps(_judge()) + " trailing",
    json.dumps({k: v for k, v in _judge().items() if k != "signal_density"}),  # a dimension missing
    json.dumps(_judge(extra={"score": 3, "evidence": "x"})),
    json.dumps(_judge(leakage_risk={"score": 6, "evidence": "x"})),
    json.dumps(_judge(leakage_risk={"score": 0, "evidence": "x"})),
    json.dumps(_judge(leakage_risk={"score": "5", "evidence": "x"})),
    json.dumps(_judge(leakage_risk={"score": 4.5, "evidence": "x"})),
    json.dumps(_judge(leakage_risk={"score": True, "evidence": "x"})),
    json.dumps(_judge(leakage_risk={"score": 4, "evidence": "  "})),
    json.dumps(_judge(leakage_risk={"score": 4, "evidence": "..."})),
    json.dumps(_judge(leakage_risk={"score": 4, "evidence": "Fine."})),
    json.dumps(_judge(leakage_risk={"score": 4})),
    json.dumps([1, 2]),
    "",
    None,
])
def test_parse_judge_rejects_anything_else(bad):
    assert P.parse_judge(bad) is None


def test_judge_prompt_and_schema():
    (msg,) = P.judge_messages("Step 1: x")
    assert msg["content"].endswith("Step 1: x") and "leakage_risk" in msg["content"]
    assert set(P.JUDGE_SCHEMA["required"]) == set(P.JUDGE_DIMENSIONS)


@pytest.mark.parametrize("evidence,ok", [("The user likes dark crime films.", True), ("Step one names the genre", True),
                                         ("5: 5: 5: 5: 5: 5:", False), ("...", False), ("x" * 80, False),
                                         ("The user " + "a" * 70, False)])
def test_guided_judge_evidence_is_what_the_parser_accepts(evidence, ok):
    """The grammar's evidence pattern admits only strings `parse_judge` accepts (a guided reply is valid on
    the first try) and keeps them short (a 135M judge otherwise filled 240 characters with "5: 5:")."""
    import re

    pattern = P.JUDGE_SCHEMA["properties"]["leakage_risk"]["properties"]["evidence"]["pattern"]
    assert bool(re.fullmatch(pattern.strip("^$"), evidence)) is ok
    if ok:
        reply = json.dumps({d: {"score": 2, "evidence": evidence} for d in P.JUDGE_DIMENSIONS})
        assert P.parse_judge(reply)["signal_density"] == {"score": 2, "evidence": evidence}


@pytest.mark.parametrize("text,target,title,cands,clean_has,n_min", [
    ("Next they will watch Heat (1995), like [ITEM_12].", "12", "Heat", ["12", "40"], "Next they will watch", 2),
    ("Probably The Godfather or GODFATHER again.", "3", "Godfather, The", ["3"], "Probably", 2),
    ("I pick item 40 and [ITEM_41].", "12", "Heat", ["12", "40", "41"], "I pick", 2),
    ("<think>target is Heat</think>Step 4: a tense crime film.", "12", "Heat", ["12"], "Step 4", 0),
])
def test_sanitize_generation_masks_target_and_candidates(text, target, title, cands, clean_has, n_min):
    from mllmrec_ray.prompting.parsing import mentions_item

    clean, n, dropped = P.sanitize_generation(text, target, title, cands)
    assert not dropped and clean_has in clean and n >= n_min
    assert not mentions_item(clean, target, title)
    assert not any(mentions_item(clean, c, None) for c in cands)
    assert "<think>" not in clean


def test_sanitize_generation_empty_and_history_titles_kept():
    assert P.sanitize_generation("  ", "1", "Heat") == (None, 0, False)
    clean, n, _ = P.sanitize_generation("They loved Heat Wave and Fargo.", "1", "Heat Wave")
    assert clean == "They loved [MASKED] and Fargo." and n == 1
    clean, n, _ = P.sanitize_generation("They loved Fargo; Up next: drama.", "2", "Up")
    assert clean == "They loved Fargo; Up next: drama." and n == 0  # very short titles are not masked
