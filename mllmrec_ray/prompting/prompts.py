"""Instruction prompts and answer strings (SPEC section 4), shared by SFT, GRPO, eval and serving.

Answer format (paper order):   ``[ITEM_<id>] <title>`` then optionally ``<think>...</think>``.
Think-first variant:           ``<think>...</think>`` then ``[ITEM_<id>] <title>``.

Titles and captions are untrusted text. Everywhere they are rendered (prompt lists, the
answer string, SFT labels) they go through :func:`clean_text`, which puts them on one line
and turns ``[ ] < >`` into ``( ) ( )``; so no title can ever form an ``[ITEM_..]`` tag or a
``<think>`` tag, and the model sees and writes exactly the same title text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

UNTITLED = "(untitled)"

DEFAULT_SYSTEM = (
    "You are a movie recommender system. Given the items a user recently watched, "
    "choose the one candidate item the user is most likely to watch next."
)

COMPACT_SYSTEM = "You are a movie recommender."

# Brackets and angle brackets are the only characters our tags are made of: neutralise them.
_TAG_CHARS = str.maketrans({"[": "(", "]": ")", "<": "(", ">": ")"})
# Any run of whitespace, including newlines and Unicode line/paragraph separators.
_WS = re.compile(r"\s+")


def clean_text(text: str | None) -> str | None:
    """One-line, tag-free rendering of untrusted text (titles, captions); None stays None."""
    if text is None:
        return None
    return _WS.sub(" ", str(text).translate(_TAG_CHARS)).strip()


def item_tag(item_id: str) -> str:
    return f"[ITEM_{item_id}]"


def answer_text(item_id: str, title: str | None) -> str:
    """The exact answer line for an item: ``[ITEM_<id>] <title>`` (title cleaned, never empty)."""
    return f"{item_tag(item_id)} {clean_text(title) or UNTITLED}"


def _output_constraint(think_first: bool, compact: bool = False) -> str:
    if compact:
        if think_first:
            return "Reason inside <think> ... </think>, then write one candidate item as [ITEM_<id>] <title>."
        return "Reply with one candidate item as [ITEM_<id>] <title>; you may add <think> ... </think> after it."
    if think_first:
        return (
            "Output format (strict): first write your reasoning inside <think> ... </think>, "
            "then on a new line write exactly one item chosen from the candidate items as "
            "[ITEM_<id>] <title>. Write nothing after the item line."
        )
    return (
        "Output format (strict): start your reply with exactly one item chosen from the "
        "candidate items, written as [ITEM_<id>] <title> on the first line. You may then add "
        "a short explanation inside <think> ... </think>. Write nothing else."
    )


def is_output_constraint(text: str) -> bool:
    """Whether `text` is one of the prompts' output rules (full or compact, either answer order)."""
    return any(text == _output_constraint(t, c) for t in (False, True) for c in (False, True))


def build_messages(
    history: Sequence[Mapping[str, Any]],
    candidates: Sequence[Mapping[str, Any]],
    reasoning: str | None = None,
    with_captions: bool = False,
    think_first: bool = False,
    system: str | None = None,
    evidence: Sequence[str] | None = None,
    legend: str | None = None,
    compact: bool = False,
) -> list[dict]:
    """Chat messages for one recommendation prompt.

    history / candidates: dicts with ``item_id``, ``title`` and optionally ``caption``.
    The system message is the role statement (i); the user message holds (ii) the recently
    watched list, (iii) the candidate list, (iv) the reference reasoning when given and
    (v) the output constraint. No argument carries the target, so no prompt can reveal it.
    evidence: one collaborative-evidence text per candidate (`mllmrec_ray.data.collab`), written before
    its line; legend: what they mean (`CollabStats.legend`), one line above the candidates.
    compact (`prompt.instructions: compact`): the same parts with a one-line role, list header and
    output rule (~14% fewer tokens on the demo's prompts: every SFT, GRPO and scoring step is shorter).
    """
    lines = ["Recently watched (oldest first):" if compact else "The user recently watched these items (oldest first):"]
    for n, it in enumerate(history, 1):
        line = f"{n}. {answer_text(str(it['item_id']), it.get('title'))}"
        caption = clean_text(it.get("caption"))
        if with_captions and caption:  # empty captions add nothing but noise
            line += f" — {caption}"
        lines.append(line)
    lines += [""]
    if evidence is not None:
        if len(evidence) != len(candidates):
            raise ValueError(f"{len(evidence)} evidence texts for {len(candidates)} candidates")
        if not legend:
            raise ValueError("evidence without a legend: the prompt would not say what it means")
        lines += [legend]
    lines += ["Candidate items:"]
    # Candidates carry no caption: the paper's prompt lists candidates by tag and title.
    cand_lines = [answer_text(str(it["item_id"]), it.get("title")) for it in candidates]
    if evidence is not None:
        # evidence before the tag: in a causal LM the id tokens can then see their own line's
        # evidence, so choosing an id is one attention step (after the title it needs two)
        cand_lines = [f"{clean_text(e)} {line}" for line, e in zip(cand_lines, evidence)]
    lines += cand_lines
    if reasoning is not None:
        lines += ["", "Reference reasoning about this user's preferences:", reasoning.strip()]
    lines += ["", _output_constraint(think_first, compact)]
    if system is None:
        system = COMPACT_SYSTEM if compact else DEFAULT_SYSTEM
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n".join(lines)},
    ]


def _item_dict(item_id: str, items: Mapping[str, Mapping[str, Any]]) -> dict:
    if item_id not in items:  # a missing item is a data bug: fail loudly, never render "None"
        raise KeyError(f"item {item_id!r} is not in the item table")
    it = items[item_id]
    return {"item_id": item_id, "title": it.get("title"), "caption": it.get("caption")}


def _candidate_ids(sample: Mapping[str, Any], n_candidates: int) -> list[str]:
    for key in ("candidates", "candidates_100"):
        ids = sample.get(key)
        if ids is not None and len(ids) == n_candidates:
            return [str(i) for i in ids]
    raise ValueError(f"sample {sample.get('sample_id')!r} has no candidate list of size {n_candidates}")


def sample_messages(
    sample: Mapping[str, Any],
    items: Mapping[str, Mapping[str, Any]],
    reasoning: str | None = None,
    with_captions: bool = False,
    think_first: bool = False,
    n_candidates: int = 10,
    collab=None,
    without_history: bool = False,
    compact: bool = False,
) -> list[dict]:
    """Messages for a samples.parquet row. Never reads ``sample["target"]`` (leak-proof by construction).

    collab: `mllmrec_ray.data.collab.CollabStats` adds evidence per candidate (the sample's own user
        left out of the statistics). without_history: the same prompt with an empty history
        (the reference prompt of the calibrated readout). compact: `build_messages`'s short instructions.
    """
    history_ids = [] if without_history else [str(i) for i in sample["history"]]
    history = [_item_dict(i, items) for i in history_ids]
    cand_ids = _candidate_ids(sample, n_candidates)
    cands = [_item_dict(i, items) for i in cand_ids]
    evidence = None if collab is None else collab.texts(history_ids, cand_ids, sample.get("user_id"))
    return build_messages(history, cands, reasoning, with_captions, think_first, evidence=evidence,
                          legend=None if collab is None else collab.legend(evidence), compact=compact)


@dataclass
class EvalMessages:
    """`messages_of(row, without_history)` of an evaluation: only the row's ids, history and candidates reach
    `sample_messages`, never its target. A picklable object, so the scorers of `mllmrec eval --workers N`
    build exactly the prompts the job itself would."""

    items: Mapping[str, Mapping[str, Any]]
    with_captions: bool = False
    think_first: bool = False
    n_candidates: int = 10
    collab: Any = None
    compact: bool = False

    def __call__(self, row: Mapping[str, Any], without_history: bool = False) -> list[dict]:
        visible = {key: row[key] for key in ("sample_id", "user_id", "history", "candidates")}
        return sample_messages(visible, self.items, with_captions=self.with_captions, think_first=self.think_first,
                               n_candidates=self.n_candidates, collab=self.collab, without_history=without_history,
                               compact=self.compact)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Prompt text through the tokenizer's chat template, ending with the assistant turn opener."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; set one "
            "(tokenizer.chat_template = ...) before building prompts"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _clean_think(think: str) -> str:
    # A literal think tag inside the label would make the label itself unparseable.
    return re.sub(r"</?think>", "", think).strip()


def sft_target(
    sample: Mapping[str, Any],
    items: Mapping[str, Mapping[str, Any]],
    think: str | None = None,
    think_first: bool = False,
) -> str:
    """Supervised completion: the target's answer line, plus ``<think>`` text when given (the label)."""
    target = str(sample["target"])
    answer = answer_text(target, _item_dict(target, items)["title"])
    if think is None:
        return answer
    block = f"<think>\n{_clean_think(think)}\n</think>"
    return f"{block}\n{answer}" if think_first else f"{answer}\n{block}"
