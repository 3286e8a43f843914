"""Quality-control pictures: tissue outline and tile grid, score heatmaps, tile montages.

numpy + Pillow only (matplotlib is imported lazily, and only for named colormaps).
All tile geometry is given in level-0 pixels and mapped onto a thumbnail through
``thumb_downsample`` (level-0 px per thumbnail px), so the pictures show tiles at their
true position whatever the thumbnail size.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._image import rgb_uint8
from .._io import atomic_write_bytes
from ..errors import ConfigError, WsiConvnextError

if TYPE_CHECKING:
    from ..tiling.grid import TileGrid

__all__ = ["QC_MAX_SIZE", "render_qc", "render_tiling_qc", "overlay_scores", "montage", "save_png", "write_failed_qc",
           "write_tiling_qc"]

logger = logging.getLogger(__name__)

#: Longest side of a slide's tiling QC picture, in pixels.
QC_MAX_SIZE = 1280

Color = tuple[int, int, int]


# --------------------------------------------------------------------------- helpers


def _rgb8(image: Any, name: str) -> np.ndarray:
    """(H, W, 3) uint8 copy of an image to draw on (:func:`~wsi_convnext._image.rgb_uint8`)."""
    return np.array(rgb_uint8(image, name)[0])


def _check_geometry(thumb_downsample: float, coords: Any, extent: float) -> tuple[float, np.ndarray, float]:
    ds = float(thumb_downsample)
    if not (math.isfinite(ds) and ds > 0):
        raise ConfigError(f"thumb_downsample={thumb_downsample!r} must be > 0 (level-0 px per thumbnail px)")
    ext = float(extent)
    if not (math.isfinite(ext) and ext > 0):
        raise ConfigError(f"extent={extent!r} must be the tile side in level-0 px (> 0)")
    c = np.asarray(coords, dtype=np.float64)
    if c.size == 0:
        c = c.reshape(0, 2)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ConfigError(f"coords must have shape (N, 2) of level-0 (x, y), got {np.shape(coords)}")
    return ds, c, ext


def _tile_boxes(
    coords: np.ndarray, extent: float, ds: float, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-open thumbnail-pixel boxes (x0, y0, x1, y1) clipped to the image, and a validity flag."""
    x0 = np.rint(coords[:, 0] / ds)
    y0 = np.rint(coords[:, 1] / ds)
    x1 = np.maximum(np.rint((coords[:, 0] + extent) / ds), x0 + 1)
    y1 = np.maximum(np.rint((coords[:, 1] + extent) / ds), y0 + 1)
    x0, x1 = np.clip(x0, 0, w).astype(np.int64), np.clip(x1, 0, w).astype(np.int64)
    y0, y1 = np.clip(y0, 0, h).astype(np.int64), np.clip(y1, 0, h).astype(np.int64)
    return x0, y0, x1, y1, (x1 > x0) & (y1 > y0)


def _paint_sum(
    h: int, w: int, boxes: tuple[np.ndarray, ...], weights: np.ndarray
) -> np.ndarray:
    """Sum of ``weights`` over all boxes covering each pixel (2-D difference array, O(N + HW))."""
    x0, y0, x1, y1 = boxes
    stride = w + 1
    idx = np.concatenate([y0 * stride + x0, y0 * stride + x1, y1 * stride + x0, y1 * stride + x1])
    wts = np.concatenate([weights, -weights, -weights, weights]).astype(np.float64)
    diff = np.bincount(idx, weights=wts, minlength=(h + 1) * stride).reshape(h + 1, stride)
    return np.cumsum(np.cumsum(diff, axis=0), axis=1)[:h, :w]


def _shift_or(m: np.ndarray) -> np.ndarray:
    """4-neighbour dilation (outside counts as False)."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _resize_nearest(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    mh, mw = mask.shape
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.int64), mw - 1)
    return mask[rows[:, None], cols[None, :]]


def font_path() -> Path | None:
    """DejaVu Sans as bundled with matplotlib (found without importing it), or None.

    Pillow's built-in font has no glyph for "µ" (it draws a box), and titles say µm/px.
    """
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    path = font_path()
    try:
        if path is not None:
            return ImageFont.truetype(str(path), size=size)
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _as_mask(mask: Any, name: str, h: int, w: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ConfigError(f"{name} must be a non-empty 2-D array, got shape {m.shape}")
    return _resize_nearest(m.astype(bool), h, w)


def _boundary(m: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary of ``width`` px: mask minus its erosion (complement of dilated background)."""
    eroded = m
    for _ in range(max(1, int(width))):
        eroded = ~_shift_or(~eroded)
    return m & ~eroded


def _font_size(width: int) -> int:
    return int(min(28, max(10, width // 45)))


def _title_band(image: np.ndarray, title: str) -> np.ndarray:
    """``image`` with a white band holding ``title`` (multi-line allowed) above it."""
    w = image.shape[1]
    font = _font(_font_size(w))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), title, font=font)
    pad = max(2, (bottom - top) // 4)
    band = Image.new("RGB", (w, bottom - top + 2 * pad), (255, 255, 255))
    ImageDraw.Draw(band).multiline_text((pad - left, pad - top), title, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(band), image], axis=0)


# --------------------------------------------------------------------------- API


def render_qc(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    mask: np.ndarray | None,
    coords: np.ndarray,
    extent: float,
    *,
    tissue_fraction: np.ndarray | None = None,
    title: str | None = None,
    outline_color: Color = (0, 220, 0),
    grid_color: Color = (0, 0, 255),
    outline_width: int | None = None,
    removed: np.ndarray | None = None,
    removed_color: Color = (255, 140, 0),
) -> np.ndarray:
    """Thumbnail with the tissue outline and the kept tile grid drawn on it.

    Args:
        thumbnail: (H, W, 3|4) slide thumbnail (uint8, or float in [0, 1]).
        thumb_downsample: level-0 px per thumbnail px.
        mask: tissue mask covering the same slide area as the thumbnail, at any size
            (it is resized to the thumbnail, nearest neighbour); ``None`` draws no outline.
        coords: (N, 2) level-0 (x, y) top-left corners of the kept tiles.
        extent: tile side in level-0 px.
        tissue_fraction: optional (N,) tissue fraction per tile; tiles are tinted with
            ``grid_color`` in proportion to it.
        title: optional text (e.g. slide id, number of tiles, mpp) drawn in a white band
            above the picture; the output is then taller than the thumbnail.
        outline_color: RGB of the tissue outline.
        grid_color: RGB of the 1-px tile rectangles.
        outline_width: outline thickness in px (default: about 1/250 of the short side).
        removed: optional mask (any size, like ``mask``) of what tissue detection removed
            (small pieces, ink); drawn tinted and outlined in ``removed_color``.
        removed_color: RGB of the removed objects.

    Returns:
        (H', W, 3) uint8 picture; ``H' == H`` without a title.

    Raises:
        ConfigError: on malformed images, geometry or array lengths.
    """
    out = _rgb8(thumbnail, "thumbnail")
    h, w = out.shape[:2]
    ds, c, ext = _check_geometry(thumb_downsample, coords, extent)
    boxes = _tile_boxes(c, ext, ds, h, w)
    x0, y0, x1, y1, valid = boxes

    if tissue_fraction is not None and h and w:
        frac = np.asarray(tissue_fraction, dtype=np.float64).reshape(-1)
        if frac.shape[0] != c.shape[0]:
            raise ConfigError(f"tissue_fraction has {frac.shape[0]} values for {c.shape[0]} tiles")
        ok = valid & np.isfinite(frac)
        frac = np.clip(frac[ok], 0.0, 1.0)
        sel = tuple(b[ok] for b in (x0, y0, x1, y1))
        cover = _paint_sum(h, w, sel, np.ones_like(frac))
        tint = np.where(cover > 0, 0.3 * _paint_sum(h, w, sel, frac) / np.maximum(cover, 1), 0.0)[..., None]
        out = (out * (1.0 - tint) + np.asarray(grid_color, np.float64) * tint + 0.5).astype(np.uint8)

    if valid.any():
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        color = tuple(int(v) for v in grid_color)
        for a, b, cc, d in zip(x0[valid].tolist(), y0[valid].tolist(), x1[valid].tolist(), y1[valid].tolist()):
            draw.rectangle((a, b, cc - 1, d - 1), outline=color, width=1)
        out = np.asarray(img).copy()

    width = outline_width if outline_width is not None else max(1, round(min(h, w) / 250))
    if removed is not None and h and w:
        r = _as_mask(removed, "removed", h, w)
        out[r] = (0.5 * out[r] + 0.5 * np.asarray(removed_color, np.float64) + 0.5).astype(np.uint8)
        out[_boundary(r, width)] = removed_color
    if mask is not None and h and w:
        out[_boundary(_as_mask(mask, "mask", h, w), width)] = outline_color

    if title:
        out = _title_band(out, title)
    return out


def _colormap_lut(cmap: Any) -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap name or object."""
    import matplotlib

    if isinstance(cmap, str):
        try:
            cm = matplotlib.colormaps[cmap]
        except KeyError:
            raise ConfigError(
                f"unknown colormap {cmap!r}; use a matplotlib name such as 'viridis', 'magma' or 'jet'"
            ) from None
    else:
        cm = cmap
    rgba = np.asarray(cm(np.linspace(0.0, 1.0, 256)), dtype=np.float64)
    return np.clip(rgba[:, :3] * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _colorbar(h: int, lut: np.ndarray, vmin: float, vmax: float, label: str | None) -> np.ndarray:
    """White (h, W, 3) panel with a vertical colour bar (vmax on top) and tick labels."""
    font = _font(max(9, min(20, h // 25)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [_fmt(vmax), _fmt(vmin)]
    boxes = [probe.textbbox((0, 0), t, font=font) for t in texts]
    text_w = max(b[2] - b[0] for b in boxes)
    text_h = max(b[3] - b[1] for b in boxes)
    pad = max(3, text_h // 2)
    bar_w = max(8, min(30, h // 20))
    label_h = 0
    label_img = None
    if label:
        lb = probe.textbbox((0, 0), label, font=font)
        label_img = Image.new("RGB", (lb[2] - lb[0] + 2, lb[3] - lb[1] + 2), (255, 255, 255))
        ImageDraw.Draw(label_img).text((1 - lb[0], 1 - lb[1]), label, fill=(0, 0, 0), font=font)
        label_img = label_img.rotate(90, expand=True)
        label_h = label_img.width + pad
    width = pad + bar_w + pad + text_w + pad + label_h
    panel = Image.new("RGB", (width, max(h, 1)), (255, 255, 255))
    top, bottom = pad + text_h // 2, max(pad + text_h // 2 + 1, h - pad - text_h // 2)
    n = bottom - top
    ramp = lut[np.clip(((1.0 - (np.arange(n) + 0.5) / n) * 256).astype(np.int64), 0, 255)]
    bar = np.repeat(ramp[:, None, :], bar_w, axis=1)
    panel.paste(Image.fromarray(bar), (pad, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((pad - 1, top - 1, pad + bar_w, bottom), outline=(0, 0, 0), width=1)
    tx = pad + bar_w + pad
    for text, y, box in ((texts[0], top, boxes[0]), (texts[1], bottom, boxes[1])):
        draw.text((tx - box[0], y - (box[3] - box[1]) // 2 - box[1]), text, fill=(0, 0, 0), font=font)
    if label_img is not None:
        panel.paste(label_img, (tx + text_w + pad, max(0, (h - label_img.height) // 2)))
    return np.asarray(panel)[:h]


def overlay_scores(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    extent: float,
    scores: np.ndarray,
    *,
    cmap: Any = "viridis",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    label: str | None = None,
    mask: np.ndarray | None = None,
    outline_color: Color = (0, 200, 0),
    title: str | None = None,
) -> np.ndarray:
    """Heatmap of per-tile scores blended on the thumbnail at the tiles' true positions.

    Where tiles overlap, the painted value is the mean of their scores. Non-finite
    scores (NaN, inf) are not painted, so the thumbnail shows through.

    Args:
        thumbnail: (H, W, 3|4) slide thumbnail (uint8, or float in [0, 1]).
        thumb_downsample: level-0 px per thumbnail px.
        coords: (N, 2) level-0 (x, y) top-left tile corners.
        extent: tile side in level-0 px.
        scores: (N,) score per tile.
        cmap: matplotlib colormap name (e.g. ``"viridis"``, ``"jet"``) or object.
        alpha: opacity of the colours over the thumbnail, in [0, 1].
        vmin: score mapped to the bottom of the colormap (default: finite minimum).
        vmax: score mapped to the top of the colormap (default: finite maximum).
        colorbar: append a colour-bar panel with min/max tick labels on the right.
        label: optional caption of the colour bar (drawn vertically).
        mask: optional tissue mask covering the thumbnail's area (any size); its outline
            is drawn in ``outline_color``.
        outline_color: RGB of the tissue outline.
        title: optional text drawn in a white band above the picture (e.g. slide id and
            prediction); the output is then taller.

    Returns:
        (H, W + bar width, 3) uint8 picture (width ``W`` without colour bar; taller with a title).

    Raises:
        ConfigError: on malformed images, geometry, lengths, ``alpha`` or colormap.
    """
    out = _rgb8(thumbnail, "thumbnail")
    h, w = out.shape[:2]
    ds, c, ext = _check_geometry(thumb_downsample, coords, extent)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != c.shape[0]:
        raise ConfigError(f"scores has {s.shape[0]} values for {c.shape[0]} tiles")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha={alpha!r} must be in [0, 1]")
    lut = _colormap_lut(cmap)
    finite = np.isfinite(s)
    lo = float(vmin) if vmin is not None else (float(s[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(s[finite].max()) if finite.any() else 1.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ConfigError(f"vmin={lo!r} and vmax={hi!r} must be finite with vmin <= vmax")

    x0, y0, x1, y1, valid = _tile_boxes(c, ext, ds, h, w)
    ok = valid & finite
    if ok.any() and h and w:
        sel = tuple(b[ok] for b in (x0, y0, x1, y1))
        count = _paint_sum(h, w, sel, np.ones(int(ok.sum())))
        total = _paint_sum(h, w, sel, s[ok])
        painted = count > 0.5
        mean = total[painted] / count[painted]
        t = np.full(mean.shape, 0.5) if hi == lo else (mean - lo) / (hi - lo)
        colors = lut[np.clip((t * 256).astype(np.int64), 0, 255)].astype(np.float64)
        a = float(alpha)
        out[painted] = (out[painted] * (1.0 - a) + colors * a + 0.5).astype(np.uint8)
    if mask is not None and h and w:
        out[_boundary(_as_mask(mask, "mask", h, w), max(1, round(min(h, w) / 250)))] = outline_color
    if colorbar and h:
        out = np.concatenate([out, _colorbar(h, lut, lo, hi, label)], axis=1)
    if title:
        out = _title_band(out, title)
    return out


def montage(
    tiles: np.ndarray,
    *,
    ncols: int | None = None,
    labels: Sequence[str] | None = None,
    pad: int = 2,
    background: Color = (255, 255, 255),
) -> np.ndarray:
    """Grid picture of tiles, row by row (e.g. the top-k tiles of a slide).

    Args:
        tiles: (K, T, T, 3|4) tiles, channel last (uint8, or float in [0, 1]).
        ncols: tiles per row (default ``ceil(sqrt(K))``).
        labels: optional K strings drawn in each tile's top-left corner.
        pad: gap between and around tiles, px.
        background: RGB of the gaps.

    Returns:
        (rows*(T+pad)+pad, ncols*(T+pad)+pad, 3) uint8 picture.

    Raises:
        ConfigError: if there are no tiles, they are not channel-last, or ``labels`` /
            ``ncols`` do not fit.
    """
    t = np.asarray(tiles)
    if t.ndim != 4 or t.shape[-1] not in (3, 4) or t.shape[0] == 0:
        raise ConfigError(
            f"tiles must be a non-empty (K, T, T, 3) channel-last array, got shape {t.shape}"
            " (transpose (K, 3, T, T) tensors first)"
        )
    k, th, tw = t.shape[:3]
    if ncols is None:
        ncols = math.ceil(math.sqrt(k))
    if int(ncols) < 1:
        raise ConfigError(f"ncols={ncols!r} must be >= 1")
    ncols = min(int(ncols), k)
    if pad < 0:
        raise ConfigError(f"pad={pad!r} must be >= 0")
    if labels is not None and len(labels) != k:
        raise ConfigError(f"labels has {len(labels)} entries for {k} tiles")
    nrows = math.ceil(k / ncols)
    out = np.empty((nrows * (th + pad) + pad, ncols * (tw + pad) + pad, 3), np.uint8)
    out[:] = background
    for i in range(k):
        r, q = divmod(i, ncols)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        out[y : y + th, x : x + tw] = _rgb8(t[i], "tiles[i]")
    if labels is not None:
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        font = _font(max(9, min(20, tw // 10)))
        for i, text in enumerate(labels):
            if not text:
                continue
            r, q = divmod(i, ncols)
            y, x = pad + r * (th + pad), pad + q * (tw + pad)
            b = draw.textbbox((x + 2, y + 2), str(text), font=font)
            draw.rectangle((x, y, min(b[2] + 2, x + tw - 1), min(b[3] + 2, y + th - 1)), fill=(0, 0, 0))
            draw.text((x + 2, y + 2), str(text), fill=(255, 255, 255), font=font)
        out = np.asarray(img).copy()
    return out


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write ``image`` as PNG atomically (temporary file in the same folder, then rename).

    Missing parent folders are created. Readers never see a half-written file.

    Args:
        path: destination ``.png`` path.
        image: (H, W), (H, W, 3) or (H, W, 4) uint8 image (float in [0, 1] is converted).

    Returns:
        The destination path.

    Raises:
        ConfigError: if ``image`` is not an image array.
        OSError: if the folder cannot be written.
    """
    dest = Path(path)
    a = np.asarray(image)
    if a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        pil = Image.fromarray(a)
    else:
        pil = Image.fromarray(_rgb8(a, "image"))
    buf = io.BytesIO()
    # Level 3 is ~5× faster than Pillow's default for a few % more bytes.
    pil.save(buf, format="PNG", compress_level=3)
    return atomic_write_bytes(dest, buf.getvalue())


# --------------------------------------------------------------------------- tiling QC


def write_tiling_qc(
    qc_path: Path, thumb: np.ndarray, thumb_ds: float, mask: np.ndarray, grid: TileGrid, slide_id: str,
    frac: np.ndarray, removed: np.ndarray | None = None, *, failed: str | None = None,
) -> Path:  # fmt: skip
    """Write the QC picture of a slide (see :func:`render_tiling_qc`); returns its path."""
    return save_png(qc_path, render_tiling_qc(thumb, thumb_ds, mask, grid, slide_id, frac, removed, failed=failed))


def render_tiling_qc(
    thumb: np.ndarray, thumb_ds: float, mask: np.ndarray, grid: TileGrid, slide_id: str, frac: np.ndarray,
    removed: np.ndarray | None = None, *, failed: str | None = None,
) -> np.ndarray:  # fmt: skip
    """The QC picture: tissue outline, kept tiles, removed objects (orange); ``failed`` titles a failure."""
    scale = QC_MAX_SIZE / max(thumb.shape[:2])
    if scale < 1:
        size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
        thumb_ds *= thumb.shape[1] / size[0]
        thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BILINEAR))
    title = f"{slide_id}: {len(grid)} tiles, {grid.tile_size}px @ {grid.target_mpp:g} µm/px"
    if failed:
        title = f"{slide_id}: FAILED, {failed} ({grid.tile_size}px @ {grid.target_mpp:g} µm/px)"
    if removed is not None and removed.any():
        title += "\ngreen: tissue; orange: removed (small pieces, ink)"
    return render_qc(thumb, thumb_ds, mask, grid.coords, grid.extent0, tissue_fraction=frac, title=title,
                     removed=removed)  # fmt: skip


def write_failed_qc(qc_path: Path, reader: Any, slide_id: str, failed: str) -> Path | None:
    """QC picture of a slide that failed before tissue detection: its thumbnail, titled; None if unreadable."""
    try:
        thumb = reader.thumbnail(QC_MAX_SIZE)
        image = render_qc(thumb, 1.0, None, np.zeros((0, 2)), 1.0, title=f"{slide_id}: FAILED, {failed}")
        return save_png(qc_path, image)
    except (WsiConvnextError, OSError):
        logger.debug("%s: no QC picture", slide_id, exc_info=True)
        return None
