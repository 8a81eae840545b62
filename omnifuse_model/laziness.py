"""Traceable Laziness Activation (TLA, Eq. 15-17): combinations, mining and the activation loss.

Combination order (stable and documented, relied on by audits and the wire format): by size,
then in the order ``itertools.combinations`` yields over the modality names as given. For
names (ehr, cxr, rep): (ehr,), (cxr,), (rep,), (ehr, cxr), (ehr, rep), (cxr, rep),
(ehr, cxr, rep).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

Combination = tuple[str, ...]


def modality_combinations(names: list[str] | tuple[str, ...]) -> list[Combination]:
    """All 2^M - 1 non-empty modality combinations, in the order documented above."""
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be unique, got {names}")
    return [
        combo for size in range(1, len(names) + 1) for combo in itertools.combinations(names, size)
    ]


def combination_masks(names: list[str] | tuple[str, ...]) -> Tensor:
    """bool [2^M - 1, M]: row c marks the modalities of combination c."""
    combos = modality_combinations(names)
    index = {name: i for i, name in enumerate(names)}
    masks = torch.zeros(len(combos), len(names), dtype=torch.bool)
    for row, combo in enumerate(combos):
        masks[row, [index[name] for name in combo]] = True
    return masks


def combination_label(combination: Combination) -> str:
    """Readable, stable key for a combination: names joined with '+'."""
    return "+".join(combination)


@dataclass
class LazinessReport:
    """Result of one mining pass (the 'traceable' part of TLA).

    scores: combination label -> score (mean or sum of sample distances); combinations that no
        sample holds are absent. counts: combination label -> samples that hold it.
    """

    lazy_combination: Combination | None
    scores: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    distance_sums: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "lazy_combination": list(self.lazy_combination) if self.lazy_combination else None,
            "scores": self.scores,
            "counts": self.counts,
            "distance_sums": self.distance_sums,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LazinessReport:
        lazy = data.get("lazy_combination")
        return cls(
            lazy_combination=tuple(lazy) if lazy else None,
            scores={k: float(v) for k, v in data.get("scores", {}).items()},
            counts={k: int(v) for k, v in data.get("counts", {}).items()},
            distance_sums={k: float(v) for k, v in data.get("distance_sums", {}).items()},
        )


class LazinessMiner:
    """Accumulates per-combination sample distances over an epoch and picks the lazy one.

    Only samples that hold every modality of a combination count towards it (METHOD.md
    section 4). The lazy combination is the argmax of the combination scores (Eq. 15).
    """

    def __init__(self, names: list[str], reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.combinations = modality_combinations(names)
        self.reduction = reduction
        self.sums = torch.zeros(len(self.combinations), dtype=torch.float64)
        self.counts = torch.zeros(len(self.combinations), dtype=torch.long)

    def update(self, distances: Tensor, eligible: Tensor) -> None:
        """Add a batch: distances [B, C] and bool eligibility [B, C]."""
        eligible = eligible.to(torch.bool).cpu()
        distances = distances.detach().to(torch.float64).cpu()
        self.sums += torch.where(eligible, distances, torch.zeros_like(distances)).sum(dim=0)
        self.counts += eligible.sum(dim=0)

    def merge(self, distance_sums: dict[str, float], counts: dict[str, int]) -> None:
        """Add pre-aggregated sums and counts (e.g. from other sites)."""
        for row, combo in enumerate(self.combinations):
            key = combination_label(combo)
            self.sums[row] += float(distance_sums.get(key, 0.0))
            self.counts[row] += int(counts.get(key, 0))

    def report(self) -> LazinessReport:
        scores: dict[str, float] = {}
        counts: dict[str, int] = {}
        sums: dict[str, float] = {}
        best, best_score = None, -math.inf
        for row, combo in enumerate(self.combinations):
            count = int(self.counts[row])
            if count == 0:
                continue
            key = combination_label(combo)
            total = float(self.sums[row])
            score = total / count if self.reduction == "mean" else total
            scores[key], counts[key], sums[key] = score, count, total
            if score > best_score:
                best, best_score = combo, score
        return LazinessReport(best, scores, counts, sums)


def tla_loss(per_sample: Tensor, mask: Tensor) -> Tensor:
    """L_TLA (Eq. 17): mean of the lazy-combination losses over masked samples (Eq. 16).

    per_sample: [N] losses of the samples selected by ``mask`` (already indexed) or [B] with
    ``mask`` [B]; returns 0 when no sample holds the lazy combination.
    """
    if per_sample.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: losses {tuple(per_sample.shape)}, mask {tuple(mask.shape)}"
        )
    weight = mask.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)
