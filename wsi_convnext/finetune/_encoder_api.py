"""Adapter to the Encoder training API (issue 8): the ONE place to swap at merge.

The encoders package (helper ``enc``) adds ``Encoder.train()``, ``Encoder.parameter_groups()``
and ``Encoder.preprocess(..., transform=)``. Until it is merged, these functions emulate them on
``Encoder.model`` (the timm ConvNeXt); afterwards each body becomes one call of the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..encoder import Encoder


def parameter_groups(encoder: Encoder) -> dict[str, list[torch.nn.Parameter]]:
    """``{"stem", "stages.0", ..., "stages.N-1", "head"}`` → parameters, each parameter once."""
    model = encoder.model
    groups: dict[str, list[torch.nn.Parameter]] = {"stem": list(model.stem.parameters())}
    for i, stage in enumerate(model.stages):
        groups[f"stages.{i}"] = list(stage.parameters())
    seen = {id(p) for ps in groups.values() for p in ps}
    groups["head"] = [p for p in model.parameters() if id(p) not in seen]
    return groups


def set_train(encoder: Encoder, mode: bool = True) -> None:
    """Put the encoder's network in train (or eval) mode."""
    encoder.model.train(mode)


def preprocess(
    encoder: Encoder, tiles: torch.Tensor, *, device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """uint8 (B, H, W, 3) → [0, 1] → ``transform`` → mean/std normalised float (B, 3, H, W) on ``device``."""
    import torch

    x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if transform is not None:
        x = transform(x)
    mean = torch.tensor(encoder.preprocessing["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.preprocessing["std"], device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if encoder.channels_last else torch.contiguous_format)
