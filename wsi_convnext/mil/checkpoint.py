"""Model checkpoints: ``model.safetensors`` (weights) + ``config.json`` (everything else). No pickles.

``config.json`` holds the format version, package version, aggregator name and full kwargs, input
dimension, class names, positive class, feature key, the feature standardisation statistics
(per-dimension mean/std as float lists; float32 → JSON → float32 is exact), training arguments and
the SHA-256 of the weights file, which is checked on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputNotFoundError, WeightsError
from .._io import atomic_path, atomic_write_text, file_sha256
from ..labels.metrics import _json_safe

__all__ = ["save_model", "load_model", "WEIGHTS_FILE", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "wsi-convnext-mil"
FORMAT_VERSION = 1
_NORM_KEYS = ("norm_mean", "norm_std")


def save_model(
    model_dir: str | os.PathLike[str],
    model: Any,
    *,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a :class:`~wsi_convnext.mil.model.TrainedModel`) to ``model_dir``.

    Args:
        model_dir: Folder (created if needed); existing checkpoint files are replaced.
        model: The trained model.
        name: Model name (used e.g. as the score name written into stores); default: folder name.
        extra: More JSON-serialisable metadata stored under ``"extra"``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    from .. import __version__

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = model.module
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k not in _NORM_KEYS}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    mean = module.norm_mean.detach().cpu().numpy().astype(np.float32)
    std = module.norm_std.detach().cpu().numpy().astype(np.float32)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "name": name or out.resolve().name,
        "aggregator": model.aggregator,
        "aggregator_kwargs": model.aggregator_kwargs,
        "in_dim": int(module.aggregator.in_dim),
        "classes": list(model.classes),
        "positive_class": model.positive_class,
        "feature_key": model.feature_key,
        "normalization": {
            "kind": "standardize",
            "description": "x' = (x - mean) / std per feature dimension, statistics of the training tiles",
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        },
        "training": model.info,
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(out / WEIGHTS_FILE)},
        "extra": extra or {},
    }
    text = json.dumps(_json_safe(config), indent=2, allow_nan=False)
    atomic_write_text(out / CONFIG_FILE, text + "\n")
    return out


def read_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check ``config.json`` of a model folder."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InputNotFoundError(f"model folder {d} not found; pass the folder written by training")
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputNotFoundError(f"model folder {d} has no {CONFIG_FILE}; it is not a complete wsi-convnext model")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt, re-train or restore it") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise WeightsError(f"{cfg_path} is not a {FORMAT} config; pass a folder written by wsi-convnext training")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(
            f"{cfg_path} has format_version {version!r}, this wsi-convnext reads <= {FORMAT_VERSION}; upgrade wsi-convnext"
        )
    required = ("aggregator", "aggregator_kwargs", "in_dim", "classes", "normalization", "weights")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise WeightsError(f"{cfg_path} lacks key(s) {', '.join(missing)}; the checkpoint is corrupt")
    return cfg


def load_model(model_dir: str | os.PathLike[str]) -> Any:
    """Load a :class:`~wsi_convnext.mil.model.TrainedModel` written by :func:`save_model`.

    Raises:
        InputNotFoundError: Folder, config or weights file missing.
        WeightsError: Corrupt/foreign config or weights, checksum mismatch, or weights that do not
            fit the configured aggregator.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import FeatureStats, TrainedModel, new_model

    d = Path(model_dir)
    cfg = read_config(d)
    wpath = d / str(cfg["weights"].get("file", WEIGHTS_FILE))
    if not wpath.is_file():
        raise InputNotFoundError(f"model folder {d} has no {wpath.name}; the checkpoint is incomplete")
    expected = cfg["weights"].get("sha256")
    if expected and file_sha256(wpath) != expected:
        raise WeightsError(f"{wpath} does not match the checksum in {CONFIG_FILE}; the file is corrupt or was replaced")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{wpath} cannot be read as safetensors ({e}); the checkpoint is corrupt") from e
    norm = cfg["normalization"]
    try:
        stats = FeatureStats(np.asarray(norm["mean"], dtype=np.float32), np.asarray(norm["std"], dtype=np.float32))
        classes = [str(c) for c in cfg["classes"]]
        module, _ = new_model(str(cfg["aggregator"]), int(cfg["in_dim"]), len(classes), stats, dict(cfg["aggregator_kwargs"]))
    except ConfigError as e:
        raise WeightsError(f"{d / CONFIG_FILE}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{d / CONFIG_FILE}: invalid model description ({e}); the checkpoint is corrupt") from e
    full = {k: v for k, v in module.state_dict().items()}
    expected_keys = set(full) - set(_NORM_KEYS)
    if set(state) != expected_keys:
        missing = sorted(expected_keys - set(state))
        extra = sorted(set(state) - expected_keys)
        raise WeightsError(
            f"{wpath} does not fit aggregator {cfg['aggregator']!r}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, v in state.items():
        if v.shape != full[k].shape:
            raise WeightsError(f"{wpath}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(full[k].shape)}")
    with torch.no_grad():
        module.load_state_dict({**state, "norm_mean": full["norm_mean"], "norm_std": full["norm_std"]})
    return TrainedModel(
        module,
        tuple(classes),
        str(cfg["aggregator"]),
        dict(cfg["aggregator_kwargs"]),
        feature_key=cfg.get("feature_key"),
        positive_class=cfg.get("positive_class"),
        info={"name": cfg.get("name"), "package_version": cfg.get("package_version"), **(cfg.get("training") or {})},
    )
