"""The tile-transform interface and registry.

A tile transform maps float RGB tiles ``(B, 3, H, W)`` in [0, 1] on any device to the same
shape, vectorised over the batch so it runs where the batch is (the GPU during embedding).
It is applied after uint8 → [0, 1] and before the encoder's mean/std normalisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._io import json_sha256
from ..errors import ConfigError
from .._registry import Registry

if TYPE_CHECKING:
    import torch

__all__ = ["TRANSFORMS", "FallbackCounts", "TileTransform", "TransformSpec", "build_transform", "params_key", "register_transform"]


def params_key(params: dict[str, Any], n: int = 8) -> str:
    """First ``n`` hex digits of the canonical-JSON sha256 of ``params`` (floats rounded to 6 decimals)."""
    return json_sha256(params, n, round_floats=6)


class TileTransform:
    """Base class of tile transforms: callable on (B, 3, H, W) float RGB in [0, 1].

    Subclasses set :attr:`name`, implement :meth:`forward` and :meth:`params` (the JSON-able
    parameters that determine the output, reference included), and may count events in
    :meth:`stats`.
    """

    name: str = "transform"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ConfigError(f"{self.name}: tiles must be float RGB (B, 3, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}")
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform a batch (override)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that determine the output (override)."""
        return {}

    @property
    def key(self) -> str:
        """Short filesystem-safe name with a hash of the parameters, e.g. ``macenko-1a2b3c4d``."""
        return f"{self.name}-{params_key(self.params())}"

    @property
    def attrs(self) -> dict[str, Any]:
        """JSON-able provenance: name, key and parameters."""
        return {"name": self.name, "key": self.key, **self.params()}

    def stats(self) -> dict[str, int]:
        """Counters since construction (e.g. tiles seen, tiles left unchanged)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r})"


class FallbackCounts:
    """Counts tiles seen and tiles left unchanged, per device, without a host sync per batch."""

    def __init__(self) -> None:
        self._by_device: dict[str, torch.Tensor] = {}

    def add(self, valid: torch.Tensor) -> None:
        """Record a batch; ``valid`` (B,) bool is False for tiles that fell back to identity."""
        import torch

        counts = torch.stack([torch.ones_like(valid, dtype=torch.int64).sum(), (~valid).sum()])
        dev = str(valid.device)
        self._by_device[dev] = self._by_device[dev] + counts if dev in self._by_device else counts

    def keep_valid(self, out: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``out`` where ``valid`` (B,) is True, the input ``x`` elsewhere (identity); records the batch."""
        import torch

        self.add(valid)
        return torch.where(valid.view(-1, 1, 1, 1), out, x)

    def as_dict(self) -> dict[str, int]:
        """``{"tiles": n, "identity_fallbacks": k}`` (syncs with the devices)."""
        tiles = fallbacks = 0
        for c in self._by_device.values():
            t, f = c.tolist()
            tiles, fallbacks = tiles + int(t), fallbacks + int(f)
        return {"tiles": tiles, "identity_fallbacks": fallbacks}


@dataclass(frozen=True)
class TransformSpec:
    """A registered transform.

    Attributes:
        name: Registry name (``--stain`` for stain normalisers).
        factory: ``factory(**params) -> TileTransform``.
        kind: ``"stain"`` (normalisation, deterministic) or ``"augmentation"`` (random, training).
        description: One line for help texts.
    """

    name: str
    factory: Callable[..., TileTransform]
    kind: str
    description: str


#: Registered transforms by name (``none`` is handled by :func:`build_transform`).
TRANSFORMS: Registry[TransformSpec] = Registry("tile transform")


def register_transform(spec: TransformSpec, *, replace: bool = False) -> TransformSpec:
    """Add a transform to :data:`TRANSFORMS` (the :class:`~wsi_convnext._registry.Registry` rule)."""
    return TRANSFORMS.register(spec.name, spec, replace=replace)


def build_transform(name: str, **params: Any) -> TileTransform | None:
    """Build a registered transform; ``"none"`` gives None.

    Raises:
        ConfigError: Unknown name or parameters, or a bad reference.
        InputNotFoundError: A reference image does not exist.
    """
    given = {k: v for k, v in params.items() if v is not None}
    if name in ("none", "", None):
        if given:
            raise ConfigError(f"transform 'none' takes no parameters (got {', '.join(given)}); drop --stain-reference")
        return None
    factory = TRANSFORMS.lookup(name).factory
    try:
        inspect.signature(factory).bind(**given)
    except TypeError as exc:
        raise ConfigError(f"transform {name!r}: {exc}") from exc
    return factory(**given)
