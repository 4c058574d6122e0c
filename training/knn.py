"""Weighted kNN classification on frozen features (Wu et al. 2018, as used by CARL).

Cosine similarity, the k nearest training samples vote with weight exp(s / T). Chunked
over the test set so memory stays bounded; correct when the train set has fewer than k
samples (k is clipped).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_scores", "knn_accuracy", "topk_accuracy", "SIM_BLOCK_ELEMENTS"]

# Test rows per chunk are as many as keep their (rows, N_train) similarity block within this
# many elements (1 GiB in float32), at most 1024: a 1.28M-image train set (ImageNet at 64 px)
# then takes ~200 rows at a time and fits a modest GPU.
SIM_BLOCK_ELEMENTS = 2**28


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Class scores (N_test, C) of a weighted cosine kNN vote: each class's share of the
    votes exp(s / T) of the ``k`` nearest training samples (every row sums to 1). Computed on
    ``device`` (default: where ``train_features`` are), ``chunk_size`` test rows at a time
    (default: from :data:`SIM_BLOCK_ELEMENTS`)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(
            f"chunk_size must be >= 1 (or None: from the memory budget), got {chunk_size}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t < math.inf:
        raise ValueError(f"t={t!r}: the kNN temperature must be a finite number > 0")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r}: the kNN neighbour count must be an integer >= 1")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dim {train_features.shape[1]}, test features "
            f"{test_features.shape[1]}"
        )
    train = F.normalize(train_features.to(device).float(), dim=1)  # (N, D)
    if chunk_size is None:
        chunk_size = max(1, min(1024, SIM_BLOCK_ELEMENTS // train.shape[0]))
    labels = train_labels.long().to(train.device)
    c = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_features.shape[0], chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].float().to(train.device), dim=1)
        sim = q @ train.T  # (b, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        # exp(s / T) overflows float32 once s / T > 88 (s > 0.88 at T = 0.01); scaling each
        # row by exp(-max s / T) keeps the nearest vote at 1 and the shares unchanged.
        weights = ((top_sim - top_sim[:, :1]) / t).exp()
        votes = torch.zeros(q.shape[0], c, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # (b, C)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, c)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k (clipped to the number of classes)."""
    labels = labels.long().to(scores.device)
    res = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        res[f"top{k}"] = 100.0 * hit.double().mean().item() if len(labels) else float("nan")
    return res


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 kNN accuracy (percent); the vote runs on ``device`` (see knn_scores)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        k=k,
        t=t,
        num_classes=num_classes,
        device=device,
    )
    return topk_accuracy(scores, test_labels)
