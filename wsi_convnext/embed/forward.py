"""The model's forward pass on a device: the precision policy applied and the compile cache."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..encoders.precision import Precision, resolve_precision
from ..errors import EncoderError, one_line

if TYPE_CHECKING:
    import torch

    from ..encoders import Encoder

__all__ = ["prepare_forward"]

# Compiled models per encoder, device and layout: torch.compile is expensive, so a cohort run
# compiles once and reuses it for every slide. Keyed by the encoder (not its model, which the
# compiled module references) so that an unused encoder and its compiled model can be freed.
_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[str, bool], Callable[..., Any]]] = weakref.WeakKeyDictionary()


def _forward_fn(encoder: Encoder, dev: torch.device, compile: bool) -> Callable[..., Any]:
    if not compile:
        return encoder.model
    import torch

    cache = _COMPILED.setdefault(encoder, {})
    key = (str(dev), bool(encoder.channels_last))
    fn = cache.get(key)
    if fn is None:
        try:
            fn = torch.compile(encoder.model, dynamic=False)
        except Exception as exc:  # backend missing (e.g. no C compiler)
            msg = f"torch.compile failed for {encoder.key} ({one_line(exc)}); run without --compile"
            raise EncoderError(msg) from exc
        cache[key] = fn
    return fn


def prepare_forward(
    encoder: Encoder,
    device: str | torch.device | None = "auto",
    *,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Precision]:
    """Move ``encoder`` to ``device`` and return its forward pass under the device's precision policy.

    The returned function maps a preprocessed (B, 3, H, W) float batch on the device to
    (B, D) embeddings (autocast on CUDA by default). Call it under ``torch.inference_mode``.

    Args:
        encoder: Moved to ``device`` and switched to the policy's memory layout in place.
        device: See :func:`~wsi_convnext.encoders.resolve_device`.
        amp: Autocast (CUDA only; default on there).
        channels_last: Override the policy's memory layout (default: channels-last on CUDA).
        compile: Use ``torch.compile`` (compiled once per model, device and layout).

    Raises:
        DeviceError: The device is not available.
        EncoderError: ``torch.compile`` failed.
    """
    import torch

    from ..encoders import resolve_device

    dev = resolve_device(device)
    prec = resolve_precision(dev, amp, channels_last)
    encoder.to(dev, channels_last=prec.channels_last)
    model = _forward_fn(encoder, dev, compile)
    if prec.autocast_dtype is None:
        return model, prec

    def forward(x: torch.Tensor) -> torch.Tensor:
        with prec.autocast(dev):
            return model(x)

    return forward, prec
