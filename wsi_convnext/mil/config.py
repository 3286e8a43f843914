"""The MIL training configuration: one frozen dataclass, validated on construction (no torch at import)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .._registry import Registry
from ..errors import ConfigError
from ..encoders.device import check_device
from ..params import at_least, check_params, half_open, non_negative, param, positive

__all__ = ["AGGREGATORS", "ProgressFn", "TrainConfig"]

#: Registry: aggregator name → :class:`~wsi_convnext.mil.aggregators.Aggregator` subclass (fill it with
#: ``@register_aggregator``). It lives here, free of torch, so that front ends list the names
#: instantly; the built-ins are declared and registered by :mod:`.aggregators` on first lookup.
AGGREGATORS: Registry[Any] = Registry(
    "aggregator", loader="wsi_convnext.mil.aggregators", declares=("mean", "maxpool", "abmil", "dsmil", "clam_sb")
)

#: Progress callback of the MIL functions and the demo: ``progress(description, done, total)``.
ProgressFn = Callable[[str, int, int], None]


def _check_aggregator(aggregator: str, agg_kwargs: Mapping[str, Any]) -> None:
    """Fail fast on an unknown aggregator or option (the lookup imports the aggregators, and torch)."""
    AGGREGATORS.lookup(aggregator).check_options(**agg_kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how (AdamW, one bag per step); validated on construction.

    Attributes:
        aggregator: Aggregator registry name (see :data:`~wsi_convnext.mil.aggregators.AGGREGATORS`).
        aggregator_kwargs: Aggregator hyperparameters (its defaults for the rest).
        folds: Cross-validation folds when the labels have no fixed ``split``/``fold`` column.
        seed: Seed for splits, initialisation and training order.
        positive_class: Positive class for binary metrics (default: second sorted class).
        n_boot: Bootstrap resamples for confidence intervals (0 = none).
        epochs: Maximum number of epochs.
        lr: Learning rate.
        weight_decay: AdamW decoupled weight decay.
        patience: Stop after this many epochs without a validation-loss improvement.
        min_epochs: Never stop before this many epochs, and keep weights from epoch >= min_epochs.
        val_fraction: Fraction of each training fold held out (patient-grouped) for early stopping.
        class_weighting: Weight each bag's loss by inverse class frequency.
        grad_clip: Max gradient norm (0 = off).
        max_instances: Train on a random subset of at most this many tiles per bag and step
            (None = all tiles). Prediction always uses all tiles.
        bags_per_step: Bags whose gradients are accumulated per optimiser step (still one bag in
            memory at a time).
        num_threads: CPU threads for torch while training (restored afterwards). None = auto: one
            thread when the median bag has fewer than 8,192 tiles (small per-bag matrix products
            gain nothing from threads and suffer badly on oversubscribed machines), else torch's
            current setting.
        device: Torch device for training ("cpu", "cuda", ...).
    """

    aggregator: str = param("dsmil", doc="MIL aggregator (registry name)")
    aggregator_kwargs: Mapping[str, Any] = param(default_factory=dict, doc="aggregator hyperparameters")
    folds: int = param(5, check=at_least(2), doc="cross-validation folds")
    seed: int = param(0, doc="seed of splits, initialisation and training order")
    positive_class: str | None = param(None, doc="positive class for binary metrics")
    n_boot: int = param(1000, check=non_negative, doc="bootstrap resamples for confidence intervals")
    epochs: int = param(60, check=at_least(1), doc="maximum number of epochs")
    lr: float = param(5e-4, check=positive, doc="learning rate")
    weight_decay: float = param(1e-2, check=non_negative, doc="AdamW weight decay")
    patience: int = param(15, check=at_least(1), doc="epochs without improvement before stopping")
    min_epochs: int = param(15, check=non_negative, doc="never stop before this many epochs")
    val_fraction: float = param(0.2, check=half_open(0, 1), doc="share of each training fold for early stopping")
    class_weighting: bool = param(True, doc="weight bag losses by inverse class frequency")
    grad_clip: float = param(5.0, check=non_negative, doc="max gradient norm (0 = off)")
    max_instances: int | None = param(None, check=at_least(1), doc="tiles sampled per bag and step (None: all)")
    bags_per_step: int = param(1, check=at_least(1), doc="bags accumulated per optimiser step")
    num_threads: int | None = param(None, check=at_least(1), doc="torch CPU threads while training")
    device: str = param("cpu", check=check_device, doc="torch device for training")

    @classmethod
    def create(cls, base: TrainConfig | None = None, **kwargs: Any) -> TrainConfig:
        """Build from keyword arguments over ``base`` (or the defaults); ``None`` values are ignored."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None})

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregator_kwargs", dict(self.aggregator_kwargs))
        check_params(self)
        _check_aggregator(self.aggregator, self.aggregator_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


