"""Tissue detection on a low-resolution slide image, and per-tile tissue fractions.

Pure numpy / SciPy / scikit-image: no slide I/O happens here. The caller reads a
thumbnail at about :attr:`TissueParams.mask_mpp` µm/px, passes it to
:func:`detect_tissue` with its true resolution, and gets a boolean mask of the same
height and width. :func:`tile_tissue_fraction` then measures, for tiles given in
level-0 pixels, which fraction of each tile the mask covers.

Detection pipeline (all thresholds on the 0–255 intensity scale, saturation and
optical density as defined below):

1. RGBA input is composited over white (transparent = outside the scan = background).
   Inputs finer than ``mask_mpp / 2`` are block-averaged to about ``mask_mpp`` first,
   so that the result and the run time do not depend on the thumbnail size.
2. Colour features, smoothed over ``smooth_um``: HSV saturation
   ``(max - min) / max`` and the summed optical density ``Σ_c ln(W_c / I_c)``
   relative to the slide's own background white ``W`` (95th percentile per channel).
3. A registered *method* turns the features into tissue candidates (default
   ``"otsu-saturation"``: Otsu threshold on saturation, clipped to
   ``[min_saturation, max_saturation_threshold]``, OR pale tissue: optical density
   ``>= pale_min_od`` with at least ``pale_min_saturation``).
4. Pixels brighter than ``max_brightness`` in every channel are background.
5. Pen ink is removed: blue and green ink by hue window plus strong saturation, black
   ink (and dark label/border artefacts) by very low value and low saturation. Purple
   hematoxylin lies outside the blue-ink hue window, and dark nuclei are saturated, so
   nuclei-rich tissue survives. The ink mask is dilated by ``ink_margin_um`` to drop
   the blurred rim of strokes.
6. Morphological closing over ``closing_um``, filling of holes smaller than
   ``fill_holes_um2`` (larger holes, e.g. lumina and tears, stay background), and
   removal of objects smaller than ``min_object_um2``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .._image import rgb_uint8
from .._registry import Registry
from ..coercion import Mismatch, coerce
from ..errors import ConfigError, MppError
from ..params import ParameterError, check_params, one_of, param

__all__ = [
    "TissueParams",
    "TissueReport",
    "explain_tissue",
    "TissueFeatures",
    "TissueMethod",
    "detect_tissue",
    "tile_tissue_fraction",
    "register_tissue_method",
    "tissue_methods",
]

logger = logging.getLogger(__name__)


def _range(what: str, low: float, high: float, *, open_low: bool = False) -> Callable[[Any], str | None]:
    """Check: a number in [low, high] ((low, high] with ``open_low``), called ``what`` in the message."""

    def check(v: Any) -> str | None:
        ok = (low < v if open_low else low <= v) and v <= high and math.isfinite(v)
        bounds = f"[{low:g}, {high:g}]" if math.isfinite(high) else ""
        return None if ok else f"must be {what}" + (f" in {bounds}" if bounds else "")

    return check


_SATURATION = _range("a saturation", 0.0, 1.0)
_INTENSITY = _range("an intensity", 0.0, 255.0)
_LENGTH = _range("a finite value >= 0", 0.0, math.inf)


def _hue_window(v: tuple[float, float]) -> str | None:
    lo, hi = v
    return None if 0.0 <= lo <= hi <= 360.0 else "must satisfy 0 <= low <= high <= 360"


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue`.

    Lengths are in µm, areas in µm², intensities on the 0–255 scale, saturations in
    ``[0, 1]`` (HSV saturation), hues in degrees ``[0, 360)``, optical densities in
    natural-log units summed over R, G and B.

    Attributes:
        mask_mpp: Resolution (µm/px) the mask is computed at. Callers read a thumbnail
            at about this resolution; finer inputs are block-averaged down to it.
        method: Name of a registered candidate method (see :func:`tissue_methods`).
        min_saturation: Floor of the saturation threshold, so that a blank slide gives
            an empty mask instead of Otsu splitting its noise.
        max_saturation_threshold: Cap of the Otsu saturation threshold, so that pale
            pink stroma is not cut away when the slide is dominated by dark nuclei.
        pale_min_od: Summed optical density above which a faintly coloured pixel counts
            as (pale) tissue although its saturation is below the Otsu threshold.
        pale_min_saturation: Minimal saturation for the pale-tissue rule; keeps grey
            shading, coverslip edges and vignetting out.
        max_brightness: Pixels brighter than this in all three channels are background.
        smooth_um: Side of the box filter applied to saturation and optical density
            (largest odd number of pixels not above it; none at ``mask_mpp`` 8).
        remove_blue_ink: Remove blue pen marks.
        blue_ink_hue: Hue window (degrees) of blue ink (red below green). Hematoxylin
            is purple-blue (red above green, hue above 240°), outside this window.
        remove_green_ink: Remove green (and teal) pen marks.
        green_ink_hue: Hue window (degrees) of green ink.
        ink_min_saturation: Minimal saturation of blue and green ink.
        remove_black_ink: Remove black pen marks and dark label/border artefacts.
        black_max_value: Maximal HSV value (brightest channel, 0–255) of black ink.
        black_max_saturation: Maximal saturation of black ink; dark nuclei are more
            saturated than this.
        ink_min_width_um: Ink-coloured regions narrower than this are ignored (morphological
            opening): pen strokes are hundreds of µm wide, whereas blue-black nuclei
            and grains of tissue-margin dye are not.
        ink_margin_um: Ink regions are dilated by this radius before removal, to drop
            the blurred rim of strokes.
        closing_um: Diameter of the disk of the morphological closing (bridges gaps
            narrower than this); 0 disables it.
        fill_holes_um2: Holes smaller than this are filled; larger holes stay background.
        min_object_um2: Connected tissue pieces smaller than this are dropped.
    """

    mask_mpp: float = param(8.0, check=_range("a positive µm/px value", 0, math.inf, open_low=True))
    method: str = param("otsu-saturation", check=one_of(lambda: _METHODS.names()))
    min_saturation: float = param(0.07, check=_SATURATION)
    max_saturation_threshold: float = param(0.15, check=_SATURATION)
    pale_min_od: float = param(0.15, check=_LENGTH)
    pale_min_saturation: float = param(0.04, check=_SATURATION)
    max_brightness: float = param(235.0, check=_INTENSITY)
    smooth_um: float = param(8.0, check=_LENGTH)
    remove_blue_ink: bool = True
    blue_ink_hue: tuple[float, float] = param((190.0, 235.0), check=_hue_window)
    remove_green_ink: bool = True
    green_ink_hue: tuple[float, float] = param((70.0, 190.0), check=_hue_window)
    ink_min_saturation: float = param(0.3, check=_SATURATION)
    remove_black_ink: bool = True
    black_max_value: float = param(80.0, check=_INTENSITY)
    black_max_saturation: float = param(0.35, check=_SATURATION)
    ink_min_width_um: float = param(40.0, check=_LENGTH)
    ink_margin_um: float = param(8.0, check=_LENGTH)
    closing_um: float = param(16.0, check=_LENGTH)
    fill_holes_um2: float = param(10000.0, check=_LENGTH)
    min_object_um2: float = param(2500.0, check=_LENGTH)

    def __post_init__(self) -> None:
        # Values arrive as TOML/flag values or Python numbers: converted to the field types (the
        # one coercion of wsi_convnext.coercion), then checked by the param() checks, once.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, coerce(hints[f.name], value))
            except Mismatch as exc:
                raise ParameterError(f.name, f"must be {exc}", value) from None
        check_params(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (hue windows become lists)."""
        out = dataclasses.asdict(self)
        for name in ("blue_ink_hue", "green_ink_hue"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TissueParams:
        """Inverse of :meth:`to_dict`; missing keys take defaults, ``None`` values are ignored.

        Raises:
            ConfigError: on unknown keys or invalid values.
        """
        return cls.from_kwargs(**dict(data))

    @classmethod
    def from_assignments(cls, items: Sequence[str], base: Mapping[str, Any] | None = None) -> TissueParams:
        """Build from ``key=value`` strings, e.g. ``["min_object_um2=1000", "remove_black_ink=false"]``.

        Values are parsed by field type: numbers, ``true``/``false`` (also yes/no, 1/0), a hue
        window as ``low,high`` degrees, or a name. Later items win; ``base`` supplies defaults.

        Raises:
            ConfigError: A one-line message naming the item, for malformed items, unknown keys or bad values.
        """
        names = sorted(f.name for f in dataclasses.fields(cls))
        values: dict[str, Any] = dict(base or {})
        given: dict[str, str] = {}
        for item in items:
            key, sep, raw = (part.strip() for part in str(item).partition("="))
            if not sep or not key:
                raise ConfigError(f"tissue parameter {item!r} must look like key=value, e.g. min_object_um2=1000")
            if key not in names:
                raise ConfigError(f"unknown tissue parameter {key!r} in {item!r}; valid names: {', '.join(names)}")
            values[key], given[key] = raw, str(item)  # converted and checked once, by the constructor
        try:
            return cls.from_kwargs(**values)
        except ParameterError as exc:
            where = f"tissue parameter {given[exc.name]!r}" if exc.name in given else "tissue parameters"
            raise ConfigError(f"{where}: {exc.render(exc.name)}") from exc

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TissueParams:
        """Build from keyword arguments, ignoring those that are ``None``.

        Raises:
            ConfigError: on unknown names or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown tissue parameter(s) {unknown}; valid names are {sorted(names)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class TissueFeatures:
    """Per-pixel colour features handed to tissue methods (working resolution).

    Attributes:
        rgb: (H, W, 3) uint8 image, RGBA already composited over white.
        saturation: (H, W) float32 smoothed HSV saturation in [0, 1].
        optical_density: (H, W) float32 smoothed Σ_c ln(W_c / I_c) relative to ``white``.
        white: (3,) float64 estimated background white per channel (0–255).
        mpp: µm/px of these arrays.
    """

    rgb: np.ndarray
    saturation: np.ndarray
    optical_density: np.ndarray
    white: np.ndarray
    mpp: float


TissueMethod = Callable[[TissueFeatures, TissueParams], np.ndarray]
"""A method maps features and parameters to a boolean (H, W) candidate mask."""

_METHODS: Registry[TissueMethod] = Registry("tissue method")


def register_tissue_method(name: str, fn: TissueMethod | None = None, *, replace: bool = False) -> Any:
    """Register a tissue candidate method under ``name`` (usable as a decorator; the
    :class:`~wsi_convnext._registry.Registry` rule).

    The method gets :class:`TissueFeatures` and :class:`TissueParams` and returns a
    boolean candidate mask; brightness, ink removal and morphology are applied after it.
    """

    deco = _METHODS.decorator(name, replace=replace)
    return deco if fn is None else deco(fn)


def tissue_methods() -> tuple[str, ...]:
    """Names of the registered tissue methods."""
    return tuple(sorted(_METHODS.names()))


def _otsu(values: np.ndarray, lo: float, hi: float, bins: int = 256) -> float:
    """Otsu threshold of ``values`` over the histogram range [lo, hi] (nan if degenerate)."""
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return math.nan
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    if between.max() <= 0:
        return math.nan
    # Threshold at the upper edge of the best split bin: class 0 is <= threshold.
    return float(edges[int(np.argmax(between)) + 1])


def _pale(features: TissueFeatures, params: TissueParams) -> np.ndarray:
    return (features.optical_density >= params.pale_min_od) & (features.saturation >= params.pale_min_saturation)


def _subsample(a: np.ndarray, max_n: int = 1_000_000) -> np.ndarray:
    flat = a.reshape(-1)
    step = max(1, flat.size // max_n)
    return flat[::step]


@register_tissue_method("otsu-saturation")
def _otsu_saturation(features: TissueFeatures, params: TissueParams) -> np.ndarray:
    """Otsu on saturation (clipped to [min_saturation, max_saturation_threshold]) OR pale tissue."""
    thr = _otsu(_subsample(features.saturation), 0.0, 1.0)
    if not math.isfinite(thr):
        thr = params.min_saturation
    thr = min(max(thr, params.min_saturation), max(params.max_saturation_threshold, params.min_saturation))
    logger.debug("otsu-saturation threshold %.3f", thr)
    return (features.saturation >= thr) | _pale(features, params)


@register_tissue_method("saturation")
def _fixed_saturation(features: TissueFeatures, params: TissueParams) -> np.ndarray:
    """Fixed threshold ``min_saturation`` on saturation OR pale tissue."""
    return (features.saturation >= params.min_saturation) | _pale(features, params)


@register_tissue_method("otsu-od")
def _otsu_od(features: TissueFeatures, params: TissueParams) -> np.ndarray:
    """Otsu on optical density, floored at ``pale_min_od`` (colour-blind; for weak stains)."""
    od = features.optical_density
    thr = _otsu(_subsample(od), 0.0, 3.0)
    if not math.isfinite(thr):
        thr = params.pale_min_od
    return od >= max(thr, params.pale_min_od)


# --------------------------------------------------------------------------- helpers


def _block_mean(rgb: np.ndarray, f: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    ph, pw = -h % f, -w % f
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = rgb.shape[0] // f, rgb.shape[1] // f
    s = rgb.reshape(hh, f, ww, f, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + (f * f) // 2) // (f * f)).astype(np.uint8)


def _block_any(mask: np.ndarray, f: int) -> np.ndarray:
    h, w = mask.shape
    ph, pw = -h % f, -w % f
    if ph or pw:
        mask = np.pad(mask, ((0, ph), (0, pw)), mode="edge")
    return mask.reshape(mask.shape[0] // f, f, mask.shape[1] // f, f).all(axis=(1, 3))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk-like octagon of ``radius`` px (outside counts as False).

    Alternates 4-neighbour (cross) and 8-neighbour (square) steps: a cross for radius 1,
    an octagon approximating a disk beyond. Done with array shifts, far faster than
    ``scipy.ndimage.binary_dilation`` on large masks.
    """
    out = mask.copy()
    for step in range(radius):
        if step % 2 == 0:  # cross: OR the four direct neighbours of the previous result
            src = out.copy()
            out[1:] |= src[:-1]
            out[:-1] |= src[1:]
            out[:, 1:] |= src[:, :-1]
            out[:, :-1] |= src[:, 1:]
        else:  # square: separable 3-row then 3-column maximum
            col = out.copy()
            out[1:] |= col[:-1]
            out[:-1] |= col[1:]
            row = out.copy()
            out[:, 1:] |= row[:, :-1]
            out[:, :-1] |= row[:, 1:]
    return out


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    # Erosion as the complement of dilating the background; outside the image counts
    # as tissue there, so tissue touching the image border is not eaten.
    return ~_dilate(~_dilate(mask, radius), radius)


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees for an (N, 3) uint8 array (0 for grey)."""
    c = rgb.astype(np.float32)
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    mx = c.max(axis=1)
    d = mx - c.min(axis=1)
    d[d == 0] = 1.0
    h = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return h * np.float32(60.0)


def _box_side(length_um: float, mpp: float) -> int:
    """Largest odd box side (px) not longer than ``length_um``; 1 means no filtering."""
    k = int(length_um / mpp + 1e-6)
    return max(1, k - 1 if k % 2 == 0 else k)


def _features(rgb: np.ndarray, mx: np.ndarray, mn: np.ndarray, mpp: float, params: TissueParams) -> TissueFeatures:
    sat = (mx - mn).astype(np.float32)
    sat /= np.maximum(mx, 1).astype(np.float32)
    # Background white: 95th percentile per channel of the slide's own glass colour.
    sample = rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 500_000)]
    white = np.maximum(np.percentile(sample, 95, axis=0), 1.0)
    levels = np.maximum(np.arange(256, dtype=np.float64), 0.5)
    od = np.log(white[0] / levels).astype(np.float32)[rgb[..., 0]]
    od += np.log(white[1] / levels).astype(np.float32)[rgb[..., 1]]
    od += np.log(white[2] / levels).astype(np.float32)[rgb[..., 2]]
    k = _box_side(params.smooth_um, mpp)
    if k > 1:
        sat = ndi.uniform_filter(sat, size=k, mode="nearest")
        od = ndi.uniform_filter(od, size=k, mode="nearest")
    return TissueFeatures(rgb=rgb, saturation=sat, optical_density=od, white=white, mpp=mpp)


def _ink_mask(rgb: np.ndarray, mx: np.ndarray, mn: np.ndarray, params: TissueParams) -> np.ndarray:
    """Pixels of blue, green or black ink (and dark unsaturated artefacts)."""
    spread = mx - mn  # uint8, max - min >= 0
    levels = np.arange(256, dtype=np.float64)
    ink = np.zeros(mx.shape, bool)
    windows = []
    if params.remove_blue_ink:
        windows.append(params.blue_ink_hue)
    if params.remove_green_ink:
        windows.append(params.green_ink_hue)
    if windows:
        # Saturation >= s  <=>  spread >= s * max; per-max-level uint8 table avoids floats.
        need = np.ceil(params.ink_min_saturation * levels - 1e-9).clip(0, 255).astype(np.uint8)
        # Hue only where red is not the brightest channel: pink/red stain is never ink.
        cand = (rgb[..., 0] < mx) & (spread >= need[mx])
        idx = np.flatnonzero(cand)
        if idx.size:
            hue = _hue_degrees(rgb.reshape(-1, 3)[idx])
            hit = np.zeros(idx.size, bool)
            for lo, hi in windows:
                hit |= (hue >= lo) & (hue <= hi)
            ink.reshape(-1)[idx[hit]] = True
    if params.remove_black_ink:
        allow = np.floor(params.black_max_saturation * levels + 1e-9).clip(0, 255).astype(np.uint8)
        ink |= (mx <= params.black_max_value) & (spread <= allow[mx])
    return ink


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components not touching the border with area < ``max_px``."""
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    fill = sizes < max_px
    fill[0] = False
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    fill[border] = False
    if not fill.any():
        return mask
    return mask | fill[labels]


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    if keep[1:].all():
        return mask
    return keep[labels]


# --------------------------------------------------------------------------- API


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of a low-resolution slide image.

    Args:
        rgb: (H, W, 3) RGB or (H, W, 4) RGBA image, uint8 (0–255), uint16 or float
            (0–1); transparent pixels (alpha 0) are background.
        mpp: µm per pixel of ``rgb``; converts the µm / µm² parameters to pixels.
        params: Detection parameters (defaults: :class:`TissueParams`).

    Returns:
        (H, W) bool array, True on tissue. A blank slide gives an all-False mask.

    Raises:
        MppError: if ``mpp`` is not a positive finite number.
        ConfigError: if ``rgb`` is not an RGB(A) image or ``params.method`` is unknown.
    """
    return _detect(rgb, mpp, params or TissueParams(), None)


@dataclass(frozen=True)
class TissueReport:
    """What :func:`detect_tissue` saw and which rule removed what (for "no tissue" diagnoses).

    Areas are in µm²; masks have the input image's height and width.

    Attributes:
        mask: The tissue mask (identical to :func:`detect_tissue`'s).
        removed: Candidate tissue that a rule removed: pieces smaller than
            ``min_object_um2`` and candidates taken for ink.
        params: The parameters used.
        mpp: µm/px of the detection (after block-averaging to about ``mask_mpp``).
        candidate_um2: Area the candidate method selected (before brightness and ink rules).
        bright_um2: Candidate area removed as too bright (``max_brightness``) or transparent.
        ink_um2: Candidate area removed as pen ink.
        max_saturation: Largest smoothed saturation of a non-background pixel (0–1).
        max_optical_density: Largest smoothed summed optical density of the image.
        work_kept: The kept pieces at the detection resolution ``mpp``.
        work_small: The pieces removed by ``min_object_um2``, at ``mpp``.
    """

    mask: np.ndarray
    removed: np.ndarray
    params: TissueParams
    mpp: float
    candidate_um2: float = 0.0
    bright_um2: float = 0.0
    ink_um2: float = 0.0
    max_saturation: float = 0.0
    max_optical_density: float = 0.0
    work_kept: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool), repr=False)
    work_small: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool), repr=False)

    # Labelling costs about as much as the detection: done only when a report is read.
    @functools.cached_property
    def kept_um2(self) -> tuple[float, ...]:
        """Areas of the kept pieces (µm²), largest first."""
        return _piece_areas(self.work_kept, self.mpp**2)

    @functools.cached_property
    def small_um2(self) -> tuple[float, ...]:
        """Areas of the pieces removed by ``min_object_um2`` (µm²), largest first."""
        return _piece_areas(self.work_small, self.mpp**2)

    def describe(self) -> str:
        """One clause saying what the mask saw, naming the parameters that decided it."""
        p = self.params
        parts = []
        if self.kept_um2:
            parts.append(f"kept {_pieces(self.kept_um2)}")
        if self.small_um2:
            parts.append(f"removed {_pieces(self.small_um2)} smaller than min_object_um2={p.min_object_um2:g}")
        if self.ink_um2 > 0:
            parts.append(f"removed {_area(self.ink_um2)} as pen ink (remove_*_ink)")
        if self.bright_um2 > 0 and not self.kept_um2:
            parts.append(f"removed {_area(self.bright_um2)} brighter than max_brightness={p.max_brightness:g}")
        if self.candidate_um2 == 0:
            parts.append(
                f"no candidate pixel (saturation up to {self.max_saturation:.3f}, floor min_saturation="
                f"{p.min_saturation:g}; optical density up to {self.max_optical_density:.3f}, "
                f"pale_min_od={p.pale_min_od:g})"
            )
        return "; ".join(parts) if parts else "nothing found"

    def suggestion(self) -> dict[str, Any]:
        """Tissue parameters that would keep more of what was removed (empty: none would help)."""
        p = self.params
        if self.kept_um2:
            return {}
        if self.small_um2:
            return {"min_object_um2": _round_down(0.8 * self.small_um2[0])}
        if self.ink_um2 > 0:
            return {name: False for name in ("remove_blue_ink", "remove_green_ink", "remove_black_ink")
                    if getattr(p, name)}  # fmt: skip
        if self.bright_um2 > 0:
            return {"max_brightness": min(255.0, p.max_brightness + 10.0)}
        # No candidate at all: faint tissue and clean glass look alike here, so no guess.
        return {}


def explain_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> TissueReport:
    """Like :func:`detect_tissue`, but also report what each rule removed.

    Same arguments and errors as :func:`detect_tissue`; ``report.mask`` equals its result.
    """
    trace: dict[str, Any] = {}
    params = params or TissueParams()
    mask = _detect(rgb, mpp, params, trace)
    h, w = mask.shape
    f = trace.get("f", 1)
    removed = trace.get("removed")
    if removed is None:
        removed = np.zeros((h, w), bool)
    elif f > 1:
        removed = np.repeat(np.repeat(removed, f, axis=0), f, axis=1)[:h, :w]
    return TissueReport(
        mask=mask, removed=removed, params=params, mpp=float(trace.get("mpp", mpp)),
        candidate_um2=trace.get("candidate_um2", 0.0), bright_um2=trace.get("bright_um2", 0.0),
        ink_um2=trace.get("ink_um2", 0.0), max_saturation=trace.get("max_saturation", 0.0),
        max_optical_density=trace.get("max_optical_density", 0.0),
        work_kept=trace.get("kept", np.zeros((0, 0), bool)), work_small=trace.get("small", np.zeros((0, 0), bool)),
    )  # fmt: skip


def _area(um2: float) -> str:
    return f"{um2:,.0f} µm²"


def _pieces(areas: tuple[float, ...], shown: int = 3) -> str:
    n = len(areas)
    listed = ", ".join(_area(a) for a in areas[:shown]) + (", ..." if n > shown else "")
    return f"{n} piece{'s' if n != 1 else ''} ({listed})"


def _round_down(value: float, digits: int = 2) -> float:
    """``value`` rounded down to ``digits`` significant digits (a readable suggestion)."""
    if value <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(math.floor(value / scale) * scale)


def _detect(rgb: np.ndarray, mpp: float, params: TissueParams, trace: dict[str, Any] | None) -> np.ndarray:
    """:func:`detect_tissue`; records the effect of each rule into ``trace`` when given."""
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise MppError(f"detect_tissue: mpp={mpp!r} must be the image's µm/px as a positive number") from None
    if not (math.isfinite(mpp) and mpp > 0):
        raise MppError(f"detect_tissue: mpp={mpp!r} must be the image's µm/px as a positive number")
    method = _METHODS.lookup(params.method)
    image, transparent = rgb_uint8(rgb, "rgb")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), bool)

    f = int(params.mask_mpp / mpp + 1e-6)
    if f >= 2:
        image = _block_mean(image, f)
        if transparent is not None:
            transparent = _block_any(transparent, f)
        work_mpp = mpp * f
    else:
        f, work_mpp = 1, mpp
    px_area = work_mpp * work_mpp

    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    feats = _features(image, mx, mn, work_mpp, params)
    mask = np.asarray(method(feats, params), dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ConfigError(f"tissue method {params.method!r} returned shape {mask.shape}, expected {image.shape[:2]}")
    if trace is not None:
        candidates = mask.copy()
        glass = mn > params.max_brightness
        trace.update(
            f=f, mpp=work_mpp, candidate_um2=float(mask.sum()) * px_area,
            max_saturation=float(feats.saturation[~glass].max()) if (~glass).any() else 0.0,
            max_optical_density=float(feats.optical_density.max()),
        )  # fmt: skip
    mask &= mn <= params.max_brightness
    if transparent is not None:
        mask &= ~transparent
    if trace is not None:
        trace["bright_um2"] = float((candidates & ~mask).sum()) * px_area
        before_ink = mask.copy()
    if params.remove_blue_ink or params.remove_green_ink or params.remove_black_ink:
        ink = _ink_mask(image, mx, mn, params)
        if ink.any():
            # Opening (erode, dilate back) keeps only wide ink; the margin grows it further.
            r_open = int(params.ink_min_width_um / (2.0 * work_mpp))
            r_margin = int(round(params.ink_margin_um / work_mpp))
            if r_open > 0:
                ink = ~_dilate(~ink, r_open)
            if r_open + r_margin > 0:
                ink = _dilate(ink, r_open + r_margin)
            mask &= ~ink
    if trace is not None:
        inked = before_ink & ~mask
        trace["ink_um2"] = float(inked.sum()) * px_area
    radius = int(round(params.closing_um / (2.0 * work_mpp)))
    if radius > 0 and mask.any():
        mask = _closing(mask, radius)
    if params.fill_holes_um2 > 0 and mask.any():
        mask = _fill_small_holes(mask, params.fill_holes_um2 / px_area)
    if trace is not None:
        before_small = mask.copy()
    if params.min_object_um2 > 0 and mask.any():
        mask = _remove_small_objects(mask, params.min_object_um2 / px_area)
    if trace is not None:
        trace["kept"] = mask
        trace["small"] = before_small & ~mask
        trace["removed"] = trace["small"] | inked

    if f > 1:
        mask = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)[:h, :w]
    logger.debug("tissue: %.1f%% of %dx%d px at %.2f µm/px", 100.0 * mask.mean(), w, h, mpp)
    return mask


def _piece_areas(mask: np.ndarray, px_area: float) -> tuple[float, ...]:
    """Areas (µm²) of the 8-connected pieces of ``mask``, largest first."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return ()
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)[1:]
    return tuple(float(v) * px_area for v in sorted(sizes.tolist(), reverse=True))


def tile_tissue_fraction(
    mask: np.ndarray, mask_downsample: float, coords: np.ndarray, extent: float
) -> np.ndarray:
    """Fraction of each square tile covered by tissue, with exact area weighting.

    Each mask pixel ``[j, i]`` covers level-0 area ``[i*d, (i+1)*d) × [j*d, (j+1)*d)``
    with ``d = mask_downsample``. The integral of the mask is bilinear inside each
    pixel, so bilinear interpolation of the summed-area table gives the exact covered
    area of any axis-aligned rectangle, fractional boundaries included. Area outside
    the mask counts as background.

    Args:
        mask: (H, W) bool (or 0/1) tissue mask.
        mask_downsample: level-0 pixels per mask pixel (> 0).
        coords: (N, 2) level-0 (x, y) top-left tile corners.
        extent: tile side in level-0 pixels (> 0).

    Returns:
        (N,) float32 fractions in [0, 1].

    Raises:
        ConfigError: on a bad mask, downsample, extent or coords shape.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ConfigError(f"tile_tissue_fraction: mask must be 2-D, got shape {m.shape}")
    ds = float(mask_downsample)
    ext = float(extent)
    if not (math.isfinite(ds) and ds > 0):
        raise ConfigError(f"tile_tissue_fraction: mask_downsample={mask_downsample!r} must be > 0")
    if not (math.isfinite(ext) and ext > 0):
        raise ConfigError(f"tile_tissue_fraction: extent={extent!r} must be > 0 level-0 px")
    c = np.asarray(coords)
    if c.size == 0:
        return np.zeros(0, np.float32)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ConfigError(f"tile_tissue_fraction: coords must have shape (N, 2), got {c.shape}")
    h, w = m.shape
    if h == 0 or w == 0:
        return np.zeros(c.shape[0], np.float32)

    acc = np.int32 if h * w < 2**31 else np.int64
    sat = np.zeros((h + 1, w + 1), acc)
    np.cumsum(np.cumsum(m != 0, axis=0, dtype=acc), axis=1, dtype=acc, out=sat[1:, 1:])

    c = c.astype(np.float64)
    x0 = np.clip(c[:, 0] / ds, 0.0, w)
    x1 = np.clip((c[:, 0] + ext) / ds, 0.0, w)
    y0 = np.clip(c[:, 1] / ds, 0.0, h)
    y1 = np.clip((c[:, 1] + ext) / ds, 0.0, h)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ix = np.minimum(np.floor(x).astype(np.intp), w - 1)
        iy = np.minimum(np.floor(y).astype(np.intp), h - 1)
        fx, fy = x - ix, y - iy
        s00 = sat[iy, ix].astype(np.float64)
        s01 = sat[iy, ix + 1]
        s10 = sat[iy + 1, ix]
        s11 = sat[iy + 1, ix + 1]
        return s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy

    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    frac = area / (ext / ds) ** 2
    return np.clip(frac, 0.0, 1.0).astype(np.float32)
