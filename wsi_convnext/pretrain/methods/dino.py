"""DINO self-distillation (Caron et al., 2021) for ConvNets.

The student sees all crops (2 global + ``n_local`` local), the teacher (an EMA of the
student, momentum cosine from ``ema`` to 1) the global ones. The loss is the cross-entropy
between the teacher's centred, sharpened (``teacher_temp``) distribution and the student's
(``student_temp``) over every (teacher view, other student view) pair. The centre is an EMA of
the teacher's mean output over the *global* batch (all-reduced across ranks). The projection
heads are discarded; the teacher's backbone is the result, as in the paper.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import SslMethod, mlp, register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["Dino", "DinoHead"]


class DinoHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normalised prototypes (norm fixed to 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden, bottleneck, layers=3)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


@register_method("dino")
class Dino(SslMethod):
    """See the module docstring."""

    description = "DINO self-distillation: student + EMA teacher, multi-crop, centring and sharpening"
    multi_crop = True

    def __init__(self, backbone: nn.Module, num_features: int, config: PretrainConfig) -> None:
        super().__init__(backbone, num_features, config)
        self.n_local = int(config.n_local)
        self.head = DinoHead(num_features, config.out_dim)
        self.teacher = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self.teacher_temp = float(config.teacher_temp)
        self.student_temp = float(config.student_temp)
        self.center_momentum = float(config.center_momentum)
        self.ema = float(config.ema)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g, b = global_views.shape[:2]
        s_out = [self.head(self.student(global_views.flatten(0, 1))).chunk(g)]
        if local_views is not None and len(local_views):
            s_out.append(self.head(self.student(local_views.flatten(0, 1))).chunk(local_views.shape[0]))
        student = [s.float() / self.student_temp for part in s_out for s in part]
        with torch.no_grad():
            t_logits = self.teacher_head(self.teacher(global_views.flatten(0, 1))).float()
            t_prob = F.softmax((t_logits - self.center) / self.teacher_temp, dim=-1)
            teacher = t_prob.chunk(g)
        total, n = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n += 1
        loss = total / n
        with torch.no_grad():
            batch_center = t_logits.sum(0, keepdim=True)
            count = torch.tensor([float(t_logits.shape[0])], device=t_logits.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(batch_center)
                torch.distributed.all_reduce(count)
            self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)
            entropy = -(t_prob * t_prob.clamp_min(1e-12).log()).sum(-1).mean()
        return loss, {"teacher_entropy": entropy}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = 1 - (1 - self.ema) * (math.cos(math.pi * min(1.0, step / max(1, total_steps))) + 1) / 2
        for ps, pt in zip(
            list(self.student.parameters()) + list(self.head.parameters()),
            list(self.teacher.parameters()) + list(self.teacher_head.parameters()),
        ):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def export_backbone(self) -> nn.Module:
        return self.teacher
