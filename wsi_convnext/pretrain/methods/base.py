"""The interface of a self-supervised method (see :mod:`wsi_convnext.pretrain.methods`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from . import METHODS

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["SslMethod", "effective_rank", "mlp", "register_method"]

M = TypeVar("M", bound="type[SslMethod]")


class SslMethod(nn.Module):
    """A student backbone plus the method's heads; the projection heads are discarded at the end.

    Attributes:
        description: One line for ``--method``'s help.
        multi_crop: Whether the method takes local crops (``n_local`` per tile) besides the global ones.
        n_local: Local crops per tile the method uses (0: global crops only).
    """

    description: str = ""
    multi_crop: bool = False
    n_local: int = 0

    def __init__(self, backbone: nn.Module, num_features: int, config: PretrainConfig) -> None:
        super().__init__()
        self.student = backbone

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch and detached statistics.

        Args:
            global_views: (G, B, 3, S, S) preprocessed global crops of the B tiles of this rank.
            local_views: (L, B, 3, s, s) local crops, or None.
        """
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (``step`` = steps done), e.g. for an EMA teacher."""

    def export_backbone(self) -> nn.Module:
        """The backbone the method hands out (the student, or a teacher)."""
        return self.student


def register_method(name: str, *, replace: bool = False) -> Callable[[M], M]:
    """Class decorator that adds an :class:`SslMethod` subclass to :data:`METHODS` under ``name``
    (the :class:`~wsi_convnext._registry.Registry` rule)."""

    def deco(cls: M) -> M:
        METHODS.register(name, cls, replace=replace)
        return cls

    return deco


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear–GELU stack (no batch norm, so a sample's output never depends on its batch)."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    net = nn.Sequential(*mods)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of (N, D) features: exp of the entropy of the normalised
    singular values of the centred matrix; 1 = collapsed onto one direction, min(N, D) = full."""
    x = features.detach().double()
    x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))
