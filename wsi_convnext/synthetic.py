"""Synthetic whole-slide images with exact ground truth.

Writes real pyramidal TIFF files (Aperio SVS or generic tiled TIFF) that OpenSlide and
tiffslide open like scanner output, for the demo, the tests and the benchmarks. Pixels
are generated procedurally, tile by tile, from level-0 physical coordinates, so memory
does not grow with the slide size (an 80,000×80,000 px slide is written with a few
hundred MB) and every output is a pure function of :class:`SyntheticSlideSpec` (same
seed → identical bytes).

Content (``pattern="he"``): H&E-like tissue pieces with holes and loose fragments on a
white glass background, pink eosin stroma with fibres, purple hematoxylin nuclei, optional
lesions (denser, larger, darker, irregular nuclei), pen marks and pale staining.
``pattern="lines"`` draws black grid lines at exact physical positions for geometry tests.

Readers: OpenSlide 4.0 and tiffslide both open every flavour/compression, except generic
TIFF + JPEG 2000 (compression 33005), which only tiffslide decodes (OpenSlide decodes JPEG
2000 in Aperio files only). Without mpp, no resolution tag is written at all.

Coordinate frames: geometry is stored in level-0 pixels (x to the right, y down). A
ground-truth mask at ``mpp_mask`` µm/px has pixel ``(r, c)`` covering the level-0
rectangle ``[c*s, (c+1)*s) × [r*s, (r+1)*s)`` with ``s = mpp_mask / content_mpp``; a
mask pixel is set when its centre lies inside the region.

Example:
    >>> spec = SyntheticSlideSpec(width=6000, height=5000, mpp=0.5, lesions=1, seed=3)
    >>> slide = write_synthetic_slide("slide.svs", spec)     # doctest: +SKIP
    >>> slide.tissue_mask(16.0).mean()                        # doctest: +SKIP
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import logging
import math
import os
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ConfigError, InputNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
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

#: Pixel size (µm/px) used to draw content when the spec writes no mpp metadata.
DEFAULT_CONTENT_MPP = 0.5

# Ink transmittance per colour (fraction of light passed per RGB channel at full ink).
PEN_INKS: dict[str, tuple[float, float, float]] = {
    "blue": (0.10, 0.28, 0.80),
    "green": (0.12, 0.58, 0.28),
    "black": (0.11, 0.11, 0.13),
}

_STANDARD_POWERS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)


# --------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueSpec:
    """Shape controls of the tissue on the slide.

    Attributes:
        n_blobs: Number of main tissue pieces (irregular star-shaped outlines).
        coverage: Target fraction (0–0.8) of the slide area covered by tissue (approximate,
            reached to within a few per cent).
        n_fragments: Number of small loose fragments (about 0.1–0.5 mm across).
        n_holes: Number of holes (background inside tissue), spread over the main pieces.
        roughness: Amplitude of outline irregularity (0 = plain ellipses, 0.4 = very lobed).
    """

    n_blobs: int = 2
    coverage: float = 0.3
    n_fragments: int = 3
    n_holes: int = 2
    roughness: float = 0.25


@dataclass(frozen=True)
class Shape:
    """A star-shaped region: an ellipse whose radius is modulated by a few harmonics.

    All lengths are level-0 pixels. The outline is ``centre + R(angle) · (rx·ρ(φ)·cos φ,
    ry·ρ(φ)·sin φ)`` with ``ρ(φ) = 1 + Σ amp_k·cos(k·φ + phase_k)``.

    Attributes:
        cx: Centre x (level-0 px).
        cy: Centre y (level-0 px).
        rx: Semi-axis along the rotated x axis (level-0 px).
        ry: Semi-axis along the rotated y axis (level-0 px).
        angle: Rotation (radians, counter-clockwise in image coordinates).
        harmonics: ``(k, amp, phase)`` triples; ``Σ|amp|`` must stay below 1.
    """

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def polygon(self, n: int = 256) -> np.ndarray:
        """Return the outline as an ``(n, 2)`` float array of ``(x, y)`` level-0 px."""
        phi = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
        rho = np.ones_like(phi)
        for k, amp, phase in self.harmonics:
            rho += amp * np.cos(k * phi + phase)
        u = self.rx * rho * np.cos(phi)
        v = self.ry * rho * np.sin(phi)
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + ca * u - sa * v, self.cy + sa * u + ca * v], axis=1)

    @property
    def area(self) -> float:
        """Area in level-0 px² (shoelace formula on a 1024-vertex outline)."""
        p = self.polygon(1024)
        x, y = p[:, 0], p[:, 1]
        return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))

    def scaled(self, factor: float) -> Shape:
        """Return the same shape scaled about its centre."""
        return replace(self, rx=self.rx * factor, ry=self.ry * factor)


@dataclass(frozen=True)
class PenStroke:
    """A pen-marker stroke on the glass.

    Attributes:
        colour: One of ``"blue"``, ``"green"``, ``"black"``.
        points: ``(n, 2)`` centre-line polyline as ``(x, y)`` level-0 px.
        width: Stroke width in level-0 px.
    """

    colour: str
    points: tuple[tuple[float, float], ...]
    width: float


@dataclass
class SyntheticSlideSpec:
    """Everything that determines a synthetic slide (output is a pure function of it).

    Attributes:
        width: Level-0 width (px).
        height: Level-0 height (px).
        mpp: Level-0 pixel size written to the metadata (µm/px); ``None`` writes no
            resolution metadata at all (no Aperio ``MPP``, TIFF ResolutionUnit NONE).
        content_mpp: Pixel size used to draw the content (µm/px); defaults to ``mpp``,
            or 0.5 when ``mpp`` is ``None``. Set it to make a 40×-looking slide without mpp.
        downsamples: Integer downsample of each pyramid level; starts with 1, increasing.
        tile: Tile edge (px) of every level; a multiple of 16.
        compression: ``"jpeg"``, ``"jpeg2000"`` (Aperio 33005, J2K codestream),
            ``"zlib"`` or ``"none"`` (the last two are lossless: exact pixels).
        quality: JPEG quality (1–100); for JPEG 2000, 100 means lossless.
        flavour: ``"aperio"`` (SVS: Aperio ImageDescription with AppMag/MPP, thumbnail,
            label and macro) or ``"generic"`` (pyramidal tiled TIFF whose X/YResolution
            carry the mpp in CENTIMETER units).
        seed: Seed of every random choice (non-negative int).
        tissue: Tissue shape controls.
        stain_variation: Scale of the per-slide random H&E colour shift (0 = canonical).
        pale: Draw very pale (under-stained) tissue.
        pen_marks: Pen-marker colours to draw, among ``"blue"``, ``"green"``, ``"black"``.
        blank: No tissue at all (glass only; pen marks still drawn if requested).
        lesions: Number of random lesions, or explicit lesion :class:`Shape` s (level-0 px).
            Lesions are clipped to the tissue.
        lesion_fraction: Total area of random lesions as a fraction of the tissue area,
            or a ``(low, high)`` range to draw it from (log-uniform).
        min_lesion_um2: Smallest area of one random lesion (µm²); default ≈ 4 tiles of
            224 px at 0.5 µm/px.
        pattern: ``"he"`` (H&E-like tissue) or ``"lines"`` (black lines on white; the
            tissue, lesion, stain and pen fields are then ignored and the truth masks are empty).
        line_spacing_um: ``"lines"``: spacing of the lines (µm).
        line_width_um: ``"lines"``: width of each line (µm).
        objective_power: Aperio ``AppMag``; ``None`` derives it from ``mpp`` (0.25 → 40,
            0.5 → 20) and writes none when ``mpp`` is ``None``.
        associated: ``"aperio"``: also write label and macro images.
    """

    width: int = 6000
    height: int = 5000
    mpp: float | None = 0.5
    content_mpp: float | None = None
    downsamples: tuple[int, ...] = (1, 4, 16)
    tile: int = 256
    compression: str = "jpeg"
    quality: int = 90
    flavour: str = "aperio"
    seed: int = 0
    tissue: TissueSpec = field(default_factory=TissueSpec)
    stain_variation: float = 1.0
    pale: bool = False
    pen_marks: tuple[str, ...] = ()
    blank: bool = False
    lesions: int | Sequence[Shape] = 0
    lesion_fraction: float | tuple[float, float] = (0.01, 0.05)
    min_lesion_um2: float = 4 * 112.0**2
    pattern: str = "he"
    line_spacing_um: float = 100.0
    line_width_um: float = 2.0
    objective_power: float | None = None
    associated: bool = True

    @property
    def pixel_um(self) -> float:
        """µm per level-0 pixel used for the content."""
        if self.content_mpp is not None:
            return float(self.content_mpp)
        return float(self.mpp) if self.mpp is not None else DEFAULT_CONTENT_MPP

    @property
    def magnification(self) -> float | None:
        """Objective power written as Aperio ``AppMag`` (``None``: not written)."""
        if self.objective_power is not None:
            return float(self.objective_power)
        if self.mpp is None:
            return None
        raw = 10.0 / self.mpp
        return min(_STANDARD_POWERS, key=lambda p: abs(math.log(p / raw)))

    def level_dimensions(self) -> list[tuple[int, int]]:
        """``(width, height)`` of each pyramid level (ceil of level-0 size / downsample)."""
        return [(-(-self.width // d), -(-self.height // d)) for d in self.downsamples]

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an impossible spec."""
        if int(self.width) < 1 or int(self.height) < 1:
            raise ConfigError(f"synthetic slide size {self.width}x{self.height} px is invalid; use positive sizes")
        if self.mpp is not None and not (0.01 <= self.mpp <= 100):
            raise ConfigError(
                f"synthetic slide mpp={self.mpp} is outside 0.01–100 µm/px; pass a real pixel size or None"
            )
        if not (0.01 <= self.pixel_um <= 100):
            raise ConfigError(f"synthetic slide content_mpp={self.content_mpp} is outside 0.01–100 µm/px")
        ds = tuple(self.downsamples)
        if not ds or ds[0] != 1 or any(int(d) != d or d < 1 for d in ds) or list(ds) != sorted(set(ds)):
            raise ConfigError(f"synthetic slide downsamples={ds} must be increasing integers starting with 1")
        if self.tile < 16 or self.tile % 16:
            raise ConfigError(f"synthetic slide tile={self.tile} must be a positive multiple of 16")
        if self.compression not in _CODECS:
            raise ConfigError(f"synthetic slide compression={self.compression!r}; use one of {sorted(_CODECS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"synthetic slide quality={self.quality} must be in 1–100")
        if self.flavour not in _FLAVOURS:
            raise ConfigError(f"synthetic slide flavour={self.flavour!r}; use one of {sorted(_FLAVOURS)}")
        if self.pattern not in _PATTERNS:
            raise ConfigError(f"synthetic slide pattern={self.pattern!r}; use one of {sorted(_PATTERNS)}")
        bad = [c for c in self.pen_marks if c not in PEN_INKS]
        if bad:
            raise ConfigError(f"synthetic slide pen_marks={bad} unknown; use colours among {sorted(PEN_INKS)}")
        if int(self.seed) < 0:
            raise ConfigError(f"synthetic slide seed={self.seed} must be a non-negative integer")
        if not 0.0 <= self.tissue.coverage <= 0.8:
            raise ConfigError(f"synthetic slide tissue.coverage={self.tissue.coverage} must be in 0–0.8")
        if not isinstance(self.lesions, int) and not all(isinstance(x, Shape) for x in self.lesions):
            raise ConfigError("synthetic slide lesions must be a count or a sequence of Shape (level-0 px)")
        lo, hi = _as_range(self.lesion_fraction)
        if not 0.0 < lo <= hi <= 0.5:
            raise ConfigError(f"synthetic slide lesion_fraction={self.lesion_fraction} must lie in (0, 0.5]")
        if self.line_spacing_um <= self.line_width_um or self.line_width_um <= 0:
            raise ConfigError("synthetic slide line_spacing_um must exceed line_width_um > 0")


def _as_range(value: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        return float(value[0]), float(value[1])
    return float(value), float(value)


# --------------------------------------------------------------------------------------
# Geometry and ground truth
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideGeometry:
    """Exact geometric description of the slide content (all level-0 px).

    Tissue = union(blobs, fragments) minus holes; lesions = union(lesions) ∩ tissue.
    """

    blobs: tuple[Shape, ...] = ()
    fragments: tuple[Shape, ...] = ()
    holes: tuple[Shape, ...] = ()
    lesions: tuple[Shape, ...] = ()
    pens: tuple[PenStroke, ...] = ()


def _fill_polygons(polys: Sequence[np.ndarray], shape: tuple[int, int], band: int = 1024) -> np.ndarray:
    """Union of simple polygons (``(n, 2)`` x, y in mask px; pixel (r, c) centre at (c+½, r+½)).

    Scanline even-odd fill: a pixel is set iff its centre is inside; O(vertices + rows +
    pixels), with scratch memory bounded by ``band`` rows.
    """
    rows, cols = shape
    span_r, span_c0, span_c1 = [], [], []
    for p in polys:
        xa, ya = p[:, 0], p[:, 1]
        xb, yb = np.roll(xa, -1), np.roll(ya, -1)
        ymin, ymax = np.minimum(ya, yb), np.maximum(ya, yb)
        r0 = np.maximum(np.ceil(ymin - 0.5), 0).astype(np.int64)
        r1 = np.minimum(np.ceil(ymax - 0.5), rows).astype(np.int64)  # exclusive
        n = np.maximum(r1 - r0, 0)
        if n.sum() == 0:
            continue
        e = np.repeat(np.arange(len(xa)), n)
        r = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + r0[e]
        yc = r + 0.5
        x = xa[e] + (yc - ya[e]) * (xb[e] - xa[e]) / (yb[e] - ya[e])
        order = np.lexsort((x, r))
        r, x = r[order], x[order]
        # Crossings of a row come in pairs (simple closed polygon, half-open edge rule).
        c0 = np.clip(np.ceil(x[0::2] - 0.5), 0, cols).astype(np.int64)
        c1 = np.clip(np.ceil(x[1::2] - 0.5), 0, cols).astype(np.int64)
        keep = c1 > c0
        span_r.append(r[0::2][keep])
        span_c0.append(c0[keep])
        span_c1.append(c1[keep])
    out = np.zeros(shape, dtype=bool)
    if not span_r:
        return out
    sr, sc0, sc1 = np.concatenate(span_r), np.concatenate(span_c0), np.concatenate(span_c1)
    order = np.argsort(sr, kind="stable")
    sr, sc0, sc1 = sr[order], sc0[order], sc1[order]
    for b0 in range(0, rows, band):
        b1 = min(rows, b0 + band)
        i0, i1 = np.searchsorted(sr, [b0, b1])
        if i0 == i1:
            continue
        diff = np.zeros((b1 - b0, cols + 1), dtype=np.int32)
        np.add.at(diff, (sr[i0:i1] - b0, sc0[i0:i1]), 1)
        np.add.at(diff, (sr[i0:i1] - b0, sc1[i0:i1]), -1)
        out[b0:b1] = np.cumsum(diff[:, :cols], axis=1) > 0
    return out


def _raster_shapes(shapes: Sequence[Shape], shape: tuple[int, int], s: float) -> np.ndarray:
    """Union of shapes at ``s`` level-0 px per mask pixel (mask pixel set if its centre is inside)."""
    polys = []
    for sh in shapes:
        n = int(np.clip(2.0 * np.pi * max(sh.rx, sh.ry) / s, 64, 2048))
        polys.append(sh.polygon(n) / s)
    return _fill_polygons(polys, shape)


def _polyline_distance_map(
    strokes: Sequence[PenStroke], shape: tuple[int, int], s: float
) -> list[np.ndarray]:
    """Distance (level-0 px) from each mask pixel centre to each stroke's centre line."""
    out = []
    ys = (np.arange(shape[0]) + 0.5) * s
    xs = (np.arange(shape[1]) + 0.5) * s
    for st in strokes:
        pts = np.asarray(st.points, dtype=np.float64)
        dist = np.full(shape, np.inf, dtype=np.float32)
        reach = st.width / 2.0 + 2.0 * s
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=False):
            c0 = max(int((min(x0, x1) - reach) / s), 0)
            c1 = min(int((max(x0, x1) + reach) / s) + 1, shape[1])
            r0 = max(int((min(y0, y1) - reach) / s), 0)
            r1 = min(int((max(y0, y1) + reach) / s) + 1, shape[0])
            if c0 >= c1 or r0 >= r1:
                continue
            px = xs[c0:c1][None, :]
            py = ys[r0:r1][:, None]
            dx, dy = x1 - x0, y1 - y0
            seg2 = dx * dx + dy * dy
            t = np.zeros((r1 - r0, c1 - c0)) if seg2 == 0 else np.clip(((px - x0) * dx + (py - y0) * dy) / seg2, 0, 1)
            d = np.hypot(px - (x0 + t * dx), py - (y0 + t * dy)).astype(np.float32)
            np.minimum(dist[r0:r1, c0:c1], d, out=dist[r0:r1, c0:c1])
        out.append(dist)
    return out


@dataclass
class SyntheticSlide:
    """A written synthetic slide and its ground truth.

    Attributes:
        path: The TIFF/SVS file.
        spec: The spec it was written from.
        geometry: Exact content geometry (level-0 px).
    """

    path: Path
    spec: SyntheticSlideSpec
    geometry: SlideGeometry

    def mask_shape(self, mpp_mask: float) -> tuple[int, int]:
        """``(rows, cols)`` of a mask at ``mpp_mask`` µm/px covering the whole level 0."""
        s = self._scale(mpp_mask)
        return max(1, math.ceil(self.spec.height / s)), max(1, math.ceil(self.spec.width / s))

    def _scale(self, mpp_mask: float) -> float:
        if not mpp_mask > 0:
            raise ConfigError(f"mask resolution mpp_mask={mpp_mask} must be > 0 µm/px")
        return float(mpp_mask) / self.spec.pixel_um

    def tissue_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean tissue truth at ``mpp_mask`` µm/px (level-0 aligned, see module doc)."""
        shape, s = self.mask_shape(mpp_mask), self._scale(mpp_mask)
        g = self.geometry
        mask = _raster_shapes(g.blobs + g.fragments, shape, s)
        if g.holes:
            mask &= ~_raster_shapes(g.holes, shape, s)
        return mask

    def lesion_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean lesion truth (always inside the tissue mask) at ``mpp_mask`` µm/px."""
        shape, s = self.mask_shape(mpp_mask), self._scale(mpp_mask)
        if not self.geometry.lesions:
            return np.zeros(shape, dtype=bool)
        return _raster_shapes(self.geometry.lesions, shape, s) & self.tissue_mask(mpp_mask)

    def pen_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean pen-ink truth (strokes, over tissue or glass) at ``mpp_mask`` µm/px."""
        shape, s = self.mask_shape(mpp_mask), self._scale(mpp_mask)
        mask = np.zeros(shape, dtype=bool)
        pens = self.geometry.pens
        for st, dist in zip(pens, _polyline_distance_map(pens, shape, s), strict=True):
            mask |= dist <= st.width / 2.0
        return mask

    @property
    def has_lesion(self) -> bool:
        """Whether any lesion is drawn."""
        return bool(self.geometry.lesions)


# --------------------------------------------------------------------------------------
# Random geometry
# --------------------------------------------------------------------------------------


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent random stream per purpose, so e.g. adding pen marks keeps the tissue."""
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode())])


def _random_shape(rng: np.random.Generator, cx: float, cy: float, area: float, roughness: float,
                  aspect: tuple[float, float] = (1.0, 2.2)) -> Shape:
    ar = rng.uniform(*aspect)
    r = math.sqrt(area / math.pi)
    rx, ry = r * math.sqrt(ar), r / math.sqrt(ar)
    harm = []
    budget = min(0.85, roughness * 2.2)
    for k in range(2, 8):
        amp = float(roughness * rng.uniform(0.2, 1.0) / (k - 0.8))
        amp = min(amp, budget)
        budget -= amp
        harm.append((k, amp, float(rng.uniform(0, 2 * np.pi))))
    shape = Shape(float(cx), float(cy), rx, ry, float(rng.uniform(0, np.pi)), tuple(harm))
    # Harmonics change the area; rescale so the requested area holds.
    return shape.scaled(math.sqrt(area / max(shape.area, 1e-9)))


def _sdf(mask: np.ndarray, cell_um: float) -> np.ndarray:
    """Signed distance (µm, > 0 inside) from a boolean grid, via Euclidean distance transforms."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return np.full(mask.shape, -1e4, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, 1e4, dtype=np.float32)
    inside = distance_transform_edt(mask)
    outside = distance_transform_edt(~mask)
    return (np.where(mask, inside - 0.5, 0.5 - outside) * cell_um).astype(np.float32)


def _build_geometry(spec: SyntheticSlideSpec, grid_um: float) -> tuple[SlideGeometry, np.ndarray | None]:
    """Random geometry from the spec; also returns the tissue SDF on the grid (or None)."""
    W, H, um = spec.width, spec.height, spec.pixel_um
    if spec.pattern != "he":
        return SlideGeometry(), None
    rng = _rng(spec.seed, "tissue")
    ts = spec.tissue
    probe_s = max(W, H) / 384.0  # level-0 px per probe pixel for coverage estimates
    probe_shape = (max(1, math.ceil(H / probe_s)), max(1, math.ceil(W / probe_s)))

    blobs: list[Shape] = []
    fragments: list[Shape] = []
    holes: list[Shape] = []
    if not spec.blank and ts.n_blobs > 0 and ts.coverage > 0:
        target = ts.coverage * W * H
        shares = rng.dirichlet(np.full(ts.n_blobs, 2.0))
        for share in shares:
            area = target * share
            r = math.sqrt(area / math.pi)
            mx, my = min(r * 0.9, W / 2), min(r * 0.9, H / 2)
            cx = rng.uniform(mx, max(mx, W - mx))
            cy = rng.uniform(my, max(my, H - my))
            blobs.append(_random_shape(rng, cx, cy, area, ts.roughness))
        for _ in range(ts.n_fragments):
            area = target * rng.uniform(0.002, 0.012)
            fragments.append(_random_shape(rng, rng.uniform(0.05, 0.95) * W, rng.uniform(0.05, 0.95) * H,
                                           area, ts.roughness * 0.8))
        # Scale blobs about their centres until the covered fraction matches the target.
        for _ in range(4):
            got = _raster_shapes(blobs + fragments, probe_shape, probe_s).mean()
            if got <= 0:
                break
            f = float(np.clip(math.sqrt(ts.coverage / got), 0.7, 1.4))
            if abs(f - 1) < 0.01:
                break
            blobs = [b.scaled(f) for b in blobs]
        if ts.n_holes:
            tissue_probe = _raster_shapes(blobs, probe_shape, probe_s)
            ys, xs = np.nonzero(tissue_probe)
            for _ in range(ts.n_holes):
                if len(ys) == 0:
                    break
                i = int(rng.integers(len(ys)))
                area = ts.coverage * W * H * rng.uniform(0.002, 0.012)
                holes.append(_random_shape(rng, (xs[i] + 0.5) * probe_s, (ys[i] + 0.5) * probe_s,
                                           area, 0.15, aspect=(1.0, 1.8)))

    # Ground-truth-equivalent tissue raster on the rendering grid, and its SDF (µm).
    gs = grid_um / um
    gshape = (max(1, math.ceil(H / gs)), max(1, math.ceil(W / gs)))
    base = SlideGeometry(tuple(blobs), tuple(fragments), tuple(holes))
    tissue_grid = _raster_shapes(base.blobs + base.fragments, gshape, gs)
    if base.holes:
        tissue_grid &= ~_raster_shapes(base.holes, gshape, gs)
    tissue_sdf = _sdf(tissue_grid, grid_um)

    lesions = _place_lesions(spec, rng=_rng(spec.seed, "lesions"), tissue_sdf=tissue_sdf,
                             tissue_area_px=float(tissue_grid.sum()) * gs * gs, gs=gs)
    pens = _place_pens(spec, _rng(spec.seed, "pens"), blobs)
    return replace(base, lesions=lesions, pens=pens), tissue_sdf


def _place_lesions(spec: SyntheticSlideSpec, *, rng: np.random.Generator, tissue_sdf: np.ndarray,
                   tissue_area_px: float, gs: float) -> tuple[Shape, ...]:
    if not isinstance(spec.lesions, int):
        return tuple(spec.lesions)
    n = int(spec.lesions)
    if n <= 0 or tissue_area_px <= 0:
        return ()
    um2 = spec.pixel_um**2
    lo, hi = _as_range(spec.lesion_fraction)
    frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    total = frac * tissue_area_px
    shares = rng.dirichlet(np.full(n, 3.0)) if n > 1 else np.ones(1)
    out = []
    for share in shares:
        area = max(total * share, spec.min_lesion_um2 / um2)
        r_um = math.sqrt(area / math.pi) * spec.pixel_um
        # Centre deep enough inside the tissue that most of the lesion is tissue.
        depth = tissue_sdf.max()
        need = min(0.7 * r_um, 0.8 * depth)
        ys, xs = np.nonzero(tissue_sdf >= need)
        if len(ys) == 0:
            break
        i = int(rng.integers(len(ys)))
        cx, cy = (xs[i] + rng.uniform(0.1, 0.9)) * gs, (ys[i] + rng.uniform(0.1, 0.9)) * gs
        out.append(_random_shape(rng, cx, cy, area, 0.3, aspect=(1.0, 1.8)))
    return tuple(out)


def _place_pens(spec: SyntheticSlideSpec, rng: np.random.Generator, blobs: Sequence[Shape]) -> tuple[PenStroke, ...]:
    W, H, um = spec.width, spec.height, spec.pixel_um
    strokes = []
    for colour in spec.pen_marks:
        if blobs:
            b = blobs[int(rng.integers(len(blobs)))]
            cx, cy, R = b.cx, b.cy, math.sqrt(b.rx * b.ry) * rng.uniform(0.85, 1.15)
        else:
            cx, cy, R = W * rng.uniform(0.3, 0.7), H * rng.uniform(0.3, 0.7), min(W, H) * rng.uniform(0.2, 0.35)
        start = rng.uniform(0, 2 * np.pi)
        span = rng.uniform(0.6, 1.6) * np.pi
        t = np.linspace(0, 1, 64)
        ang = start + span * t
        wob = 1 + 0.06 * np.sin(2 * np.pi * (rng.uniform(1, 3) * t + rng.uniform(0, 1)))
        px = np.clip(cx + R * wob * np.cos(ang), 0, W - 1)
        py = np.clip(cy + R * 0.85 * wob * np.sin(ang), 0, H - 1)
        width_um = min(rng.uniform(120, 320), 0.04 * min(W, H) * um)
        strokes.append(PenStroke(colour, tuple(zip(px.tolist(), py.tolist(), strict=True)), width_um / um))
    return tuple(strokes)


# --------------------------------------------------------------------------------------
# Textures (periodic, per pyramid level)
# --------------------------------------------------------------------------------------


def _periodic_noise(rng: np.random.Generator, P: int | tuple[int, int], sigma_along: float,
                    sigma_across: float | None = None, angle: float = 0.0) -> np.ndarray:
    """Zero-mean unit-std periodic Gaussian random field of shape P (or P×P); filter sigmas in px.

    Drawn directly in the Fourier domain, only where the (anisotropic) Gaussian filter is not
    negligible, then one inverse real FFT: smooth fields cost little even when P is large.
    """
    import scipy.fft

    ny, nx = (P, P) if isinstance(P, int) else P
    sa = float(sigma_along)
    sc = sa if sigma_across is None else float(sigma_across)
    kmax = min(0.5, 0.7 / max(min(sa, sc), 1e-6))  # filter < 1e-4 beyond (cycles/px)
    ry, rx = min(ny // 2, math.ceil(kmax * ny) + 1), min(nx // 2, math.ceil(kmax * nx) + 1)
    rows = np.arange(ny) if 2 * ry + 1 >= ny else np.r_[0:ry + 1, ny - ry:ny]
    cols = np.arange(rx + 1)
    ky = np.fft.fftfreq(ny).astype(np.float32)[rows][:, None]
    kx = np.fft.rfftfreq(nx).astype(np.float32)[cols][None, :]
    ku = kx * np.float32(math.cos(angle)) + ky * np.float32(math.sin(angle))
    kv = kx * np.float32(-math.sin(angle)) + ky * np.float32(math.cos(angle))
    gain = np.exp(np.float32(-2 * np.pi**2) * ((np.float32(sa) * ku) ** 2 + (np.float32(sc) * kv) ** 2))
    z = rng.standard_normal((len(rows), len(cols), 2), dtype=np.float32)
    F = np.zeros((ny, nx // 2 + 1), dtype=np.complex64)
    F[np.ix_(rows, cols)] = (z[..., 0] + 1j * z[..., 1]) * gain
    out = scipy.fft.irfft2(F, s=(ny, nx)).astype(np.float32, copy=False)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _fold_periodic(canvas: np.ndarray, pad: int, P: int) -> np.ndarray:
    """Fold a (P+2·pad)² canvas onto a P×P torus with max-compositing."""
    c = canvas.copy()
    np.maximum(c[pad:2 * pad], c[P + pad:P + 2 * pad], out=c[pad:2 * pad])
    np.maximum(c[P:P + pad], c[0:pad], out=c[P:P + pad])
    np.maximum(c[:, pad:2 * pad], c[:, P + pad:P + 2 * pad], out=c[:, pad:2 * pad])
    np.maximum(c[:, P:P + pad], c[:, 0:pad], out=c[:, P:P + pad])
    return c[pad:P + pad, pad:P + pad]


@dataclass(frozen=True)
class _NucleiParams:
    density: float  # nuclei per µm²
    radius_um: tuple[float, float]
    aspect: tuple[float, float]
    amp: tuple[float, float]  # hematoxylin density at the nucleus centre
    irregular: float  # outline harmonic amplitude
    rim: float  # 0: solid; >0: darker rim, paler centre (vesicular)


def _stamp_nuclei(rng: np.random.Generator, P: int, um: float, p: _NucleiParams, count_scale: float) -> np.ndarray:
    """Periodic P×P hematoxylin density of randomly placed elliptic nuclei."""
    n = int(rng.poisson(p.density * (P * um) ** 2 * count_scale))
    reach = p.radius_um[1] * math.sqrt(p.aspect[1]) * (1 + 1.6 * p.irregular) / um + 1.5
    pad = min(int(math.ceil(reach)) + 3, P)  # a stamp spans [x - reach, x + reach + 2)
    canvas = np.zeros((P + 2 * pad, P + 2 * pad), dtype=np.float32)
    cx = rng.uniform(0, P, n)
    cy = rng.uniform(0, P, n)
    r = rng.uniform(*p.radius_um, n) / um
    asp = rng.uniform(*p.aspect, n)
    ang = rng.uniform(0, np.pi, n)
    amp = rng.uniform(*p.amp, n)
    h2 = rng.uniform(-p.irregular, p.irregular, n)
    h3 = rng.uniform(-p.irregular, p.irregular, n) * 0.6
    ph = rng.uniform(0, 2 * np.pi, (n, 2))
    for i in range(n):
        rx, ry = r[i] * math.sqrt(asp[i]), r[i] / math.sqrt(asp[i])
        R = rx * (1 + abs(h2[i]) + abs(h3[i])) + 1.5
        x = cx[i] + pad
        y = cy[i] + pad
        c0, c1 = max(int(x - R), 0), min(int(x + R) + 2, P + 2 * pad)
        r0, r1 = max(int(y - R), 0), min(int(y + R) + 2, P + 2 * pad)
        u = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - x
        v = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - y
        ca, sa = math.cos(ang[i]), math.sin(ang[i])
        uu = ca * u + sa * v
        vv = -sa * u + ca * v
        rho = np.sqrt((uu / rx) ** 2 + (vv / ry) ** 2)
        if p.irregular:
            phi = np.arctan2(vv, uu)
            rho /= 1 + h2[i] * np.cos(2 * phi + ph[i, 0]) + h3[i] * np.cos(3 * phi + ph[i, 1])
        alpha = np.clip((1.0 - rho) * ry + 0.5, 0.0, 1.0)
        val = alpha * amp[i]
        if p.rim:
            val *= 1.0 - p.rim * np.clip(1.0 - rho, 0, 1) ** 2
        np.maximum(canvas[r0:r1, c0:c1], val, out=canvas[r0:r1, c0:c1])
    return _fold_periodic(canvas, pad, P)


@dataclass(frozen=True)
class _TissueLook:
    """Per-slide random texture parameters of one tissue class (normal or lesion)."""

    nuclei: tuple[_NucleiParams, ...]
    eosin: float  # stroma eosin density
    h_tint: float  # hematoxylin haze of the cytoplasm/stroma
    fibre_um: tuple[float, float]  # fibre filter sigmas (along, across)
    loose: float  # fraction of loose (pale) stroma


def _looks(rng: np.random.Generator) -> tuple[_TissueLook, _TissueLook]:
    normal = _TissueLook(
        nuclei=(
            _NucleiParams(rng.uniform(8, 22) * 1e-4, (2.0, 2.8), (1.0, 1.3), (0.9, 1.25), 0.05, 0.0),
            _NucleiParams(rng.uniform(8, 22) * 1e-4, (2.4, 3.4), (1.8, 3.5), (0.7, 1.0), 0.05, 0.0),
        ),
        eosin=rng.uniform(0.75, 1.05),
        h_tint=rng.uniform(0.02, 0.07),
        fibre_um=(rng.uniform(5, 10), rng.uniform(0.8, 1.5)),
        loose=rng.uniform(0.05, 0.25),
    )
    lesion = _TissueLook(
        nuclei=(
            _NucleiParams(rng.uniform(55, 75) * 1e-4, (3.8, 5.8), (1.0, 1.7), (1.25, 1.7), 0.18, 0.35),
            _NucleiParams(rng.uniform(6, 12) * 1e-4, (2.0, 2.6), (1.0, 1.2), (1.1, 1.4), 0.05, 0.0),
        ),
        eosin=rng.uniform(0.55, 0.75),
        h_tint=rng.uniform(0.24, 0.34),
        fibre_um=(rng.uniform(3, 5), rng.uniform(1.5, 2.5)),
        loose=rng.uniform(0.0, 0.05),
    )
    return normal, lesion


def _layer(rng: np.random.Generator, P: int, um: float, look: _TissueLook) -> np.ndarray:
    """One periodic texture layer (2, P, P) float32 of (H, E) centi-densities (half amplitude)."""
    fine = _periodic_noise(rng, P, 0.5 / um)
    angle = rng.uniform(0, np.pi)
    fib = np.tanh(1.4 * _periodic_noise(rng, P, look.fibre_um[0] / um, look.fibre_um[1] / um, angle))
    fib2 = np.tanh(1.4 * _periodic_noise(rng, P, look.fibre_um[0] / um, look.fibre_um[1] / um, angle + 1.2))
    low = _periodic_noise(rng, P, 14.0 / um)
    thr = float(np.quantile(low, 1 - look.loose)) if look.loose > 0 else np.inf
    loose = np.clip((low - thr) * 2.5, 0, 1)
    nuc = np.zeros((P, P), dtype=np.float32)
    for p in look.nuclei:
        np.maximum(nuc, _stamp_nuclei(rng, P, um, p, 0.5), out=nuc)
    nuc *= 0.82 + 0.18 * np.tanh(fine)
    e = look.eosin * (0.72 + 0.18 * fib + 0.10 * fib2 + 0.05 * fine) * (1 - 0.75 * loose)
    e *= 1 - 0.55 * np.clip(nuc, 0, 1)
    h = look.h_tint * (0.8 + 0.2 * np.tanh(low)) * (1 - 0.6 * loose) + 0.01 * fine
    out = np.empty((2, P, P), dtype=np.float32)
    out[0] = (0.5 * h + nuc) * 100.0
    out[1] = 0.5 * e * 100.0
    return out


def _box_down(a: np.ndarray, d: int) -> np.ndarray:
    """Box-filter downsample of the last two axes by d (which divides both)."""
    if d == 1:
        return a
    rows = a[..., 0::d, :].astype(np.float32)
    for i in range(1, d):
        rows += a[..., i::d, :]
    out = rows[..., 0::d].copy()
    for i in range(1, d):
        out += rows[..., i::d]
    out *= np.float32(1.0 / (d * d))
    return out


def _wrap_extend(a: np.ndarray, T: int) -> np.ndarray:
    """Periodic extension of the last two axes from P to P+T, for contiguous tile crops."""
    P = a.shape[-1]
    reps = -(-(P + T) // P)
    tiled = np.tile(a, (1,) * (a.ndim - 2) + (reps, reps))
    return np.ascontiguousarray(tiled[..., : P + T, : P + T])


def _q8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@dataclass
class _LevelTex:
    """Textures of one level: crops of ``[y % P : y % P + T]`` are contiguous."""

    Pa: int
    Pb: int
    normal_a: np.ndarray  # (2, Pa+T, Pa+T) uint8 centi-density (H, E)
    normal_b: np.ndarray
    lesion_a: np.ndarray | None
    lesion_b: np.ndarray | None
    aux: np.ndarray  # (2, Pa+T, Pa+T) uint8: ragged-edge noise, ink/grain noise (128 = 0)
    bg_idx: np.ndarray  # (Pa+T, Pa+T) uint16 LUT index of the glass background


# --------------------------------------------------------------------------------------
# Renderers
# --------------------------------------------------------------------------------------


class _Renderer(Protocol):
    """Draws tiles of a level from level-0 physical coordinates (thread-safe after prepare)."""

    def prepare(self, downsample: int) -> None: ...

    def release_sources(self) -> None: ...

    def render(self, downsample: int, y0: int, x0: int) -> np.ndarray: ...


@dataclass(frozen=True)
class _Interp:
    """Linear interpolation from grid nodes ``lo..lo+n-1`` onto T pixel positions of one axis."""

    lo: int
    n: int  # number of grid nodes used
    j: np.ndarray  # (T,) left node, relative to lo
    f: np.ndarray  # (T,) weight of the right node


def _interp(pos: np.ndarray, n: int) -> _Interp:
    """Interpolation of grid coordinates ``pos`` (increasing) on an axis of n grid nodes."""
    if n == 1:
        return _Interp(0, 1, np.zeros(len(pos), np.int64), np.zeros(len(pos), np.float32))
    u = np.clip(pos, 0, n - 1)
    j = np.minimum(np.floor(u).astype(np.int64), n - 2)
    f = (u - j).astype(np.float32)
    lo = int(j[0])
    return _Interp(lo, int(j[-1]) - lo + 2, j - lo, f)


def _bilinear(a: np.ndarray, iy: _Interp, ix: _Interp) -> np.ndarray:
    """Bilinear sample of grid ``a`` at the tile pixels (separable gathers, no BLAS)."""
    p = a[iy.lo:iy.lo + iy.n, ix.lo:ix.lo + ix.n]
    if iy.n == 1:
        rows = np.repeat(p, len(iy.j), axis=0)
    else:
        fy = iy.f[:, None]
        rows = p[iy.j] * (1 - fy) + p[iy.j + 1] * fy  # (T, nx)
    if ix.n == 1:
        return np.repeat(rows, len(ix.j), axis=1).astype(np.float32)
    left = rows[:, ix.j]
    left += (rows[:, ix.j + 1] - left) * ix.f[None, :]
    return left.astype(np.float32, copy=False)


def _periods(q: int, um: float) -> tuple[int, int]:
    """Two texture periods (level-0 px): multiples of q, FFT-friendly, far from commensurate."""

    def smooth(n: int) -> bool:
        for f in (2, 3, 5):
            while n % f == 0:
                n //= f
        return n == 1

    def pick(target_um: float, avoid: int = 0) -> int:
        target = min(max(target_um / um, 2.0 * q), 2560.0)
        cands = [k * q for k in range(1, 4 * int(target / q) + 8)]
        cands = [c for c in cands if c != avoid and (not avoid or math.lcm(c, avoid) >= 4 * max(c, avoid))]
        return min(cands, key=lambda c: (not smooth(c // q), abs(math.log(c / target))))

    pa = pick(384.0)
    return pa, pick(544.0, avoid=pa)


class _HERenderer:
    """H&E-like tissue. Fields on a coarse grid (SDFs in µm) + periodic textures per level."""

    EDGE_UM = 2.5  # soft edge width of the tissue outline
    RAG_UM = 4.0  # amplitude of the ragged outline noise
    LESION_EDGE_UM = 12.0
    PEN_EDGE_UM = 6.0

    def __init__(self, spec: SyntheticSlideSpec, geometry: SlideGeometry, tissue_sdf: np.ndarray | None,
                 grid_um: float) -> None:
        self.spec = spec
        self.T = spec.tile
        self.um = spec.pixel_um
        self.grid_um = grid_um
        self.gs = grid_um / self.um  # level-0 px per grid cell
        gshape = (max(1, math.ceil(spec.height / self.gs)), max(1, math.ceil(spec.width / self.gs)))
        self.gshape = gshape
        self.tissue = tissue_sdf if tissue_sdf is not None else np.full(gshape, -1e4, np.float32)
        self.lesion: np.ndarray | None = None
        if geometry.lesions:
            lesion_raw = _sdf(_raster_shapes(geometry.lesions, gshape, self.gs), grid_um)
            self.lesion = np.minimum(lesion_raw, self.tissue)
        self.pens: list[tuple[np.ndarray, np.ndarray]] = []
        if geometry.pens:
            dists = _polyline_distance_map(geometry.pens, gshape, self.gs)
            for st, dist in zip(geometry.pens, dists, strict=True):
                sdf = ((st.width / 2.0 - np.minimum(dist, 1e6)) * self.um).astype(np.float32)
                self.pens.append((sdf, np.asarray(PEN_INKS[st.colour], dtype=np.float32)))
        mrng = _rng(spec.seed, "modulation")
        self.mod = self._modulation(mrng, gshape)
        self._lut(_rng(spec.seed, "stain"))
        self.normal_look, self.lesion_look = _looks(_rng(spec.seed, "looks"))
        self._levels: dict[int, _LevelTex] = {}
        self._tex0: dict[str, np.ndarray] | None = None
        # Texture periods (level-0 px): multiples of every downsample so that each level's
        # texture is an exact box-downsample; two incommensurate periods hide repetition.
        self.Pa, self.Pb = _periods(math.lcm(*spec.downsamples), self.um)

    # ---- setup -------------------------------------------------------------------------

    def _modulation(self, rng: np.random.Generator, gshape: tuple[int, int]) -> np.ndarray:
        """Smooth per-slide (2, gh, gw) factors of hematoxylin and eosin density."""
        sigma = max(1.0, 250.0 / self.grid_um)
        out = np.empty((2, *gshape), dtype=np.float32)
        amps = (rng.uniform(0.10, 0.25), rng.uniform(0.06, 0.15))
        for i, amp in enumerate(amps):
            z = _periodic_noise(rng, gshape, sigma) if min(gshape) > 1 else np.zeros(gshape, np.float32)
            out[i] = np.clip(1.0 + amp * z, 0.5, 1.6)
        return out

    def _lut(self, rng: np.random.Generator) -> None:
        """(256·256, 3) uint8 Beer–Lambert colour of centi-densities (H, E)."""
        sv = self.spec.stain_variation
        i0 = np.array([243.0, 241.0, 244.0]) + sv * rng.uniform(-3, 3, 3)
        e_rgb = np.array([230.0, 150.0, 190.0])
        n_rgb = np.array([90.0, 60.0, 140.0])
        e_od = np.log10(np.array([242.0, 240.0, 242.0]) / e_rgb)
        h_od = np.log10(np.array([242.0, 240.0, 242.0]) / n_rgb) - 0.3 * e_od
        h_od = h_od * np.exp(sv * rng.normal(0, 0.08, 3)) * math.exp(sv * rng.normal(0, 0.12))
        e_od = e_od * np.exp(sv * rng.normal(0, 0.10, 3)) * math.exp(sv * rng.normal(0, 0.15))
        if self.spec.pale:
            h_od, e_od = h_od * 0.3, e_od * 0.28
        q = np.arange(256) / 100.0
        od = q[:, None, None] * h_od[None, None, :] + q[None, :, None] * e_od[None, None, :]
        rgb = i0[None, None, :] * np.power(10.0, -od)
        self.lut = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)
        self.bg_rgb = np.clip(np.rint(i0), 0, 255).astype(np.uint8)

    def _level0_textures(self) -> dict[str, np.ndarray]:
        if self._tex0 is None:
            rng = _rng(self.spec.seed, "textures")
            t: dict[str, np.ndarray] = {}
            t["normal_a"] = _layer(rng, self.Pa, self.um, self.normal_look)
            t["normal_b"] = _layer(rng, self.Pb, self.um, self.normal_look)
            if self.lesion is not None:
                t["lesion_a"] = _layer(rng, self.Pa, self.um, self.lesion_look)
                t["lesion_b"] = _layer(rng, self.Pb, self.um, self.lesion_look)
            rag = _periodic_noise(rng, self.Pa, 2.5 / self.um)
            grain = _periodic_noise(rng, self.Pa, 0.7 / self.um)
            t["aux"] = np.stack([rag, grain]).astype(np.float32)
            self._tex0 = t
        return self._tex0

    def prepare(self, downsample: int) -> None:
        """Build (once) the textures of a level; call before rendering in threads."""
        d = int(downsample)
        if d in self._levels:
            return
        T = self.T
        if self.Pa % d == 0 and self.Pb % d == 0:
            t0 = self._level0_textures()
            Pa, Pb = self.Pa // d, self.Pb // d

            def lvl(name: str) -> np.ndarray | None:
                a = t0.get(name)
                return None if a is None else _wrap_extend(_q8(_box_down(a, d)), T)

            aux = _wrap_extend(_q8(128 + 40 * _box_down(t0["aux"], d)), T)
            tex = _LevelTex(Pa, Pb, lvl("normal_a"), lvl("normal_b"), lvl("lesion_a"), lvl("lesion_b"), aux,
                            np.empty(0, np.uint16))
        else:
            # Flat textures (mean densities) for scales that are not a divisor of the period,
            # e.g. a thumbnail: nuclei are sub-pixel there anyway.
            t0 = self._level0_textures()

            def flat(name: str) -> np.ndarray | None:
                a = t0.get(name)
                if a is None:
                    return None
                m = a.reshape(a.shape[0], -1).mean(axis=1)
                return np.broadcast_to(_q8(m)[:, None, None], (a.shape[0], T + 1, T + 1)).copy()

            aux = np.full((2, T + 1, T + 1), 128, np.uint8)
            tex = _LevelTex(1, 1, flat("normal_a"), flat("normal_b"), flat("lesion_a"), flat("lesion_b"), aux,
                            np.empty(0, np.uint16))
        grain = tex.aux[1].astype(np.int16) - 128
        bg_h = np.clip(grain // 40 + 1, 0, 2).astype(np.uint16)
        bg_e = np.clip(grain // 20 + 2, 0, 4).astype(np.uint16)
        tex.bg_idx = (bg_h << 8) | bg_e
        self._levels[d] = tex

    def release_sources(self) -> None:
        """Free the level-0 float textures once every needed level is prepared."""
        self._tex0 = None

    # ---- per tile ----------------------------------------------------------------------

    def render(self, downsample: int, y0: int, x0: int) -> np.ndarray:
        d = int(downsample)
        T = self.T
        tex = self._levels[d]
        ya, xa = y0 % tex.Pa, x0 % tex.Pa
        yb, xb = y0 % tex.Pb, x0 % tex.Pb
        ar = np.arange(T, dtype=np.float64) + 0.5
        iy = _interp((y0 + ar) * d / self.gs - 0.5, self.gshape[0])
        ix = _interp((x0 + ar) * d / self.gs - 0.5, self.gshape[1])
        sy, sx = slice(iy.lo, iy.lo + iy.n), slice(ix.lo, ix.lo + ix.n)
        pix_um = d * self.um
        edge = max(self.EDGE_UM, pix_um)
        margin = self.RAG_UM + edge

        def field(a: np.ndarray) -> np.ndarray:
            return _bilinear(a, iy, ix)

        patch = self.tissue[sy, sx]
        if patch.max() < -margin:
            rgb = np.take(self.lut, tex.bg_idx[ya:ya + T, xa:xa + T], axis=0)
        else:
            h = tex.normal_a[0, ya:ya + T, xa:xa + T].astype(np.float32)
            h += tex.normal_b[0, yb:yb + T, xb:xb + T]
            e = tex.normal_a[1, ya:ya + T, xa:xa + T].astype(np.float32)
            e += tex.normal_b[1, yb:yb + T, xb:xb + T]
            if self.lesion is not None and tex.lesion_a is not None and tex.lesion_b is not None:
                lp = self.lesion[sy, sx]
                if lp.max() > -(self.LESION_EDGE_UM + self.RAG_UM):
                    wl = field(self.lesion)
                    wl += (tex.aux[0, ya:ya + T, xa:xa + T].astype(np.float32) - 128.0) * (3 * self.RAG_UM / 128.0)
                    wl *= 1.0 / self.LESION_EDGE_UM
                    wl += 0.5
                    np.clip(wl, 0.0, 1.0, out=wl)
                    hl = tex.lesion_a[0, ya:ya + T, xa:xa + T].astype(np.float32)
                    hl += tex.lesion_b[0, yb:yb + T, xb:xb + T]
                    el = tex.lesion_a[1, ya:ya + T, xa:xa + T].astype(np.float32)
                    el += tex.lesion_b[1, yb:yb + T, xb:xb + T]
                    h += wl * (hl - h)
                    e += wl * (el - e)
            h *= field(self.mod[0])
            e *= field(self.mod[1])
            if patch.min() < margin:
                wt = field(self.tissue)
                wt += (tex.aux[0, ya:ya + T, xa:xa + T].astype(np.float32) - 128.0) * (self.RAG_UM / 128.0)
                wt *= 1.0 / edge
                wt += 0.5
                np.clip(wt, 0.0, 1.0, out=wt)
                h *= wt
                e *= wt
                bgi = tex.bg_idx[ya:ya + T, xa:xa + T]
                h += (bgi >> 8).astype(np.float32) * (1 - wt)
                e += (bgi & 255).astype(np.float32) * (1 - wt)
            np.clip(h, 0, 255, out=h)
            np.clip(e, 0, 255, out=e)
            idx = h.astype(np.uint16)
            idx <<= 8
            idx |= e.astype(np.uint16)
            rgb = np.take(self.lut, idx, axis=0)
        for sdf, ink in self.pens:
            pp = sdf[sy, sx]
            pe = max(self.PEN_EDGE_UM, pix_um)
            if pp.max() < -pe:
                continue
            wp = field(sdf)
            wp *= 1.0 / pe
            wp += 0.5
            np.clip(wp, 0.0, 1.0, out=wp)
            wp *= 0.9 + (tex.aux[1, ya:ya + T, xa:xa + T].astype(np.float32) - 128.0) * (0.1 / 128.0)
            f = rgb.astype(np.float32)
            f *= 1.0 - wp[..., None] * (1.0 - ink)
            rgb = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        return rgb


class _LinesRenderer:
    """Black lines (``line_width_um`` wide, every ``line_spacing_um``) on white, exact at every level.

    Level-0 column ``u`` is black iff ``start_k <= u < start_k + w`` for some k ≥ 0, with
    ``start_k = round(k · spacing_um / content_mpp)`` and ``w = max(1, round(width_um /
    content_mpp))`` (same for rows). A level with downsample d is the exact box-filter
    downsample of level 0: value = round(255 · (1 − (fx + fy − fx·fy))), where fx/fy are the
    black fractions of the d level-0 columns/rows a level pixel covers.
    """

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        self.T = spec.tile
        self.step = spec.line_spacing_um / spec.pixel_um
        self.w = max(1, round(spec.line_width_um / spec.pixel_um))

    def prepare(self, downsample: int) -> None:
        return None

    def release_sources(self) -> None:
        return None

    def _black(self, u: np.ndarray) -> np.ndarray:
        k = np.floor(u / self.step).astype(np.int64)
        out = np.zeros(u.shape, dtype=bool)
        for kk in (k - 1, k, k + 1):  # rounding may put start_k on either side of k·step
            start = np.rint(np.maximum(kk, 0) * self.step).astype(np.int64)
            out |= (kk >= 0) & (u >= start) & (u < start + self.w)
        return out

    def fraction(self, downsample: int, start: int, n: int) -> np.ndarray:
        """Black fraction of level pixels ``start..start+n`` along one axis."""
        d = int(downsample)
        u = np.arange(start * d, (start + n) * d, dtype=np.int64)
        return self._black(u).reshape(n, d).mean(axis=1)

    def render(self, downsample: int, y0: int, x0: int) -> np.ndarray:
        fy = self.fraction(downsample, y0, self.T)[:, None]
        fx = self.fraction(downsample, x0, self.T)[None, :]
        v = np.rint(255.0 * (1.0 - (fx + fy - fx * fy))).astype(np.uint8)
        return np.repeat(v[..., None], 3, axis=2)


# --------------------------------------------------------------------------------------
# Codecs and TIFF flavours (registries)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Codec:
    tag: int  # TIFF Compression tag value
    aperio_name: str  # as in Aperio descriptions
    lossless: bool
    encode: Callable[[np.ndarray, int], bytes]


def _enc_jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                    subsampling=(2, 2))


def _enc_j2k(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    level = None if quality >= 100 else 30 + quality // 5  # PSNR target in dB
    return imagecodecs.jpeg2k_encode(tile, level=level, codecformat="J2K", reversible=level is None)


def _enc_zlib(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.zlib_encode(tile, level=6)


def _enc_none(tile: np.ndarray, quality: int) -> bytes:
    return np.ascontiguousarray(tile).tobytes()


_CODECS: dict[str, _Codec] = {
    "jpeg": _Codec(7, "JPEG/RGB", False, _enc_jpeg),
    "jpeg2000": _Codec(33005, "J2K/KDU", False, _enc_j2k),
    "zlib": _Codec(8, "ZLIB/RGB", True, _enc_zlib),
    "none": _Codec(1, "RAW/RGB", True, _enc_none),
}


def _fmt_mpp(mpp: float) -> str:
    s = f"{mpp:.4f}"
    return s if abs(float(s) - mpp) < 1e-9 else f"{mpp:.8f}".rstrip("0")


def _fmt_mag(m: float) -> str:
    return str(int(m)) if float(m).is_integer() else f"{m:g}"


class _Flavour(Protocol):
    def level_kwargs(self, spec: SyntheticSlideSpec, level: int) -> dict[str, Any]: ...

    has_thumbnail: bool


class _AperioFlavour:
    """Aperio SVS: level 0, thumbnail (stripped), other levels, then label and macro."""

    has_thumbnail = True

    @staticmethod
    def header(spec: SyntheticSlideSpec) -> str:
        c = _CODECS[spec.compression]
        W, H, T = spec.width, spec.height, spec.tile
        return f"Aperio Image Library v12.0.0\r\n{W}x{H} [0,0 {W}x{H}] ({T}x{T}) {c.aperio_name} Q={spec.quality}"

    def level_kwargs(self, spec: SyntheticSlideSpec, level: int) -> dict[str, Any]:
        if level == 0:
            parts = [self.header(spec)]
            mag = spec.magnification
            if mag is not None:
                parts.append(f"AppMag = {_fmt_mag(mag)}")
            parts.append("StripeWidth = 2048")
            parts.append("ScanScope ID = SYNTHETIC")
            parts.append(f"Filename = synthetic-{spec.seed}")
            parts.append("Date = 01/02/25")
            parts.append("Time = 12:00:00")
            if spec.mpp is not None:
                parts.append(f"MPP = {_fmt_mpp(spec.mpp)}")
            parts.append(f"Synthetic = wsi_convnext pattern {spec.pattern} seed {spec.seed}")
            desc = "|".join(parts)
        else:
            w, h = spec.level_dimensions()[level]
            c = _CODECS[spec.compression]
            desc = (f"Aperio Image Library v12.0.0\r\n{spec.width}x{spec.height} [0,0 {spec.width}x{spec.height}] "
                    f"({spec.tile}x{spec.tile}) -> {w}x{h} {c.aperio_name} Q={spec.quality}")
        return {"description": desc, "resolution": None, "resolutionunit": "inch" if spec.mpp is not None else None}


class _GenericFlavour:
    """Generic pyramidal tiled TIFF; levels are reduced-resolution IFDs in the main chain."""

    has_thumbnail = False

    def level_kwargs(self, spec: SyntheticSlideSpec, level: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"description": None, "subfiletype": 1 if level else 0}
        if spec.mpp is not None:
            w, _ = spec.level_dimensions()[level]
            level_mpp = spec.mpp * spec.width / w
            kw["resolution"] = (1e4 / level_mpp, 1e4 / level_mpp)
            kw["resolutionunit"] = "centimeter"
        return kw


_FLAVOURS: dict[str, _Flavour] = {"aperio": _AperioFlavour(), "generic": _GenericFlavour()}
_PATTERNS = ("he", "lines")


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _grid_um(spec: SyntheticSlideSpec) -> float:
    extent = max(spec.width, spec.height) * spec.pixel_um
    return max(4.0, extent / 2048.0)


def _make_renderer(spec: SyntheticSlideSpec, geometry: SlideGeometry, tissue_sdf: np.ndarray | None) -> _Renderer:
    if spec.pattern == "lines":
        return _LinesRenderer(spec)
    return _HERenderer(spec, geometry, tissue_sdf, _grid_um(spec))


def _encoded_tiles(renderer: _Renderer, codec: _Codec, quality: int, d: int, w: int, h: int, T: int,
                   pool: concurrent.futures.Executor | None, window: int,
                   tick: Callable[[], None]) -> Iterator[bytes]:
    """Encoded tiles of one level in TIFF order, rendered+encoded in a bounded thread window."""

    def job(ty: int, tx: int) -> bytes:
        return codec.encode(renderer.render(d, ty * T, tx * T), quality)

    coords = ((ty, tx) for ty in range(-(-h // T)) for tx in range(-(-w // T)))
    # tick() before each yield: tifffile stops pulling after the last tile.
    if pool is None:
        for ty, tx in coords:
            data = job(ty, tx)
            tick()
            yield data
        return
    pending: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
    for ty, tx in coords:
        pending.append(pool.submit(job, ty, tx))
        if len(pending) >= window:
            data = pending.popleft().result()
            tick()
            yield data
    while pending:
        data = pending.popleft().result()
        tick()
        yield data


def _render_small(renderer: _Renderer, d: int, w: int, h: int, T: int) -> np.ndarray:
    """Render a whole small image (thumbnail) at integer downsample d."""
    renderer.prepare(d)
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y in range(0, h, T):
        for x in range(0, w, T):
            t = renderer.render(d, y, x)
            out[y:y + T, x:x + T] = t[: min(T, h - y), : min(T, w - x)]
    return out


def _thumbnail_downsample(spec: SyntheticSlideSpec, renderer: _Renderer, max_side: int = 1024) -> int:
    need = max(1, math.ceil(max(spec.width, spec.height) / max_side))
    if isinstance(renderer, _HERenderer):
        for d in range(need, need * 2 + 1):
            if renderer.Pa % d == 0 and renderer.Pb % d == 0:
                return d
    return need


def _label_image(spec: SyntheticSlideSpec) -> np.ndarray:
    rng = _rng(spec.seed, "label")
    img = np.full((400, 380, 3), 250, np.uint8)
    bars = rng.integers(0, 2, 60).astype(bool)
    for i, b in enumerate(bars):
        if b:
            img[40:140, 40 + i * 5:43 + i * 5] = 10
    for r in range(4):  # "handwriting" strokes
        y = 190 + r * 45
        xs = np.arange(40, 40 + int(rng.integers(150, 300)))
        ys = (y + 6 * np.sin(xs / rng.uniform(4, 9))).astype(int)
        for dy in range(3):
            img[ys + dy, xs] = 30
    return img


def _macro_image(spec: SyntheticSlideSpec, thumb: np.ndarray) -> np.ndarray:
    from PIL import Image

    macro = np.full((430, 1280, 3), 205, np.uint8)
    macro[:, :360] = np.asarray(Image.fromarray(_label_image(spec)).resize((360, 430)))
    th, tw = thumb.shape[:2]
    f = min(880 / tw, 400 / th)
    small = np.asarray(Image.fromarray(thumb).resize((max(1, int(tw * f)), max(1, int(th * f)))))
    y, x = (430 - small.shape[0]) // 2, 380 + (880 - small.shape[1]) // 2
    macro[y:y + small.shape[0], x:x + small.shape[1]] = small
    return macro


def _strip_resolution_tags(path: Path) -> None:
    """Remove XResolution, YResolution and ResolutionUnit from every IFD, in place.

    tifffile always writes them (1/1, unit NONE); a slide "without mpp" must carry none.
    The IFD entries are compacted; the orphaned rational values stay as unused bytes.
    """
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tf:
        bo = tf.byteorder
        big = tf.is_bigtiff
        offsets = [page.offset for page in tf.pages]
    cfmt, esize, ofmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    csize, osize = struct.calcsize(cfmt), struct.calcsize(ofmt)
    with path.open("r+b") as fh:
        for off in offsets:
            fh.seek(off)
            (n,) = struct.unpack(bo + cfmt, fh.read(csize))
            raw = fh.read(n * esize + osize)
            entries = [raw[i * esize:(i + 1) * esize] for i in range(n)]
            keep = [e for e in entries if struct.unpack(bo + "H", e[:2])[0] not in (282, 283, 296)]
            fh.seek(off)
            fh.write(struct.pack(bo + cfmt, len(keep)) + b"".join(keep) + raw[n * esize:])
            fh.write(b"\0" * ((n - len(keep)) * esize))


def write_synthetic_slide(
    path: str | os.PathLike[str],
    spec: SyntheticSlideSpec,
    *,
    workers: int | None = None,
    bigtiff: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSlide:
    """Write a synthetic pyramidal slide and return it with its ground truth.

    Memory stays bounded whatever the size: tiles are rendered from level-0 physical
    coordinates and streamed to tifffile. The file is written under a temporary name in
    the same folder and moved into place atomically.

    Args:
        path: Output file (``.svs`` for Aperio, ``.tif``/``.tiff`` otherwise; any name works).
        spec: What to draw and how to store it.
        workers: Threads rendering and compressing tiles (default: CPU count).
        bigtiff: Force BigTIFF on/off; default: BigTIFF when the raw pixels exceed 2 GiB.
        progress: Called as ``progress(tiles_done, tiles_total)`` while writing.

    Returns:
        The :class:`SyntheticSlide` (path, spec, geometry, ground-truth masks).

    Raises:
        ConfigError: The spec is invalid.
    """
    import tifffile

    spec.validate()
    path = Path(path)
    if not path.parent.is_dir():
        raise InputNotFoundError(f"output folder {path.parent} does not exist; create it first")
    geometry, tissue_sdf = _build_geometry(spec, _grid_um(spec))
    renderer = _make_renderer(spec, geometry, tissue_sdf)
    codec = _CODECS[spec.compression]
    flavour = _FLAVOURS[spec.flavour]
    dims = spec.level_dimensions()
    T = spec.tile
    raw = sum(w * h * 3 for w, h in dims)
    if bigtiff is None:
        bigtiff = raw > 2**31
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    total = sum(-(-w // T) * -(-h // T) for w, h in dims)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None and (done[0] % 64 == 0 or done[0] == total):
            progress(done[0], total)

    for d in spec.downsamples:
        renderer.prepare(d)
    thumb = None
    if flavour.has_thumbnail:
        dt = _thumbnail_downsample(spec, renderer)
        thumb = _render_small(renderer, dt, -(-spec.width // dt), -(-spec.height // dt), T)
    renderer.release_sources()
    thumb_comp = "jpeg" if spec.compression in ("jpeg", "jpeg2000") else codec.tag

    # Unique temporary name in the same folder (same file system → atomic os.replace); created
    # by tifffile with the usual umask permissions, unlike tempfile.mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    pool = concurrent.futures.ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for i, (d, (w, h)) in enumerate(zip(spec.downsamples, dims, strict=True)):
                kw = flavour.level_kwargs(spec, i)
                tiles = _encoded_tiles(renderer, codec, spec.quality, d, w, h, T, pool, 4 * n_workers, tick)
                tw.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(T, T), photometric="rgb",
                         compression=codec.tag, metadata=None, software="wsi_convnext.synthetic", **kw)
                if i == 0 and thumb is not None:
                    desc = (f"Aperio Image Library v12.0.0\r\n{spec.width}x{spec.height} -> "
                            f"{thumb.shape[1]}x{thumb.shape[0]} - ")
                    tw.write(thumb, photometric="rgb", compression=thumb_comp,
                             compressionargs={"level": 90} if thumb_comp == "jpeg" else None,
                             metadata=None, software=False, description=desc)
            if thumb is not None and spec.associated:
                label = _label_image(spec)
                tw.write(label, photometric="rgb", compression="lzw", metadata=None, software=False, subfiletype=1,
                         description=f"Aperio Image Library v12.0.0\r\nlabel {label.shape[1]}x{label.shape[0]}")
                macro = _macro_image(spec, thumb)
                tw.write(macro, photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                         metadata=None, software=False, subfiletype=9,
                         description=f"Aperio Image Library v12.0.0\r\nmacro {macro.shape[1]}x{macro.shape[0]}")
        if spec.mpp is None:
            _strip_resolution_tags(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    logger.debug("wrote synthetic slide %s (%dx%d px, %d levels)", path, spec.width, spec.height, len(dims))
    return SyntheticSlide(path=path, spec=replace(spec), geometry=geometry)


# --------------------------------------------------------------------------------------
# Cohorts, demo slides, truncated files
# --------------------------------------------------------------------------------------


@dataclass
class CohortSlide:
    """One slide of a synthetic cohort with its labels and truth.

    Attributes:
        slide_id: File stem, the ``slide_id`` column of ``labels.csv``.
        patient_id: Patient the slide belongs to.
        label: ``"tumor"`` or ``"normal"``.
        slide: The written slide with its ground truth.
    """

    slide_id: str
    patient_id: str
    label: str
    slide: SyntheticSlide

    @property
    def path(self) -> Path:
        """The slide file."""
        return self.slide.path

    def lesion_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean lesion truth at ``mpp_mask`` µm/px (all False for normal slides)."""
        return self.slide.lesion_mask(mpp_mask)

    def tissue_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean tissue truth at ``mpp_mask`` µm/px."""
        return self.slide.tissue_mask(mpp_mask)


def make_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int,
    *,
    positive_fraction: float = 0.5,
    lesion_fraction: tuple[float, float] = (0.01, 0.05),
    size: tuple[int, int] = (6000, 4500),
    mpp: float = 0.5,
    seed: int = 0,
    n_patients: int | None = None,
    flavour: str = "aperio",
    compression: str = "jpeg",
    pale_fraction: float = 0.1,
    pen_fraction: float = 0.15,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[CohortSlide]:
    """Write a labelled cohort of varied synthetic slides plus ``labels.csv``.

    ``round(n_slides · positive_fraction)`` slides are ``"tumor"`` (1–3 lesions covering
    ``lesion_fraction`` of the tissue, at least ~4 tiles of 224 px at 0.5 µm/px); the rest
    are ``"normal"``. Slides differ in stain, tissue amount and shape, texture, and a few
    are pale or carry pen marks (confounders: ink looks dark, pale lesions look faint). By
    default about a quarter of the patients have 2 slides.

    Args:
        out_dir: Folder to write into (created if missing).
        n_slides: Number of slides.
        positive_fraction: Fraction of tumour slides.
        lesion_fraction: ``(low, high)`` lesion area as a fraction of the tissue area.
        size: ``(width, height)`` of level 0 (px).
        mpp: Level-0 pixel size (µm/px).
        seed: Cohort seed.
        n_patients: Number of patients (≤ n_slides); default ``ceil(0.8 · n_slides)``.
        flavour: ``"aperio"`` (``.svs`` files) or ``"generic"`` (``.tiff``).
        compression: Tile compression, see :class:`SyntheticSlideSpec`.
        pale_fraction: Probability that a slide is pale (under-stained).
        pen_fraction: Probability that a slide carries pen marks (1–2 colours).
        workers: Threads per slide.
        progress: Called as ``progress(slides_done, n_slides)``.

    Returns:
        One :class:`CohortSlide` per slide, in ``labels.csv`` order.
    """
    if n_slides < 1:
        raise ConfigError(f"make_cohort n_slides={n_slides} must be >= 1")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"make_cohort positive_fraction={positive_fraction} must be in 0–1")
    n_pat = n_patients if n_patients is not None else max(1, math.ceil(0.8 * n_slides))
    if not 1 <= n_pat <= n_slides:
        raise ConfigError(f"make_cohort n_patients={n_patients} must be between 1 and n_slides={n_slides}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "cohort")
    n_pos = round(n_slides * positive_fraction)
    labels = np.array(["tumor"] * n_pos + ["normal"] * (n_slides - n_pos))
    rng.shuffle(labels)
    # Every patient gets one slide; the remaining slides go to distinct random patients first.
    extra = rng.permutation(np.arange(n_slides - n_pat) % n_pat) if n_slides > n_pat else np.array([], int)
    patient_of = np.concatenate([np.arange(n_pat), extra]).astype(int)
    order = rng.permutation(n_slides)
    patient_of = patient_of[order]
    ext = ".svs" if flavour == "aperio" else ".tiff"
    slides = []
    for i in range(n_slides):
        srng = _rng(seed * 100003 + i, "cohort-slide")
        tumor = labels[i] == "tumor"
        pens: tuple[str, ...] = ()
        if srng.random() < pen_fraction:
            pens = tuple(str(c) for c in srng.choice(list(PEN_INKS), size=int(srng.integers(1, 3)), replace=False))
        spec = SyntheticSlideSpec(
            width=int(size[0]), height=int(size[1]), mpp=mpp, flavour=flavour, compression=compression,
            seed=int(seed * 100003 + i),
            tissue=TissueSpec(
                n_blobs=int(srng.integers(1, 4)), coverage=float(srng.uniform(0.15, 0.5)),
                n_fragments=int(srng.integers(0, 5)), n_holes=int(srng.integers(0, 4)),
                roughness=float(srng.uniform(0.1, 0.35)),
            ),
            stain_variation=float(srng.uniform(0.5, 1.5)),
            pale=bool(srng.random() < pale_fraction),
            pen_marks=pens,
            lesions=int(srng.choice([1, 1, 1, 2, 3])) if tumor else 0,
            lesion_fraction=tuple(lesion_fraction),
        )
        slide_id = f"slide_{i:03d}"
        slide = write_synthetic_slide(out / f"{slide_id}{ext}", spec, workers=workers)
        slides.append(CohortSlide(slide_id, f"patient_{patient_of[i]:03d}", str(labels[i]), slide))
        if progress is not None:
            progress(i + 1, n_slides)
    tmp = out / ".labels.csv.tmp"
    with tmp.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide_id", "label", "patient_id"])
        for s in slides:
            wr.writerow([s.slide_id, s.label, s.patient_id])
    os.replace(tmp, out / "labels.csv")
    return slides


def demo_slides(out_dir: str | os.PathLike[str], n: int = 3, seed: int = 0, *,
                workers: int | None = None) -> list[SyntheticSlide]:
    """Write ``n`` small varied slides (a few seconds each) for ``wsi-convnext demo``.

    The variants cycle through: an Aperio 20× slide (0.5 µm/px) with a lesion and blue/green
    pen marks; a pale generic TIFF; a 40×-like Aperio slide (0.25 µm/px) with a lesion;
    a slide without mpp metadata; a blank slide with a black pen mark.

    Returns:
        The written slides, with ground truth.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("demo_pen", dict(width=6000, height=5000, mpp=0.5, pen_marks=("blue", "green"), lesions=1,
                          tissue=TissueSpec(n_blobs=2, coverage=0.35))),
        ("demo_pale", dict(width=6000, height=5000, mpp=0.5, pale=True, flavour="generic",
                           tissue=TissueSpec(n_blobs=1, coverage=0.3, n_holes=3))),
        ("demo_40x", dict(width=8000, height=6000, mpp=0.25, lesions=2, lesion_fraction=(0.03, 0.06),
                          tissue=TissueSpec(n_blobs=2, coverage=0.4))),
        ("demo_nompp", dict(width=6000, height=5000, mpp=None, tissue=TissueSpec(n_blobs=3, coverage=0.25))),
        ("demo_blank", dict(width=4000, height=3000, mpp=0.5, blank=True, pen_marks=("black",))),
    ]
    slides = []
    for i in range(n):
        name, kw = variants[i % len(variants)]
        rep = i // len(variants)
        stem = name if rep == 0 else f"{name}_{rep}"
        spec = SyntheticSlideSpec(seed=seed * 1000 + i, **kw)
        ext = ".svs" if spec.flavour == "aperio" else ".tiff"
        slides.append(write_synthetic_slide(out / f"{stem}{ext}", spec, workers=workers))
    return slides


def truncate_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], keep_fraction: float) -> Path:
    """Copy the first ``keep_fraction`` (0–1) of ``src``'s bytes to ``dst`` (a truncated file).

    Returns:
        ``dst`` as a Path.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputNotFoundError(f"truncate_copy source {src} does not exist")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ConfigError(f"truncate_copy keep_fraction={keep_fraction} must be in 0–1")
    keep = int(src.stat().st_size * keep_fraction)
    with src.open("rb") as fi, dst.open("wb") as fo:
        remaining = keep
        while remaining > 0:
            buf = fi.read(min(remaining, 1 << 22))
            if not buf:
                break
            fo.write(buf)
            remaining -= len(buf)
    return dst

