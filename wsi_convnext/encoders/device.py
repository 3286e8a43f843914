"""Compute devices: the device strings users may give, and turning one into a usable :class:`torch.device`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_FORMS", "check_device", "resolve_device"]

#: The device strings users may give (the one list for help texts, checks and messages).
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps(:0)?)$")


def check_device(device: Any) -> str | None:
    """``param()`` check of a device string (its form only; no torch import): ``"must be ..."`` or None."""
    ok = isinstance(device, str) and _DEVICE.match(device.strip().lower())
    return None if ok else f"must be {DEVICE_FORMS}"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a device string (:data:`DEVICE_FORMS`) or a :class:`torch.device` into a usable device.

    ``"auto"`` (or ``None``) picks CUDA if available, else MPS if available, else CPU; a
    :class:`torch.device` is returned as it is.

    Raises:
        DeviceError: The device string is unknown or the device is not available (one line
            that says which device to use instead).
    """
    import torch

    if isinstance(device, torch.device):
        return device
    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:  # the form was checked where the string entered (check_device); torch's own refusal, in our words
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"device must be {DEVICE_FORMS}, got {device!r}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(
                f"device {device!r} requested but only {count} CUDA device(s) exist; use cuda:0..{count - 1}"
            )
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(
                f"device {device!r} requested but MPS is not available; use --device cpu or --device auto"
            )
        return dev
    raise DeviceError(f"device {device!r} is not supported: use {DEVICE_FORMS}")
