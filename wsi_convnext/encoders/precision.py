"""The one precision policy: how a model runs on a device (embed, finetune, predict-tiles, pretrain).

On CUDA the model runs under autocast, bfloat16 where the GPU supports it, else float16, on
channels-last tensors fed from pinned memory with non-blocking copies; on CPU and MPS it runs
in float32 (``amp`` is ignored there). :func:`resolve_precision` is the one entry point;
:meth:`Precision.autocast` is the one way to enter it, and :meth:`Precision.grad_scaler` the loss
scaling that training under it needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "Precision", "resolve_precision"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """How a model runs on one device.

    Attributes:
        name: Compute precision (``float32``, ``bfloat16`` or ``float16``), recorded in outputs.
        autocast_dtype: ``torch`` dtype name for autocast, or None for plain float32.
        channels_last: Feed channels-last tensors to a channels-last model.
        pin_memory: Put host batches in pinned memory and copy them without blocking.
    """

    name: str
    autocast_dtype: str | None
    channels_last: bool
    pin_memory: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for ``device`` (a no-op context in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device.type, dtype=getattr(torch, self.autocast_dtype))

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The loss scaler for training under this policy: active for float16 autocast only.

        Use ``scaler.scale(loss).backward()``, ``scaler.step(optimizer)``, ``scaler.update()``;
        disabled, these are plain ``backward``/``step``.
        """
        import torch

        return torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == "float16")


def _cuda_precision(dev: torch.device, amp: bool) -> Precision:
    import torch

    if not amp:
        return Precision("float32", None, True, True)
    if torch.cuda.is_bf16_supported():
        return Precision("bfloat16", "bfloat16", True, True)
    return Precision("float16", "float16", True, True)


def _fp32_precision(dev: torch.device, amp: bool) -> Precision:
    if amp:
        logger.info("AMP is only used on CUDA; running in float32 on %s", dev)
    return Precision("float32", None, False, False)


#: Precision policy by ``torch.device.type``: ``f(device, amp) -> Precision``.
PRECISIONS: dict[str, Callable[[Any, bool], Precision]] = {
    "cuda": _cuda_precision,
    "cpu": _fp32_precision,
    "mps": _fp32_precision,
}

#: Whether AMP is on when ``amp=None``, by device type.
_AMP_DEFAULT: dict[str, bool] = {"cuda": True}


def resolve_precision(device: torch.device, amp: bool | None = None, channels_last: bool | None = None) -> Precision:
    """The precision policy for ``device`` (:data:`PRECISIONS`; float32 for other device types).

    Args:
        device: A resolved device (:func:`~wsi_convnext.encoders.resolve_device`).
        amp: Autocast (None: the device type's default, on for CUDA only).
        channels_last: Override the policy's memory layout (default: channels-last on CUDA).
    """
    policy = PRECISIONS.get(device.type, _fp32_precision)
    p = policy(device, _AMP_DEFAULT.get(device.type, False) if amp is None else bool(amp))
    if channels_last is not None and channels_last != p.channels_last:
        p = replace(p, channels_last=bool(channels_last))
    return p
