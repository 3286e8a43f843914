"""Multiple-instance learning: slide-level classification from tile embeddings.

Submodules (torch is imported only by those that need it):

- :mod:`.data`: :class:`~.data.Bag`, :func:`~.data.read_labels`, :func:`~.data.load_bags`.
- :mod:`.aggregators`: aggregator registry (``mean``, ``maxpool``, ``abmil``, ``dsmil``, ``clam_sb``).
- :mod:`.splits`: patient-grouped stratified folds.
- :mod:`.config`: :class:`~.config.TrainConfig` (validated on construction, no torch at import).
- :mod:`.training`: :func:`~.training.cross_validate`, :func:`~.training.train_model`.
- :mod:`.metrics`: AUC / balanced accuracy / F1 with bootstrap CIs.
- :mod:`.checkpoint`: safetensors + JSON checkpoints.
- :mod:`.api`: :func:`~.api.train`, :func:`~.api.evaluate`, :func:`~.api.predict` (what the CLI calls).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "Bag": "data",
    "LabelTable": "data",
    "read_labels": "data",
    "load_bags": "data",
    "AGGREGATORS": "config",
    "Aggregator": "aggregators",
    "AggregatorOutput": "aggregators",
    "register_aggregator": "aggregators",
    "build_aggregator": "aggregators",
    "make_folds": "splits",
    "TrainConfig": "config",
    "CVResult": "training",
    "cross_validate": "training",
    "train_model": "training",
    "TrainedModel": "model",
    "compute_metrics": "metrics",
    "format_metrics_table": "metrics",
    "topk_precision": "metrics",
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
