"""Weighted kNN classification on frozen features (Wu et al. 2018, as used by CARL).

Cosine similarity, the k nearest training samples vote with weight exp(s / T). Chunked
over the test set so memory stays bounded; correct when the train set has fewer than k
samples (k is clipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_scores", "knn_accuracy", "topk_accuracy"]


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores (N_test, C) of a weighted cosine kNN vote."""
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dim {train_features.shape[1]}, test features "
            f"{test_features.shape[1]}"
        )
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    labels = train_labels.long().to(train.device)
    c = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_features.shape[0], chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].float().to(train.device), dim=1)
        sim = q @ train.T  # (b, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / t).exp()
        votes = torch.zeros(q.shape[0], c, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # (b, C)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, c)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k (clipped to the number of classes)."""
    labels = labels.long().to(scores.device)
    res = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        res[f"top{k}"] = 100.0 * hit.float().mean().item() if len(labels) else float("nan")
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
) -> dict[str, float]:
    """Top-1 / top-5 kNN accuracy (percent)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(
        train_features, train_labels, test_features, k=k, t=t, num_classes=num_classes
    )
    return topk_accuracy(scores, test_labels)
