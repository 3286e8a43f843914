"""Slide reading: one small, thread-safe interface over OpenSlide and tiffslide.

* :mod:`.base`: :class:`BaseSlideReader` (the one abstract slide), :class:`SlideMetadata`,
  the backend registry and :func:`open_slide`, :func:`slide_info`;
* :mod:`.fingerprint`: :func:`slide_fingerprint`, the content hash that notices a changed slide file;
* :mod:`.openslide`, :mod:`.tiffslide`: the built-in backends, one module each (``"auto"``
  tries them in this order);
* :mod:`.tiff`: TIFF tag reading and truncation checks;
* :mod:`.mpp`: where a slide's level-0 µm/px comes from, and :func:`resolve_mpp`.

Adding a backend = writing one module with a :class:`BaseSlideReader` subclass and a
:func:`register_backend` call.
"""

from __future__ import annotations

from .base import (
    SLIDE_EXTENSIONS,
    BaseSlideReader,
    SlideMetadata,
    available_backends,
    backend_reference,
    ensure_backend,
    open_slide,
    register_backend,
    slide_info,
)
from .fingerprint import FINGERPRINT_MODES, slide_fingerprint
from .mpp import resolve_mpp
from .openslide import OpenSlideReader
from .tiffslide import TiffSlideReader

__all__ = [
    "FINGERPRINT_MODES",
    "SLIDE_EXTENSIONS",
    "BaseSlideReader",
    "OpenSlideReader",
    "SlideMetadata",
    "TiffSlideReader",
    "available_backends",
    "backend_reference",
    "ensure_backend",
    "open_slide",
    "register_backend",
    "resolve_mpp",
    "slide_fingerprint",
    "slide_info",
]
