"""The CARL objective (Silva & Ramirez Rivera, SAC 2022, arXiv 2112.15421).

Pure functions, one per term of the paper, and :class:`CARLLoss`, which combines them
and returns every term so each can be logged. Softmax and logarithms run in float32
whatever the autocast context.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from carlzoo.training import dist

__all__ = [
    "consistency_loss",
    "consistency_loss_from_logits",
    "uniform_prior_loss",
    "mean_assignment",
    "kl_to_uniform",
    "kl_weight",
    "mean_entropy",
    "CARLLoss",
    "LossTerms",
]

_EPS = 1e-8


def consistency_loss(p_a: Tensor, p_b: Tensor) -> Tensor:
    """Eq. 4: L_c = -1/B sum_i log <p_i^a, p_i^b>.

    Args:
        p_a, p_b: (B, K) assignment probabilities of two views of the same B images.
    Returns:
        Scalar; 0 when both views put all mass on the same prototype.
    """
    agreement = (p_a.float() * p_b.float()).sum(dim=1)  # (B,)
    return -torch.log(agreement.clamp_min(_EPS)).mean()


def consistency_loss_from_logits(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Eq. 4 from the prototype logits, in log space: -1/B sum_i logsumexp_k(log p_ik^a +
    log p_ik^b).

    The same value as :func:`consistency_loss` of their softmaxes, without its floor: when
    two views confidently disagree, <p^a, p^b> underflows (below 1e-8 at a logit gap of
    ~18), where the probability form would stop at -log 1e-8 with no gradient.
    """
    log_a = torch.log_softmax(logits_a.float(), dim=1)
    log_b = torch.log_softmax(logits_b.float(), dim=1)
    return _consistency_from_log(log_a, log_b)


def _consistency_from_log(log_a: Tensor, log_b: Tensor) -> Tensor:
    return -torch.logsumexp(log_a + log_b, dim=1).mean()


def mean_assignment(p: Tensor) -> Tensor:
    """Eq. 5: pbar = mean of the assignments over the batch, the GLOBAL batch under DDP.

    Args:
        p: (N, K) assignment probabilities (both views stacked).
    Returns:
        (K,) mean assignment. Under torch.distributed the sums are all-reduced with a
        differentiable collective, so the uniform prior (which depends only on pbar) does
        not change with the number of processes and its gradient is the global one.
    """
    p = p.float()
    total = dist.differentiable_all_reduce_sum(p.sum(dim=0))  # (K,)
    count = p.shape[0] * dist.world_size()  # equal per-rank batches (drop_last)
    return total / count


def uniform_prior_loss(p: Tensor) -> Tensor:
    """Eq. 5-6: L_KL = KL(pbar || uniform) = log K + sum_k pbar_k log pbar_k.

    Args:
        p: (N, K) assignment probabilities; pbar is their (global) batch mean.
    Returns:
        Scalar in [0, log K]: 0 for a uniform mean assignment, log K when every image
        sits on one prototype.
    """
    return kl_to_uniform(mean_assignment(p))


def kl_to_uniform(pbar: Tensor) -> Tensor:
    """Eq. 6 for a given mean assignment: log K + sum_k pbar_k log pbar_k."""
    return math.log(pbar.shape[0]) + (pbar * torch.log(pbar.clamp_min(_EPS))).sum()


def mean_entropy(log_p: Tensor) -> Tensor:
    """Mean entropy in nats of the assignments whose log-probabilities are the rows of
    ``log_p`` (N, K): 0 when each sits on one prototype with certainty, log K when uniform."""
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def kl_weight(epoch: float, start: float, end: float, decay_epochs: float) -> float:
    """Eq. 8: lambda_e decays linearly from ``start`` (b) to ``end`` (a) over ``decay_epochs``.

    lambda_e = b - (b - a) * min(e, E) / E; constant at ``end`` after the decay.
    """
    if decay_epochs <= 0:
        return float(end)
    t = min(max(float(epoch), 0.0), float(decay_epochs)) / float(decay_epochs)
    return float(start + (end - start) * t)


class LossTerms(NamedTuple):
    total: Tensor
    consistency: Tensor
    uniform_prior: Tensor
    mean_assignment: Tensor  # (K,) detached global mean assignment, for monitoring
    entropy: Tensor  # detached mean entropy (nats) of the 2B assignments, for monitoring


class CARLLoss(nn.Module):
    """Eq. 7: L = L_c + lambda_e * L_KL, from the prototype logits of two views."""

    def forward(self, logits_a: Tensor, logits_b: Tensor, kl_weight: float | Tensor) -> LossTerms:
        # Eq. 3 in float32: a bf16 softmax over K prototypes loses the small probabilities
        # the uniform prior acts on.
        with torch.autocast(device_type=logits_a.device.type, enabled=False):
            log_p = torch.log_softmax(torch.cat([logits_a, logits_b]).float(), dim=1)  # (2B, K)
            log_a, log_b = log_p.chunk(2)
            l_c = _consistency_from_log(log_a, log_b)
            p = log_p.exp()
            pbar = mean_assignment(p)
            l_kl = kl_to_uniform(pbar)
            total = l_c + kl_weight * l_kl
            with torch.no_grad():
                entropy = mean_entropy(log_p)
        return LossTerms(total, l_c.detach(), l_kl.detach(), pbar.detach(), entropy)
