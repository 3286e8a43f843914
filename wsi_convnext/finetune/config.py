"""The fine-tuning configuration: one frozen dataclass, validated on construction (:mod:`wsi_convnext.params`)."""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from .._io import json_sha256
from ..data.labelled import BALANCE_MODES, SIZE_POLICIES
from ..errors import ConfigError
from ..encoders import EncoderConfig
from ..encoders.device import DEVICE_FORMS, check_device
from ..params import at_least, check_params, fraction, half_open, non_negative, one_of, param, positive

__all__ = ["AUGMENTATIONS", "RUNTIME_FIELDS", "FinetuneConfig", "TrainingRunConfig", "parse_freeze"]

#: Augmentation recipes: geometric ones run in the loader workers, colour ones on the batch.
AUGMENTATIONS = {
    "histology": "random crop at the tile's µm/px, flips, 90° rotations, HED + brightness/contrast jitter",
    "geometric": "random crop, flips and 90° rotations only",
    "none": "random crop only (centre crop when the tile is the training size)",
}

_FREEZE_RE = re.compile(r"^(none|stem|stages:(\d+))$")

#: Fields of a training run that do not change the result (where it runs, how fast, what is printed).
RUNTIME_FIELDS = frozenset({"out", "device", "num_workers", "threads", "overwrite", "compile", "checkpoint_every", "strict"})


def _decay(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _crop(v: Any) -> str | None:
    return None if isinstance(v, numbers.Integral) and v >= 32 and v % 4 == 0 else "must be a multiple of 4 and >= 32 px"


def _freeze(v: Any) -> str | None:
    return None if _FREEZE_RE.match(str(v).strip()) else "must be none, stem or stages:K (K = number of leading stages)"


def parse_freeze(value: str) -> tuple[str, int]:
    """``"none"`` → ("none", 0); ``"stem"`` → ("stem", 0); ``"stages:K"`` → ("stages", K).

    ``stem`` freezes the stem; ``stages:K`` freezes the first K stages (the stem stays
    trainable, so ``stages:<all>`` trains only the stem and the head on a frozen trunk).

    Raises:
        ConfigError: Any other value.
    """
    m = _FREEZE_RE.match(str(value).strip())
    if not m:
        raise ConfigError(f"unknown --freeze {value!r}: use none, stem or stages:K (K = number of leading stages)")
    if m.group(2) is not None:
        return "stages", int(m.group(2))
    return m.group(1), 0


@dataclass(frozen=True, kw_only=True)
class TrainingRunConfig:
    """What the frozen configurations of an encoder-training run over tiles share (finetune, pretrain):
    the fields below (where and how it runs; ``seed`` decides the result), ``data`` and ``out``
    normalised, ``--epochs``/``--steps`` exclusive, a JSON-able round trip."""

    seed: int = param(0, doc="seed of initialisation, data order, augmentation (and finetune's split)")
    device: str = param("auto", check=check_device, doc=f"training device: {DEVICE_FORMS}")
    compile: bool = param(False, doc="torch.compile the model (CUDA only)")
    num_workers: int | None = param(None, check=non_negative, doc="DataLoader worker processes (per rank)")
    threads: int | None = param(None, check=at_least(1), doc="torch CPU threads of each training process")
    strict: bool = param(False, doc="fail on an unreadable image instead of skipping it")
    checkpoint_every: int | None = param(None, check=at_least(1), doc="also checkpoint every this many steps")
    overwrite: bool = False

    _command = "training"  # names the run in messages

    def _check_data_and_length(self) -> None:
        data = (self.data,) if isinstance(self.data, str) else tuple(str(d) for d in self.data)  # type: ignore[attr-defined]
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "out", str(self.out))  # type: ignore[attr-defined]
        if not data:
            raise ConfigError(f"no {self._command} data given; pass an image folder, a CSV or tile stores")
        if self.epochs is not None and self.steps is not None:  # type: ignore[attr-defined]
            raise ConfigError("pass either --epochs or --steps, not both")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)  # type: ignore[call-overload]
        d["data"] = list(self.data)  # type: ignore[attr-defined]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"unknown {cls._command} config key(s) {unknown}")
        return cls(**{**d, "data": tuple(d.get("data") or ())})


@dataclass(frozen=True)
class FinetuneConfig(TrainingRunConfig):
    """Everything that defines a fine-tuning run (see ``wsi-convnext finetune --help``).

    Attributes:
        data: Image folder, CSV ``path,label[,group][,split]``, or tile stores / folders of stores.
        out: Output folder (ENC_DIR).
        labels: Labels CSV ``slide_id,label[,patient_id][,split]`` for stores (weak labels).
        model: Encoder name: a timm model (ConvNeXt, any other timm name, ``hf-hub:`` id) or a preset
            (``wsi_convnext.encoders.PRESETS``).
        stem: Stem name (``wsi_convnext.encoders.STEMS``, ConvNeXt only); None: the stem recorded with the weights, else the family's default.
        weights: Starting weights: a weights file, or an earlier finetune output folder.
        pretrained: Start from timm's pretrained weights (local cache).
        stem_init: ``checkpoint`` or ``random`` (see ``wsi_convnext.encoders.STEM_INITS``).
        epochs: Epochs (passes over the training tiles); exclusive with ``steps``.
        steps: Optimiser steps; exclusive with ``epochs``.
        batch_size: Tiles per forward pass.
        accumulate: Forward passes per optimiser step (effective batch = batch_size × accumulate).
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (never on norms, biases or layer scales).
        warmup: Warm-up as a fraction of all steps (linear from 0), then cosine to ``min_lr_ratio × lr``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        label_smoothing: Cross-entropy label smoothing.
        freeze: ``none``, ``stem`` or ``stages:K`` (see :func:`parse_freeze`).
        layer_decay: Layer-wise learning-rate decay: the head gets ``lr``, the last stage ``lr × d``,
            ... the stem ``lr × d^(n_stages+1)``. 1.0 disables it.
        crop_size: Training crop side in px (default: the tile size); crops keep the µm/px.
        eval_size: Validation/prediction centre-crop side in px (default: the tile size).
        on_size: Mixed tile sizes: ``crop`` or ``refuse`` (``wsi_convnext.data.SIZE_POLICIES``).
        augment: Name in :data:`AUGMENTATIONS`.
        hed_sigma: Strength of the HED jitter (scale ±σ, shift ±σ of each stain's optical density).
        balance: Name in ``wsi_convnext.data.BALANCE_MODES``; ``auto``: ``class_group`` for stores
            (one big slide does not dominate), ``none`` for tiles.
        val_frac: Fraction of groups used for validation when the data has no ``split`` column.
        patience: Stop after this many epochs without a better validation score (None: never).
        drop_path: Stochastic depth rate.
        seed: Seed of the initialisation (scratch), data order, augmentation and split.
        device: A device string (``wsi_convnext.encoders.device.DEVICE_FORMS``).
        compile: ``torch.compile`` the model (CUDA only; ignored elsewhere).
        num_workers: DataLoader worker processes (default: up to 4, leaving one core).
        threads: torch CPU threads of the training process (default: torch's own choice). On a
            busy shared CPU, 1 can be several times faster than 2 (no spinning on contended cores).
        strict: Fail on an unreadable image instead of skipping it.
        checkpoint_every: Also write a checkpoint every this many optimiser steps (default: at epoch ends only).
        overwrite: Replace an existing output folder made with another configuration.
    """

    data: tuple[str, ...]
    out: str
    labels: str | None = None
    model: str = "convnext_atto"
    stem: str | None = None
    weights: str | None = None
    pretrained: bool = False
    stem_init: str | None = None
    epochs: int | None = param(None, check=at_least(1), doc="passes over the training tiles (default 10)")
    steps: int | None = param(None, check=at_least(1), doc="optimiser steps (instead of epochs)")
    batch_size: int = param(32, check=at_least(1), doc="tiles per forward pass")
    accumulate: int = param(1, check=at_least(1), doc="forward passes per optimiser step")
    lr: float = param(1e-3, check=positive, doc="peak learning rate (AdamW)")
    weight_decay: float = param(0.05, check=non_negative, doc="AdamW weight decay")
    warmup: float = param(0.05, check=half_open(0, 1), doc="warm-up as a fraction of all steps")
    min_lr_ratio: float = param(0.01, check=fraction, doc="final learning rate as a fraction of lr")
    label_smoothing: float = param(0.1, check=half_open(0, 1), doc="cross-entropy label smoothing")
    freeze: str = param("none", check=_freeze, doc="none, stem or stages:K")
    layer_decay: float = param(1.0, check=_decay, doc="layer-wise learning-rate decay (1 = off)")
    crop_size: int | None = param(None, check=_crop, doc="training crop side in px (default: the tile size)")
    eval_size: int | None = param(None, check=_crop, doc="validation centre-crop side in px (default: the tile size)")
    on_size: str = param("crop", check=one_of(SIZE_POLICIES), doc="mixed tile sizes: crop or refuse")
    augment: str = param("histology", check=one_of(AUGMENTATIONS), doc="augmentation recipe")
    hed_sigma: float = param(0.05, check=half_open(0, 1), doc="strength of the HED jitter")
    balance: str = param("auto", check=one_of(("auto", *BALANCE_MODES)), doc="batch balancing over classes and slides")
    val_frac: float = param(0.2, check=half_open(0, 1), doc="share of groups for validation")
    patience: int | None = param(None, check=at_least(1), doc="epochs without improvement before stopping")
    drop_path: float = param(0.0, check=half_open(0, 1), doc="stochastic depth rate")

    _command = "finetune"

    def __post_init__(self) -> None:
        self._check_data_and_length()
        if self.stem is None:  # the model's family default ("patch" for ConvNeXt; "none" without stems)
            from ..encoders import family_for

            object.__setattr__(self, "stem", family_for(self.model).default_stem)
        if self.weights is not None and self.pretrained:
            raise ConfigError("pass either --weights or --pretrained, not both")
        check_params(self)
        EncoderConfig(model=self.model, stem=self.stem, stem_init=self.stem_init)  # the encoder's own checks
        parse_freeze(self.freeze)
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 10)

    def result_dict(self) -> dict[str, Any]:
        """The fields that decide the result (no output path, device, worker count...)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def training_fingerprint(self, data_fingerprint: str = "", start_sha256: str = "") -> str:
        """sha256 of the result-deciding fields, the data (tiles, labels, groups) and the starting weights."""
        # Inputs are named by content (data fingerprint, weights sha256), not by path.
        cfg = {k: v for k, v in self.result_dict().items() if k not in ("data", "labels", "weights")}
        return json_sha256({"config": cfg, "data": data_fingerprint, "start": start_sha256})
