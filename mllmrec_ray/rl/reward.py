"""Rule reward of MLLMRec-R1 (paper Eq. 8): R = R_fmt + 1[hit], with R_fmt in {-1, +0.3}.

A hit needs a well-formed answer whose id (one of the candidates) equals the target, so the
possible values are -1 (malformed), 0.3 (well-formed miss) and 1.3 (hit). The <think> text is
never rewarded (paper section 3.4).

Named terms (`reward_terms`): `format` (R_fmt) and `hit` (1[hit]); the GRPO controller sums them
with per-term weights (config `grpo.reward`, 1 and 1 = Eq. 8). `require_think=True` makes the
paper's full template `[ITEM_<id>] <title> <think>...</think>` (or, think_first, the think block
first) the only well-formed answer: an answer without a non-empty think block is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from mllmrec_ray.prompting.parsing import ParsedAnswer, parse_answer

REWARD_TERMS = ("format", "hit")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass(frozen=True)
class RewardConfig:
    malformed: float = -1.0
    well_formed: float = 0.3
    hit: float = 1.0


DEFAULT_REWARD = RewardConfig()


def format_reward(parsed: ParsedAnswer, config: RewardConfig = DEFAULT_REWARD) -> float:
    return config.well_formed if parsed.well_formed else config.malformed


def hit_reward(parsed: ParsedAnswer, target: str, config: RewardConfig = DEFAULT_REWARD) -> float:
    # item_id is None for malformed answers, so a malformed answer can never hit.
    return config.hit if parsed.well_formed and parsed.item_id == str(target) else 0.0


def apply_require_think(parsed: ParsedAnswer, require_think: bool) -> ParsedAnswer:
    """`parsed`, made malformed when `require_think` and it has no non-empty <think> block."""
    if require_think and parsed.well_formed and not parsed.think:
        return ParsedAnswer(None, False, parsed.think, "no <think> block (reward.require_think)")
    return parsed


def reward_terms(
    text: str,
    target: str,
    candidates: Sequence[str],
    think_first: bool = False,
    require_think: bool = False,
    config: RewardConfig = DEFAULT_REWARD,
) -> tuple[dict[str, float], ParsedAnswer]:
    """Unweighted reward terms by name ({"format": R_fmt, "hit": 1[hit] * config.hit}) and the parse."""
    parsed = apply_require_think(parse_answer(text, candidates, think_first=think_first), require_think)
    return {"format": format_reward(parsed, config), "hit": hit_reward(parsed, target, config)}, parsed


def weighted_reward(terms: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum_k weights[k] * terms[k]; every term needs a weight (a missing one is an error, not 0)."""
    missing = set(terms) - set(weights)
    if missing:
        raise ValueError(f"no weight for reward term(s) {sorted(missing)}")
    return float(sum(weights[k] * v for k, v in terms.items()))


def think_text(text: str) -> str | None:
    """The stripped text of the first closed <think>...</think> block, or None (for think-rate logs)."""
    m = _THINK.search(text or "")
    return m.group(1).strip() if m else None


def reward(
    text: str,
    target: str,
    candidates: Sequence[str],
    think_first: bool = False,
    config: RewardConfig = DEFAULT_REWARD,
) -> float:
    """R = format reward + hit reward for one response (Eq. 8: the named terms, weights 1 and 1)."""
    return sum(reward_terms(text, target, candidates, think_first=think_first, config=config)[0].values())
