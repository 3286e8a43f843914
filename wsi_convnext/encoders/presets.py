"""Pathology foundation-model presets: named timm builds with their authors' feature recipe.

Each :class:`Preset` carries the timm architecture and ``create_model`` arguments its authors
publish, the Hugging Face repo of its weights, its preprocessing (mean/std, input size), its
feature recipe and its licence. :data:`PRESETS` is the registry (extend with
:func:`register_preset`); :class:`PresetFamily` builds its names through the generic
:func:`~.base.build_encoder` path, so ``embed``, ``finetune``, the cohort ``[embed]`` section
(and anything else that builds encoders) accept them.

No weights ship with wsi-convnext. ``pretrained=True`` reads them from the Hugging Face cache
(downloaded when online; gated repos need their licence accepted on the hub and ``HF_TOKEN``);
without weights the architecture is built with random weights, as for every family.
docs/encoders.md lists the presets with their licences and how to get access.

Feature recipes (:data:`RECIPES`): ``class_token`` is timm's pooled output (the class token
after the final norm); ``class_mean_patch`` concatenates the class token with the mean of the
patch tokens (register tokens left out), as Virchow and Virchow2 publish (2 × width).

Tile-size policy: every preset is built with ``dynamic_img_size=True``, so tiles of any
multiple of the patch size are embedded at their stored µm/px (see :mod:`.timm_generic`); the
authors' own pipelines resize to ``input_size`` (224 px), which ``resize = "input_size"`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._registry import Registry
from ..errors import EncoderError
from .base import register_family
from .timm_generic import TimmFamily

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["PRESETS", "RECIPES", "Preset", "PresetFamily", "register_preset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)


def _layer(name: str) -> Any:
    """timm / torch layer classes named in preset kwargs (resolved at build time: no torch at import)."""
    import torch
    from timm.layers import SwiGLUPacked

    return {"SwiGLUPacked": SwiGLUPacked, "SiLU": torch.nn.SiLU}[name]


@dataclass(frozen=True)
class Preset:
    """One pathology foundation model that timm can build.

    Attributes:
        name: Registry name (``--model``); also the first part of its feature key.
        title: Human name (``UNI2-h``).
        arch: timm architecture (``timm.create_model`` name).
        timm_kwargs: The authors' ``create_model`` arguments; ``mlp_layer``/``act_layer`` are
            names resolved at build time (``SwiGLUPacked``, ``SiLU``).
        hf_repo: Hugging Face repo of the weights (``ORG/NAME``).
        num_features: Embedding size of the recipe.
        recipe: Name in :data:`RECIPES`.
        mean, std: Normalisation of [0, 1] RGB.
        input_size: Side (px) the authors feed (their pipelines resize to it).
        license: The weights' licence, as on the model card.
        gated: Whether the hub repo asks users to accept terms before downloading.
        description: One line for docs and help.
    """

    name: str
    title: str
    arch: str
    timm_kwargs: Mapping[str, Any]
    hf_repo: str
    num_features: int
    recipe: str = "class_token"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    license: str = "see the model card"
    gated: bool = True
    description: str = ""
    _layers: tuple[str, ...] = field(default=("mlp_layer", "act_layer"), repr=False)

    @property
    def url(self) -> str:
        """The model card."""
        return f"https://huggingface.co/{self.hf_repo}"

    def create_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` arguments: the authors', ``dynamic_img_size``, and the pretrained config."""
        kwargs = {k: (_layer(v) if k in self._layers else v) for k, v in self.timm_kwargs.items()}
        kwargs["dynamic_img_size"] = True
        kwargs["pretrained_cfg_overlay"] = {
            "hf_hub_id": self.hf_repo, "tag": None, "url": None, "file": None, "mean": self.mean, "std": self.std,
            "input_size": (3, self.input_size, self.input_size), "crop_pct": 1.0, "num_classes": 0,
            "license": self.license, "origin_url": self.url,
            "notes": (f"gated: accept the licence at {self.url} and set HF_TOKEN",) if self.gated else (),
        }  # fmt: skip
        return kwargs


#: Registry of presets by name. Extend with :func:`register_preset`.
PRESETS: Registry[Preset] = Registry("encoder preset", error=EncoderError)


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Add ``preset`` to :data:`PRESETS` (another preset under a taken name needs ``replace``); returns it."""
    return PRESETS.register(preset.name, preset, replace=replace)


# --------------------------------------------------------------------------------- recipes


def _class_mean_patch(trunk: nn.Module) -> nn.Module:
    """Wrap a ViT: class token ⊕ mean of the patch tokens (register tokens skipped)."""
    import torch

    class ClassMeanPatch(torch.nn.Module):
        """``[cls, mean(patch tokens)]`` of ``trunk.forward_features`` (after the final norm)."""

        def __init__(self, trunk: nn.Module) -> None:
            super().__init__()
            self.trunk = trunk
            self.num_features = 2 * int(trunk.num_features)
            self.pretrained_cfg = trunk.pretrained_cfg
            self.default_cfg = trunk.pretrained_cfg
            self.feature_info = getattr(trunk, "feature_info", [])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.trunk.forward_features(x)
            patches = tokens[:, int(self.trunk.num_prefix_tokens) :]
            return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)

        def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
            return {k: _prefixed(v) for k, v in self.trunk.group_matcher(coarse=coarse).items()}

        def init_weights(self) -> None:
            self.trunk.init_weights()

    return ClassMeanPatch(trunk)


def _prefixed(spec: Any) -> Any:
    """A timm group_matcher entry with every regex anchored under ``trunk.``."""
    if isinstance(spec, str):
        return r"^trunk\.(?:" + spec.lstrip("^") + ")"
    return [(_prefixed(item[0]), *item[1:]) if isinstance(item, (tuple, list)) else _prefixed(item) for item in spec]


#: Feature recipes by name: ``f(timm_model) -> module whose forward gives (B, num_features)``.
RECIPES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "class_token": lambda model: model,
    "class_mean_patch": _class_mean_patch,
}


# --------------------------------------------------------------------------------- family


class PresetFamily(TimmFamily):
    """The presets of :data:`PRESETS`, built as their authors publish (no stem choices)."""

    name = "preset"

    @property
    def model_hint(self) -> str:  # type: ignore[override]
        """The registered presets, for error messages."""
        return f"pathology presets: {', '.join(PRESETS)} (docs/encoders.md)"

    def owns(self, model: str) -> bool:
        """A name in :data:`PRESETS`."""
        return model in PRESETS

    def create_model(self, model: str, stem: Any, **timm_kwargs: Any) -> nn.Module:
        """The preset's architecture with its arguments (``timm_kwargs`` override them), random weights."""
        import timm

        preset = PRESETS[model]
        kwargs = {**preset.create_kwargs(), **timm_kwargs}
        net = timm.create_model(preset.arch, pretrained=False, num_classes=0, **kwargs)
        return RECIPES[preset.recipe](net)


def _vit_g14_reg4(**extra: Any) -> dict[str, Any]:
    return {"img_size": 224, "init_values": 1e-5, "global_pool": "token", **extra}


_KAIKO = "towards large pathology foundation models (kaiko.ai), timm port by 1aurent"
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

register_preset(Preset(
    "uni", "UNI", "vit_large_patch16_224",
    {"img_size": 224, "patch_size": 16, "init_values": 1e-5}, "MahmoodLab/UNI", 1024,
    license="CC-BY-NC-ND-4.0", description="ViT-L/16, DINOv2 on 100M tiles of Mass General Brigham (Mahmood lab)",
))  # fmt: skip
register_preset(Preset(
    "uni2-h", "UNI2-h", "vit_giant_patch14_224",
    {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
     "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **_SWIGLU},
    "MahmoodLab/UNI2-h", 1536, license="CC-BY-NC-ND-4.0", description="ViT-H/14 with 8 registers (Mahmood lab)",
))  # fmt: skip
register_preset(Preset(
    "virchow", "Virchow", "vit_huge_patch14_224",
    {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", **_SWIGLU},
    "paige-ai/Virchow", 2560, recipe="class_mean_patch", license="Apache-2.0 with the model card's terms",
    description="ViT-H/14 (Paige); class token + mean patch tokens",
))  # fmt: skip
register_preset(Preset(
    "virchow2", "Virchow2", "vit_huge_patch14_224",
    {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4, **_SWIGLU},
    "paige-ai/Virchow2", 2560, recipe="class_mean_patch", license="CC-BY-NC-ND-4.0",
    description="ViT-H/14 with 4 registers (Paige); class token + mean patch tokens",
))  # fmt: skip
register_preset(Preset(
    "h-optimus-0", "H-optimus-0", "vit_giant_patch14_reg4_dinov2", _vit_g14_reg4(), "bioptimus/H-optimus-0", 1536,
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), license="Apache-2.0",
    description="ViT-g/14 with 4 registers (Bioptimus)",
))  # fmt: skip
register_preset(Preset(
    "h-optimus-1", "H-optimus-1", "vit_giant_patch14_reg4_dinov2", _vit_g14_reg4(), "bioptimus/H-optimus-1", 1536,
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
    description="ViT-g/14 with 4 registers (Bioptimus), successor of H-optimus-0",
))  # fmt: skip
register_preset(Preset(
    "prov-gigapath", "Prov-GigaPath (tile encoder)", "vit_giant_patch14_dinov2",
    {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
     "init_values": 1e-5, "mlp_ratio": 5.33334},
    "prov-gigapath/prov-gigapath", 1536, license="Apache-2.0 with the model card's terms",
    description="ViT-g/16 tile encoder of Prov-GigaPath (Providence, Microsoft)",
))  # fmt: skip
for _size, _arch, _dim, _img in (
    ("vits16", "vit_small_patch16_224", 384, 224),
    ("vits8", "vit_small_patch8_224", 384, 224),
    ("vitb16", "vit_base_patch16_224", 768, 224),
    ("vitb8", "vit_base_patch8_224", 768, 224),
    ("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 518),
):
    register_preset(Preset(
        f"kaiko-{_size}", f"kaiko.ai {_size.upper()}", _arch, {"img_size": _img},
        f"1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms", _dim, mean=_HALF, std=_HALF, gated=False, description=_KAIKO,
    ))  # fmt: skip

#: The registered preset family (after ConvNeXt and the generic family: its names win).
FAMILY = register_family(PresetFamily())
