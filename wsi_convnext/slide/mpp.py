"""Level-0 resolution: where a slide's µm/px comes from, and the policy that accepts it.

Sources, in order: the backend's ``<backend>.mpp-x/y`` property, the Aperio ``MPP`` field of the
ImageDescription, the TIFF X/YResolution tags. :func:`resolve_mpp` turns that (or a user
override) into the single isotropic µm/px value the pipeline works with, and refuses missing,
absurd or anisotropic values instead of guessing.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

from ..errors import MppError
from .tiff import TiffTags

if TYPE_CHECKING:
    from .base import BaseSlideReader, SlideMetadata

logger = logging.getLogger(__name__)

RESOLUTION_UNITS: dict[int, tuple[str, float]] = {
    # TIFF ResolutionUnit -> (label, micrometres per unit). 4/5 are tifffile extensions.
    2: ("inch", 25400.0),
    3: ("cm", 10000.0),
    4: ("mm", 1000.0),
    5: ("um", 1.0),
}
#: The plausible range of a level-0 resolution for microscopy, µm/px.
MIN_MPP, MAX_MPP = 0.05, 100.0


def check_slide_mpp(value: Any) -> str | None:
    """``param()`` check of a level-0 µm/px given by a user (``slide_mpp``): ``"must be ..."`` or None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and MIN_MPP <= value <= MAX_MPP
    return None if ok else (
        f"must be the level-0 µm/px, between {MIN_MPP:g} and {MAX_MPP:g} (about 0.25 for 40x, 0.5 for 20x scans)"
    )


APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([-+0-9.eE]+)")
APERIO_APPMAG = re.compile(r"\|\s*AppMag\s*=\s*([-+0-9.eE]+)")


def resolve_mpp(reader: BaseSlideReader, *, anisotropy_tolerance: float = 0.02) -> tuple[float, str]:
    """Return the slide's isotropic level-0 resolution in µm/px and where it came from.

    The ``slide_mpp`` given to :func:`~wsi_convnext.slide.open_slide` (checked there, carried by
    the reader) wins (source ``"override"``) and is the way to accept a slide whose metadata is
    missing or absurd. Otherwise the metadata value is used. Nothing is ever guessed.

    Args:
        reader: An open slide.
        anisotropy_tolerance: Largest accepted relative difference between x and y µm/px; within
            it the mean is used.

    Raises:
        MppError: Metadata missing, outside the plausible range, or anisotropic (and no ``slide_mpp``).
    """
    name = reader.path
    value = reader.slide_mpp_override
    min_mpp, max_mpp = MIN_MPP, MAX_MPP
    if value is not None:
        if reader.mpp_x is not None and not math.isclose(value, reader.mpp_x, rel_tol=anisotropy_tolerance):
            logger.info(
                "%s: using mpp override %g instead of metadata %g (%s)", name, value, reader.mpp_x, reader.mpp_source
            )
        return value, "override"
    mx, my, source = reader.mpp_x, reader.mpp_y, reader.mpp_source
    if mx is None or my is None:
        raise MppError(
            f"{name}: no microns-per-pixel in the slide metadata; "
            "pass --slide-mpp X or add a `slide_mpp` column to the CSV manifest"
        )
    for v in (mx, my):
        if not (math.isfinite(v) and min_mpp <= v <= max_mpp):
            raise MppError(
                f"{name}: metadata mpp {v:.6g} µm/px (from {source}) is implausible for microscopy "
                f"(expected {min_mpp:g} to {max_mpp:g}); if you know the true resolution pass --slide-mpp X "
                "or add a `slide_mpp` column to the CSV manifest"
            )
    if abs(mx - my) > anisotropy_tolerance * min(mx, my):
        raise MppError(
            f"{name}: non-square pixels (mpp x {mx:.6g}, y {my:.6g} µm/px from {source}) are not supported; "
            "resample the slide to square pixels or pass --slide-mpp X to override"
        )
    return (mx + my) / 2.0, str(source)


def metadata_mpp(backend: str, meta: SlideMetadata) -> tuple[float | None, float | None, str | None]:
    """Level-0 (mpp_x, mpp_y, source): backend property, then Aperio MPP, then TIFF resolution tags."""
    props = meta.properties
    tag_mpp = mpp_from_resolution_tags(meta.tiff_tags)
    mx = positive_or_none(props.get(f"{backend}.mpp-x"))
    my = positive_or_none(props.get(f"{backend}.mpp-y"))
    if mx is not None or my is not None:
        mx, my = (mx if mx is not None else my), (my if my is not None else mx)
        source = f"{backend}.mpp-x"
        # OpenSlide 4 and tiffslide derive their mpp from the resolution tags for generic TIFFs;
        # name the tag so that a user seeing "352.78 µm/px" knows where it comes from.
        if tag_mpp is not None and math.isclose(tag_mpp[0], mx, rel_tol=1e-6):
            source = tag_mpp[2]
        return mx, my, source
    aperio = aperio_value(meta, APERIO_MPP, "aperio.MPP")
    if aperio is not None and aperio > 0:
        return aperio, aperio, "aperio.MPP"
    if tag_mpp is not None:
        return tag_mpp
    return None, None, None


def mpp_from_resolution_tags(tags: TiffTags | None) -> tuple[float, float, str] | None:
    if tags is None or tags.resolution_unit not in RESOLUTION_UNITS:
        return None
    if not tags.x_resolution or not tags.y_resolution:
        return None
    label, um_per_unit = RESOLUTION_UNITS[int(tags.resolution_unit)]
    mx, my = um_per_unit / tags.x_resolution, um_per_unit / tags.y_resolution
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        return None
    return mx, my, f"tiff.XResolution({label})"


def aperio_value(meta: SlideMetadata, pattern: re.Pattern[str], prop: str) -> float | None:
    value = positive_or_none(meta.properties.get(prop))
    if value is not None:
        return value
    for desc in (meta.properties.get("tiff.ImageDescription"), meta.tiff_tags.description if meta.tiff_tags else None):
        if desc and desc.lstrip().startswith("Aperio"):
            m = pattern.search(desc)
            if m:
                return positive_or_none(m.group(1))
    return None



def float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def positive_or_none(value: Any) -> float | None:
    f = float_or_none(value)
    return f if f is not None and f > 0 else None

