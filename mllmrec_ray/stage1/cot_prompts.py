"""Stage I prompts (paper Eq. 3-5 and Appendix D) and parsing of their outputs.

Leak-proof by construction: the pseudo-CoT and refinement builders take the
user's HISTORY only (titles, captions, optional cover paths) and, for the
refiner, the already sanitised pseudo-CoT. No function here accepts the target
item or the candidate list, so no prompt built here can contain them.

History items are mappings with `title`, optional `year`, `caption` and
`image_path`. Titles and captions are untrusted text: they go through
`prompts.clean_text` (one line, no tag characters).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from mllmrec_ray.prompting.prompts import UNTITLED, clean_text

CAPTION_VERSION = "caption-v1"
PSEUDO_VERSION = "pseudo-v1"
REFINE_VERSION = "refine-v1"
JUDGE_VERSION = "judge-v3"

STEP_NAMES = {
    1: "Multimodal attributes",
    2: "Stable preference patterns",
    3: "Plausible next-item characteristics",
    4: "Conclusion",
}


def _title(item: Mapping[str, Any]) -> str:
    title = clean_text(item.get("title")) or UNTITLED
    year = item.get("year")
    return f"{title} ({int(year)})" if year is not None and year == year else title  # year == year: not NaN


def _history_lines(history: Sequence[Mapping[str, Any]], with_captions: bool) -> list[str]:
    lines = []
    for n, item in enumerate(history, 1):
        line = f"{n}. {_title(item)}"
        if with_captions:
            caption = clean_text(item.get("caption"))
            line += f" | cover: {caption}" if caption else " | cover: not available"
        lines.append(line)
    return lines


# ------------------------------------------------------------------ Eq. 3: captions


def caption_messages(title: str | None) -> list[dict]:
    """VLM caption request for one cover (image part first, then the instruction with the title)."""
    text = (
        f'This is the cover image of the movie "{clean_text(title) or UNTITLED}". '
        "Describe what the cover shows in one or two sentences: main subjects, setting, colours, "
        "lighting, mood and visual style. Only state what is visible in the image. "
        "Do not repeat the title, do not tell the plot and do not mention any other movie."
    )
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


# ------------------------------------------------------------------ Eq. 4: pseudo-CoT

_STEP_RULES = (
    "Write exactly four steps, each starting on a new line:\n"
    "Step 1 (Multimodal attributes): the concrete visual and textual attributes shared by the watched items "
    "(cover colours, mood, style, subjects, genre cues in the titles).\n"
    "Step 2 (Stable preference patterns): the preferences that repeat across the history.\n"
    "Step 3 (Plausible next-item characteristics): what the next movie is likely to be like.\n"
    "Step 4 (Conclusion): one sentence that profiles the next movie.\n"
    "Rules: use only the information above; describe the next movie by its characteristics and never "
    "name a specific movie, title or id as the prediction."
)


def pseudo_cot_messages(history: Sequence[Mapping[str, Any]], with_captions: bool = True,
                        with_images: bool = False) -> list[dict]:
    """Pseudo-CoT request (Eq. 4) from the history only.

    with_images: each item with an `image_path` gets an image part before its line
    (for a VLM generator; the actor loads the file). Otherwise covers come as captions.
    """
    intro = "A user watched these movies, oldest first"
    intro += ", each with a description of its cover:" if with_captions else ":"
    lines = _history_lines(history, with_captions)
    tail = "\n\nReason step by step about this user's taste.\n" + _STEP_RULES
    if not with_images:
        return [{"role": "user", "content": intro + "\n" + "\n".join(lines) + tail}]
    parts: list[dict] = [{"type": "text", "text": intro + "\n"}]
    for item, line in zip(history, lines):
        if item.get("image_path"):
            parts.append({"type": "image", "image_path": str(item["image_path"])})
        parts.append({"type": "text", "text": line + "\n"})
    parts.append({"type": "text", "text": tail})
    return [{"role": "user", "content": parts}]


# ------------------------------------------------------------------ Eq. 5: refinement

REFINE_SYSTEM = "You are a careful recommendation analyst who reasons from evidence."


def refine_messages(history: Sequence[Mapping[str, Any]], pseudo_cot: str | None,
                    with_captions: bool = True) -> list[dict]:
    """Refinement request (Eq. 5): history titles (+ captions) and the sanitised pseudo-CoT, never the target."""
    lines = ["Watched movies, oldest first" + (" (with cover descriptions):" if with_captions else ":")]
    lines += _history_lines(history, with_captions)
    if pseudo_cot:
        lines += ["", "A first draft of the reasoning (may be noisy or incomplete):",
                  " ".join(pseudo_cot.split())]
    lines += [
        "",
        "Rewrite the reasoning into a clean, evidence-based analysis of what this user will watch next. "
        "Remove claims the history does not support and add missing cues.",
        _STEP_RULES.replace("Step 4 (Conclusion): one sentence that profiles the next movie.",
                            "Step 4 (Conclusion): one sentence that profiles the predicted next movie "
                            "(its genre, tone, visual style and era)."),
    ]
    return [{"role": "system", "content": REFINE_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


# ------------------------------------------------------------------ Step parsing

_STEP_HEAD = re.compile(
    r"^[\s>*#_`-]*(?:\d+[.)]\s*)?[*_]*step\s*([1-4])\b(?:\s*\([^)\n]*\))?[\s*_]*(?:[:.)\-\u2013\u2014][\s*_]*)?",
    re.IGNORECASE | re.MULTILINE,
)


def parse_steps(text: str | None) -> dict[int, str]:
    """{step number: text} for `Step 1..Step 4` headers at line starts (first occurrence of each)."""
    if not text:
        return {}
    heads = list(_STEP_HEAD.finditer(text))
    steps: dict[int, str] = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split()).strip(" *_")
        n = int(m.group(1))
        if n not in steps and body:
            steps[n] = body
    return steps


def step4_profile(text: str | None) -> str | None:
    """The Step-4 next-item profile, or None when the text has no Step 4."""
    return parse_steps(text).get(4)


def sanitize_generation(text: str | None, target_id: str, target_title: str | None,
                        candidate_ids: Sequence[str] = ()) -> tuple[str | None, int, bool]:
    """Clean one generated CoT -> (text or None, masks applied, dropped).

    A leading reasoning-model `<think>...</think>` block is removed (its conclusion is kept),
    then every mention of the target id/title and of candidate ids is masked
    (`parsing.sanitize_cot`). If a mention still survives, the CoT is dropped (None, dropped=True).
    An empty generation becomes None without counting as dropped.
    """
    from mllmrec_ray.prompting.parsing import mentions_item, sanitize_cot

    s = text or ""
    if "</think>" in s:
        s = s.split("</think>", 1)[1]
    s = s.replace("<think>", " ").strip()
    if not s:
        return None, 0, False
    clean, n = sanitize_cot(s, str(target_id), target_title, [str(c) for c in candidate_ids])
    if mentions_item(clean, str(target_id), target_title) or any(mentions_item(clean, str(c), None)
                                                                  for c in candidate_ids):
        return None, n, True
    return clean, n, False


# ------------------------------------------------------------------ Appendix D: judge

JUDGE_DIMENSIONS = ("modality_consistency", "prediction_consistency", "signal_density",
                    "leakage_risk", "coverage_hardness")

_RUBRIC = """Role. You are an evaluator for "multimodal sequential recommendation data quality." You will be given a Chain-of-Thought (CoT) reasoning text. Your task is to score it on five data-quality dimensions and provide evidence for each score.

Scoring Requirements.
- For each dimension, assign an integer score from 1 to 5.
- For each dimension, provide exactly ONE sentence of evidence/justification, quoting only from the given reasoning text.
- Output MUST be strict JSON (no extra explanations, no markdown, no multiple blocks).

Five Dimensions + Rubrics.
(1) modality_consistency. Evaluate whether the preference signals in the reasoning are concrete and groundable to multimodal inputs (title/image/caption), avoiding vague or unverifiable claims.
5: Specific and verifiable descriptions that can align with image. 3: Generally relevant but somewhat generic; limited details; partially hard to verify. 1: Mostly vague/template-like statements, or obviously ungroundable/contradictory descriptions.
(2) prediction_consistency. Evaluate whether steps logically support the conclusion, avoiding "jump-to-conclusion."
5: Conclusion clearly inherits multiple retrieval criteria from steps. 3: The main line is consistent but with missing links or weak support. 1: Contradictions, or conclusion is unrelated to the earlier preference profile.
(3) signal_density. Evaluate whether the reasoning provides sufficiently rich, fine-grained, learnable preference cues rather than generic templates.
5: Multiple fine-grained preference dimensions with strong discriminative power for candidates. 3: Some preference cues but coarse (e.g., only "likes sci-fi action"); moderate discriminativeness. 1: Almost no learnable preference information, or highly templated/empty content.
(4) leakage_risk. Evaluate whether the text contains shortcut signals that enable guessing without true preference reasoning.
5: No explicit target info; stays at "profile/criteria" level; does not uniquely pinpoint an answer. 3: No explicit title/ID, but includes highly identifying combinations or overly strong hints. 1: Contains target title/ID, candidate position hints, or any explicit leakage of the answer.
(5) coverage_hardness. Evaluate whether this sample provides useful difficulty and coverage for training (distinguishing similar candidates, capturing long-tail preferences), rather than being too easy or redundant.
5: Fine-grained constraints that help distinguish homogeneous candidates; "hard-but-useful" training value. 3: Medium difficulty and medium information value. 1: Too easy (candidates are trivially separable) or highly repetitive, yielding low marginal training benefit.

Output Format (Strict JSON).
{"modality_consistency": {"score": 1-5, "evidence": "..."}, "prediction_consistency": {"score": 1-5, "evidence": "..."}, "signal_density": {"score": 1-5, "evidence": "..."}, "leakage_risk": {"score": 1-5, "evidence": "..."}, "coverage_hardness": {"score": 1-5, "evidence": "..."}}

Now Start Evaluating. Please score ONLY based on the following reasoning text:
"""

# One short evidence sentence that starts with two words (what `parse_judge` requires). With a bare
# 12-240 character string SmolLM2 wrote "5: 5: 5: ..." to the cap, ran into max_tokens 512 and was asked
# again twice: an invalid audit that took 100 s of the demo's CoT stage for 2 rows.
EVIDENCE_PATTERN = r"^[A-Z][a-z]+ [a-z]+[^\"\\]{0,60}$"
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        d: {
            "type": "object",
            "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                           "evidence": {"type": "string", "pattern": EVIDENCE_PATTERN}},
            "required": ["score", "evidence"],
            "additionalProperties": False,
        }
        for d in JUDGE_DIMENSIONS
    },
    "required": list(JUDGE_DIMENSIONS),
    "additionalProperties": False,
}


def judge_messages(reasoning: str) -> list[dict]:
    """The Appendix D evaluator prompt for one reasoning text."""
    return [{"role": "user", "content": _RUBRIC + reasoning.strip()}]


def parse_judge(text: str | None) -> dict[str, dict] | None:
    """Strictly parse a judge reply -> {dimension: {"score": int 1-5, "evidence": str}}, or None if invalid.

    Accepted: one JSON object (optionally after a reasoning model's leading <think>...</think>)
    with exactly the five dimensions, each an integer score in 1..5 and an evidence string of at
    least two words.
    Nothing is guessed or repaired.
    """
    s = (text or "").strip()
    if s.startswith("<think>") and "</think>" in s:
        s = s.split("</think>", 1)[1].strip()
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(JUDGE_DIMENSIONS):
        return None
    out = {}
    for dim in JUDGE_DIMENSIONS:
        v = obj[dim]
        if not isinstance(v, dict) or set(v) != {"score", "evidence"}:
            return None
        score, evidence = v["score"], v["evidence"]
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            return None
        if not isinstance(evidence, str) or len(re.findall(r"[^\W\d_]{2,}", evidence)) < 2:
            return None  # an evidence sentence has words, not "..." copied from the format line
        out[dim] = {"score": score, "evidence": evidence.strip()}
    return out
