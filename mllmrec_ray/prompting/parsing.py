"""Strict parsing of model answers, ranking extraction, and CoT leakage masking.

Answer grammar (``think_first=False``, the paper's order), applied to ``text.lstrip()``::

    [ITEM_<id>] <title> [ <think> ... </think> ] <whitespace only>

- The response must START with the tag ``[ITEM_<id>]`` (``<id>``: no whitespace, no brackets;
  the tag is case-sensitive). Tags anywhere else are never read as the answer, so echoed
  candidate lists or titles cannot choose it.
- The answer line runs from the tag to the first newline or ``<think>``; its title part must
  be non-empty and must not contain another ``[ITEM_`` (any case: ambiguous) or ``</think>``.
  The title is NOT checked against the catalogue (the hit is decided by the id only).
- After the answer line only whitespace may follow, or one ``<think>...</think>`` block
  (closed, not nested) followed by whitespace only.
- ``think_first=True``: an optional ``<think>...</think>`` block first, then the answer line,
  then whitespace only.
- The id must be one of ``candidates``; otherwise the answer is malformed.
Decode responses with ``skip_special_tokens=True``: an EOS string left in the text is "trailing text".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MASK = "[MASKED]"

_TAG = re.compile(r"\[ITEM_([^\[\]\s]+)\]")
_SECOND_TAG = re.compile(r"\[ITEM_", re.IGNORECASE)


@dataclass
class ParsedAnswer:
    item_id: str | None  # the chosen candidate; None unless well_formed
    well_formed: bool
    think: str | None  # text inside <think>...</think>, stripped; None when absent
    error: str | None  # why the answer is malformed; None when well-formed


def _bad(error: str, think: str | None = None) -> ParsedAnswer:
    return ParsedAnswer(None, False, think, error)


def _answer_line(s: str) -> tuple[str | None, str, str | None]:
    """Parse ``[ITEM_<id>] <title>`` at the start of s -> (id, rest after the line, error)."""
    m = _TAG.match(s)
    if not m:
        return None, "", "response does not start with an [ITEM_<id>] tag"
    rest = s[m.end():]
    ends = [i for i in (rest.find("\n"), rest.find(THINK_OPEN)) if i >= 0]
    cut = min(ends) if ends else len(rest)
    title = rest[:cut].strip()
    if not title:
        return None, "", "no title after the item tag"
    if _SECOND_TAG.search(title):
        return None, "", "a second [ITEM_ tag on the answer line (ambiguous)"
    if THINK_CLOSE in title:
        return None, "", "stray </think> on the answer line"
    return m.group(1), rest[cut:], None


def _think_block(s: str) -> tuple[str | None, str, str | None]:
    """Parse ``<think>...</think>`` at the start of s -> (think text, rest, error)."""
    end = s.find(THINK_CLOSE)
    if end < 0:
        return None, "", "unclosed <think>"
    think = s[len(THINK_OPEN):end].strip()
    if THINK_OPEN in think:
        return None, "", "nested <think>"
    return think, s[end + len(THINK_CLOSE):], None


def parse_answer(text: str, candidates: Sequence[str], think_first: bool = False) -> ParsedAnswer:
    """Strictly parse one response (grammar in the module docstring)."""
    s = (text or "").lstrip()
    if not s:
        return _bad("empty response")
    think = None
    if think_first:
        if s.startswith(THINK_OPEN):
            think, s, err = _think_block(s)
            if err:
                return _bad(err)
            s = s.lstrip()
        item_id, rest, err = _answer_line(s)
        if err:
            return _bad(err, think)
        if rest.strip():
            return _bad("text after the answer line", think)
    else:
        item_id, rest, err = _answer_line(s)
        if err:
            return _bad(err)
        rest = rest.strip()
        if rest:
            if not rest.startswith(THINK_OPEN):
                return _bad("text after the answer line that is not a <think> block")
            think, rest, err = _think_block(rest)
            if err:
                return _bad(err)
            if rest.strip():
                return _bad("text after </think>", think)
    if item_id not in set(map(str, candidates)):
        return _bad(f"item id {item_id!r} is not one of the candidates", think)
    return ParsedAnswer(item_id, True, think, None)


def _outside_think(text: str) -> str:
    """The text with every <think> block removed (an unclosed one runs to the end)."""
    close, open_ = text.find(THINK_CLOSE), text.find(THINK_OPEN)
    if close >= 0 and (open_ < 0 or close < open_):  # think opened by the prompt: drop its reasoning
        text = text[close + len(THINK_CLOSE):]
    return re.sub(r"<think>.*?(?:</think>|\Z)", " ", text, flags=re.DOTALL)


def parse_ranking(text: str, candidates: Sequence[str], k: int) -> list[str] | None:
    """Generate mode: candidate ids from ``[ITEM_<id>]`` tags outside <think>, in order, deduped, at most k."""
    allowed = set(map(str, candidates))
    ranking: list[str] = []
    for item_id in _TAG.findall(_outside_think(text or "")):
        if item_id in allowed and item_id not in ranking:
            ranking.append(item_id)
    return ranking[:k] or None


# ---------------------------------------------------------------- CoT leakage masking

_ARTICLES = r"The|A|An|La|Le|Les|L'|Il|El|Das|Der|Die"


def _title_variants(title: str | None) -> list[str]:
    """Title forms a CoT may use: full, without trailing "(1995)"-style parts, "X, The" -> "The X" / "X"."""
    if not title:
        return []
    full = " ".join(title.split())
    base = re.sub(r"(\s*\([^()]*\))+\s*$", "", full).strip()
    variants = {full, base}
    m = re.match(rf"^(.*\S),\s*({_ARTICLES})$", base, re.IGNORECASE)
    if m:
        variants |= {f"{m.group(2)} {m.group(1)}", m.group(1)}
    # Very short titles ("It", "Up") would mask ordinary words.
    return sorted((v for v in variants if len(v) >= 4), key=len, reverse=True)


def _phrase_pattern(phrase: str) -> str:
    body = r"\s+".join(re.escape(w) for w in phrase.split())  # whitespace-normalised match
    left = r"(?<!\w)" if re.match(r"\w", phrase) else ""
    right = r"(?!\w)" if re.search(r"\w$", phrase) else ""
    return left + body + right


def _leak_regex(item_ids: Iterable[str], title: str | None) -> re.Pattern | None:
    ids = sorted({str(i) for i in item_ids if str(i)}, key=len, reverse=True)
    alts = []
    if ids:
        id_alt = "|".join(re.escape(i) for i in ids)
        # [ITEM_42], [item 42], [42]: a bracketed item tag (longest form first, so one mask per tag).
        alts.append(rf"\[\s*(?:item[\s_#:-]*(?:id[\s#:_-]*)?)?(?:{id_alt})\s*\]")
        # ITEM_42, item 42, item #42, Item ID: 42 (a bare number alone is never masked: "Step 4").
        alts.append(rf"(?<!\w)item[\s_-]*(?:id)?[\s#:_-]*(?:{id_alt})(?!\w)")
    alts += [_phrase_pattern(v) for v in _title_variants(title)]
    return re.compile("|".join(alts), re.IGNORECASE) if alts else None


def sanitize_cot(
    text: str, target_id: str, target_title: str | None, candidate_ids: Sequence[str] = ()
) -> tuple[str, int]:
    """Mask target id tags, target title variants and candidate id tags with [MASKED] -> (text, n masks)."""
    rx = _leak_regex([target_id, *candidate_ids], target_title)
    return rx.subn(MASK, text) if rx else (text, 0)


def mentions_item(text: str, item_id: str, title: str | None) -> bool:
    """Leakage check: does text contain an id tag of item_id or a (case/space-insensitive) title form?"""
    rx = _leak_regex([item_id], title)
    return bool(rx and rx.search(text))
