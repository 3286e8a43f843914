"""Tile transforms: stain normalisation (embedding, fine-tuning) and training augmentations.

A transform works on float RGB tiles (B, 3, H, W) in [0, 1] on any device, vectorised over the
batch, and is applied between uint8 → [0, 1] and the encoder's mean/std normalisation.
Build one by name with :func:`build_transform` (``"none"`` gives None)::

    t = build_transform("macenko")                       # built-in reference
    t = build_transform("reinhard", reference="ref.png")  # fitted to a reference tile
    y = t(x); t.key, t.attrs, t.stats()

Registered (:data:`TRANSFORMS`): ``macenko`` and ``reinhard`` stain normalisation (kind
``"stain"``, see :mod:`.macenko`, :mod:`.reinhard`); ``hed_jitter`` and
``brightness_contrast`` augmentations (kind ``"augmentation"``, seeded, :mod:`.augment`).
``.key`` (e.g. ``macenko-1a2b3c4d``) names the transform and a hash of its
parameters and reference; embeddings made with it are stored under
``features/<encoder key>-<transform key>`` next to the raw ones. Add one by writing a module
that calls :func:`register_transform` and importing it here.
"""

from __future__ import annotations

from .base import TRANSFORMS, FallbackCounts, TileTransform, TransformSpec, build_transform, params_key, register_transform

from . import macenko, reinhard, augment  # noqa: E402,F401,I001  (each registers its transforms)

__all__ = [
    "TRANSFORMS", "FallbackCounts", "TileTransform", "TransformSpec", "build_transform", "params_key",
    "register_transform", "stain_names",
]  # fmt: skip


def stain_names() -> list[str]:
    """``none`` plus the registered stain normalisers (the choices of ``--stain``)."""
    return ["none", *(n for n, s in TRANSFORMS.items() if s.kind == "stain")]
