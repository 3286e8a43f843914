"""Training the tile encoder: fine-tuning (or training from scratch) a ConvNeXt on labelled tiles.

- :mod:`.config`: :class:`FinetuneConfig` (validated on construction).
- :mod:`.train`: :func:`finetune_encoder` (resumable training loop), :func:`prepare_model`.
- :mod:`.outputs`: the files of ENC_DIR; :func:`load_finetuned`.
- :mod:`.predict`: :func:`predict_tiles` (per-tile class probabilities).
- :mod:`.compare`: :func:`compare_finetuned` (MIL on random against fine-tuned features, held-out
  slides), :func:`hold_out_patients`.
- colour augmentation: the registered ``hed_jitter`` and ``brightness_contrast`` tile transforms (:mod:`wsi_convnext.transforms.augment`).

torch is imported by the submodules that need it, not here.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "AUGMENTATIONS": "config",
    "FinetuneConfig": "config",
    "parse_freeze": "config",
    "FinetuneProgress": "train",
    "finetune_encoder": "train",
    "prepare_model": "train",
    "work_dir": "train",
    "FinetunedModel": "outputs",
    "load_finetuned": "outputs",
    "predict_tiles": "predict",
    "TilePredictions": "predict",
    "ArmResult": "compare",
    "FinetuneComparison": "compare",
    "HeldOutSplit": "compare",
    "compare_finetuned": "compare",
    "hold_out_patients": "compare",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
