"""The trainable slide classifier (feature standardisation + aggregator) and the trained-model handle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .aggregators import Aggregator, AggregatorOutput, aggregator_defaults, build_aggregator
from .data import Bag

__all__ = ["FeatureStats", "MILModel", "TrainedModel", "compute_feature_stats", "bag_tensor"]

_CHUNK = 8192


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension mean and standard deviation of training tiles (float32, shape (D,))."""

    mean: np.ndarray
    std: np.ndarray
    n_tiles: int = 0
    n_slides: int = 0


def compute_feature_stats(bags: Iterable[Bag]) -> FeatureStats:
    """Mean/std over all tiles of ``bags`` (streamed in float64 chunks; Chan's parallel update).

    Dimensions with (near-)zero spread get std 1 so they pass through unscaled.
    """
    n_tot = 0
    n_slides = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    for bag in bags:
        feats = bag.features
        n_slides += 1
        for i in range(0, feats.shape[0], _CHUNK):
            chunk = feats[i : i + _CHUNK].astype(np.float64)
            n_b = chunk.shape[0]
            mean_b = chunk.mean(axis=0)
            m2_b = ((chunk - mean_b) ** 2).sum(axis=0)
            if mean is None or m2 is None:
                mean, m2, n_tot = mean_b, m2_b, n_b
                continue
            delta = mean_b - mean
            n_new = n_tot + n_b
            mean = mean + delta * (n_b / n_new)
            m2 = m2 + m2_b + delta**2 * (n_tot * n_b / n_new)
            n_tot = n_new
    if mean is None or m2 is None:
        raise ValueError("cannot compute feature statistics from zero bags")
    std = np.sqrt(m2 / max(n_tot - 1, 1))
    std = np.where(std > 1e-6, std, 1.0)
    return FeatureStats(mean.astype(np.float32), std.astype(np.float32), int(n_tot), n_slides)


def bag_tensor(bag: Bag | np.ndarray | Tensor) -> Tensor:
    """(N, D) tensor in the storage dtype, sharing memory with the array where possible."""
    if isinstance(bag, Tensor):
        return bag
    arr = bag.features if isinstance(bag, Bag) else np.asarray(bag)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write to it
        arr = np.array(arr)
    return torch.from_numpy(arr)


class MILModel(nn.Module):
    """Standardise features with stored training statistics, then aggregate.

    ``forward`` casts the bag to float32 once (in place afterwards), so a float16 bag of
    100,000 × 768 costs one 300 MB float32 copy; a float32 input is never modified.
    """

    def __init__(self, aggregator: Aggregator, stats: FeatureStats | None = None) -> None:
        super().__init__()
        self.aggregator = aggregator
        d = aggregator.in_dim
        mean = torch.zeros(d) if stats is None else torch.from_numpy(np.asarray(stats.mean, dtype=np.float32))
        std = torch.ones(d) if stats is None else torch.from_numpy(np.asarray(stats.std, dtype=np.float32))
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"feature statistics have shape {tuple(mean.shape)}, expected ({d},)")
        self.register_buffer("norm_mean", mean.clone())
        self.register_buffer("norm_std", std.clone())

    def standardize(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.aggregator.in_dim:
            raise ValueError(f"bag must have shape (N, {self.aggregator.in_dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("bag has no tiles")
        xf = x.to(device=self.norm_mean.device, dtype=torch.float32)
        if xf.data_ptr() == x.data_ptr():
            return (xf - self.norm_mean) / self.norm_std
        return xf.sub_(self.norm_mean).div_(self.norm_std)

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:
        return self.aggregator(self.standardize(x), target)


@dataclass
class TrainedModel:
    """A trained slide classifier with everything needed to apply it.

    Attributes:
        module: The torch module (eval mode).
        classes: Class names; column order of ``probs``.
        aggregator: Registry name of the aggregator.
        aggregator_kwargs: Its full hyperparameters.
        feature_key: Feature set in the stores it was trained on (None if unknown).
        positive_class: Class treated as positive for binary metrics.
        info: Training arguments, cohort summary, CV metrics summary (JSON-ready).
    """

    module: MILModel
    classes: tuple[str, ...]
    aggregator: str
    aggregator_kwargs: dict[str, Any]
    feature_key: str | None = None
    positive_class: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module.eval()
        self.classes = tuple(self.classes)

    @property
    def in_dim(self) -> int:
        return self.module.aggregator.in_dim

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class) if self.positive_class in self.classes else 1

    def forward(self, bag: Bag | np.ndarray | Tensor) -> AggregatorOutput:
        """Full aggregator output for one bag (eval mode, no gradients)."""
        self.module.eval()
        with torch.inference_mode():
            return self.module(bag_tensor(bag))

    def predict(self, bag: Bag | np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (C,) float32 and tile scores (N,) float32 for one bag (N, D)."""
        out = self.forward(bag)
        probs = torch.softmax(out.logits.float(), dim=-1).cpu().numpy()
        return probs, out.tile_scores.float().cpu().numpy()


def new_model(
    aggregator: str, in_dim: int, n_classes: int, stats: FeatureStats | None, agg_kwargs: dict[str, Any]
) -> tuple[MILModel, dict[str, Any]]:
    """Build a fresh :class:`MILModel`; returns it and the aggregator's full resolved kwargs."""
    agg = build_aggregator(aggregator, in_dim, n_classes, **agg_kwargs)
    full = aggregator_defaults(aggregator)
    full.update({k: v for k, v in agg_kwargs.items() if v is not None})
    return MILModel(agg, stats), full
