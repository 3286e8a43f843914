"""The registry of self-supervised methods: one module each, imported (with torch) when built.

A method is an ``nn.Module`` (:class:`~.base.SslMethod`) holding the student backbone and its
heads (and a teacher where it has one); ``forward(views)`` returns the loss and detached
statistics. Adding a method is one module defining a subclass plus one :data:`METHODS` entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..config import PretrainConfig
    from .base import SslMethod

__all__ = ["DEFAULT_METHOD", "METHODS", "MethodSpec", "build_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``module`` (relative to this package) defines the class ``cls``."""

    name: str
    description: str
    module: str
    cls: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("dino", "DINO self-distillation: student + EMA teacher, multi-crop, centring and sharpening",
                   ".dino", "Dino"),
        MethodSpec("simclr", "SimCLR: two global crops, NT-Xent contrastive loss over the global batch",
                   ".simclr", "SimCLR"),
    )
}  # fmt: skip
DEFAULT_METHOD = "dino"


def build_method(name: str, backbone: nn.Module, num_features: int, config: PretrainConfig) -> SslMethod:
    """Instantiate method ``name`` around ``backbone`` (heads initialised under ``config.seed``).

    Raises:
        ConfigError: Unknown method.
    """
    import torch

    spec = METHODS.get(name)
    if spec is None:
        raise ConfigError(f"unknown pretraining method {name!r}: choose one of {', '.join(METHODS)}")
    cls: Any = getattr(importlib.import_module(spec.module, __name__), spec.cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 104729)
        return cls(backbone, num_features, config)
