"""k-NN classification on class tokens, as in DINO's protocol: cosine similarity, the k nearest
training features vote for their class with weight ``exp(similarity / T)`` (k=20, T=0.07)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each query ([Q, C] features) from the labelled bank ([N, C], labels [N])."""
    bank = F.normalize(train.float(), dim=-1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, bank.shape[0])
    preds = []
    for q in F.normalize(queries.float(), dim=-1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=-1)  # [q, k]
        votes = torch.zeros(q.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(-1))
    return torch.cat(preds)


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`knn_predict` on the held-out queries."""
    return (knn_predict(train, train_labels, queries, k, temperature) == query_labels).float().mean().item()
