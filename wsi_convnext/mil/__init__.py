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

from .._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "data": ("Bag", "load_bags"),
        "aggregators": ("Aggregator", "AggregatorOutput", "register_aggregator", "build_aggregator"),
        "config": ("AGGREGATORS", "TrainConfig"),
        "training": ("CVResult", "cross_validate", "train_model"),
        "model": ("TrainedModel",),
        "synthetic": ("make_synthetic_cohort",),
        "checkpoint": ("save_model", "load_model"),
        "api": ("train", "evaluate", "predict", "TrainReport", "SlidePrediction"),
    },
)
