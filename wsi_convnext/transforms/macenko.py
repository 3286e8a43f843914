"""Macenko stain normalisation, batched in torch.

Method (Macenko et al., ISBI 2009): per tile, convert RGB to optical density (OD, Beer–Lambert),
keep the pixels with OD ≥ ``beta`` in every channel, find the plane of the two largest
principal components of their OD, take the ``alpha`` and ``100 - alpha`` percentile angles in
that plane as the haematoxylin and eosin directions (the one with the larger red OD is H),
solve for each pixel's stain concentrations, scale them so their 99th percentile matches the
reference's, and re-render with the reference stain matrix.

Everything is vectorised over the batch (masked covariance, batched ``eigh``, sort-based
masked percentiles, closed-form 2×2 least squares), so a (B, 3, H, W) batch on the GPU is
normalised in a few kernel launches, without a host round trip.

Robustness: a tile is left unchanged (identity) and counted when it has too few stained
pixels (``min_tissue``: background, blank glass), when the two stain directions are less
than ``min_angle`` degrees apart (low contrast: one stain, pen ink, washed-out tiles), or when
the estimate is not finite. :meth:`MacenkoNormalizer.stats` reports the counts.

Reference: a tile or image given by path (fitted once, on the CPU in float64), or the
built-in one, :data:`BUILTIN_STAIN_MATRIX` and :data:`BUILTIN_MAX_CONCENTRATIONS`, the
reference values of Macenko's reference implementation that most ports use.

Why not torchstain: its Macenko normaliser (1.4) works on one image at a time, selects the
stained pixels by boolean indexing (a device sync and a variable shape per tile) and has no
fallback for background or single-stain tiles, so it is neither batched nor safe on raw WSI
tiles; this module is the same method, written for batches.
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

__all__ = ["BUILTIN_MAX_CONCENTRATIONS", "BUILTIN_STAIN_MATRIX", "MacenkoNormalizer", "estimate_stains"]

#: Built-in reference H&E stain matrix: columns are the unit OD vectors (R, G, B) of
#: haematoxylin and eosin (Macenko's reference implementation).
BUILTIN_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
#: Built-in reference 99th-percentile concentrations of H and E.
BUILTIN_MAX_CONCENTRATIONS = (1.9705, 1.0308)


def estimate_stains(
    rgb: torch.Tensor, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
    min_tissue: float = 0.05, min_angle: float = 3.0, max_samples: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tile stain matrices and concentrations of a batch.

    Args:
        rgb: (B, 3, H, W) float RGB in [0, 1].
        io: Transmitted light intensity (0–255 units).
        alpha: Percentile (0–100) of the stain angles taken as the extreme directions.
        beta: OD threshold of a stained pixel (every channel).
        min_tissue: Least fraction of stained pixels for a tile to be estimated.
        min_angle: Least angle in degrees between the two stain directions.
        max_samples: The stain estimate uses at most about this many pixels per tile, on a
            regular stride (percentiles of 16k pixels are as good as of 50k, at a third of the
            sort); the concentrations are computed for every pixel.

    Returns:
        ``stains`` (B, 3, 2) unit OD columns (H, E); ``conc`` (B, 2, H·W) concentrations;
        ``max_conc`` (B, 2) 99th percentiles over stained pixels; ``valid`` (B,) bool, False
        where the tile must be left unchanged. Invalid rows hold arbitrary finite values.
    """
    import torch

    b = rgb.shape[0]
    od_all = _color.optical_density(rgb.reshape(b, 3, -1), io)  # (B, 3, P)
    step = max(1, -(-od_all.shape[-1] // max_samples))
    od = od_all[..., ::step]
    mask = _color.tissue_pixels(od, beta)  # (B, P)
    n = mask.sum(dim=1)
    valid = n >= max(3, math.ceil(min_tissue * od.shape[-1]))
    w = mask.to(od.dtype).unsqueeze(1)
    mean = (od * w).sum(-1, keepdim=True) / n.clamp_min(1).view(b, 1, 1)
    centred = (od - mean) * w
    cov = centred @ centred.transpose(1, 2) / (n - 1).clamp_min(1).view(b, 1, 1)
    eye = torch.eye(3, dtype=od.dtype, device=od.device).expand(b, 3, 3)
    cov = torch.where(valid.view(b, 1, 1) & torch.isfinite(cov).all(-1).all(-1).view(b, 1, 1), cov, eye)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    plane = vecs[:, :, 1:]  # (B, 3, 2): second largest, largest
    plane = plane * torch.where(plane.sum(1, keepdim=True) < 0, -1.0, 1.0).to(od.dtype)  # point into OD > 0
    proj = plane.transpose(1, 2) @ od  # (B, 2, P)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = _color.masked_quantile(phi, mask, (alpha / 100, 1 - alpha / 100)).unbind(-1)
    v_lo = plane @ torch.stack([lo.cos(), lo.sin()], 1).unsqueeze(-1)  # (B, 3, 1)
    v_hi = plane @ torch.stack([hi.cos(), hi.sin()], 1).unsqueeze(-1)
    h_first = (v_lo[:, 0] > v_hi[:, 0]).view(b, 1, 1)
    stains = torch.where(h_first, torch.cat([v_lo, v_hi], 2), torch.cat([v_hi, v_lo], 2))
    valid &= (hi - lo).abs() >= math.radians(min_angle)
    conc = _lstsq(stains, od_all)
    sampled = conc[..., ::step]
    max_conc = _color.masked_quantile(sampled, mask.unsqueeze(1).expand_as(sampled), (0.99,))[..., 0]
    valid &= torch.isfinite(stains).all(-1).all(-1) & torch.isfinite(max_conc).all(-1) & (max_conc > 1e-3).all(-1)
    return stains, conc, max_conc, valid


def _lstsq(stains: torch.Tensor, od: torch.Tensor) -> torch.Tensor:
    """Least-squares concentrations (B, 2, P) of ``od`` (B, 3, P) in the columns of ``stains`` (B, 3, 2).

    Closed-form 2×2 normal equations: never raises on singular (invalid) tiles.
    """
    import torch

    g = stains.transpose(1, 2) @ stains  # (B, 2, 2)
    a, b_, c, d = g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1]
    det = a * d - b_ * c
    det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    inv = torch.stack([torch.stack([d, -b_], -1), torch.stack([-c, a], -1)], -2) / det.view(-1, 1, 1)
    return inv @ (stains.transpose(1, 2) @ od)


class MacenkoNormalizer(TileTransform):
    """Macenko stain normalisation to a reference (see the module docstring).

    Args:
        reference: Path of a reference tile or image, or None for the built-in reference.
        io, alpha, beta, min_tissue, min_angle, max_samples: See :func:`estimate_stains`.

    Raises:
        InputNotFoundError: ``reference`` does not exist.
        ConfigError: ``reference`` is not an image, or holds too little stained tissue.
    """

    name = "macenko"

    def __init__(
        self, reference: str | os.PathLike[str] | None = None, *, io: float = 240.0, alpha: float = 1.0,
        beta: float = 0.15, min_tissue: float = 0.05, min_angle: float = 3.0, max_samples: int = 16384,
    ) -> None:
        import torch

        self.settings = {"io": float(io), "alpha": float(alpha), "beta": float(beta),
                         "min_tissue": float(min_tissue), "min_angle": float(min_angle),
                         "max_samples": int(max_samples)}  # fmt: skip
        if reference is None:
            stains = torch.tensor(BUILTIN_STAIN_MATRIX, dtype=torch.float64)
            max_conc = torch.tensor(BUILTIN_MAX_CONCENTRATIONS, dtype=torch.float64)
            self.reference: dict[str, Any] = {"reference": "built-in"}
        else:
            image = _color.load_reference(reference)
            s, _, m, ok = estimate_stains(image, **self.settings)
            if not bool(ok[0]):
                raise ConfigError(
                    f"{reference}: too little two-stain tissue to fit a Macenko reference; give an H&E tissue tile"
                )
            stains, max_conc = s[0], m[0]
            self.reference = {"reference": str(reference), "reference_sha256": file_sha256(reference)}
        self.stain_matrix = stains.to(torch.float32)  # (3, 2)
        self.max_concentrations = max_conc.to(torch.float32)  # (2,)
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fallbacks = FallbackCounts()

    def params(self) -> dict[str, Any]:
        return {
            "stain_matrix": [[round(float(v), 4) for v in row] for row in self.stain_matrix.tolist()],
            "max_concentrations": [round(float(v), 4) for v in self.max_concentrations.tolist()],
            **self.settings,
        }

    @property
    def attrs(self) -> dict[str, Any]:
        return {**super().attrs, **self.reference}

    def _reference_on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = f"{x.device}:{x.dtype}"
        if k not in self._on:
            self._on[k] = (self.stain_matrix.to(x.device, x.dtype), self.max_concentrations.to(x.device, x.dtype))
        return self._on[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        b, _, h, w = x.shape
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        stains_ref, max_ref = self._reference_on(xf)
        _, conc, max_conc, valid = estimate_stains(xf, **self.settings)
        conc = conc * (max_ref / max_conc.clamp_min(1e-6)).unsqueeze(-1)
        out = (self.settings["io"] / 255.0) * torch.exp(-(stains_ref @ conc))  # (B, 3, P)
        out = out.clamp(0, 1).reshape(b, 3, h, w).to(x.dtype)
        return self._fallbacks.keep_valid(out, x, valid)

    def stats(self) -> dict[str, int]:
        """``tiles`` seen and ``identity_fallbacks`` (tiles left unchanged: background or low contrast)."""
        return self._fallbacks.as_dict()


register_transform(
    TransformSpec("macenko", MacenkoNormalizer, "stain",
                  "Macenko stain normalisation (stain matrix + max concentrations of a reference)")  # fmt: skip
)
