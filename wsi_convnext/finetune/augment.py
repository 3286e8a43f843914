"""Colour augmentation for training on H&E: HED stain jitter plus brightness/contrast/saturation.

Local implementation until the tile-transform registry (``wsi_convnext/transforms``) lands; it
follows that interface: a callable on float RGB (B, 3, H, W) in [0, 1] on any device, returning
the same shape, with ``.key`` and ``.attrs``. The lead swaps it for the registered transform at
merge (this module is the ONE place to change).

HED jitter (after Tellez et al., 2018): RGB → optical density ``OD = -log(max(x, 1/255))`` →
stain concentrations with the inverse of Ruifrok & Johnston's H&E-DAB matrix → each stain
scaled by ``U(1-σ, 1+σ)`` and shifted by ``U(-σ, σ)`` → back to RGB. Random draws come from
the generator passed per call, so a batch's augmentation is a function of (seed, step).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ColourJitter"]

# Rows: haematoxylin, eosin, DAB optical-density vectors (Ruifrok & Johnston 2001, as in skimage).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_EPS = 1.0 / 255.0


class ColourJitter:
    """HED jitter (σ) then brightness/contrast/saturation jitter (± ``bcs``), per image.

    Args:
        hed_sigma: Stain scale/shift strength; 0 turns HED jitter off.
        bcs: Brightness, contrast and saturation jitter strength; 0 turns it off.
    """

    def __init__(self, hed_sigma: float = 0.05, bcs: float = 0.1) -> None:
        self.hed_sigma = float(hed_sigma)
        self.bcs = float(bcs)

    @property
    def key(self) -> str:
        return f"hedjitter-{self.hed_sigma:g}-bcs-{self.bcs:g}"

    @property
    def attrs(self) -> dict[str, Any]:
        return {"name": "hed_jitter", "hed_sigma": self.hed_sigma, "bcs": self.bcs}

    def stats(self) -> dict[str, Any]:
        return {}

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]

        def u(*shape: int) -> torch.Tensor:  # U(-1, 1) on CPU from the generator, then moved
            return (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device, torch.float32)

        if self.hed_sigma > 0:
            m_in = _HED_FROM_RGB.to(x.device, torch.float32)
            m_out = _RGB_FROM_HED.to(x.device, torch.float32)
            od = -torch.log(x.float().clamp_min(_EPS))  # (B, 3, H, W)
            hed = torch.einsum("bchw,cd->bdhw", od, m_in)
            scale = 1 + self.hed_sigma * u(b, 3, 1, 1)
            shift = self.hed_sigma * u(b, 3, 1, 1)
            hed = hed * scale + shift
            x = torch.exp(-torch.einsum("bdhw,dc->bchw", hed, m_out)).clamp_(0, 1)
        if self.bcs > 0:
            x = x * (1 + self.bcs * u(b, 1, 1, 1))  # brightness
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + self.bcs * u(b, 1, 1, 1)) + mean  # contrast
            grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - grey) * (1 + self.bcs * u(b, 1, 1, 1)) + grey  # saturation
            x = x.clamp_(0, 1)
        return x
