"""Tile encoders: the :class:`Encoder` wrapper and the registry of encoder families.

:func:`build_encoder` turns a model name into an :class:`Encoder`: a timm backbone with pooled
features (``num_classes=0``) plus the provenance of its weights (sha256), its preprocessing and
a store key naming the configuration. The model name is dispatched to the
:class:`EncoderFamily` that builds it (:data:`FAMILIES`, extended with :func:`register_family`,
in the spirit of timm's ``register_model``). A family knows its model names, its stems, how a
checkpoint maps onto its models (its checkpoint filter) and how to initialise a stem fresh;
everything else here (weights I/O, preprocessing, train/eval, parameter groups, feature key)
is generic. The ConvNeXt family lives in :mod:`wsi_convnext.encoders.convnext`.

Preprocessing follows the model's pretrained config (``timm.data.resolve_model_data_config``):
uint8 RGB tiles (B, T, T, 3) → float (B, 3, T, T), scaled to [0, 1], optionally passed through a
tile transform, and normalised with the config's mean/std. Resize policy
(:data:`RESIZE_POLICIES`): ``"none"`` (default) never resizes, because the backbones are fully
convolutional and the tiles were already extracted at the target µm/px — resizing would change
the physical scale; ``"input_size"`` resizes tiles whose size differs from the config's
``input_size`` with the config's interpolation. Tiles are never cropped (``crop_pct`` is recorded
for provenance only): a tile is the tissue area it stands for.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._registry import Registry
from ..errors import ConfigError, EncoderError, WeightsError, WsiConvnextError, one_line
from ..params import ParameterError, check_params, one_of, param
from .device import resolve_device

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_RESIZE",
    "DEFAULT_STEM_INIT",
    "FAMILIES",
    "RANDOM",
    "RESIZE_POLICIES",
    "STEM_INITS",
    "Encoder",
    "EncoderConfig",
    "EncoderFamily",
    "Stem",
    "TileTransformFn",
    "build_encoder",
    "family_for",
    "register_family",
]

logger = logging.getLogger(__name__)

#: The library's default model (a registered family must build it).
DEFAULT_MODEL = "convnext_tiny"
DEFAULT_STEM_INIT = "checkpoint"
DEFAULT_RESIZE = "none"
#: Seed of the documented fresh stem initialisation (``stem_init="random"``), so it is reproducible.
STEM_INIT_SEED = 0
#: ``weights_sha256`` of an encoder with random weights.
RANDOM = "random"
#: Seed of the random initialisation used when no weights are given.
RANDOM_INIT_SEED = 0

#: ``timm.create_model`` arguments that :func:`build_encoder` sets itself (families add theirs).
_RESERVED_TIMM_KWARGS = frozenset({"num_classes", "pretrained", "features_only"})

#: How the stem is initialised when a checkpoint is loaded: from the checkpoint (converted when
#: the family can do so exactly), or fresh with a fixed seed (changes the function; logged).
STEM_INITS: dict[str, str] = {
    "checkpoint": "load the stem from the checkpoint, converted by the family where that is exact; refuse otherwise",
    "random": f"ignore the checkpoint's stem; initialise it fresh with the family's init (seed {STEM_INIT_SEED})",
}

#: A tile transform as :meth:`Encoder.preprocess` applies it: float RGB (B, 3, H, W) in [0, 1] →
#: the same shape, on the batch's device (see ``wsi_convnext.transforms``).
TileTransformFn = Callable[["torch.Tensor"], "torch.Tensor"]


# ------------------------------------------------------------------------------------ families


class Stem(Protocol):
    """What generic code needs of a family's stem choice (e.g. :class:`~.convnext.StemSpec`)."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...


class EncoderFamily(ABC):
    """A family of backbones that :func:`build_encoder` can build (register with :func:`register_family`).

    Subclasses set :attr:`name`, :attr:`stems`, :attr:`default_stem` and :attr:`model_hint` and
    implement :meth:`owns`, :meth:`create_model`, :meth:`checkpoint_filter` and
    :meth:`init_stem`. :meth:`parameter_groups` and :meth:`is_stem_key` have generic defaults
    built on timm's ``group_matcher``.
    """

    #: Registry name (e.g. ``"convnext"``).
    name: str
    #: The family's stems by name (``--stem``).
    stems: Mapping[str, Stem]
    #: Stem used when neither the caller nor the weights' metadata name one.
    default_stem: str
    #: One phrase telling users how to list valid model names (for error messages).
    model_hint: str
    #: Extra ``timm.create_model`` arguments the family sets itself (refused from callers).
    reserved_timm_kwargs: frozenset[str] = frozenset()
    #: Name prefixes of the family's models, for checking a model name without importing torch
    #: (empty: the family cannot tell cheaply; :meth:`owns` decides when the encoder is built).
    model_prefixes: tuple[str, ...] = ()

    @abstractmethod
    def owns(self, model: str) -> bool:
        """Whether this family builds ``model`` (a name, optionally with a ``.tag``)."""

    @abstractmethod
    def create_model(self, model: str, stem: Stem, **timm_kwargs: Any) -> nn.Module:
        """Build ``model`` with ``stem`` and pooled features (no classifier), random weights.

        The module must have ``num_features`` and should have timm's ``pretrained_cfg``.
        """

    @abstractmethod
    def checkpoint_filter(
        self, state_dict: dict[str, torch.Tensor], model: nn.Module, *, stem: Stem, fresh_stem: bool, source: str
    ) -> dict[str, torch.Tensor]:
        """Map an unwrapped checkpoint onto ``model``'s layout for ``stem``.

        Args:
            state_dict: Tensors with wrapper prefixes removed; may still hold a classifier.
            model: The freshly built model.
            stem: The stem ``model`` was built with.
            fresh_stem: The stem will be initialised fresh; do not convert or check it.
            source: The checkpoint's file name, for error messages.

        Raises:
            EncoderError: The checkpoint's stem cannot be turned into ``stem`` exactly.
            WeightsError: The checkpoint does not fit the family.
        """

    @abstractmethod
    def init_stem(self, model: nn.Module, generator: torch.Generator) -> None:
        """Initialise ``model``'s stem fresh (``stem_init="random"``), drawing from ``generator``."""

    def stem(self, name: str | Stem | None) -> Stem:
        """The stem named ``name`` (``None``: :attr:`default_stem`); a stem object passes through.

        Raises:
            EncoderError: Unknown stem name.
        """
        if name is not None and not isinstance(name, str):
            return name
        key = self.default_stem if name is None else name
        spec = self.stems.get(key)
        if spec is None:
            raise EncoderError(f"unknown stem {key!r}: choose one of {', '.join(self.stems)}")
        return spec

    def parameter_groups(self, model: nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        """Named parameters grouped as ``stem``, ``stages.0`` … ``stages.N-1``, ``head``.

        Uses timm's coarse ``group_matcher`` (``stem`` pattern, ``blocks`` pattern whose first
        group is the stage index); anything matched by neither (final norm, head) is ``head``.
        """
        matcher = model.group_matcher(coarse=True) if hasattr(model, "group_matcher") else {}
        stem_re = _as_patterns(matcher.get("stem"))
        block_re = _as_patterns(matcher.get("blocks"))
        stages: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"stem": []}
        head: list[tuple[str, torch.nn.Parameter]] = []
        for pname, param in model.named_parameters():
            if any(r.match(pname) for r in stem_re):
                groups["stem"].append((pname, param))
                continue
            index = next((int(m.group(1)) for r in block_re if (m := r.match(pname)) and m.groups()), None)
            if index is None:
                head.append((pname, param))
            else:
                stages.setdefault(index, []).append((pname, param))
        for index in sorted(stages):
            groups[f"stages.{index}"] = stages[index]
        groups["head"] = head
        return groups

    def init_weights(self, model: nn.Module) -> None:
        """Re-initialise all of ``model``'s weights as training from scratch does (caller seeds torch).

        Default: timm's own ``init_weights()`` where the model has one, else every module's
        ``reset_parameters()``.
        """
        if callable(getattr(model, "init_weights", None)):
            model.init_weights()
            return
        for module in model.modules():
            if module is not model and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    def tile_size_policy(self, model: nn.Module) -> str:
        """How the model takes tiles of any size, in one line (recorded in the feature attrs)."""
        return "native: fully convolutional, tiles are used at their stored size"

    def tile_size_error(self, model: nn.Module, size: int) -> str | None:
        """Why ``model`` cannot embed ``size``-px tiles without resizing (one line), or None."""
        return None

    def is_stem_key(self, model: nn.Module, key: str) -> bool:
        """Whether state-dict entry ``key`` belongs to the stem (timm's ``group_matcher``)."""
        matcher = model.group_matcher(coarse=True) if hasattr(model, "group_matcher") else {}
        return any(r.match(key) for r in _as_patterns(matcher.get("stem")))

    def __repr__(self) -> str:
        return f"<encoder family {self.name!r}: stems {', '.join(self.stems)}>"


def _as_patterns(spec: Any) -> list[re.Pattern[str]]:
    """timm group_matcher entry (a regex, or a list of ``(regex, ordinal)``) → compiled regexes."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [re.compile(spec)]
    return [re.compile(item[0] if isinstance(item, (tuple, list)) else item) for item in spec]


#: Registry of encoder families by name. Extend with :func:`register_family`.
FAMILIES: Registry[EncoderFamily] = Registry("encoder family", error=EncoderError)


def register_family(family: EncoderFamily, *, replace: bool = False) -> EncoderFamily:
    """Add ``family`` to :data:`FAMILIES` (the :class:`~wsi_convnext._registry.Registry` rule); returns it."""
    return FAMILIES.register(family.name, family, replace=replace)


def family_for(model: str) -> EncoderFamily:
    """The registered family that builds ``model`` (later registrations win).

    Raises:
        EncoderError: No family builds ``model``; the message says how to list valid names.
    """
    if not isinstance(model, str) or not model:
        raise EncoderError(f"model must be a model name such as {DEFAULT_MODEL!r}, got {model!r}")
    for family in reversed(list(FAMILIES.values())):
        if family.owns(model):
            return family
    hints = "; ".join(f.model_hint for f in FAMILIES.values()) or "no encoder family is registered"
    raise EncoderError(f"unknown model {model!r} (no encoder family builds it): {hints}")


def _candidate_families(model: str) -> list[EncoderFamily]:
    """The registered families that may build ``model``, told by name without importing torch."""
    arch = model.partition(".")[0]
    return [f for f in FAMILIES.values() if not f.model_prefixes or arch.startswith(f.model_prefixes)]


def _check_model(model: Any) -> str | None:
    """``param()`` check: a model name some registered family may build."""
    if not isinstance(model, str) or not model:
        return f"must be a model name such as {DEFAULT_MODEL!r}"
    if _candidate_families(model):
        return None
    return "must be a model of a registered encoder family (" + "; ".join(f.model_hint for f in FAMILIES.values()) + ")"


def _family_of_module(model: nn.Module) -> EncoderFamily:
    """The family of an already built model, via its timm ``pretrained_cfg['architecture']``."""
    return family_for(arch_name(model))


def arch_name(model: nn.Module) -> str:
    """The architecture name of a built model (timm's ``pretrained_cfg['architecture']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _stem_init_name(stem_init: str | None) -> str:
    name = DEFAULT_STEM_INIT if stem_init is None else stem_init
    if name not in STEM_INITS:
        raise EncoderError(f"unknown stem_init {name!r}: choose one of {', '.join(STEM_INITS)}")
    return name


# ------------------------------------------------------------------------------- preprocessing


def _resize_none(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    return x


def _resize_to_input_size(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    import torch.nn.functional as F

    mode = interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bicubic"
    kwargs: dict[str, Any] = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    # Bicubic overshoots; keep the pixel range before normalising.
    return F.interpolate(x, size=size, mode=mode, **kwargs).clamp_(0.0, 255.0)


#: Resize policies by name: ``f(x_float_0_255_nchw, (H, W), interpolation) -> x``.
RESIZE_POLICIES: dict[str, Callable[[torch.Tensor, tuple[int, int], str], torch.Tensor]] = {
    "none": _resize_none,
    "input_size": _resize_to_input_size,
}


def _preprocessing(model: nn.Module, resize: str) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    return {
        "input": "uint8 RGB (B, H, W, 3)",
        "scale": 1.0 / 255.0,
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "resize": resize,
        "crop": "none",
        "pretrained_tag": tag,
    }


# -------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that defines an encoder. ``None`` means the library default.

    Attributes:
        model: Model name, optionally with a pretrained tag (``convnext_tiny.fb_in1k``).
        stem: Name of one of the family's stems; ``None``: the weights' metadata stem, else the
            family's ``default_stem``.
        weights: Path of a safetensors file or torch state dict.
        pretrained: Load timm's pretrained weights (Hugging Face cache, downloaded when online).
        stem_init: Name in :data:`STEM_INITS` (default ``"checkpoint"``).
        resize: Name in :data:`RESIZE_POLICIES` (default ``"none"``).
        timm_kwargs: Extra ``timm.create_model`` keyword arguments as sorted ``(name, value)`` pairs.
    """

    model: str = param(DEFAULT_MODEL, check=_check_model, doc="encoder model name (timm), e.g. convnext_tiny")
    stem: str | None = param(None, doc="encoder stem (default: the weights' stem, else the family's)")
    weights: str | None = param(None, doc="weights file or finetune output folder")
    pretrained: bool = param(False, doc="timm pretrained weights (Hugging Face cache)")
    stem_init: str | None = param(None, check=one_of(STEM_INITS), doc="checkpoint (convert the stem) or random")
    resize: str | None = param(None, check=one_of(lambda: RESIZE_POLICIES), doc="tile resize policy before the encoder")
    timm_kwargs: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        check_params(self)
        families = _candidate_families(self.model)
        if self.stem is not None and not any(self.stem in f.stems or self.stem == f.default_stem for f in families):
            names = ", ".join(repr(n) for f in families for n in f.stems)
            if not names:
                why = f"is not a choice: {self.model!r} has no stem choices (it keeps its own stem); drop --stem"
                raise ParameterError("stem", why, self.stem)
            raise ParameterError("stem", f"must be one of {names} (the stems of {self.model!r})", self.stem)

    def build(self) -> Encoder:
        """Build the :class:`Encoder` this configuration describes."""
        return build_encoder(
            self.model,
            stem=self.stem,
            weights=self.weights,
            pretrained=self.pretrained,
            stem_init=self.stem_init,
            resize=self.resize,
            **dict(self.timm_kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``timm_kwargs`` as a dict)."""
        out = asdict(self)
        out["timm_kwargs"] = dict(self.timm_kwargs)
        return out


# ------------------------------------------------------------------------------------- encoder


class Encoder:
    """A backbone plus its provenance, preprocessing and parameter groups.

    Built in eval mode; :meth:`train` switches it for fine-tuning. :meth:`forward` (``__call__``)
    is the inference API (``torch.inference_mode``); training calls :attr:`model` on
    :meth:`preprocess`'s output directly.

    Attributes:
        model: The timm backbone (``num_classes=0``, pooled features), differentiable.
        num_features: Embedding size.
        config: The resolved :class:`EncoderConfig`.
        family: The :class:`EncoderFamily` that built :attr:`model`.
        stem: The family's stem object :attr:`model` was built with.
        weights_sha256: sha256 of the weights file, or ``"random"``.
        weights_path: The weights file actually read (for ``pretrained``, the cache file), or None.
        preprocessing: JSON-able preprocessing description (see :meth:`preprocess`).
        channels_last: Whether :meth:`preprocess` returns channels-last tensors (set by :meth:`to`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: EncoderConfig,
        weights_sha256: str,
        weights_path: str | None,
        preprocessing: dict[str, Any],
        *,
        family: EncoderFamily | None = None,
        stem: Stem | None = None,
    ) -> None:
        self.model = model.eval()
        self.num_features = int(model.num_features)
        self.config = config
        self.family = family_for(config.model) if family is None else family
        self.stem = self.family.stem(config.stem) if stem is None else stem
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.preprocessing = preprocessing
        self.channels_last = False
        self._norm_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"Encoder(key={self.key!r}, num_features={self.num_features}, device={self.device})"

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def training(self) -> bool:
        """Whether the model is in train mode."""
        return bool(self.model.training)

    @property
    def key(self) -> str:
        """Store key naming the configuration: ``<model>[-<stem>]-<sha12|random>[-stemrand][-resize]``.

        The stem is named only for families that have stems (ConvNeXt).
        """
        sha = self.weights_sha256
        parts = [self.config.model, *([self.stem.name] if self.family.stems else []), sha if sha == RANDOM else sha[:12]]
        if sha != RANDOM and self.config.stem_init == "random":
            parts.append("stemrand")
        if self.config.resize != DEFAULT_RESIZE:
            parts.append(f"resize_{self.config.resize}")
        return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))

    def attrs(self) -> dict[str, Any]:
        """JSON-able provenance to store with the embeddings."""
        import timm
        import torch

        from .. import __version__

        return {
            "key": self.key,
            "model": self.config.model,
            "architecture": arch_name(self.model),
            "family": self.family.name,
            "tile_size_policy": self.tile_size_policy,
            "stem": self.stem.name,
            "stem_init": self.config.stem_init,
            "pretrained": self.config.pretrained,
            "weights_sha256": self.weights_sha256,
            "weights_path": self.weights_path,
            "num_features": self.num_features,
            "preprocessing": dict(self.preprocessing),
            "timm_kwargs": dict(self.config.timm_kwargs),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "wsi_convnext_version": __version__,
        }

    @property
    def tile_size_policy(self) -> str:
        """How tiles of the stored size reach the model (resize policy, else the family's policy)."""
        if self.config.resize != DEFAULT_RESIZE:
            return f"resize: tiles are resampled to input_size {self.preprocessing['input_size'][-2:]}"
        return self.family.tile_size_policy(self.model)

    def tile_size_error(self, size: int) -> str | None:
        """Why ``size``-px tiles cannot be embedded as they are (one line), or None."""
        if self.config.resize != DEFAULT_RESIZE:
            return None
        return self.family.tile_size_error(self.model, size)

    # --------------------------------------------------------------------------- training API

    def train(self, mode: bool = True) -> Encoder:
        """Put the model in train (``mode=True``) or eval mode; returns self."""
        self.model.train(mode)
        return self

    def eval(self) -> Encoder:
        """Put the model in eval mode; returns self."""
        return self.train(False)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The model's parameters as ``stem``, ``stages.0`` … ``stages.N-1``, ``head``.

        Every parameter is in exactly one group (``head``: the final norm and anything after the
        stages), so training can freeze groups or give them their own learning rates.
        """
        return {name: [p for _, p in named] for name, named in self.named_parameter_groups().items()}

    def named_parameter_groups(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        """As :meth:`parameter_groups`, with each parameter's name in :attr:`model`."""
        return self.family.parameter_groups(self.model)

    # ------------------------------------------------------------------------ device, layout

    def to(self, device: str | torch.device | None = None, *, channels_last: bool | None = None) -> Encoder:
        """Move the model (``device`` may be ``"auto"``) and/or switch channels-last; returns self."""
        import torch

        if device is not None:
            dev = resolve_device(device)
            self.model.to(dev)
        if channels_last is not None:
            self.channels_last = bool(channels_last)
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            self.model.to(memory_format=fmt)
        return self

    def _mean_inv_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        cached = self._norm_cache.get(str(device))
        if cached is None:
            mean = torch.tensor(self.preprocessing["mean"], dtype=torch.float32).mul_(255.0)
            inv_std = 1.0 / torch.tensor(self.preprocessing["std"], dtype=torch.float32).mul_(255.0)
            cached = (mean.view(1, -1, 1, 1).to(device), inv_std.view(1, -1, 1, 1).to(device))
            self._norm_cache[str(device)] = cached
        return cached

    def preprocess(
        self,
        batch: torch.Tensor | np.ndarray,
        *,
        device: torch.device | str | None = None,
        transform: TileTransformFn | None = None,
    ) -> torch.Tensor:
        """uint8 RGB tiles (B, H, W, 3) → normalised float32 (B, 3, H', W') on ``device``.

        Scales to [0, 1], resizes per the resize policy (default: never), applies ``transform``
        if given, subtracts the config's mean and divides by its std. The uint8 batch is moved
        first (4× less traffic).

        Args:
            batch: uint8 tensor or array, NHWC, RGB.
            device: Target device; default the model's.
            transform: Tile transform on float RGB (B, 3, H, W) in [0, 1] on ``device``,
                returning the same shape (e.g. stain normalisation, augmentation).

        Raises:
            EncoderError: Wrong dtype or shape, or a transform that changes the shape.
        """
        import numpy as np
        import torch

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch if batch.flags.writeable else batch.copy())
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            desc = f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}"
            raise EncoderError(f"tiles must be a uint8 RGB batch of shape (B, H, W, 3), got {desc}")
        dev = self.device if device is None else torch.device(device)
        x = batch.to(dev, non_blocking=True).permute(0, 3, 1, 2).float()  # strides stay channels-last
        size = tuple(int(s) for s in self.preprocessing["input_size"][-2:])
        x = RESIZE_POLICIES[self.preprocessing["resize"]](x, size, self.preprocessing["interpolation"])
        if transform is not None:
            # The transform sees [0, 1]; the normalisation below works on the 0..255 scale, so
            # that without a transform the numbers are exactly those of earlier releases.
            y = transform(x.mul(1.0 / 255.0))
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise EncoderError(f"tile transform {transform!r} changed the batch shape {tuple(x.shape)} to {got}")
            x = y.float().mul(255.0)
        mean, inv_std = self._mean_inv_std(dev)
        x = x.sub_(mean).mul_(inv_std)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings (B, num_features) under ``torch.inference_mode``.

        ``batch`` is either raw uint8 tiles (B, H, W, 3), preprocessed here, or an already
        preprocessed float batch (B, 3, H, W).
        """
        import torch

        if not isinstance(batch, torch.Tensor) or batch.dtype == torch.uint8:
            x = self.preprocess(batch)
        else:
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise EncoderError(f"a float batch must be preprocessed (B, 3, H, W), got {tuple(batch.shape)}")
            x = batch.to(self.device)
        with torch.inference_mode():
            return self.model(x)

    __call__ = forward


# ------------------------------------------------------------------------------------- builder


def _same_architecture(a: str, b: str) -> bool:
    from timm.models import split_model_name_tag

    return split_model_name_tag(a)[0] == split_model_name_tag(b)[0]


def _stem_from_metadata(
    family: EncoderFamily, model: str, stem: str | Stem | None, meta: Mapping[str, str], path: Path,
    *, convert: bool = False,
) -> str | Stem | None:
    """Apply the weights' recorded model and stem: check the model, pick up or check the stem.

    With ``convert`` (an explicit ``stem_init``) a different stem is allowed: the weights'
    stem is then converted by the family's checkpoint filter, or the conversion fails there.
    """
    from .weights import META_MODEL, META_STEM

    meta_model, meta_stem = meta.get(META_MODEL), meta.get(META_STEM)
    if meta_model and not _same_architecture(meta_model, model):
        raise WeightsError(
            f"weights file {path} was made for model {meta_model!r} (its metadata), not {model!r}; "
            f"pass --model {meta_model}"
        )
    if not meta_stem:
        return stem
    if stem is None:
        logger.info("stem %r picked up from the metadata of %s", meta_stem, path)
        return meta_stem
    asked = stem if isinstance(stem, str) else stem.name
    if asked != meta_stem and not convert:
        raise EncoderError(
            f"weights file {path} was trained with stem {meta_stem!r} (its metadata), but stem {asked!r} was "
            f"asked for; drop --stem to use the weights' stem or pass --stem {meta_stem}"
        )
    return stem


def build_encoder(
    model: str = DEFAULT_MODEL,
    *,
    stem: str | Stem | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    stem_init: str | None = None,
    resize: str | None = None,
    **timm_kwargs: Any,
) -> Encoder:
    """Build a tile encoder with the family that owns ``model``.

    Args:
        model: Model name, optionally with a pretrained tag (``convnext_tiny.fb_in1k``).
        stem: One of the family's stems (name or object). ``None``: the stem recorded in the
            weights' metadata (``wsi_convnext.stem``, see :func:`~.weights.read_weights_metadata`),
            else the family's ``default_stem``. A stem that differs from the
            recorded one is an error unless ``stem_init`` is given explicitly (then the recorded
            stem is converted, e.g. ``patch`` → ``overlap`` exactly, or initialised fresh).
        weights: Weights file, or a ``finetune`` output folder holding ``encoder.safetensors``
            (see :func:`~.weights.load_weights`).
        pretrained: timm's pretrained weights for ``model``'s tag, from the Hugging Face cache;
            downloaded into it when online and ``HF_HUB_OFFLINE`` is not set.
        stem_init: Name in :data:`STEM_INITS`; ``None`` means ``"checkpoint"``.
        resize: Name in :data:`RESIZE_POLICIES`; ``None`` means ``"none"``.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Without ``weights`` and ``pretrained`` the weights are random (logged at WARNING,
    ``weights_sha256 == "random"``), drawn with the fixed seed :data:`RANDOM_INIT_SEED`.

    Raises:
        ParameterError: A stem, stem_init or resize that :class:`EncoderConfig` refuses.
        EncoderError: Unknown model, bad timm kwargs, a stem
            that disagrees with the weights' metadata, or a stem conversion that is impossible.
        ConfigError: Both ``weights`` and ``pretrained``.
        InputNotFoundError, WeightsError: See :func:`~.weights.load_weights`; weights made for
            another model; pretrained weights neither cached nor downloadable.
    """
    from .weights import find_pretrained_file, load_weights, read_weights_metadata, resolve_weights_path

    family = family_for(model)
    # The values are checked once, here where they enter, by EncoderConfig's param() checks.
    EncoderConfig(model, stem=stem if isinstance(stem, str) else None, stem_init=stem_init, resize=resize)
    stem_init_name = DEFAULT_STEM_INIT if stem_init is None else stem_init
    resize_name = DEFAULT_RESIZE if resize is None else resize
    if weights is not None and pretrained:
        raise ConfigError("pass either weights (--weights PATH) or pretrained (--pretrained), not both")
    reserved = sorted((_RESERVED_TIMM_KWARGS | family.reserved_timm_kwargs) & timm_kwargs.keys())
    if reserved:
        raise EncoderError(f"timm arguments {reserved} are set by build_encoder; use stem=/pretrained= instead")

    weights_path: Path | None = None
    if weights is not None:
        weights_path = resolve_weights_path(weights)
        meta = read_weights_metadata(weights_path)
        stem = _stem_from_metadata(family, model, stem, meta, weights_path, convert=stem_init is not None)
    spec = family.stem(stem)

    import torch

    try:
        # A fixed seed makes "random" weights one reproducible model, so a random-weight
        # feature key names the same function in every run (resume, demo, benchmarks).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            net = family.create_model(model, spec, **timm_kwargs)
    except WsiConvnextError:
        raise
    except (TypeError, RuntimeError, ValueError, AssertionError) as exc:
        with_stem = f" with stem {spec.name!r}" if family.stems else ""
        raise EncoderError(f"cannot build {model!r}{with_stem}: {one_line(exc)}") from exc
    net.eval()

    if weights_path is None and pretrained:
        cfg = dict(getattr(net, "pretrained_cfg", None) or {})
        name = f"{cfg.get('architecture', model)}.{cfg.get('tag')}" if cfg.get("tag") else model
        weights_path = find_pretrained_file(cfg, name)
    if weights_path is not None:
        sha = load_weights(net, weights_path, stem=spec, stem_init=stem_init_name, family=family)
    else:
        sha = RANDOM
        logger.warning(
            "encoder %s (stem %r) has RANDOM weights: no weights file and no pretrained weights were given, so "
            "its embeddings carry no learned features; recorded as weights_sha256='random'",
            model,
            spec.name,
        )

    config = EncoderConfig(
        model=model,
        stem=spec.name,
        weights=str(weights_path) if weights is not None else None,
        pretrained=bool(pretrained),
        stem_init=stem_init_name,
        resize=resize_name,
        timm_kwargs=tuple(sorted(timm_kwargs.items())),
    )
    return Encoder(
        net,
        config,
        sha,
        None if weights_path is None else str(weights_path),
        _preprocessing(net, resize_name),
        family=family,
        stem=spec,
    )

