"""Synthetic whole-slide images with exact ground truth.

Writes real pyramidal TIFF files (Aperio SVS or generic tiled TIFF) that OpenSlide and
tiffslide open like scanner output, for the demo, the tests and the benchmarks. Pixels
are generated procedurally, tile by tile, from level-0 physical coordinates, so memory
does not grow with the slide size (an 80,000×80,000 px slide is written with a few
hundred MB) and every output is a pure function of :class:`SyntheticSlideSpec` (same
seed → identical bytes).

Content (``pattern="he"``): H&E-like tissue pieces with holes and loose fragments on a
white glass background, pink eosin stroma with fibres, purple hematoxylin nuclei, optional
lesions (denser, larger, darker, irregular nuclei), pen marks and pale staining; with
``stain="hematoxylin"`` or ``"dab"`` the same tissue looks like an IHC slide (blue-grey
counterstain only, or DAB brown). ``pattern="lines"`` draws black grid lines at exact
physical positions for geometry tests.

Readers: OpenSlide 4.0 and tiffslide both open every flavour/compression, except generic
TIFF + JPEG 2000 (compression 33005), which only tiffslide decodes (OpenSlide decodes JPEG
2000 in Aperio files only). Without mpp, no resolution tag is written at all.

Modules: :mod:`.shapes` (spec, geometry, ground truth), :mod:`.render` (textures and
renderers), :mod:`.write` (TIFF writing, codecs, flavours), :mod:`.cohorts` (labelled
cohorts, demo slides).

Example:
    >>> spec = SyntheticSlideSpec(width=6000, height=5000, mpp=0.5, lesions=1, seed=3)
    >>> slide = write_synthetic_slide("slide.svs", spec)     # doctest: +SKIP
    >>> slide.tissue_mask(16.0).mean()                        # doctest: +SKIP
"""

from __future__ import annotations

from .cohorts import CohortSlide, demo_slides, make_cohort
from .shapes import (
    DEFAULT_CONTENT_MPP,
    PEN_INKS,
    PenStroke,
    Shape,
    SlideGeometry,
    SyntheticSlide,
    SyntheticSlideSpec,
    TissueSpec,
)
from .write import truncate_copy, write_synthetic_slide

__all__ = [
    "DEFAULT_CONTENT_MPP",
    "PEN_INKS",
    "CohortSlide",
    "PenStroke",
    "Shape",
    "SlideGeometry",
    "SyntheticSlide",
    "SyntheticSlideSpec",
    "TissueSpec",
    "demo_slides",
    "make_cohort",
    "truncate_copy",
    "write_synthetic_slide",
]
