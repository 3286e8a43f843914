"""What a synthetic slide is: its spec, its exact geometry and the ground truth derived from it.

All geometry is in level-0 pixels (x to the right, y down); masks at ``mpp_mask`` µm/px are
level-0 aligned (pixel ``(r, c)`` covers ``[c*s, (c+1)*s) × [r*s, (r+1)*s)``, ``s = mpp_mask /
content_mpp``; set when its centre lies inside the region).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError

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
        pieces: Explicit tissue pieces (level-0 px); when given they are the whole tissue and
            the random fields above are ignored (e.g. one small fragment of a known area).
    """

    n_blobs: int = 2
    coverage: float = 0.3
    n_fragments: int = 3
    n_holes: int = 2
    roughness: float = 0.25
    pieces: tuple[Shape, ...] = ()


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
        stain: ``"he"`` (haematoxylin and eosin), ``"hematoxylin"`` (IHC-like counterstain
            only: blue nuclei in blue-grey tissue) or ``"dab"`` (IHC-like: blue nuclei in
            DAB-brown tissue).
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
    stain: str = "he"

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
        from .render import _PATTERNS, _STAINS
        from .write import _CODECS, _FLAVOURS

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
        if self.stain not in _STAINS:
            raise ConfigError(f"synthetic slide stain={self.stain!r}; use one of {sorted(_STAINS)}")
        bad = [c for c in self.pen_marks if c not in PEN_INKS]
        if bad:
            raise ConfigError(f"synthetic slide pen_marks={bad} unknown; use colours among {sorted(PEN_INKS)}")
        if int(self.seed) < 0:
            raise ConfigError(f"synthetic slide seed={self.seed} must be a non-negative integer")
        if not all(isinstance(x, Shape) for x in self.tissue.pieces):
            raise ConfigError("synthetic slide tissue.pieces must be a sequence of Shape (level-0 px)")
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
    if not spec.blank and ts.pieces:
        blobs = list(ts.pieces)
    elif not spec.blank and ts.n_blobs > 0 and ts.coverage > 0:
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

