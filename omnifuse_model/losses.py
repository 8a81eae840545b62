"""Task-aware per-sample losses and probabilities for binary, multi-label and multi-class tasks.

Label layout everywhere: binary and multilabel labels are float [B, C] (C = 1 for binary);
multiclass labels are long [B] class indices. Logits are [B, C] in every case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from omnifuse_model.config import TaskKind


def per_sample_loss(logits: Tensor, labels: Tensor, task: TaskKind) -> Tensor:
    """Cross-entropy H(prediction, label) per sample, [B] (BCE averaged over labels)."""
    if task == "multiclass":
        return F.cross_entropy(logits, labels, reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return bce.mean(dim=1)


def probabilities(logits: Tensor, task: TaskKind) -> Tensor:
    """Predicted probabilities [B, C]: softmax for multiclass, sigmoid otherwise."""
    if task == "multiclass":
        return torch.softmax(logits, dim=1)
    return torch.sigmoid(logits)


def true_label_probability(logits: Tensor, labels: Tensor, task: TaskKind) -> Tensor:
    """p: the probability the prediction gives the true label, [B] (METHOD.md section 3).

    Multi-label: the mean over labels of the probability of each label's true value.
    """
    probs = probabilities(logits, task)
    if task == "multiclass":
        return probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    labels = labels.to(probs.dtype)
    return (labels * probs + (1.0 - labels) * (1.0 - probs)).mean(dim=1)


def true_label_probability_per_label(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary/multi-label: the probability of each label's true value, [B, C]."""
    probs = torch.sigmoid(logits)
    labels = labels.to(probs.dtype)
    return labels * probs + (1.0 - labels) * (1.0 - probs)


def confidence_per_label(logits: Tensor) -> Tensor:
    """Binary/multi-label without labels: the probability of each label's predicted value,
    [B, C]."""
    probs = torch.sigmoid(logits)
    return torch.maximum(probs, 1.0 - probs)


def per_label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary/multi-label: BCE of each label, [B, C] (``per_sample_loss`` is its mean)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def confidence(logits: Tensor, task: TaskKind) -> Tensor:
    """Stand-in for the true-label probability when no label is known: the probability of
    the predicted value (mean over labels for multi-label), [B]."""
    probs = probabilities(logits, task)
    if task == "multiclass":
        return probs.max(dim=1).values
    return torch.maximum(probs, 1.0 - probs).mean(dim=1)


def mean_absolute_error(logits: Tensor, labels: Tensor, task: TaskKind) -> Tensor:
    """Mean absolute error between predicted probabilities and the one-hot/label vector, [B]."""
    probs = probabilities(logits, task)
    if task == "multiclass":
        target = F.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)
    else:
        target = labels.to(probs.dtype)
    return (probs - target).abs().mean(dim=1)
