"""SimCLR (Chen et al., 2020): two global crops per tile, NT-Xent over the *global* batch.

Embeddings are gathered from every rank with gradients (``torch.distributed.nn.all_gather``),
so the negatives, the loss and the gradient are those of one process holding the whole batch.
The projection head is discarded; the student backbone is the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import SslMethod, mlp, register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["SimCLR"]


def _gather(z: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(z), 0)
    return z


@register_method("simclr")
class SimCLR(SslMethod):
    """See the module docstring."""

    description = "SimCLR: two global crops, NT-Xent contrastive loss over the global batch"

    def __init__(self, backbone: nn.Module, num_features: int, config: PretrainConfig) -> None:
        super().__init__(backbone, num_features, config)
        self.head = mlp(num_features, 512, 128)
        self.temperature = float(config.temperature)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = F.normalize(self.head(self.student(global_views[:2].flatten(0, 1))).float(), dim=-1)
        a, b = (_gather(part) for part in z.chunk(2))
        n = a.shape[0]
        z = torch.cat([a, b], 0)
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        loss = F.cross_entropy(sim, target)
        with torch.no_grad():
            acc = (sim.argmax(1) == target).float().mean()
        return loss, {"contrastive_accuracy": acc}
