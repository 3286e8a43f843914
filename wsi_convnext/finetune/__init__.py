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

from .._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "config": ("AUGMENTATIONS", "FinetuneConfig", "parse_freeze"),
        "train": ("FinetuneProgress", "finetune_encoder", "prepare_model", "work_dir"),
        "outputs": ("FinetunedModel", "load_finetuned"),
        "predict": ("predict_tiles", "TilePredictions"),
        "compare": ("ArmResult", "FinetuneComparison", "HeldOutSplit", "compare_finetuned", "hold_out_patients"),
    },
)
