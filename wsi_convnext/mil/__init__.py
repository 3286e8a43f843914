"""Multiple-instance learning: slide-level classification from tile embeddings.

Labels, splits and metrics live in :mod:`wsi_convnext.labels` (shared with ``finetune``).

Submodules (torch is imported only by those that need it):

- :mod:`.data`: :class:`~.data.Bag`, :func:`~.data.load_bags`, :func:`~.data.labels_for_bags`.
- :mod:`.aggregators`: aggregator registry (``mean``, ``maxpool``, ``abmil``, ``dsmil``, ``clam_sb``).
- :mod:`.config`: :class:`~.config.TrainConfig` (validated on construction, no torch at import).
- :mod:`.training`: :func:`~.training.cross_validate`, :func:`~.training.train_model`.
- :mod:`.checkpoint`: safetensors + JSON checkpoints.
- :mod:`.api`: :func:`~.api.train`, :func:`~.api.evaluate`, :func:`~.api.predict` (what the CLI calls).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "Bag": "data",
    "load_bags": "data",
    "AGGREGATORS": "aggregators",
    "Aggregator": "aggregators",
    "AggregatorOutput": "aggregators",
    "register_aggregator": "aggregators",
    "build_aggregator": "aggregators",
    "TrainConfig": "config",
    "CVResult": "training",
    "cross_validate": "training",
    "train_model": "training",
    "TrainedModel": "model",
    "make_synthetic_cohort": "synthetic",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "train": "api",
    "evaluate": "api",
    "predict": "api",
    "TrainReport": "api",
    "SlidePrediction": "api",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
