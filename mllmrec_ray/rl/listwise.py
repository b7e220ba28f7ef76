"""GRPO over rankings (`grpo.action: rank`): the policy is the Plackett-Luce distribution over the
candidates' readout scores, an action is the top k of a ranking, the reward its NDCG@k.

Why (README, cpu-full): with the paper's 1-of-10 hit reward on a generated answer, a prompt's expected
gradient is p(target) * grad log p(target), so GRPO trains hardest where the model is already right and
barely where the target sits at rank 3-5, where NDCG@3 is won. Here a sampled ranking that puts the
target 2nd is paid 0.63 and one that puts it 4th is paid 0, so the group-relative advantage moves the
score of every candidate the samples disagree about. The scores are the evaluation's own readout
(summed log-probs of each candidate's readout tokens after the prompt), so training moves what is
evaluated. An extension beyond the paper, which generates text; `grpo.action: generate` is the paper's.

Tensors in, tensors out; no model code here. `scores` are [K] logits of one prompt's K candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_rankings(scores: Tensor, n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """[n, k] candidate indices: n independent draws of the first k places of a Plackett-Luce ranking
    with logits `scores` (Gumbel-top-k: the top k of scores + Gumbel noise have exactly that law)."""
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"k must be in 1..{scores.shape[-1]} (the number of candidates), got {k}")
    u = torch.rand((n, scores.shape[-1]), generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return (scores.detach().double().unsqueeze(0) + gumbel).topk(k, dim=-1).indices


def plackett_luce_logprob(scores: Tensor, rankings: Tensor) -> Tensor:
    """[n] log P(the first k places are `rankings[i]`) under Plackett-Luce with logits `scores`:
    sum_j scores[r_j] - logsumexp(scores of the candidates not placed before j). Differentiable."""
    n, k = rankings.shape
    placed = torch.zeros((n, scores.shape[-1]), dtype=torch.bool, device=scores.device)
    s = scores.float().unsqueeze(0).expand(n, -1)
    out = torch.zeros(n, dtype=torch.float32, device=scores.device)
    for j in range(k):
        pick = rankings[:, j]
        out = out + s.gather(1, pick[:, None]).squeeze(1) - torch.logsumexp(s.masked_fill(placed, float("-inf")), dim=1)
        placed = placed.scatter(1, pick[:, None], True)
    return out


def ndcg_reward(rankings: Tensor, target: int) -> Tensor:
    """[n] NDCG@k of each ranking with one relevant item: 1 / log2(place + 2) if the target is at
    `place` (0-based) among the first k, else 0 (HR@1 rankings get 1, a target 2nd gets 0.63)."""
    hit = rankings == target
    place = hit.float().argmax(dim=1)
    return torch.where(hit.any(dim=1), 1.0 / torch.log2(place.float() + 2.0), torch.zeros(len(rankings)))


def teacher_ndcg_reward(rankings: Tensor, teacher_ranks: Tensor) -> Tensor:
    """[n] NDCG@k of each ranking against a teacher's ranks of the candidates (1-based, 0 = no rank):
    graded relevance k + 1 - rank for the teacher's first k (k, ..., 1), 0 below; all 0 without ranks.
    A ranking that copies the teacher's first k in order gets 1, one that swaps its 2nd and 3rd 0.98."""
    k = rankings.shape[1]
    ranks = teacher_ranks.long()
    rel = torch.where((ranks >= 1) & (ranks <= k), k + 1 - ranks, torch.zeros_like(ranks)).double()
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    ideal = float((rel.sort(descending=True).values[:k] * disc[: min(k, len(rel))]).sum())
    if ideal == 0.0:
        return torch.zeros(len(rankings))
    return ((rel[rankings] * disc).sum(dim=1) / ideal).float()


def listwise_loss(logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, beta: float) -> tuple[Tensor, dict]:
    """Mean over the group's sampled rankings of -advantage * log P(ranking) + beta * k3 KL(policy || ref)
    on the same rankings (on-policy, one update per sample: the clipped ratio is 1, as in `grpo_loss`)."""
    if ref_logp is None and beta != 0:
        raise ValueError("ref_logp is required when beta != 0")
    policy = -(advantages.detach().float() * logp)
    if ref_logp is None:  # beta 0 without a reference: KL is not measured, so it is reported as None, not 0
        loss = policy.mean()
        return loss, {"loss": float(loss.detach()), "kl": None}
    d = ref_logp.detach().float() - logp
    kl = torch.exp(d) - d - 1.0
    loss = (policy + beta * kl).mean()
    return loss, {"loss": float(loss.detach()), "kl": float(kl.detach().mean())}

