"""GRPO math (paper Eq. 2): group-relative advantages and the clipped, KL-regularised loss.

Tensors in, tensors out; no model code here. Log-probs are per response token, shape [N, T],
with ``mask`` 1 on response tokens and 0 on padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGGS = ("seq_mean_token_mean", "token_mean")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (0 where nothing is valid, instead of NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def group_advantages(rewards: Tensor, std_normalize: bool = False, eps: float = 1e-6) -> Tensor:
    """[B, G] rewards -> [B, G] advantages: reward minus its group mean (/ (group std + eps) optionally).

    The std is the unbiased one (as TRL and verl use); a group of one has advantage 0.
    """
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        g = rewards.shape[1]
        adv = adv / (rewards.std(dim=1, keepdim=True, correction=1 if g > 1 else 0) + eps)
    return adv


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.05,
    loss_agg: str = "seq_mean_token_mean",
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clipped-ratio policy loss + beta * k3 KL, per token, aggregated over valid tokens.

    token_weights ([N, T], detached; e.g. `tis_weights`) multiply the policy term of each token
    (not the KL term), as truncated importance sampling does in verl; None = all 1.

    loss_agg "seq_mean_token_mean" (paper): mean over each response's tokens, then over the
    responses that have at least one token; "token_mean": one mean over all valid tokens.
    ref_logp may be None only when beta == 0 (then stats' kl is None). Returns (scalar loss, stats).
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if ref_logp is None and beta != 0:
        raise ValueError("ref_logp is required when beta != 0")
    valid = mask > 0
    mask = mask.to(logp.dtype)
    zero = torch.zeros_like(logp)
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # one advantage for every token of a response
    # Padding slots may hold anything: zero their log-ratios before exp so inf * 0 never makes NaN.
    ratio = torch.exp(torch.where(valid, logp - old_logp.detach(), zero))
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if token_weights is not None:
        per_token = per_token * torch.where(valid, token_weights.detach().to(logp.dtype), zero)
    kl = k3_kl(torch.where(valid, logp, zero), torch.where(valid, ref_logp.detach(), zero)) if ref_logp is not None else zero
    per_token = per_token + beta * kl

    if loss_agg == "token_mean":
        loss = masked_mean(per_token, mask)
    else:
        has_tokens = (mask.sum(dim=1) > 0).to(logp.dtype)  # all-padding rows do not dilute the mean
        loss = masked_mean(masked_mean(per_token, mask, dim=1), has_tokens)

    with torch.no_grad():
        # Clipping is active (zero gradient) where the clipped branch wins the min.
        clip_active = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        stats = {
            "loss": float(loss.detach()),
            "kl": float(masked_mean(kl, mask)) if ref_logp is not None else None,  # None: not measured (beta 0)
            "clip_frac": float(masked_mean(clip_active.to(logp.dtype), mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, stats


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """[B, G] rewards -> [B] bool: groups whose rewards are all equal (zero advantage, no gradient)."""
    return rewards.max(dim=1).values == rewards.min(dim=1).values


def tis_weights(learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights min(exp(lp_learner - lp_sampler), cap), per token.

    `learner_logp`: the old policy (before the update) at the learner's temperature;
    `sampler_logp`: what the rollout engine sampled from. Padding and tokens with no sampler
    log-prob (NaN, e.g. an EOS the engine did not report) get weight 1. Detached.
    """
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    ok = (mask > 0) & torch.isfinite(sampler_logp) & torch.isfinite(learner_logp)
    diff = torch.where(ok, learner_logp.detach().float() - sampler_logp.float(), torch.zeros_like(learner_logp, dtype=torch.float32))
    return torch.clamp(torch.exp(diff), max=cap)


def logprob_gap(learner: list[list[float]], sampler: list[list[float | None]]) -> float | None:
    """Mean |log p_learner - log p_sampler| over every token that both sides scored (None if none).

    Rows are per response, aligned token by token; a None / NaN sampler entry is skipped.
    """
    total, n = 0.0, 0
    for lrow, srow in zip(learner, sampler):
        if lrow is None or srow is None:
            continue
        if len(lrow) != len(srow):
            raise ValueError(f"learner row has {len(lrow)} tokens, sampler row {len(srow)}")
        for a, b in zip(lrow, srow):
            if a is None or b is None or a != a or b != b:  # x != x: NaN
                continue
            total += abs(a - b)
            n += 1
    return total / n if n else None


DYNAMIC_SAMPLING = ("none", "skip", "refill")


def kept_groups(zero_var: Tensor, mode: str = "none") -> list[int]:
    """Indices of the groups that go to the learner: all (`none`), or (`skip`, and `refill`, whose
    controller then samples more prompts to fill the batch, as DAPO does) those whose rewards
    are not all equal."""
    if mode not in DYNAMIC_SAMPLING:
        raise ValueError(f"dynamic_sampling must be one of {DYNAMIC_SAMPLING}, got {mode!r}")
    return [i for i, z in enumerate(zero_var.tolist()) if mode == "none" or not z]
