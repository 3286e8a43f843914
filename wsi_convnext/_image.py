"""The one image → (H, W, 3) uint8 RGB conversion (slide pixels, tissue detection, QC pictures).

numpy only. Transparent pixels are composited over white (outside the scan is background).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["rgb_uint8"]


def rgb_uint8(image: Any, name: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
    """An image as (H, W, 3) uint8 RGB composited over white, plus its fully transparent pixels.

    Accepts (H, W) grey or (H, W, C) with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA), of
    uint8; uint16 (rounded to nearest: ``(v + 128) // 257``); bool (0 / 255); other integers
    (clipped to 0–255); or floats (in [0, 1] when their maximum is at most 1, else 0–255;
    NaN reads as white). Alpha compositing is exact integer rounding.

    Args:
        image: The pixels.
        name: What the image is, for messages.

    Returns:
        ``(rgb, transparent)``: ``rgb`` is a new or contiguous array (never a view with alpha);
        ``transparent`` is the (H, W) bool mask of alpha 0, or None when the image is opaque.

    Raises:
        ConfigError: Not 2-D or 3-D with 1–4 channels, or not numeric (one line naming ``name``).
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or not 1 <= a.shape[-1] <= 4:
        raise ConfigError(f"{name} must be an (H, W, 3) RGB or (H, W, 4) RGBA image, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a.astype(np.float32) * scale, nan=255.0) + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ConfigError(f"{name} must hold uint8, uint16 or float intensities, got dtype {a.dtype}")
    c = a.shape[-1]
    if c <= 2:  # grey (+ alpha)
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=-1), a[..., 1:]], axis=-1)
    if a.shape[-1] == 3:
        return np.ascontiguousarray(a), None
    rgb, alpha = a[..., :3], a[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb), None
    alpha16 = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * alpha16 + 255 * (255 - alpha16) + 127) // 255
    return out.astype(np.uint8), alpha[..., 0] == 0
