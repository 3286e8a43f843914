"""Training augmentations as tile transforms: HED jitter and brightness/contrast.

Both draw one set of random factors per tile from a ``torch.Generator`` on the CPU (so the
sequence is the same on every device) and apply them vectorised on the batch's device. As
transforms they use their own seeded generator (a fixed seed and call order give identical
output); :meth:`~_Seeded.apply` takes the caller's generator instead, which is how encoder
training makes a batch's augmentation a function of (seed, step) and resumes bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .base import TileTransform, TransformSpec, register_transform

if TYPE_CHECKING:
    import torch

__all__ = ["BrightnessContrast", "HedJitter", "RGB_FROM_HED"]

#: Ruifrok & Johnston's H&E-DAB colour deconvolution matrix (rows: OD of H, E, DAB), as in skimage.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


class _Seeded(TileTransform):
    """Base of the augmentations: dataclasses whose fields (float widths, then ``seed``) are the parameters."""

    seed: int

    def __post_init__(self) -> None:
        import torch

        for f in fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, int(getattr(self, f.name)) if f.name == "seed" else float(getattr(self, f.name)))
        self.generator = torch.Generator().manual_seed(self.seed)
        self._tiles = 0

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.generator)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Transform ``x`` with random factors drawn from ``generator`` (override)."""
        raise NotImplementedError

    @staticmethod
    def _uniform(
        shape: tuple[int, ...], low: float, high: float, like: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        import torch

        u = torch.rand(shape, generator=generator, dtype=torch.float32)
        return (low + (high - low) * u).to(like.device, like.dtype)

    def stats(self) -> dict[str, int]:
        return {"tiles": self._tiles}


@dataclass(eq=False, repr=False)
class HedJitter(_Seeded):
    """HED colour augmentation (Tellez et al., 2018): per tile and stain, ``s' = a·s + b``.

    The tile is deconvolved into haematoxylin, eosin and DAB optical densities (natural log,
    Ruifrok & Johnston matrix), each is scaled by ``a ~ U(1 - sigma, 1 + sigma)`` and shifted by
    ``b ~ U(-bias, bias)`` (OD units), and the tile is recomposed.

    Args:
        sigma: Half-width of the scale factors.
        bias: Half-width of the OD shifts.
        seed: Seed of the generator.
    """

    name = "hed_jitter"
    sigma: float = 0.05
    bias: float = 0.02
    seed: int = 0

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        b = x.shape[0]
        m = torch.tensor(RGB_FROM_HED, dtype=torch.float32).to(x.device, x.dtype)  # (3 stains, 3 rgb)
        od = -x.clamp_min(1e-6).log()  # (B, 3, H, W), natural-log OD
        stains = torch.einsum("cs,bchw->bshw", torch.linalg.inv(m), od)  # od = stains @ m
        a = self._uniform((b, 3, 1, 1), 1 - self.sigma, 1 + self.sigma, x, generator)
        shift = self._uniform((b, 3, 1, 1), -self.bias, self.bias, x, generator)
        od = torch.einsum("sc,bshw->bchw", m, stains * a + shift)
        self._tiles += b
        return torch.exp(-od).clamp(0, 1)


@dataclass(eq=False, repr=False)
class BrightnessContrast(_Seeded):
    """Random brightness and contrast per tile: ``x' = (b·x - m)·c + m``, clipped to [0, 1].

    ``b ~ U(1 - brightness, 1 + brightness)``, ``c ~ U(1 - contrast, 1 + contrast)``, and ``m`` is
    the tile's mean grey level after the brightness change (as torchvision's ColorJitter).

    Args:
        brightness: Half-width of the brightness factor.
        contrast: Half-width of the contrast factor.
        seed: Seed of the generator.
    """

    name = "brightness_contrast"
    brightness: float = 0.1
    contrast: float = 0.1
    seed: int = 0

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        bf = self._uniform((b, 1, 1, 1), 1 - self.brightness, 1 + self.brightness, x, generator)
        cf = self._uniform((b, 1, 1, 1), 1 - self.contrast, 1 + self.contrast, x, generator)
        y = (x * bf).clamp(0, 1)
        grey = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).mean(dim=(1, 2)).view(b, 1, 1, 1)
        self._tiles += b
        return ((y - grey) * cf + grey).clamp(0, 1)


register_transform(TransformSpec("hed_jitter", HedJitter, "augmentation", "HED stain jitter (training augmentation)"))
register_transform(
    TransformSpec("brightness_contrast", BrightnessContrast, "augmentation", "random brightness/contrast (training)")
)
