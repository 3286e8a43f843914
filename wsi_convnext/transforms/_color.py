"""Colour-space helpers shared by the stain transforms: optical density, CIE L*a*b*, masked quantiles,
reference images. All work on float tensors (B, 3, P) or (B, 3, H, W) on any device."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, InputNotFoundError, one_line

if TYPE_CHECKING:
    import torch

# sRGB (D65) → XYZ, the matrix skimage.color uses; white point D65 (2° observer).
_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)


def _mat(rows: tuple, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels on dim 1 → CIE L*a*b* (L in [0, 100]), same shape."""
    import torch

    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(0).pow(2.4), rgb / 12.92)
    xyz = torch.einsum("ij,bj...->bi...", _mat(_RGB2XYZ, rgb), lin)
    xyz = xyz / _mat(_WHITE, rgb).view(1, 3, *([1] * (rgb.ndim - 2)))
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12).pow(1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* → sRGB clipped to [0, 1], channels on dim 1."""
    import torch

    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 16 / 116) / 7.787)
    xyz = xyz * _mat(_WHITE, lab).view(1, 3, *([1] * (lab.ndim - 2)))
    lin = torch.einsum("ij,bj...->bi...", torch.linalg.inv(_mat(_RGB2XYZ, lab)), xyz).clamp_min(0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.pow(1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0, 1)


def optical_density(rgb: torch.Tensor, io: float) -> torch.Tensor:
    """Beer–Lambert optical density ``-ln((255·rgb + 1) / io)`` of [0, 1] RGB (io in 0–255 units)."""
    return -((rgb * 255 + 1) / io).log()


def tissue_pixels(od: torch.Tensor, beta: float, *, every_channel: bool = True) -> torch.Tensor:
    """(B, P) bool: pixels whose optical density is at least ``beta`` in every (or any) channel.

    Macenko's rule is every channel (pixels where both stains absorb); ``every_channel=False``
    keeps every pixel that is not glass (pale eosin-only pixels too).
    """
    above = od >= beta
    return above.all(dim=1) if every_channel else above.any(dim=1)


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Per-row linear-interpolated quantiles ``qs`` of ``values`` (..., P) over the True entries of ``mask``.

    One sort for all ``qs``. Returns (..., len(qs)); rows without any True entry give +inf
    (callers treat those rows as invalid).
    """
    import torch

    v = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=-1).values
    last = (mask.sum(dim=-1, keepdim=True) - 1).clamp_min(0)
    pos = last.to(values.dtype) * torch.tensor(list(qs), dtype=values.dtype, device=values.device)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last)
    frac = pos - lo.to(values.dtype)
    a, b = v.gather(-1, lo), v.gather(-1, hi)
    return torch.where(frac > 0, a + (b - a) * frac, a)


def load_reference(path: str | os.PathLike[str], max_pixels: int = 4_000_000) -> torch.Tensor:
    """A reference image (PNG, JPEG, TIFF, ...) as float64 RGB (1, 3, H, W) in [0, 1] on the CPU.

    Images larger than ``max_pixels`` are subsampled on a regular grid (statistics only).

    Raises:
        InputNotFoundError: The file does not exist.
        ConfigError: The file is not a readable image.
    """
    import numpy as np
    import torch
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: no such stain reference image (--stain-reference)")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises several unrelated types
        raise ConfigError(f"{p}: not a readable image ({one_line(exc)}); give a PNG/JPEG/TIFF tile as --stain-reference") from exc
    step = max(1, int(np.ceil(np.sqrt(arr.shape[0] * arr.shape[1] / max_pixels))))
    arr = arr[::step, ::step]
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].double() / 255.0
