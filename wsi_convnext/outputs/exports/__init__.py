"""Export formats: one registered writer per format, one module each.

A format is an :class:`ExportFormat` in :data:`FORMATS`; add one by writing a module that
calls :func:`register_format` and importing it at the bottom of this file. Writers get a
:class:`SlideExport` (everything one store holds that other tools want) and write one
complete file at the path they are given; :func:`wsi_convnext.outputs.export.export_features`
does the planning, the atomic renames and the error handling.

This package imports only the standard library at import time (numpy, h5py, torch and
anndata are imported by the writers), so the CLI can list the formats in ``--help``
without slowing down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._registry import Registry

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FORMATS", "STORE_PARTS", "ExportFormat", "SlideExport", "register_format", "score_columns"]


@dataclass(frozen=True)
class SlideExport:
    """What one slide exports.

    Attributes:
        slide_id: Slide identifier (the output file's stem).
        features: (N, D) embeddings, or None for a format that does not need them and a
            store without (or with an unchosen) feature key.
        coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
        coords_attrs: Tile geometry (``patch_size``, ``extent0`` in level-0 px, ``target_mpp``,
            ``level0_mpp`` in µm/px, ...; see :mod:`wsi_convnext.outputs.export`).
        feature_attrs: Provenance of the embeddings (store feature attrs plus ``feature_key``);
            empty when ``features`` is None.
        tissue_fraction: (N,) float32 tissue fraction per tile, in [0, 1].
        scores: Per-tile score arrays by store name (``scores/<name>``), (N,) or (N, C) float32.
        score_attrs: Attributes of each score array (``score`` kind, ``columns``, ``classes``, ...).
        tissue_mask: (h, w) bool tissue mask, ``mask_downsample`` level-0 px per pixel.
        mask_downsample: Level-0 pixels per mask pixel.
    """

    slide_id: str
    features: np.ndarray | None
    coords: np.ndarray
    coords_attrs: dict[str, Any]
    feature_attrs: dict[str, Any]
    tissue_fraction: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    score_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tissue_mask: np.ndarray | None = None
    mask_downsample: float = 1.0


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: Registry name (``--format``).
        suffix: File suffix, with the dot.
        write: ``write(path, slide_export)``; writes one complete file at ``path``.
        description: One line for help texts.
        needs_features: Whether every store must hold the chosen embeddings.
        write_cohort: ``write_cohort(path, slide_exports)`` writing all slides into one file
            (``--cohort``), or None when the format is one file per slide only.
        check: Called before anything is read or written; raises (e.g. a
            :class:`~wsi_convnext.errors.ConfigError` saying what to install) when the
            format cannot be written here.
        reads: Optional store parts the writer uses besides features and coords, from
            :data:`STORE_PARTS`; only these are read (and checked), so e.g. an h5 export
            never touches a tile chunk or a score array.
    """

    name: str
    suffix: str
    write: Callable[[Path, SlideExport], None]
    description: str
    needs_features: bool = True
    write_cohort: Callable[[Path, Sequence[SlideExport]], None] | None = None
    check: Callable[[], None] | None = None
    reads: tuple[str, ...] = ()


#: Store parts a format may read besides features and coords (:attr:`ExportFormat.reads`).
STORE_PARTS: tuple[str, ...] = ("tissue_fraction", "tissue_mask", "scores")

#: Export formats by name.
FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(fmt: ExportFormat, *, replace: bool = False) -> ExportFormat:
    """Add a format to :data:`FORMATS` (the :class:`~wsi_convnext._registry.Registry` rule)."""
    return FORMATS.register(fmt.name, fmt, replace=replace)


def score_columns(item: SlideExport) -> dict[str, np.ndarray]:
    """Per-tile score columns by name: ``<name>`` for an (N,) array, ``<name>_<column>`` for (N, C).

    Column labels come from the array's ``columns`` attribute (class names, see
    ``wsi-convnext predict``), else the column index.
    """
    import numpy as np

    out: dict[str, np.ndarray] = {}
    for name, values in item.scores.items():
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 1:
            out[name] = values
            continue
        labels = list(item.score_attrs.get(name, {}).get("columns") or [])
        if len(labels) != values.shape[1]:
            labels = [str(j) for j in range(values.shape[1])]
        for j, label in enumerate(labels):
            out[f"{name}_{label}"] = values[:, j]
    return out


# Each module registers its format on import; the order is the order of --help.
from . import h5, pt, geojson, h5ad  # noqa: E402,F401
