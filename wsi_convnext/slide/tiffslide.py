"""tiffslide backend (registered as ``"tiffslide"``): any TIFF, including plain stripped ones."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import BaseSlideReader, SlideMetadata, level_tile_size, open_error, register_backend, to_rgb
from .mpp import float_or_none
from .tiff import TiffTags, tiff_tags_from_page, tiff_truncation

logger = logging.getLogger(__name__)


class TiffSlideReader(BaseSlideReader):
    """tiffslide backend (tifffile + imagecodecs): any TIFF, including plain stripped ones.

    Thread safety: tiffslide keeps one zarr view per thread and tifffile serialises the file
    seeks/reads behind a re-entrant lock, so concurrent :meth:`read_region` calls are safe
    without a lock of ours (decoding runs in parallel). Everything tiffslide computes lazily
    (properties, series, level info) is computed once here at open time, before any thread
    can race on it.

    At open, every pyramid level's compression is checked against the codecs tifffile can
    decode, so an exotic file that tiffslide would "open" but could only turn into garbage or
    errors (e.g. compression 52479) is refused with :class:`SlideOpenError`.
    """

    backend = "tiffslide"

    def _open(self) -> SlideMetadata:
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(self.path))
        try:
            if len(self._ts.ts_tifffile.pages) == 0:
                raise open_error(self.path, self.backend, "no readable TIFF directory (truncated or corrupt)")
            raw_props = dict(self._ts.properties)
            self._check_decodable(raw_props)
            props = {str(k): str(v) for k, v in raw_props.items() if v is not None}
            n = self._ts.level_count
            tiff_tags = self._page0_tags(raw_props)
            return SlideMetadata(
                level_dimensions=tuple(self._ts.level_dimensions),
                level_downsamples=tuple(self._ts.level_downsamples),
                properties=props,
                vendor=raw_props.get("tiffslide.vendor") or "generic-tiff",
                objective_power=float_or_none(raw_props.get("tiffslide.objective-power")),
                associated_images=tuple(self._ts.associated_images.keys()),
                level_tile_sizes=tuple(level_tile_size(props, "tiffslide", i) for i in range(n)),
                tiff_tags=tiff_tags,
            )
        except BaseException:
            self._ts.close()
            raise

    def _level_pages(self, raw_props: Mapping[str, Any]) -> list[Any]:
        tf = self._ts.ts_tifffile
        if raw_props.get("tiffslide.series-composition"):
            series_list = [tf.series[int(i)] for i in raw_props["tiffslide.series-composition"]["located_series"]]
        else:
            series_list = [tf.series[int(raw_props.get("tiffslide.series-index") or 0)]]
        return [lvl.keyframe for s in series_list for lvl in s.levels]

    def _check_decodable(self, raw_props: Mapping[str, Any]) -> None:
        from tifffile import TIFF

        problem = tiff_truncation(self._ts.ts_tifffile, self._level_pages(raw_props))
        if problem:
            raise open_error(self.path, self.backend, problem)
        for page in self._level_pages(raw_props):
            comp = int(page.compression)
            if comp != 1 and comp not in TIFF.DECOMPRESSORS:
                raise open_error(
                    self.path,
                    self.backend,
                    f"TIFF compression {comp} has no decoder in tifffile/imagecodecs",
                )
            if np.dtype(page.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(bool)):
                raise open_error(self.path, self.backend, f"unsupported sample type {page.dtype}")

    def _page0_tags(self, raw_props: Mapping[str, Any]) -> TiffTags | None:
        try:
            return tiff_tags_from_page(self._level_pages(raw_props)[0])
        except Exception:
            logger.debug("%s: cannot read TIFF tags of the base level", self.path, exc_info=True)
            return None

    def _read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # Same level-coordinate transform as tiffslide; we pad with white instead of black.
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        ix0, iy0 = min(max(x0, 0), lw), min(max(y0, 0), lh)
        ix1, iy1 = min(max(x0 + w, 0), lw), min(max(y0 + h, 0), lh)
        if ix0 == x0 and iy0 == y0 and ix1 == x0 + w and iy1 == y0 + h:
            return self._ts.read_region(location, level, size, as_array=True, padding=False)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            arr = self._ts.read_region(location, level, size, as_array=True, padding=False)
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = to_rgb(arr, self.path)
        return out

    def _read_associated_raw(self, name: str) -> np.ndarray:
        img = self._ts.associated_images[name]
        return np.asarray(img.convert("RGBA") if img.mode not in ("RGB", "RGBA", "L") else img)

    def _close(self) -> None:
        ts = getattr(self, "_ts", None)
        if ts is not None:
            ts.close()



register_backend(TiffSlideReader.backend, TiffSlideReader)
