"""GRPO advantages and loss against hand-computed numbers."""

import math

import pytest
import torch

from mllmrec_ray.rl.grpo import group_advantages, grpo_loss, k3_kl, masked_mean

LN = math.log


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_group_advantages_mean_baseline():
    r = torch.tensor([[1.3, 0.3, -1.0, 0.3], [0.3, 0.3, 0.3, 0.3]])
    adv = group_advantages(r)
    # Row 1: mean 0.225; row 2: all equal -> no signal.
    assert close(adv, [[1.075, 0.075, -1.225, 0.075], [0.0, 0.0, 0.0, 0.0]])


def test_group_advantages_std_normalized():
    r = torch.tensor([[1.3, 0.3, -1.0, 0.3]])
    std = math.sqrt((1.075**2 + 0.075**2 + 1.225**2 + 0.075**2) / 3)  # unbiased: 0.942957
    adv = group_advantages(r, std_normalize=True, eps=1e-6)
    assert close(adv, [[1.075 / (std + 1e-6), 0.075 / (std + 1e-6), -1.225 / (std + 1e-6), 0.075 / (std + 1e-6)]])
    # Constant group and group of one: zeros, not NaN.
    assert close(group_advantages(torch.tensor([[0.3, 0.3]]), std_normalize=True), [[0.0, 0.0]])
    assert close(group_advantages(torch.tensor([[1.3]]), std_normalize=True), [[0.0]])


def test_k3_known_values():
    logp = torch.tensor([0.0, 0.0, -1.0])
    ref = torch.tensor([LN(2.0), -1.0, -1.0])
    # d = ln2: 2 - ln2 - 1 = 0.306853; d = -1: e^-1 + 1 - 1 = 0.367879; d = 0: 0.
    assert close(k3_kl(logp, ref), [2 - LN(2.0) - 1, math.exp(-1), 0.0])


def test_identity_policy_loss_is_minus_mean_advantage():
    lengths = [2, 3, 1]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    logp = torch.full((3, 3), -0.7)
    adv = torch.tensor([0.5, -0.2, 0.9])
    seq, stats = grpo_loss(logp, logp.clone(), logp.clone(), adv, mask)
    assert close(seq, -(0.5 - 0.2 + 0.9) / 3)  # -0.4
    assert stats["kl"] == 0.0 and stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    tok, _ = grpo_loss(logp, logp.clone(), logp.clone(), adv, mask, loss_agg="token_mean")
    assert close(tok, -(0.5 * 2 - 0.2 * 3 + 0.9 * 1) / sum(lengths))  # -1.3 / 6


@pytest.mark.parametrize(
    "adv,loss,clip_frac,grad",
    [
        # ratios [1.5, 0.5], A=+1: min(1.5,1.2)=1.2 (clipped, no grad), min(0.5,0.8)=0.5 (grad -r/2)
        (1.0, -(1.2 + 0.5) / 2, 0.5, [0.0, -0.5 / 2]),
        # A=-1: min(-1.5,-1.2)=-1.5 (unclipped, grad r/2), min(-0.5,-0.8)=-0.8 (clipped, no grad)
        (-1.0, (1.5 + 0.8) / 2, 0.5, [1.5 / 2, 0.0]),
    ],
)
def test_clipping_changes_value_and_gradient(adv, loss, clip_frac, grad):
    old = torch.tensor([[-1.0, -1.0]])
    logp = (old + torch.tensor([[LN(1.5), LN(0.5)]])).requires_grad_(True)
    out, stats = grpo_loss(logp, old, logp.detach().clone(), torch.tensor([adv]), torch.ones(1, 2), beta=0.0)
    out.backward()
    assert close(out.detach(), loss)
    assert stats["clip_frac"] == pytest.approx(clip_frac)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert close(logp.grad, [grad])


def test_kl_term_weighted_by_beta():
    logp = torch.zeros(2, 2)
    ref = torch.full((2, 2), LN(2.0))
    loss, stats = grpo_loss(logp, logp.clone(), ref, torch.zeros(2), torch.ones(2, 2), beta=0.1)
    assert close(loss, 0.1 * (1 - LN(2.0)))
    assert stats["kl"] == pytest.approx(1 - LN(2.0), abs=1e-6)


@pytest.mark.parametrize("agg,expected", [("seq_mean_token_mean", 1.0), ("token_mean", 0.0)])
def test_padding_is_ignored_and_aggregations_differ(agg, expected):
    # Row 0: 3 tokens, A=1; row 1: 1 token + 2 padding slots full of garbage, A=-3.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 50.0, 50.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -50.0, -50.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 9.0, -9.0]])
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0, -3.0]), mask, loss_agg=agg)
    # seq mean: -(1 + -3)/2 = 1; token mean: -(1*3 - 3*1)/4 = 0.
    assert close(loss.detach(), expected)
    assert stats["kl"] == 0.0 and stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    assert torch.all(logp.grad[1, 1:] == 0)


def test_all_padding_row_does_not_dilute_seq_mean():
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.float32)
    logp = torch.zeros(2, 2)
    loss, _ = grpo_loss(logp, logp, logp, torch.tensor([1.0, 5.0]), mask)
    assert close(loss, -1.0)


def test_masked_mean_and_argument_errors():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert close(masked_mean(x, m), 1.5)
    assert close(masked_mean(x, m, dim=1), [1.5, 0.0])
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        grpo_loss(z, z, z, torch.zeros(1), torch.ones(1, 2), loss_agg="sum")
    with pytest.raises(ValueError):
        grpo_loss(z, z, None, torch.zeros(1), torch.ones(1, 2), beta=0.1)
    loss, stats = grpo_loss(z, z, None, torch.ones(1), torch.ones(1, 2), beta=0.0)
    assert close(loss, -1.0) and stats["kl"] is None  # no reference: not measured, not 0


def test_token_weights_scale_only_the_policy_term():
    # One response, two tokens, on-policy (ratio 1), A = 1: policy term per token = -1 * weight.
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), LN(2.0))
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1, token_weights=w)
    kl = 1 - LN(2.0)  # k3 at d = ln 2: 2 - ln 2 - 1
    assert close(loss.detach(), (-0.5 - 2.0) / 2 + 0.1 * kl)
    loss.backward()
    # d/dlogp of -w * exp(logp - old) * A at ratio 1 is -w/2 (mean over 2 tokens); KL grad = beta*(1 - exp(d))/2.
    assert close(logp.grad, [[-0.25 + 0.1 * (1 - 2.0) / 2, -1.0 + 0.1 * (1 - 2.0) / 2]])


def test_tis_weights_by_hand():
    from mllmrec_ray.rl.grpo import tis_weights

    learner = torch.tensor([[-1.0, -2.0, -0.5, 7.0]])
    sampler = torch.tensor([[-1.0, -1.0, -2.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1]])
    # exp(0) = 1; exp(-1) = 0.3679; exp(1.5) = 4.48 -> capped at 2; NaN sampler -> 1.
    assert close(tis_weights(learner, sampler, mask, cap=2.0), [[1.0, math.exp(-1.0), 2.0, 1.0]])
    # padding gets weight 1 whatever it holds
    assert close(tis_weights(learner, sampler, torch.tensor([[1, 0, 0, 0]]), cap=2.0), [[1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(ValueError):
        tis_weights(learner, sampler, mask, cap=0.0)


def test_logprob_gap_and_zero_variance_groups():
    from mllmrec_ray.rl.grpo import logprob_gap, zero_variance_groups

    learner = [[-1.0, -2.0], [-0.5, -0.25, -3.0]]
    sampler = [[-1.1, -1.8], [-0.5, float("nan"), None]]
    # |0.1| + |0.2| + |0| over 3 scored tokens
    assert logprob_gap(learner, sampler) == pytest.approx(0.1)
    assert logprob_gap([[-1.0]], [None]) is None
    with pytest.raises(ValueError):
        logprob_gap([[-1.0, -2.0]], [[-1.0]])
    rewards = torch.tensor([[1.3, 1.3, 1.3], [0.3, 1.3, -1.0], [-1.0, -1.0, -1.0]])
    assert zero_variance_groups(rewards).tolist() == [True, False, True]


def test_dynamic_sampling_skip_drops_zero_variance_groups():
    from mllmrec_ray.rl.grpo import kept_groups, zero_variance_groups

    zv = zero_variance_groups(torch.tensor([[1.3, 1.3], [0.3, 1.3], [-1.0, -1.0], [0.3, -1.0]]))
    assert kept_groups(zv, "none") == [0, 1, 2, 3]
    assert kept_groups(zv, "skip") == [1, 3]
    assert kept_groups(zv, "refill") == [1, 3]  # the controller then rolls out more prompts
    assert kept_groups(torch.tensor([True, True]), "skip") == []  # the controller then skips the update
    with pytest.raises(ValueError):
        kept_groups(zv, "resample")
