"""OpenSlide backend (registered as ``"openslide"``, tried first by ``open_slide(..., "auto")``)."""

from __future__ import annotations

import numpy as np

from .base import BaseSlideReader, SlideMetadata, level_tile_size, pil_to_rgb, register_backend
from .mpp import float_or_none
from .tiff import read_tiff_tags_from_file


class OpenSlideReader(BaseSlideReader):
    """OpenSlide backend (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, DICOM, tiled TIFF).

    Thread safety: OpenSlide handles are thread-safe and openslide-python releases the GIL
    while decoding, so concurrent :meth:`read_region` calls need no lock.
    """

    backend = "openslide"

    def _open(self) -> SlideMetadata:
        import openslide

        self._osr = openslide.OpenSlide(str(self.path))
        props = {str(k): str(v) for k, v in self._osr.properties.items()}
        n = self._osr.level_count
        return SlideMetadata(
            level_dimensions=tuple(self._osr.level_dimensions),
            level_downsamples=tuple(self._osr.level_downsamples),
            properties=props,
            vendor=props.get("openslide.vendor") or None,
            objective_power=float_or_none(props.get("openslide.objective-power")),
            associated_images=tuple(self._osr.associated_images.keys()),
            level_tile_sizes=tuple(level_tile_size(props, "openslide", i) for i in range(n)),
            tiff_tags=read_tiff_tags_from_file(self.path),
        )

    def _read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return pil_to_rgb(self._osr.read_region(location, level, size))

    def _read_associated_raw(self, name: str) -> np.ndarray:
        return pil_to_rgb(self._osr.associated_images[name])

    def _close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()



register_backend(OpenSlideReader.backend, OpenSlideReader)
