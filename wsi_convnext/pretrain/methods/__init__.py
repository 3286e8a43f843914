"""The registry of self-supervised methods: one module each, imported (with torch) when looked up.

A method is an ``nn.Module`` subclass of :class:`~.base.SslMethod` holding the student backbone
and its heads (and a teacher where it has one); ``forward(views)`` returns the loss and detached
statistics. Adding a method is one module that registers its class with
``@register_method("name")`` (:mod:`.base`); a built-in is also declared by name in
:data:`METHODS` and imported by :mod:`.builtin`, so listing names (``--help``) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from ..config import PretrainConfig
    from .base import SslMethod

__all__ = ["DEFAULT_METHOD", "METHODS", "build_method"]

#: Registry: method name → :class:`~.base.SslMethod` subclass (whose ``description`` is its help line).
METHODS: Registry[Any] = Registry("pretraining method", loader=f"{__name__}.builtin", declares=("dino", "simclr"))
DEFAULT_METHOD = "dino"


def build_method(name: str, backbone: nn.Module, num_features: int, config: PretrainConfig) -> SslMethod:
    """Instantiate method ``name`` around ``backbone`` (heads initialised under ``config.seed``).

    Raises:
        ConfigError: Unknown method.
    """
    import torch

    cls = METHODS.lookup(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 104729)
        return cls(backbone, num_features, config)
