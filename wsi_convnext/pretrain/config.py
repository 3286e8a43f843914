"""The pretraining configuration: one frozen dataclass, validated on construction (:mod:`wsi_convnext.params`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from .._io import json_sha256
from ..encoders import EncoderConfig
from ..errors import ConfigError
from ..finetune.config import RUNTIME_FIELDS, TrainingRunConfig
from ..params import at_least, check_params, fraction, half_open, non_negative, one_of, param, positive

__all__ = ["INITS", "PretrainConfig"]

#: Starting points besides a weights path.
INITS = {"random": "timm's ConvNeXt init under --seed", "pretrained": "timm's pretrained weights of the model's tag (local cache)"}

# Fields that do not change the result (where it runs, how fast, what is printed). ``probe_every``
# does (with --probe the best probed step is kept); the probe set enters by its content.
_RUNTIME_FIELDS = RUNTIME_FIELDS | {"dist_timeout", "on_collapse"}


def _methods() -> tuple[str, ...]:
    from .methods import METHODS  # the built-ins are declared by name: no torch

    return METHODS.names()


def _crop(v: Any) -> str | None:
    return None if isinstance(v, numbers.Integral) and v >= 32 and v % 4 == 0 else "must be a multiple of 4 and >= 32 px"


def _default_stem(model: str, init_path: str | None) -> str:
    """The stem recorded with the ``init`` weights, else the model family's default."""
    from ..encoders import family_for
    from ..encoders.weights import META_STEM, read_weights_metadata, resolve_weights_path

    if init_path is not None:
        recorded = read_weights_metadata(resolve_weights_path(init_path)).get(META_STEM)
        if recorded:
            return recorded
    return family_for(model).default_stem


@dataclass(frozen=True)
class PretrainConfig(TrainingRunConfig):
    """Everything that defines a self-supervised pretraining run (see ``wsi-convnext pretrain --help``).

    Attributes:
        data: Tile stores / folders of stores, an image folder or a CSV (labels ignored).
        out: Output folder (ENC_DIR, the layout of ``finetune``'s).
        model: timm ConvNeXt name (with a tag for ``init="pretrained"``).
        stem: Stem name (``wsi_convnext.encoders.STEMS``); None: the stem recorded with the ``init``
            weights, else the family's default.
        init: ``random``, ``pretrained`` or a path (weights file, finetune/pretrain ENC_DIR); a
            patch-stem checkpoint is converted exactly into an overlapping ``stem``.
        method: Name in :data:`wsi_convnext.pretrain.methods.METHODS`.
        steps: Optimiser steps; exclusive with ``epochs`` (default 200 when neither is given).
        epochs: Passes over the tiles.
        batch_size: Global batch (tiles per optimiser step, over all ranks).
        lr: Peak learning rate (AdamW), linear warm-up then cosine to ``min_lr_ratio × lr``.
        global_size, local_size: Side in px of the global and local crops, cut at the tiles' µm/px.
        n_local: Local crops per tile (DINO multi-crop; 0 = global crops only).
        probe: Labelled tiles to probe the backbone on every ``probe_every`` steps (never part of ``data``).
    """

    data: tuple[str, ...]
    out: str
    model: str = "convnext_atto"
    stem: str | None = None
    init: str = "random"
    method: str = param("dino", check=one_of(_methods), doc="self-supervised method")
    steps: int | None = param(None, check=at_least(1), doc="optimiser steps (default 200)")
    epochs: int | None = param(None, check=at_least(1), doc="passes over the tiles (instead of --steps)")
    batch_size: int = param(64, check=at_least(2), doc="global batch: tiles per optimiser step over all ranks")
    lr: float = param(5e-4, check=positive, doc="peak learning rate (AdamW)")
    weight_decay: float = param(0.04, check=non_negative, doc="AdamW weight decay")
    warmup: float = param(0.1, check=half_open(0, 1), doc="warm-up as a fraction of all steps")
    min_lr_ratio: float = param(0.01, check=fraction, doc="final learning rate as a fraction of lr")
    global_size: int = param(96, check=_crop, doc="global crop side in px (same µm/px as the tiles)")
    local_size: int = param(48, check=_crop, doc="local crop side in px")
    n_local: int = param(4, check=non_negative, doc="local crops per tile (DINO multi-crop)")
    hed_sigma: float = param(0.05, check=half_open(0, 1), doc="strength of the HED jitter (0 = off)")
    brightness_contrast: float = param(0.1, check=half_open(0, 1), doc="brightness/contrast jitter half-width")
    blur: float = param(0.2, check=fraction, doc="probability of a Gaussian blur per crop")
    out_dim: int = param(1024, check=at_least(8), doc="DINO prototypes / projection size")
    teacher_temp: float = param(0.04, check=positive, doc="DINO teacher temperature (sharpening)")
    student_temp: float = param(0.1, check=positive, doc="DINO student temperature")
    center_momentum: float = param(0.9, check=half_open(0, 1), doc="DINO centring momentum")
    ema: float = param(0.996, check=half_open(0, 1), doc="teacher EMA momentum at the start (cosine to 1)")
    temperature: float = param(0.2, check=positive, doc="SimCLR temperature")
    probe: str | None = None
    probe_every: int | None = param(None, check=at_least(1), doc="probe every this many steps (default: 4 per run)")
    on_collapse: str = param("warn", check=one_of(("warn", "stop")), doc="warn or stop when the features collapse")
    dist_timeout: float = param(300.0, check=positive, doc="seconds a rank waits for the others before failing")

    _command = "pretrain"

    def __post_init__(self) -> None:
        self._check_data_and_length()
        if self.stem is None:
            object.__setattr__(self, "stem", _default_stem(self.model, self.init_path))
        check_params(self)
        EncoderConfig(model=self.model, stem=self.stem)  # the encoder's own checks
        if self.local_size > self.global_size:
            raise ConfigError(f"--local-size {self.local_size} is larger than --global-size {self.global_size}")
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "steps", 200)

    @property
    def init_path(self) -> str | None:
        """The weights path of ``init`` (None for ``random``/``pretrained``)."""
        return None if self.init in INITS else self.init

    def fingerprint(self, data_fingerprint: str, start_sha256: str) -> str:
        """sha256 of the result-deciding fields, the data and the starting weights (named by content)."""
        cfg = {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS and k not in ("data", "init", "probe")}
        cfg["init_kind"] = self.init if self.init in INITS else "weights"
        return json_sha256({"config": cfg, "data": data_fingerprint, "start": start_sha256})
