"""DAPO refill in the GRPO controller (`grpo.dynamic_sampling: refill`), with the rollout faked.

The controller's step collection is driven with a fake `rollout` that answers a prompt with
a mixed group (one hit, one miss) when its index is a multiple of 3 and an all-miss group
otherwise, so which groups carry reward variance is known in advance.
"""

import pytest

from jobs.grpo import Controller
from mllmrec_ray.rl.prompt_pool import next_batch
from mllmrec_ray.config import GRPOConfig, PipelineConfig

N_PROMPTS = 30


def controller(**grpo) -> Controller:
    c = object.__new__(Controller)  # no Ray, no engines: only collect() and score_groups() run
    c.cfg = PipelineConfig()
    c.g = GRPOConfig(group_size=2, **grpo)
    c.tokenizer = None  # no <think> in these answers, so the think-length count never tokenizes
    c.actors = [None, None]
    c.prompts = [{"sample_id": f"s{i}", "prompt_ids": [1, 2], "target": "1", "candidates": ["1", "2"]}
                 for i in range(N_PROMPTS)]
    c.calls = []

    def rollout(indices, step, round_=0):
        c.calls.append((list(indices), step, round_))
        texts = lambda i: ["[ITEM_1] One", "[ITEM_2] Two"] if i % 3 == 0 else ["[ITEM_2] Two"] * 2  # noqa: E731
        return [{"sample_id": f"s{i}", "prompt_ids": [1, 2],
                 "responses": [{"text": t, "token_ids": [5]} for t in texts(i)]} for i in indices], 100.0

    c.rollout = rollout
    return c


def test_refill_rolls_out_more_prompts_until_the_batch_has_only_groups_with_variance():
    c = controller(dynamic_sampling="refill", prompts_per_step=4, refill_rounds=10)
    groups, rewards, adv, zero_var, keep, stats, tok_s, cursor, rounds = c.collect(step=1, cursor=0)

    generated = [i for idx, _, _ in c.calls for i in idx]
    assert len(keep) == 4 and rounds == len(c.calls) > 1
    assert all(int(groups[k]["sample_id"][1:]) % 3 == 0 for k in keep)  # only mixed groups are kept
    assert all(not zero_var[k] for k in keep) and all(abs(float(adv[k].sum())) < 1e-6 for k in keep)
    # the cursor moved over every prompt rolled out, in the controller's deterministic order
    assert cursor == len(generated) and generated == next_batch(N_PROMPTS, c.g.seed, 0, cursor)[0]
    # rounds ask for the deficit (at least one prompt per actor) and get their own sampling seed
    assert [len(idx) for idx, _, _ in c.calls][0] == 4 and [r for _, _, r in c.calls] == list(range(rounds))
    assert all(len(idx) >= len(c.actors) for idx, _, _ in c.calls)
    # stats describe the policy on every group generated, not on the filtered batch
    assert float(zero_var.float().mean()) == pytest.approx(sum(i % 3 != 0 for i in generated) / len(generated))
    assert stats["reward/hit"] == pytest.approx(sum(i % 3 == 0 for i in generated) / (2 * len(generated)))


def test_refill_stops_after_refill_rounds_and_skip_never_refills():
    c = controller(dynamic_sampling="refill", prompts_per_step=8, refill_rounds=1)
    *_, keep, _, _, cursor, rounds = c.collect(step=3, cursor=0)
    assert rounds == 2 and len(keep) < 8  # gave up after one extra round

    c = controller(dynamic_sampling="skip", prompts_per_step=8)
    groups, *_, keep, _, _, cursor, rounds = c.collect(step=3, cursor=0)
    assert rounds == 1 and cursor == 8 and len(groups) == 8 and len(keep) < 8

    c = controller(dynamic_sampling="none", prompts_per_step=8)
    *_, keep, _, _, _, rounds = c.collect(step=3, cursor=0)
    assert rounds == 1 and keep == list(range(8))
