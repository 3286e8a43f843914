"""Imports the built-in methods; each registers itself in :data:`~wsi_convnext.pretrain.methods.METHODS`."""

from __future__ import annotations

from . import dino, simclr  # noqa: F401  (registration is the import's effect)
