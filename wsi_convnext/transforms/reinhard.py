"""Reinhard colour normalisation, batched in torch.

Method (Reinhard et al., 2001, as used for H&E): convert each tile to CIE L*a*b*, and map
each channel so that its mean and standard deviation over the tile's stained pixels match
the reference's (stained: optical density ≥ ``beta`` in any channel, i.e. everything but
glass, so the amount of glass does not skew the statistics); convert back to sRGB.

Robustness: a tile with fewer than ``min_tissue`` stained pixels, or a channel standard
deviation below ``min_std`` (flat, low-contrast tiles whose noise would be amplified), is
left unchanged and counted in :meth:`ReinhardNormalizer.stats`.

Reference: a tile or image given by path, or the built-in :data:`BUILTIN_LAB_MEAN` /
:data:`BUILTIN_LAB_STD`: the L*a*b* statistics of the stained pixels of the public OpenSlide
test slide CMU-1-Small-Region.svs (Aperio H&E, level 0), measured with this module.

Written here rather than taken from torchstain because torchstain's Reinhard works on one
image at a time, uses all pixels (glass included) and has no fallback (see ``macenko``).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from .._io import file_sha256
from ..errors import ConfigError
from . import _color
from .base import FallbackCounts, TileTransform, TransformSpec, register_transform

if TYPE_CHECKING:
    import torch

__all__ = ["BUILTIN_LAB_MEAN", "BUILTIN_LAB_STD", "ReinhardNormalizer", "lab_statistics"]

#: Built-in reference L*a*b* means of stained pixels (CMU-1-Small-Region.svs).
BUILTIN_LAB_MEAN = (47.639, 28.844, -12.454)
#: Built-in reference L*a*b* standard deviations of stained pixels (CMU-1-Small-Region.svs).
BUILTIN_LAB_STD = (19.202, 12.669, 9.891)


def lab_statistics(
    rgb: torch.Tensor, *, beta: float = 0.15, io: float = 240.0, min_tissue: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L*a*b* image and per-tile channel mean/std over stained pixels.

    Args:
        rgb: (B, 3, H, W) float RGB in [0, 1].
        beta, io: Stained-pixel threshold (optical density, every channel) and light intensity.
        min_tissue: Least fraction of stained pixels for a tile to count as valid.

    Returns:
        ``lab`` (B, 3, H·W), ``mean`` (B, 3), ``std`` (B, 3), ``valid`` (B,) bool.
    """
    b = rgb.shape[0]
    flat = rgb.reshape(b, 3, -1)
    mask = _color.tissue_pixels(_color.optical_density(flat, io), beta, every_channel=False)
    n = mask.sum(1)
    valid = n >= max(2, math.ceil(min_tissue * flat.shape[-1]))
    lab = _color.rgb_to_lab(flat)
    w = mask.to(lab.dtype).unsqueeze(1)
    mean = (lab * w).sum(-1) / n.clamp_min(1).unsqueeze(1)
    var = (((lab - mean.unsqueeze(-1)) * w) ** 2).sum(-1) / (n - 1).clamp_min(1).unsqueeze(1)
    return lab, mean, var.sqrt(), valid


class ReinhardNormalizer(TileTransform):
    """Reinhard L*a*b* mean/std normalisation to a reference (see the module docstring).

    Args:
        reference: Path of a reference tile or image, or None for the built-in reference.
        beta, io, min_tissue: See :func:`lab_statistics`.
        min_std: Least per-channel L*a*b* standard deviation of a tile to be normalised.

    Raises:
        InputNotFoundError: ``reference`` does not exist.
        ConfigError: ``reference`` is not an image or holds too little stained tissue.
    """

    name = "reinhard"

    def __init__(
        self, reference: str | os.PathLike[str] | None = None, *, beta: float = 0.15, io: float = 240.0,
        min_tissue: float = 0.05, min_std: float = 0.5,
    ) -> None:
        import torch

        self.settings = {"beta": float(beta), "io": float(io), "min_tissue": float(min_tissue)}
        self.min_std = float(min_std)
        if reference is None:
            mean = torch.tensor(BUILTIN_LAB_MEAN, dtype=torch.float64)
            std = torch.tensor(BUILTIN_LAB_STD, dtype=torch.float64)
            self.reference: dict[str, Any] = {"reference": "built-in"}
        else:
            _, m, s, ok = lab_statistics(_color.load_reference(reference), **self.settings)
            if not bool(ok[0]) or bool((s[0] < self.min_std).any()):
                raise ConfigError(f"{reference}: too little stained tissue to fit a Reinhard reference; give an H&E tissue tile")
            mean, std = m[0], s[0]
            self.reference = {"reference": str(reference), "reference_sha256": file_sha256(reference)}
        self.lab_mean = mean.to(torch.float32)
        self.lab_std = std.to(torch.float32)
        self._fallbacks = FallbackCounts()

    def params(self) -> dict[str, Any]:
        return {
            "lab_mean": [round(float(v), 3) for v in self.lab_mean.tolist()],
            "lab_std": [round(float(v), 3) for v in self.lab_std.tolist()],
            "min_std": self.min_std,
            **self.settings,
        }

    @property
    def attrs(self) -> dict[str, Any]:
        return {**super().attrs, **self.reference}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        b, _, h, w = x.shape
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        lab, mean, std, valid = lab_statistics(xf, **self.settings)
        valid &= (std >= self.min_std).all(1)
        ref_mean = self.lab_mean.to(xf.device, xf.dtype).view(1, 3, 1)
        ref_std = self.lab_std.to(xf.device, xf.dtype).view(1, 3, 1)
        lab = (lab - mean.unsqueeze(-1)) * (ref_std / std.clamp_min(1e-6).unsqueeze(-1)) + ref_mean
        out = _color.lab_to_rgb(lab).reshape(b, 3, h, w).to(x.dtype)
        return self._fallbacks.keep_valid(out, x, valid)

    def stats(self) -> dict[str, int]:
        """``tiles`` seen and ``identity_fallbacks`` (tiles left unchanged: background or flat)."""
        return self._fallbacks.as_dict()


register_transform(
    TransformSpec("reinhard", ReinhardNormalizer, "stain", "Reinhard L*a*b* mean/std normalisation to a reference")
)
