"""The fine-tuning configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..data.labelled import BALANCE_MODES, SIZE_POLICIES
from ..errors import ConfigError

__all__ = ["AUGMENTATIONS", "FinetuneConfig", "parse_freeze"]

#: Augmentation recipes: geometric ones run in the loader workers, colour ones on the batch.
AUGMENTATIONS = {
    "histology": "random crop at the tile's µm/px, flips, 90° rotations, HED + brightness/contrast/saturation jitter",
    "geometric": "random crop, flips and 90° rotations only",
    "none": "random crop only (centre crop when the tile is the training size)",
}

_FREEZE_RE = re.compile(r"^(none|stem|stages:(\d+))$")

# Fields that do not change the result (where it runs, how fast, what is printed).
_RUNTIME_FIELDS = frozenset({"out", "device", "num_workers", "threads", "overwrite", "compile", "checkpoint_every", "strict"})


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


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (see ``wsi-convnext finetune --help``).

    Attributes:
        data: Image folder, CSV ``path,label[,group][,split]``, or tile stores / folders of stores.
        out: Output folder (ENC_DIR).
        labels: Labels CSV ``slide_id,label[,patient_id][,split]`` for stores (weak labels).
        model: timm ConvNeXt name.
        stem: Stem name (``wsi_convnext.encoders.STEMS``).
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
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
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
    stem: str = "patch"
    weights: str | None = None
    pretrained: bool = False
    stem_init: str | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    accumulate: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    freeze: str = "none"
    layer_decay: float = 1.0
    crop_size: int | None = None
    eval_size: int | None = None
    on_size: str = "crop"
    augment: str = "histology"
    hed_sigma: float = 0.05
    balance: str = "auto"
    val_frac: float = 0.2
    patience: int | None = None
    drop_path: float = 0.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    num_workers: int | None = None
    threads: int | None = None
    strict: bool = False
    checkpoint_every: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        data = (self.data,) if isinstance(self.data, str) else tuple(str(d) for d in self.data)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "out", str(self.out))
        if not data:
            raise ConfigError("no training data given; pass an image folder, a CSV or tile stores")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("pass either --epochs or --steps, not both")
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 10)
        for name in ("epochs", "steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{name} must be a positive integer, got {v!r}")
        for name in ("batch_size", "accumulate"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup must be a fraction in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        parse_freeze(self.freeze)
        for name in ("crop_size", "eval_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 32 or v % 4):
                raise ConfigError(f"--{name.replace('_', '-')} must be a multiple of 4 and >= 32 px, got {v!r}")
        if self.on_size not in SIZE_POLICIES:
            raise ConfigError(f"unknown --on-size {self.on_size!r}: choose one of {', '.join(SIZE_POLICIES)}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown --augment {self.augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
        if not 0 <= self.hed_sigma < 1:
            raise ConfigError(f"--hed-sigma must be in [0, 1), got {self.hed_sigma}")
        if self.balance != "auto" and self.balance not in BALANCE_MODES:
            raise ConfigError(f"unknown --balance {self.balance!r}: choose auto or one of {', '.join(BALANCE_MODES)}")
        if not 0 <= self.val_frac < 1:
            raise ConfigError(f"--val-frac must be in [0, 1), got {self.val_frac}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"--patience must be >= 1, got {self.patience}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.weights is not None and self.pretrained:
            raise ConfigError("pass either --weights or --pretrained, not both")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown finetune config key(s) {unknown}")
        d = dict(d)
        d["data"] = tuple(d.get("data") or ())
        return cls(**d)

    def result_dict(self) -> dict[str, Any]:
        """The fields that decide the result (no output path, device, worker count...)."""
        return {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}

    def fingerprint(self, data_fingerprint: str = "", start_sha256: str = "") -> str:
        """sha256 of the result-deciding fields, the data (tiles, labels, groups) and the starting weights."""
        # Inputs are named by content (data fingerprint, weights sha256), not by path.
        cfg = {k: v for k, v in self.result_dict().items() if k not in ("data", "labels", "weights")}
        payload = json.dumps(
            {"config": cfg, "data": data_fingerprint, "start": start_sha256}, sort_keys=True, default=str
        )
        return hashlib.sha256(payload.encode()).hexdigest()
