"""Tile encoders: timm backbones with pooled features, their stems, weights and devices.

- :mod:`.base`: :class:`Encoder` (inference, train/eval, parameter groups, preprocessing, feature
  key), :class:`EncoderConfig`, :func:`build_encoder`, and the encoder-family registry
  (:class:`EncoderFamily`, :func:`register_family`, :data:`FAMILIES`).
- :mod:`.convnext`: the ConvNeXt family: its stems (:data:`STEMS`, :class:`StemSpec`,
  :func:`register_stem`) and the exact patch → overlap stem conversion.
- :mod:`.timm_generic`: the generic family for any other timm model or ``hf-hub:`` id (no stems;
  ``dynamic_img_size`` where the model takes it).
- :mod:`.presets`: pathology foundation-model presets (:data:`PRESETS`, :func:`register_preset`):
  UNI, UNI2-h, Virchow(2), H-optimus-0/1, Prov-GigaPath, kaiko.ai, with their feature recipes.
- :mod:`.weights`: weights files (safetensors-first, ``weights_only=True``), their metadata, and
  timm's pretrained weights through the Hugging Face cache.
- :mod:`.device`: :func:`resolve_device`.
- :mod:`.precision`: the one precision policy (:func:`resolve_precision`, :class:`Precision`),
  used by embed, finetune and predict-tiles.

Adding an encoder family = writing one module that subclasses :class:`EncoderFamily` and calls
:func:`register_family`; :func:`build_encoder` then builds its model names.
"""

from __future__ import annotations

from .base import (
    DEFAULT_MODEL,
    DEFAULT_RESIZE,
    DEFAULT_STEM_INIT,
    FAMILIES,
    RANDOM,
    RESIZE_POLICIES,
    STEM_INITS,
    Encoder,
    EncoderConfig,
    EncoderFamily,
    Stem,
    TileTransformFn,
    build_encoder,
    family_for,
    register_family,
)

# Registration order matters: later families win, so the generic timm family is the fallback,
# ConvNeXt keeps its names (stems, exact conversion) and preset names go to the presets.
from .timm_generic import NO_STEM, TimmFamily  # isort: skip
from .convnext import DEFAULT_STEM, STEMS, ConvNeXtFamily, StemSpec, convert_patch_stem_to_overlap, register_stem  # isort: skip
from .presets import PRESETS, RECIPES, Preset, PresetFamily, register_preset  # isort: skip
from .device import resolve_device
from .precision import PRECISIONS, Precision, resolve_precision
from .weights import (
    ENCODER_FILE,
    META_MODEL,
    META_PREFIX,
    META_STEM,
    find_pretrained_file,
    load_weights,
    read_weights_metadata,
    save_encoder_weights,
    weights_metadata,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_RESIZE",
    "DEFAULT_STEM",
    "DEFAULT_STEM_INIT",
    "ENCODER_FILE",
    "FAMILIES",
    "META_MODEL",
    "META_PREFIX",
    "META_STEM",
    "PRECISIONS",
    "NO_STEM",
    "PRESETS",
    "RANDOM",
    "RECIPES",
    "RESIZE_POLICIES",
    "STEMS",
    "STEM_INITS",
    "ConvNeXtFamily",
    "Encoder",
    "EncoderConfig",
    "EncoderFamily",
    "Precision",
    "Preset",
    "PresetFamily",
    "Stem",
    "StemSpec",
    "TileTransformFn",
    "TimmFamily",
    "build_encoder",
    "convert_patch_stem_to_overlap",
    "family_for",
    "find_pretrained_file",
    "load_weights",
    "read_weights_metadata",
    "register_family",
    "register_preset",
    "register_stem",
    "resolve_device",
    "resolve_precision",
    "save_encoder_weights",
    "weights_metadata",
]
