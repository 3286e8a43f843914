"""What a fine-tuning run writes into ENC_DIR, and how it is read back.

- ``encoder.safetensors``: the backbone without the classifier (timm ConvNeXt, ``num_classes=0``
  layout), loadable by ``embed --weights``. Metadata: ``wsi_convnext.model``,
  ``wsi_convnext.stem``, ``wsi_convnext.fingerprint`` (the training fingerprint),
  ``wsi_convnext.classes`` (JSON list), ``wsi_convnext.kind`` = ``finetuned_encoder``.
- ``head.safetensors``: the linear classifier (``weight`` (C, D), ``bias`` (C,)), same metadata.
- ``config.json``: the configuration (``config``), resolved values (classes, crop and eval
  sizes, balance mode, steps), the data summary, the split sizes, the starting point, the
  freeze summary, the fingerprint and library versions.
- ``metrics.json``: per-epoch history (``train_loss``, ``val_loss``, ``val_accuracy``,
  ``val_balanced_accuracy``, ``val_auc`` = macro one-vs-rest AUC), the best epoch, its
  validation metrics with stratified bootstrap 95% CIs, training throughput, skipped files,
  stores left out because they failed their check (``failed_stores``; also in ``config.json``).
- ``metrics.md``: the same as a readable table.
- ``curves.png``: training and validation loss, validation balanced accuracy and AUC per epoch.

The weights saved are those of the best epoch by validation balanced accuracy (ties: lower
validation loss), or of the last epoch without a validation part.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_dir, atomic_write_text
from ..encoders.weights import CONFIG_FILE, ENCODER_FILE, weights_metadata
from ..errors import InputNotFoundError, WeightsError

if TYPE_CHECKING:
    import torch

    from ..data.labelled import LabelledTiles
    from ..encoders import Encoder
    from .config import FinetuneConfig
    from .train import StartPoint

__all__ = ["FinetunedModel", "load_finetuned", "read_training_fingerprint", "save_curves", "write_outputs"]

HEAD_FILE = "head.safetensors"
METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"
CURVES_FILE = "curves.png"


def read_training_fingerprint(enc_dir: str | os.PathLike[str]) -> str | None:
    """The training fingerprint of a finished output folder, or None."""
    p = Path(enc_dir)
    try:
        return json.loads((p / CONFIG_FILE).read_text()).get("fingerprint") if (p / ENCODER_FILE).is_file() else None
    except (OSError, ValueError):
        return None


def _fmt(v: Any, nd: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _table(history: list[dict[str, Any]], best_epoch: int | None, best: dict[str, Any] | None) -> str:
    lines = [
        "| epoch | step | train loss | val loss | val acc | val bal. acc | val macro AUC |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in history:
        mark = " *" if r["epoch"] == best_epoch else ""
        lines.append(
            f"| {r['epoch']}{mark} | {r['step']} | {_fmt(r.get('train_loss'), 4)} | {_fmt(r.get('val_loss'), 4)} | "
            f"{_fmt(r.get('val_accuracy'))} | {_fmt(r.get('val_balanced_accuracy'))} | {_fmt(r.get('val_auc'))} |"
        )
    if best:
        def ci(m: str) -> str:
            e = best.get(m) or {}
            return f"{_fmt(e.get('value'))} (95% CI {_fmt(e.get('ci_low'))}–{_fmt(e.get('ci_high'))})"

        lines += ["", f"Best epoch {best_epoch} (*): val balanced accuracy {ci('balanced_accuracy')}, "
                  f"val macro AUC {ci('auc')}; n = {best.get('n')} tiles."]  # fmt: skip
    return "\n".join(lines) + "\n"


#: One curve of :func:`save_curves`: (x, y, matplotlib format, legend label or None).
Curve = tuple[Sequence[float], Sequence[float], str, "str | None"]


def save_curves(path: Path, panels: Sequence[tuple[str, str, Sequence[Curve], bool]], width: float = 4.5) -> None:
    """Save side-by-side line plots as a PNG (``curves.png`` of finetune and pretrain).

    Args:
        path: The PNG to write.
        panels: Per panel (x label, y label, curves, y in [0, 1]); a legend where a curve has a label.
        width: Inches per panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * len(panels), 3.4))
    FigureCanvasAgg(fig)
    for ax, (xlabel, ylabel, curves, unit) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for x, y, fmt, label in curves:
            ax.plot(x, y, fmt, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if unit:
            ax.set_ylim(0, 1.02)
        if any(c[3] for c in curves):
            ax.legend(loc="lower right" if unit else "best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _curves(history: list[dict[str, Any]], path: Path) -> None:
    ep = [r["epoch"] for r in history]

    def col(k: str) -> list[float]:
        return [np.nan if r.get(k) is None else r[k] for r in history]

    save_curves(path, [
        ("epoch", "cross-entropy", [(ep, col("train_loss"), "o-", "train"), (ep, col("val_loss"), "s-", "validation")], False),
        ("epoch", "", [(ep, col("val_balanced_accuracy"), "o-", "val balanced accuracy"),
                       (ep, col("val_auc"), "s-", "val macro AUC")], True),
    ])  # fmt: skip


def write_outputs(
    out: Path, *, config: FinetuneConfig, encoder: Encoder, best_state: dict[str, Any], state: dict[str, Any],
    tiles: LabelledTiles, split_sizes: dict[str, int], start: StartPoint, fingerprint: str,
    freeze_info: dict[str, Any], balance: str, total_steps: int, steps_per_epoch: int,
    skipped: list[tuple[str, str]], crop_size: int, eval_size: int,
) -> Path:  # fmt: skip
    """Write ENC_DIR atomically (see the module docstring); returns ``out``."""
    import timm
    import torch
    from safetensors.torch import save_file

    from .. import __version__
    from ..labels.metrics import compute_metrics, metrics_to_json

    classes = list(tiles.classes)
    meta = weights_metadata(config.model, config.stem, {
        "kind": "finetuned_encoder", "fingerprint": fingerprint, "classes": json.dumps(classes), "version": __version__,
    })  # fmt: skip
    best_eval = None
    if best_state.get("val_probs") is not None:
        vy = best_state["val_y"].numpy()
        vp = best_state["val_probs"].numpy()
        if len(vy) and len(np.unique(vy)) > 1:
            best_eval = compute_metrics(vy, vp, classes, n_boot=1000, seed=config.seed)
    secs = float(state.get("train_seconds") or 0.0)
    resolved = {
        "classes": classes, "crop_size": crop_size, "eval_size": eval_size, "balance": balance,
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "effective_batch": config.batch_size * config.accumulate,
    }  # fmt: skip
    cfg_doc = {
        "kind": "wsi_convnext.finetune", "config": config.to_dict(), "resolved": resolved,
        "model": config.model, "stem": config.stem, "classes": classes, "fingerprint": fingerprint,
        "data": tiles.summary() | {"fingerprint": tiles.data_fingerprint()}, "split": split_sizes,
        "start": start.to_dict(), "freeze": freeze_info, "preprocessing": dict(encoder.preprocessing),
        "versions": {"wsi_convnext": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }  # fmt: skip
    metrics_doc = {
        "history": state["history"], "best_epoch": state.get("best_epoch"), "best_val": best_eval,
        "selection": "best validation balanced accuracy (ties: lower validation loss)" if best_eval is not None
        else "last epoch (no validation part)",
        "train_seconds": secs, "train_tiles": int(state.get("train_tiles") or 0),
        "train_tiles_per_second": (state.get("train_tiles") or 0) / secs if secs > 0 else None,
        "n_skipped": len(skipped), "skipped": [{"tile": r, "reason": why} for r, why in skipped],
        "failed_stores": [{"store": p, "error": why} for p, why in tiles.failed_stores],
    }  # fmt: skip
    with atomic_dir(out, overwrite=True) as tmp:
        enc_sd = {k: v.contiguous() for k, v in best_state["model"].items()}
        save_file(enc_sd, str(tmp / ENCODER_FILE), metadata=meta)
        save_file({k: v.contiguous() for k, v in best_state["head"].items()}, str(tmp / HEAD_FILE), metadata=meta)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(cfg_doc, indent=2, default=str) + "\n")
        atomic_write_text(tmp / METRICS_FILE, metrics_to_json(metrics_doc) + "\n")
        left_out = "".join(f"\nLeft out (store failed): {p}: {why}\n" for p, why in tiles.failed_stores)
        atomic_write_text(tmp / TABLE_FILE, _table(state["history"], state.get("best_epoch"), best_eval) + left_out)
        _curves(state["history"], tmp / CURVES_FILE)
    return out


class FinetunedModel:
    """An ENC_DIR read back: encoder, head and their description.

    Attributes:
        encoder: The :class:`~wsi_convnext.encoders.Encoder` (weights = ``encoder.safetensors``).
        head: ``torch.nn.Linear`` classifier.
        classes: Class names (head outputs, in order).
        info: ``config.json``.
    """

    def __init__(self, encoder: Encoder, head: torch.nn.Linear, classes: list[str], info: dict[str, Any]) -> None:
        self.encoder = encoder
        self.head = head
        self.classes = classes
        self.info = info

    @property
    def eval_size(self) -> int | None:
        return (self.info.get("resolved") or {}).get("eval_size")


def load_finetuned(enc_dir: str | os.PathLike[str], *, device: str = "auto") -> FinetunedModel:
    """Read an ENC_DIR written by :func:`write_outputs` (eval mode, on ``device``).

    Raises:
        InputNotFoundError: Not a finetune output folder.
        WeightsError: Head and encoder disagree.
    """
    import torch
    from safetensors.torch import load_file

    from ..encoders import build_encoder, resolve_device

    p = Path(enc_dir)
    missing = [n for n in (ENCODER_FILE, HEAD_FILE, CONFIG_FILE) if not (p / n).is_file()]
    if missing:
        raise InputNotFoundError(f"{p}: not a finetune output (missing {', '.join(missing)}); run `wsi-convnext finetune` first")
    info = json.loads((p / CONFIG_FILE).read_text())
    dev = resolve_device(device)
    encoder = build_encoder(info["model"], stem=info["stem"], weights=p / ENCODER_FILE)
    sd = load_file(str(p / HEAD_FILE))
    classes = list(info["classes"])
    if tuple(sd["weight"].shape) != (len(classes), encoder.num_features):
        raise WeightsError(f"{p / HEAD_FILE}: shape {tuple(sd['weight'].shape)} does not fit {len(classes)} classes × {encoder.num_features}")
    head = torch.nn.Linear(encoder.num_features, len(classes))
    head.load_state_dict(sd)
    encoder.to(dev)
    head.to(dev).eval()
    return FinetunedModel(encoder, head, classes, info)
