"""Procedural pixels: periodic textures per pyramid level and the renderers that draw tiles.

A renderer draws any tile of any level from level-0 physical coordinates, so memory does not
grow with the slide size and every pixel is a pure function of the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .shapes import (
    PEN_INKS,
    SlideGeometry,
    SyntheticSlideSpec,
    _polyline_distance_map,
    _raster_shapes,
    _rng,
    _sdf,
)

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


#: Ranges of the per-slide texture of each tissue class, drawn in this order by :func:`_looks`:
#: nuclei (density range ×1e-4, then the fixed :class:`_NucleiParams` fields), eosin, h_tint,
#: fibre sigmas (along, across), loose.
_LOOK_RANGES = {
    "normal": (
        (((8, 22), (2.0, 2.8), (1.0, 1.3), (0.9, 1.25), 0.05, 0.0), ((8, 22), (2.4, 3.4), (1.8, 3.5), (0.7, 1.0), 0.05, 0.0)),
        (0.75, 1.05), (0.02, 0.07), ((5, 10), (0.8, 1.5)), (0.05, 0.25),
    ),
    "lesion": (
        (((55, 75), (3.8, 5.8), (1.0, 1.7), (1.25, 1.7), 0.18, 0.35), ((6, 12), (2.0, 2.6), (1.0, 1.2), (1.1, 1.4), 0.05, 0.0)),
        (0.55, 0.75), (0.24, 0.34), ((3, 5), (1.5, 2.5)), (0.0, 0.05),
    ),
}  # fmt: skip


def _looks(rng: np.random.Generator) -> tuple[_TissueLook, _TissueLook]:
    """The (normal, lesion) looks of one slide (the draws' order is part of the generated slides)."""
    looks = []
    for nuclei, eosin, h_tint, fibre, loose in _LOOK_RANGES.values():
        looks.append(_TissueLook(
            nuclei=tuple(_NucleiParams(rng.uniform(*density) * 1e-4, *shape) for density, *shape in nuclei),
            eosin=rng.uniform(*eosin),
            h_tint=rng.uniform(*h_tint),
            fibre_um=(rng.uniform(*fibre[0]), rng.uniform(*fibre[1])),
            loose=rng.uniform(*loose),
        ))  # fmt: skip
    normal, lesion = looks
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
        """(256·256, 3) uint8 Beer–Lambert colour of centi-densities (H, E).

        The second density is eosin for H&E; for the IHC-like stains it is the faint
        haematoxylin of the cytoplasm (``"hematoxylin"``) or DAB (``"dab"``).
        """
        sv = self.spec.stain_variation
        i0 = np.array([243.0, 241.0, 244.0]) + sv * rng.uniform(-3, 3, 3)
        h_od, e_od = _STAINS[self.spec.stain]
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
# Writing
# --------------------------------------------------------------------------------------


_PATTERNS = ("he", "lines")


def _he_densities() -> tuple[np.ndarray, np.ndarray]:
    e_od = np.log10(np.array([242.0, 240.0, 242.0]) / np.array([230.0, 150.0, 190.0]))
    h_od = np.log10(np.array([242.0, 240.0, 242.0]) / np.array([90.0, 60.0, 140.0])) - 0.3 * e_od
    return h_od, e_od


# Nuclear haematoxylin of IHC counterstains (Mayer's: bluer than H&E's), as log10 optical
# density per unit density; cf. the Ruifrok-Johnston H vector (0.65, 0.70, 0.29).
_IHC_H_OD = np.array([0.39, 0.42, 0.19])
#: Stain name -> (first, second) log10 optical density per unit density, per RGB channel.
_STAINS: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "he": _he_densities(),
    # Counterstain only: the cytoplasm and stroma take up a little blue-grey haematoxylin.
    "hematoxylin": (_IHC_H_OD, np.array([0.085, 0.075, 0.045])),
    # DAB brown (Ruifrok-Johnston DAB vector 0.27, 0.57, 0.78, scaled).
    "dab": (_IHC_H_OD, np.array([0.12, 0.26, 0.35])),
}


def _grid_um(spec: SyntheticSlideSpec) -> float:
    extent = max(spec.width, spec.height) * spec.pixel_um
    return max(4.0, extent / 2048.0)


def _make_renderer(spec: SyntheticSlideSpec, geometry: SlideGeometry, tissue_sdf: np.ndarray | None) -> _Renderer:
    if spec.pattern == "lines":
        return _LinesRenderer(spec)
    return _HERenderer(spec, geometry, tissue_sdf, _grid_um(spec))


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

