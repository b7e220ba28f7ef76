"""GRPO over rankings (`grpo.action: rank`): Plackett-Luce sampling, log-probs, the NDCG reward, the loss."""

import itertools
import math

import pytest
import torch

from mllmrec_ray.rl.grpo import group_advantages
from mllmrec_ray.rl.listwise import (listwise_loss, ndcg_reward, plackett_luce_logprob, sample_rankings,
                                     teacher_ndcg_reward)


def test_plackett_luce_logprob_is_a_distribution_over_top_k_rankings():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.0])
    for k in (1, 2, 4):
        perms = torch.tensor(list(itertools.permutations(range(4), k)))
        total = plackett_luce_logprob(scores, perms).exp().sum()
        assert float(total) == pytest.approx(1.0, abs=1e-5)
    # k = 1 is the softmax; a full ranking by hand
    first = plackett_luce_logprob(scores, torch.arange(4)[:, None])
    assert torch.allclose(first, torch.log_softmax(scores, 0), atol=1e-6)
    e = scores.exp()
    by_hand = e[2] / e.sum() * e[0] / (e[0] + e[1] + e[3]) * e[3] / (e[1] + e[3])
    assert float(plackett_luce_logprob(scores, torch.tensor([[2, 0, 3]]))[0]) == pytest.approx(math.log(by_hand), abs=1e-5)


def test_gumbel_top_k_draws_follow_plackett_luce():
    scores = torch.tensor([1.0, 0.0, -0.5])
    draws = sample_rankings(scores, 40_000, 2, torch.Generator().manual_seed(0))
    assert draws.shape == (40_000, 2) and (draws[:, 0] != draws[:, 1]).all()
    for perm in itertools.permutations(range(3), 2):
        freq = float((draws == torch.tensor(perm)).all(1).float().mean())
        want = float(plackett_luce_logprob(scores, torch.tensor([perm])).exp()[0])
        assert freq == pytest.approx(want, abs=0.01), perm
    with pytest.raises(ValueError, match="k must be in 1..3"):
        sample_rankings(scores, 2, 4)


def test_ndcg_reward_pays_for_the_target_place():
    ranks = torch.tensor([[4, 0, 1], [0, 4, 1], [0, 1, 4], [0, 1, 2]])
    assert ndcg_reward(ranks, 4).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.5, 0.0])


def test_teacher_ndcg_reward_is_graded_ndcg_against_the_teacher_ranks():
    # teacher ranks of 5 candidates (1-based): candidate 3 first, then 0, then 4; k = 3 -> relevance 3, 2, 1
    teacher = torch.tensor([2, 5, 4, 1, 3])
    d = [1.0, 1 / math.log2(3), 0.5]
    ideal = 3 * d[0] + 2 * d[1] + 1 * d[2]
    ranks = torch.tensor([[3, 0, 4], [3, 4, 0], [0, 3, 4], [1, 2, 3], [1, 2, 4]])
    want = [1.0, (3 * d[0] + 1 * d[1] + 2 * d[2]) / ideal, (2 * d[0] + 3 * d[1] + 1 * d[2]) / ideal,
            3 * d[2] / ideal, 1 * d[2] / ideal]
    assert teacher_ndcg_reward(ranks, teacher).tolist() == pytest.approx(want, abs=1e-6)
    # no evidence (an empty history prints no rank): no teacher reward at all
    assert teacher_ndcg_reward(ranks, torch.zeros(5, dtype=torch.long)).tolist() == [0.0] * 5


def test_teacher_reward_moves_the_scores_into_the_teacher_order():
    """The same SGD as below with the teacher reward alone must sort the top 3 scores as the teacher does."""
    teacher = torch.tensor([6, 4, 5, 1, 3, 2])  # wants 3, 5, 4 first
    scores = _sgd_on_sampled_rankings(lambda ranks: teacher_ndcg_reward(ranks, teacher), steps=300)
    assert scores.topk(3).indices.tolist() == [3, 5, 4]


def test_policy_gradient_over_sampled_rankings_moves_the_target_up():
    """SGD on the group-relative loss alone (as the learner does per prompt) must bring a target that starts
    4th of 6 to the first place: the estimator's sign and the advantages are right."""
    target = 3
    scores = _sgd_on_sampled_rankings(lambda ranks: ndcg_reward(ranks, target), steps=150)
    assert int(scores.argmax()) == target


def _sgd_on_sampled_rankings(reward, steps: int) -> torch.Tensor:
    """SGD from scores [2.0, 1.5, ..., -0.5] on the group-relative loss of 8 sampled top-3 rankings per step,
    each paid `reward(rankings)`; the final scores."""
    scores = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5], requires_grad=True)
    gen, opt = torch.Generator().manual_seed(1), torch.optim.SGD([scores], lr=0.5)
    for _ in range(steps):
        ranks = sample_rankings(scores, 8, 3, gen)
        adv = group_advantages(reward(ranks)[None])[0]
        loss, _ = listwise_loss(plackett_luce_logprob(scores, ranks), None, adv, beta=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return scores.detach()


def test_kl_term_is_zero_at_the_reference_pulls_back_and_is_none_without_one():
    ref = torch.tensor([0.5, 0.0, -0.5])
    ranks = sample_rankings(ref, 16, 2, torch.Generator().manual_seed(0))
    zero_adv = torch.zeros(16)
    at_ref = ref.clone().requires_grad_(True)
    loss, stats = listwise_loss(plackett_luce_logprob(at_ref, ranks), plackett_luce_logprob(ref, ranks), zero_adv, 0.1)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7) and float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    moved = (ref + torch.tensor([1.0, 0.0, 0.0])).requires_grad_(True)
    loss, stats = listwise_loss(plackett_luce_logprob(moved, ranks), plackett_luce_logprob(ref, ranks), zero_adv, 0.1)
    loss.backward()
    assert stats["kl"] > 0 and moved.grad[0] > 0  # descending the loss lowers the score that moved away
    with pytest.raises(ValueError, match="ref_logp is required"):
        listwise_loss(plackett_luce_logprob(ref, ranks), None, zero_adv, 0.1)
    adv = torch.linspace(-1.0, 1.0, 16)
    lp = plackett_luce_logprob(ref, ranks)
    loss, stats = listwise_loss(lp, None, adv, 0.0)  # beta 0 without a reference: the policy term alone
    assert stats["kl"] is None and float(loss) == pytest.approx(float(-(adv * lp).mean()), abs=1e-6)
