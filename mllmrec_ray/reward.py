"""Rule reward of MLLMRec-R1 (paper Eq. 8): R = R_fmt + 1[hit], with R_fmt in {-1, +0.3}.

A hit needs a well-formed answer whose id (one of the candidates) equals the target, so the
possible values are -1 (malformed), 0.3 (well-formed miss) and 1.3 (hit). The <think> text is
never rewarded (paper section 3.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mllmrec_ray.parsing import ParsedAnswer, parse_answer


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


def score(
    text: str,
    target: str,
    candidates: Sequence[str],
    think_first: bool = False,
    config: RewardConfig = DEFAULT_REWARD,
) -> tuple[float, ParsedAnswer]:
    """Reward and the parse it came from (for logging format / hit rates)."""
    parsed = parse_answer(text, candidates, think_first=think_first)
    return format_reward(parsed, config) + hit_reward(parsed, target, config), parsed


def reward(
    text: str,
    target: str,
    candidates: Sequence[str],
    think_first: bool = False,
    config: RewardConfig = DEFAULT_REWARD,
) -> float:
    """R = format reward + hit reward for one response."""
    return score(text, target, candidates, think_first, config)[0]
