"""The generic timm encoder family: any ``timm.create_model`` name, including ``hf-hub:`` ids.

Models: every name in ``timm.list_models()`` (optionally with a pretrained tag, e.g.
``vit_small_patch16_224.augreg_in21k``) and ``hf-hub:ORG/NAME`` ids, whose timm config is read
from the Hugging Face hub (or its cache, offline). ConvNeXt names stay with the ConvNeXt family
(registered later, so it wins), which has stems and the exact stem conversion; this family has
no stems (``--stem`` is a one-line error).

Features are timm's pooled features (``num_classes=0``); preprocessing (mean/std, input size)
comes from the model's ``pretrained_cfg`` as for every family (:mod:`.base`).

Tile-size policy (recorded as ``tile_size`` in the feature attrs, :meth:`tile_size_policy`):

- Models that take ``dynamic_img_size`` (ViT, DeiT, EVA, ...) are built with it, so a tile of
  any multiple of the patch size is embedded at its stored µm/px: the position embeddings are
  interpolated to the tile's patch grid. Other tile sizes are refused before embedding
  (:meth:`tile_size_error`) with what to do (re-tile, or ``resize = "input_size"``, which
  resamples tiles and so changes their µm/px).
- Other models with a fixed input size (e.g. Swin) need tiles of that size or ``resize``.
- Convolutional networks take any size (as ConvNeXt).

Checkpoints must be in the model's timm layout (what ``save_encoder_weights`` and the hub
repos of timm models hold); no layout conversion is attempted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EncoderError, WeightsError, one_line
from .base import EncoderFamily, register_family

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["HF_HUB_PREFIXES", "NO_STEM", "TRUNK_PREFIX", "NoStem", "TimmFamily"]

logger = logging.getLogger(__name__)

#: Prefixes timm accepts for Hugging Face hub model ids.
HF_HUB_PREFIXES = ("hf-hub:", "hf_hub:")
_DYNAMIC = "dynamic_img_size"
#: Where a feature-recipe wrapper keeps the timm model (its state-dict prefix).
TRUNK_PREFIX = "trunk."


@dataclass(frozen=True)
class NoStem:
    """The stem of a family without stem choices (its name is stored in weights metadata)."""

    name: str = "none"
    description: str = "the model's own stem (this family has no stem choices)"


#: The one stem of stemless families.
NO_STEM = NoStem()


def hub_repo(model: str) -> str | None:
    """``ORG/NAME`` of an ``hf-hub:ORG/NAME[@rev]`` model id, else None."""
    for prefix in HF_HUB_PREFIXES:
        if model.startswith(prefix):
            return model[len(prefix) :].split("@", 1)[0]
    return None


def _trunk(model: nn.Module) -> nn.Module:
    """The timm model inside a feature-recipe wrapper (:mod:`.presets`), or the model itself."""
    return getattr(model, "trunk", model)


def _patch_embed(model: nn.Module) -> nn.Module | None:
    """The model's timm ``PatchEmbed`` (``patch_embed`` in ViTs, ``stem`` in MLP-Mixer), or None."""
    from timm.layers import PatchEmbed

    embed = getattr(model, "patch_embed", None)
    return embed if embed is not None else next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)


def _patch_size(model: nn.Module) -> int | None:
    patch = getattr(_patch_embed(_trunk(model)), "patch_size", None)
    if patch is None:
        return None
    return int(patch[0]) if isinstance(patch, (tuple, list)) else int(patch)


def _fixed_size(model: nn.Module) -> int | None:
    """The one input side a model accepts, or None (any size / dynamic)."""
    model = _trunk(model)
    embed = _patch_embed(model)
    if embed is None or getattr(model, _DYNAMIC, False) or not getattr(embed, "strict_img_size", False):
        return None
    size = getattr(embed, "img_size", None)
    return int(size[0]) if isinstance(size, (tuple, list)) else (int(size) if size else None)


class TimmFamily(EncoderFamily):
    """Any timm model (or ``hf-hub:`` id) with pooled features and no stem choices."""

    name = "timm"
    stems: Mapping[str, NoStem] = {}
    default_stem = NO_STEM.name
    model_hint = (
        "any other timm model: list names with timm.list_models() (e.g. vit_small_patch16_224, resnet50), "
        "or pass hf-hub:ORG/NAME"
    )

    def stem(self, name: str | Any | None) -> NoStem:
        """:data:`NO_STEM`; any stem name but ``"none"`` (e.g. from ``--stem``) is an error."""
        if name is None or name == NO_STEM.name or isinstance(name, NoStem):
            return NO_STEM
        shown = getattr(name, "name", name)
        raise EncoderError(
            f"stem {shown!r} given, but {self.name!r} family models have no stem choices "
            "(stems are a ConvNeXt option); drop --stem / the stem key"
        )

    def owns(self, model: str) -> bool:
        """A ``timm.list_models()`` name (tag allowed) or an ``hf-hub:`` id."""
        if hub_repo(model):
            return True
        import timm
        from timm.models import split_model_name_tag

        return bool(timm.is_model(split_model_name_tag(model)[0]))

    def create_model(self, model: str, stem: Any, **timm_kwargs: Any) -> nn.Module:
        """``timm.create_model(model, num_classes=0)``, with ``dynamic_img_size`` where the model takes it.

        Raises:
            WeightsError: The ``hf-hub:`` config cannot be read (offline and not cached, gated).
        """
        import timm

        kwargs = dict(timm_kwargs)
        repo = hub_repo(model)
        if repo:
            from .weights import hf_hub_cache

            kwargs.setdefault("cache_dir", str(hf_hub_cache()))
        if _DYNAMIC in kwargs:
            return self._create(model, repo, **kwargs)
        try:
            return self._create(model, repo, **{_DYNAMIC: True}, **kwargs)
        except TypeError as exc:  # the model class has no dynamic_img_size: use its own input policy
            if _DYNAMIC not in str(exc):
                raise
            return self._create(model, repo, **kwargs)

    def _create(self, model: str, repo: str | None, **kwargs: Any) -> nn.Module:
        import timm

        if not repo:
            return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        except (OSError, HfHubHTTPError) as exc:  # offline and not cached, gated (401/403), no such repo
            from .weights import hf_hub_cache

            where = hf_hub_cache() / f"models--{repo.replace('/', '--')}"
            raise WeightsError(
                f"cannot read the timm config of {model} from the Hugging Face hub ({one_line(exc, 160)}; "
                "HF_HUB_OFFLINE=1 skips trying); "
                f"if the repo is gated, accept its licence at https://huggingface.co/{repo} and set HF_TOKEN; "
                f"offline, put its config.json (and weights) in the Hugging Face cache at {where}/snapshots/<commit>/ "
                f"with the commit hash in {where}/refs/main"
            ) from exc

    def checkpoint_filter(  # type: ignore[override]
        self, state_dict: dict[str, torch.Tensor], model: nn.Module, *, stem: Any, fresh_stem: bool, source: str
    ) -> dict[str, torch.Tensor]:
        """Checkpoints in the model's own timm layout (checked by the loader); a feature-recipe
        wrapper (:mod:`.presets`) keeps the timm model under ``trunk.``, so plain keys move there."""
        if not hasattr(model, "trunk") or any(k.startswith(TRUNK_PREFIX) for k in state_dict):
            return state_dict
        return {TRUNK_PREFIX + k: v for k, v in state_dict.items()}

    def init_stem(self, model: nn.Module, generator: torch.Generator) -> None:
        """Not supported: the family has no stem choices, so there is nothing to re-initialise."""
        raise EncoderError(f"stem_init='random' needs a family with stems; {self.name!r} models have none")

    def tile_size_policy(self, model: nn.Module) -> str:
        """``dynamic_img_size`` (patch P), a fixed input size, or native (convolutional)."""
        patch = _patch_size(model)
        if getattr(_trunk(model), _DYNAMIC, False) and patch:
            return (
                f"dynamic_img_size: tiles at their stored size, position embeddings interpolated to the tile's "
                f"{patch}-px patch grid (tile side must be a multiple of {patch})"
            )
        fixed = _fixed_size(model)
        if fixed:
            return f"fixed input size {fixed} px: tiles must have that size (or resize='input_size')"
        return super().tile_size_policy(model)

    def tile_size_error(self, model: nn.Module, size: int) -> str | None:
        """A tile side the model cannot take as it is: not a multiple of the patch, or not the fixed size."""
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        patch = _patch_size(model)
        fixed = _fixed_size(model)
        if fixed and size != fixed:
            return (
                f"tiles of {size} px cannot go into {arch}, which takes {fixed}-px inputs only; re-tile with "
                f"--tile-size {fixed} or resize with --resize input_size ([embed] resize; changes the µm/px)"
            )
        if patch and size % patch:
            lower, upper = size // patch * patch, (size // patch + 1) * patch
            return (
                f"tiles of {size} px are not a multiple of the {patch}-px patches of {arch}; re-tile with "
                f"--tile-size {lower or upper} or {upper}, or resize with --resize input_size ([embed] "
                "resize; changes the µm/px)"
            )
        return None


#: The registered generic family. Registered before ConvNeXt (see ``encoders/__init__.py``), so
#: the ConvNeXt family, with its stems, keeps the ConvNeXt names.
FAMILY = register_family(TimmFamily())
