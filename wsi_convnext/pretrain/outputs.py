"""What a pretraining run writes into ENC_DIR (``finetune``'s layout, without a head).

- ``encoder.safetensors``: the backbone the method hands out (DINO: the teacher; SimCLR: the
  student), heads discarded; with ``--probe``, that of the evaluation with the best linear-probe
  balanced accuracy, else the last step's. Metadata: ``wsi_convnext.kind`` = ``pretrained_encoder``,
  ``model``, ``stem``, ``method``, ``fingerprint``, ``data_fingerprint``, so ``embed --weights
  ENC_DIR`` (and ``finetune --weights``, ``pretrain --init``) pick model and stem up.
- ``config.json``: the configuration, resolved values, data summary, start point, fingerprint, versions.
- ``metrics.json``: per-step ``history`` (loss, lr, teacher entropy / contrastive accuracy),
  ``evaluations`` (feature effective rank, teacher entropy, probe scores), ``collapse`` events,
  the selected step, throughput and skipped tiles; ``metrics.md`` the evaluations as a table.
- ``curves.png``: loss per step; feature rank and probe balanced accuracy per evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_dir, atomic_write_text
from ..encoders.weights import CONFIG_FILE, ENCODER_FILE, weights_metadata
from ..finetune.outputs import CURVES_FILE, METRICS_FILE, TABLE_FILE, save_curves

if TYPE_CHECKING:
    from ..data.labelled import LabelledTiles
    from ..encoders import Encoder
    from ..finetune.train import StartPoint
    from .config import PretrainConfig

__all__ = ["write_outputs"]


def _probe_score(ev: dict[str, Any], name: str) -> float | None:
    return ((ev.get("probe") or {}).get(name) or {}).get("balanced_accuracy")


def _table(evaluations: list[dict[str, Any]], selected: int | None) -> str:
    lines = ["| step | feature rank | teacher entropy | probe linear bal. acc | probe kNN bal. acc |", "|---:|---:|---:|---:|---:|"]

    def f(v: Any) -> str:
        return "" if v is None else f"{v:.3f}"

    for ev in evaluations:
        mark = " *" if ev["step"] == selected else ""
        lines.append(f"| {ev['step']}{mark} | {f(ev.get('feature_rank'))} | {f(ev.get('teacher_entropy'))} | "
                     f"{f(_probe_score(ev, 'linear'))} | {f(_probe_score(ev, 'knn'))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _curves(state: dict[str, Any], path: Path) -> None:
    h, ev = state["history"], state["evaluations"]
    steps = [e["step"] for e in ev]
    probes = [(steps, [np.nan if _probe_score(e, n) is None else _probe_score(e, n) for e in ev], "o-", f"probe {n}")
              for n in ("linear", "knn")]  # fmt: skip
    save_curves(path, [
        ("step", "loss", [([r["step"] for r in h], [r["loss"] for r in h], "-", None)], False),
        ("step", "feature effective rank", [(steps, [e["feature_rank"] for e in ev], "o-", None)], False),
        ("step", "probe balanced accuracy", probes, True),
    ], width=10 / 3)  # fmt: skip


def write_outputs(
    out: Path, *, config: PretrainConfig, encoder: Encoder, backbone_state: dict[str, Any], state: dict[str, Any],
    tiles: LabelledTiles, start: StartPoint, fingerprint: str, data_fp: str, total_steps: int, world_size: int,
    skipped: list[tuple[str, str]],
) -> Path:  # fmt: skip
    """Write ENC_DIR atomically (see the module docstring); returns ``out``."""
    import timm
    import torch
    from safetensors.torch import save_file

    from .. import __version__
    from ..labels.metrics import metrics_to_json

    selected = (state.get("best") or {}).get("step") or state["step"]
    meta = weights_metadata(config.model, config.stem, {
        "kind": "pretrained_encoder", "method": config.method, "fingerprint": fingerprint,
        "data_fingerprint": data_fp, "version": __version__,
    })  # fmt: skip
    secs = float(state.get("train_seconds") or 0.0)
    cfg_doc = {
        "kind": "wsi_convnext.pretrain", "config": config.to_dict(), "model": config.model, "stem": config.stem,
        "method": config.method, "fingerprint": fingerprint,
        "resolved": {"total_steps": total_steps, "global_batch": config.batch_size, "world_size": world_size,
                     "selected_step": selected},
        "data": tiles.summary() | {"fingerprint": data_fp}, "start": start.to_dict(),
        "preprocessing": dict(encoder.preprocessing),
        "versions": {"wsi_convnext": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }  # fmt: skip
    metrics_doc = {
        "history": state["history"], "evaluations": state["evaluations"], "collapse": state["collapse"],
        "selected_step": selected,
        "selection": "best linear-probe balanced accuracy on --probe" if state.get("best") else "last step",
        "train_seconds": secs, "train_tiles": int(state.get("train_tiles") or 0),
        "train_tiles_per_second": (state.get("train_tiles") or 0) / secs if secs > 0 else None,
        "n_skipped": len(skipped), "skipped": [{"tile": r, "reason": why} for r, why in skipped],
    }  # fmt: skip
    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in backbone_state.items()}, str(tmp / ENCODER_FILE), metadata=meta)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(cfg_doc, indent=2, default=str) + "\n")
        atomic_write_text(tmp / METRICS_FILE, metrics_to_json(metrics_doc) + "\n")
        atomic_write_text(tmp / TABLE_FILE, _table(state["evaluations"], selected))
        _curves(state, tmp / CURVES_FILE)
    return out
