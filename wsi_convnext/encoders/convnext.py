"""The ConvNeXt encoder family: timm ConvNeXt models, their stems and the exact stem conversion.

Models: any timm ConvNeXt (``convnext_atto`` … ``convnext_xlarge``, ``convnextv2_*``; list them
with ``timm.list_models("convnext*")``), optionally with a pretrained tag.

Stems (:data:`STEMS`) are timm's own ``stem_type`` options, so the model is never forked:

- ``patch``: the stock stem, a 4×4 stride-4 conv followed by the norm layer.
- ``overlap``: Conv3×3 s2 (``dims[0]`` channels) → Conv3×3 s2 → norm, no activation; total stride 4.
- ``overlap_tiered``: as ``overlap`` with ``make_divisible(dims[0] // 2)`` middle channels.
- ``overlap_act``: as ``overlap`` with an activation between the convs.

A stock (patch-stem) checkpoint loaded into ``overlap``/``overlap_tiered`` is converted by
:func:`convert_patch_stem_to_overlap` (the family's checkpoint filter) so the network computes
*exactly* the same function at load time (for inputs whose height and width are multiples of
4, e.g. 224-px tiles); fine-tuning can then use the finer stem. ``overlap_act`` cannot be
converted; it needs an explicit ``stem_init="random"`` (documented, seeded fresh
initialisation of the stem).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._registry import Registry
from ..errors import EncoderError, WeightsError, one_line
from .base import EncoderFamily, register_family

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_STEM",
    "STEMS",
    "ConvNeXtFamily",
    "StemSpec",
    "convert_patch_stem_to_overlap",
    "register_stem",
]

logger = logging.getLogger(__name__)

DEFAULT_STEM = "patch"
#: The gentler overlapping stem (two 3×3 stride-2 convolutions), the demo's choice.
OVERLAP_STEM = "overlap"
_TIMM_MODULE = "convnext"
_FIRST_CONV = "stem.0"  # timm's pretrained_cfg['first_conv'] of every ConvNeXt


# --------------------------------------------------------------------------------------- stems


@dataclass(frozen=True)
class StemSpec:
    """One stem choice.

    Attributes:
        name: Registry name (``--stem``).
        timm_stem_type: ``stem_type`` passed to ``timm.models.convnext.ConvNeXt``.
        layout: State-dict layout of the stem: ``"patch"`` (stem.0 conv 4×4, stem.1 norm),
            ``"overlap"`` (stem.0 conv, stem.1 conv, stem.2 norm) or ``"overlap_act"``
            (stem.0 conv, stem.1 activation, stem.2 conv, stem.3 norm).
        exact_from_patch: Whether a patch-stem checkpoint converts exactly into this stem.
        description: One line for help texts.
    """

    name: str
    timm_stem_type: str
    layout: str
    exact_from_patch: bool
    description: str


#: Registry of stems by name. Extend with :func:`register_stem`.
STEMS: Registry[StemSpec] = Registry("stem", error=EncoderError)


def register_stem(spec: StemSpec, *, replace: bool = False) -> StemSpec:
    """Add a stem to :data:`STEMS` (the :class:`~wsi_convnext._registry.Registry` rule);
    ``spec.timm_stem_type`` must be one timm knows."""
    return STEMS.register(spec.name, spec, replace=replace)


register_stem(StemSpec(DEFAULT_STEM, "patch", "patch", True, "stock 4x4 stride-4 conv + norm"))
register_stem(
    StemSpec(OVERLAP_STEM, "overlap", "overlap", True, "conv3x3 s2 (dims[0] ch) -> conv3x3 s2 -> norm, no activation")
)
register_stem(
    StemSpec(
        "overlap_tiered", "overlap_tiered", "overlap", True, "conv3x3 s2 (dims[0]//2 ch) -> conv3x3 s2 -> norm"
    )
)
register_stem(
    StemSpec(
        "overlap_act",
        "overlap_act",
        "overlap_act",
        False,
        "conv3x3 s2 -> activation -> conv3x3 s2 -> norm (patch checkpoints need stem_init='random')",
    )
)


def _spec(stem: str | StemSpec) -> StemSpec | None:
    return stem if isinstance(stem, StemSpec) else STEMS.get(stem)


# ------------------------------------------------------------------------------ stem conversion


def convert_patch_stem_to_overlap(
    state_dict: Mapping[str, torch.Tensor],
    stem_type: str | StemSpec = "overlap",
    mid_chs: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rewrite a patch-stem ConvNeXt state dict for an overlapping stem, preserving the function.

    Two stacked 3×3 stride-2 convs (padding 1) without activation reproduce a 4×4 stride-4
    conv exactly. conv1 copies, at each of its positions, the 2×2 pixels of every input
    channel ``c`` at taps (1..2, 1..2) into channel ``m = 4c + 2dy + dx`` (weights 0/1, bias 0,
    other channels 0): ``h[m, p, q] = x[c, 2p + dy, 2q + dx]``. conv2 places these sub-blocks at
    its taps (1..2, 1..2): ``W2[o, m, 1 + a, 1 + b] = Wpatch[o, c, 2a + dy, 2b + dx]`` (tap 0
    zero, bias = patch bias), so ``y[o, i, j] = sum Wpatch[o, c, u, v] x[c, 4i + u, 4j + v]``.
    The norm layer (``stem.1.*``) moves to ``stem.2.*``. Exact when the input height and
    width are multiples of 4 (otherwise the overlap stem adds one border row/column).

    Args:
        state_dict: timm-layout state dict with a patch stem (``stem.0.weight`` of shape
            (dims0, in_chans, 4, 4)). Not modified.
        stem_type: Target stem (name or :class:`StemSpec`), ``"overlap"`` or ``"overlap_tiered"``.
        mid_chs: Middle channels of the target stem; default as timm: ``dims0`` for
            ``overlap``, ``make_divisible(dims0 // 2)`` for ``overlap_tiered``.

    Returns:
        A new state dict (other entries shared, not copied).

    Raises:
        EncoderError: The target stem cannot be reached exactly, or ``mid_chs < 4 * in_chans``.
        WeightsError: ``state_dict`` has no 4×4 patch stem.
    """
    import torch

    spec = _spec(stem_type)
    if spec is None or spec.layout != "overlap" or not spec.exact_from_patch:
        exact = sorted(n for n, s in STEMS.items() if s.layout == "overlap" and s.exact_from_patch)
        name = stem_type.name if isinstance(stem_type, StemSpec) else stem_type
        raise EncoderError(
            f"a patch stem converts exactly only to stems {exact}, not {name!r} "
            "(an activation inside the stem makes exact conversion impossible; use stem_init='random')"
        )
    w_patch = state_dict.get("stem.0.weight")
    if w_patch is None or w_patch.ndim != 4 or tuple(w_patch.shape[-2:]) != (4, 4):
        shape = None if w_patch is None else tuple(w_patch.shape)
        raise WeightsError(f"state dict has no 4x4 patch stem (stem.0.weight shape {shape}); cannot convert it")
    dims0, in_chans = int(w_patch.shape[0]), int(w_patch.shape[1])
    if mid_chs is None:
        if "tiered" in spec.timm_stem_type:
            from timm.layers import make_divisible

            mid_chs = int(make_divisible(dims0 // 2))
        else:
            mid_chs = dims0
    if mid_chs < 4 * in_chans:
        raise EncoderError(
            f"stem {spec.name!r} has {mid_chs} middle channels; exact conversion needs at least {4 * in_chans}"
        )

    w1 = torch.zeros(mid_chs, in_chans, 3, 3, dtype=w_patch.dtype)
    w2 = torch.zeros(dims0, mid_chs, 3, 3, dtype=w_patch.dtype)
    for c in range(in_chans):
        for dy in range(2):
            for dx in range(2):
                m = 4 * c + 2 * dy + dx
                w1[m, c, 1 + dy, 1 + dx] = 1.0
                for a in range(2):
                    for b in range(2):
                        w2[:, m, 1 + a, 1 + b] = w_patch[:, c, 2 * a + dy, 2 * b + dx]

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("stem.0."):
            continue
        if key.startswith("stem.1."):
            out["stem.2." + key[len("stem.1.") :]] = value
        else:
            out[key] = value
    out["stem.0.weight"] = w1
    out["stem.1.weight"] = w2
    b_patch = state_dict.get("stem.0.bias")
    if b_patch is not None:  # conv_bias=True models: conv1 gets a zero bias, conv2 the patch bias
        out["stem.0.bias"] = torch.zeros(mid_chs, dtype=b_patch.dtype)
        out["stem.1.bias"] = b_patch
    return out


def _checkpoint_stem_layout(sd: Mapping[str, torch.Tensor], first_conv: str = _FIRST_CONV) -> str | None:
    """Layout of the stem stored in a timm-layout state dict (see :class:`StemSpec`).

    ``first_conv`` is the model's ``pretrained_cfg['first_conv']`` (``stem.0``); the modules
    after it in the stem tell the layouts apart.
    """
    prefix = first_conv.rsplit(".", 1)[0]

    def ndim(index: int) -> int:
        t = sd.get(f"{prefix}.{index}.weight")
        return -1 if t is None else t.ndim

    if sd.get(f"{first_conv}.weight") is None or sd[f"{first_conv}.weight"].ndim != 4:
        return None
    if ndim(1) == 4:
        return "overlap"
    if ndim(2) == 4:
        return "overlap_act"
    return "patch"


def _stem_name_hint(layout: str) -> str:
    """Stem names whose layout matches a checkpoint's, for error messages."""
    names = [n for n, s in STEMS.items() if s.layout == layout]
    return " or ".join(repr(n) for n in names) if names else repr(layout)


def _to_timm_layout(sd: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Remap original Facebook / OpenCLIP ConvNeXt checkpoints with timm's own filter."""
    if "downsample_layers.0.0.weight" not in sd and not any(k.startswith("visual.trunk.") for k in sd):
        return sd
    from timm.models.convnext import checkpoint_filter_fn

    try:
        return dict(checkpoint_filter_fn(sd, model))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise WeightsError(
            f"weights file {source} looks like an original ConvNeXt checkpoint but does not fit: {one_line(exc)}"
        ) from exc


# -------------------------------------------------------------------------------------- family


class ConvNeXtFamily(EncoderFamily):
    """timm's ConvNeXt (v1 and v2) with the stems of :data:`STEMS`."""

    name = "convnext"
    stems = STEMS
    default_stem = DEFAULT_STEM
    model_prefixes = ("convnext", "test_convnext")
    model_hint = "list valid names with timm.list_models('convnext*') (e.g. convnext_atto ... convnext_xlarge)"
    reserved_timm_kwargs = frozenset({"stem_type"})

    def owns(self, model: str) -> bool:
        """A timm model defined in ``timm.models.convnext``."""
        import timm
        from timm.models import is_model_in_modules, split_model_name_tag

        arch, _tag = split_model_name_tag(model)
        return bool(timm.is_model(arch)) and bool(is_model_in_modules(arch, [_TIMM_MODULE]))

    def create_model(self, model: str, stem: StemSpec, **timm_kwargs: Any) -> nn.Module:  # type: ignore[override]
        import timm

        return timm.create_model(model, pretrained=False, num_classes=0, stem_type=stem.timm_stem_type, **timm_kwargs)

    def checkpoint_filter(  # type: ignore[override]
        self, state_dict: dict[str, torch.Tensor], model: nn.Module, *, stem: StemSpec, fresh_stem: bool, source: str
    ) -> dict[str, torch.Tensor]:
        """Facebook/OpenCLIP layouts → timm; a patch stem → ``stem`` exactly; refuse the rest."""
        sd = _to_timm_layout(state_dict, model, source)
        if fresh_stem:
            return sd
        first_conv = ((getattr(model, "pretrained_cfg", None) or {}).get("first_conv")) or _FIRST_CONV
        src = _checkpoint_stem_layout(sd, str(first_conv))
        if src is None or src == stem.layout:
            return sd
        if src == "patch" and stem.exact_from_patch:
            mid_chs = int(model.stem[0].out_channels)
            sd = convert_patch_stem_to_overlap(sd, stem, mid_chs)
            logger.info("converted the patch stem of %s to stem %r (function-preserving)", source, stem.name)
            return sd
        if src == "patch":
            raise EncoderError(
                f"weights file {source} has a patch stem, which cannot be converted exactly to stem {stem.name!r} "
                "(activation inside the stem); use stem 'overlap' or pass stem_init='random' to initialise "
                "the stem fresh (changes the function)"
            )
        raise WeightsError(
            f"weights file {source} has an overlapping stem ({src}), which cannot be converted to stem "
            f"{stem.name!r}; use stem {_stem_name_hint(src)} or stem_init='random'"
        )

    def init_weights(self, model: nn.Module) -> None:
        """timm's ConvNeXt init of the whole network (``head_init_scale`` 1), as training from scratch uses."""
        from functools import partial

        from timm.models._manipulate import named_apply
        from timm.models.convnext import _init_weights

        named_apply(partial(_init_weights, head_init_scale=1.0), model)

    def init_stem(self, model: nn.Module, generator: torch.Generator) -> None:
        """timm's ConvNeXt init for the stem: trunc-normal(std 0.02) convs, zero biases, fresh norms."""
        import torch

        with torch.no_grad():
            for module in model.stem.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif module is not model.stem and hasattr(module, "reset_parameters"):
                    module.reset_parameters()


#: The registered ConvNeXt family.
FAMILY = register_family(ConvNeXtFamily())
