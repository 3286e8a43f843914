"""wsi-convnext: whole-slide tiling, ConvNeXt embedding and MIL for computational pathology.

Data flow: slide (:mod:`.slide`) → tissue and tiles (:mod:`.tiling`: grid, tissue, tiler)
→ zarr store (:mod:`.store`) → embeddings (:mod:`.encoders`, :mod:`.embed`)
→ slide predictions (:mod:`.mil`). :mod:`.cohort` runs it over cohorts on Dask.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "open_slide", "open_store", "WsiConvnextError"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import wsi_convnext` (and `wsi-convnext --help`) stays instant.
    if name == "open_slide":
        from .slide import open_slide

        return open_slide
    if name == "open_store":
        from .store import open_store

        return open_store
    if name == "WsiConvnextError":
        from .errors import WsiConvnextError

        return WsiConvnextError
    raise AttributeError(f"module 'wsi_convnext' has no attribute {name!r}")
