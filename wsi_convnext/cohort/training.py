"""Cohort-scope training stages: weak-label fine-tuning of the encoder, and MIL on the cohort.

With ``[finetune] labels = "labels.csv"`` one run config does tile → ``finetune`` → embed
(with the fine-tuned encoder) → ``mil``:

* ``finetune`` (a GPU task when the cluster has GPU workers) splits the labelled patients
  once (stratified, :func:`~wsi_convnext.labels.splits.holdout_split`): ``held_out`` of them
  (default 0.5) are kept away from the encoder. It writes ``OUT/training/encoder_labels.csv``
  and ``mil_labels.csv`` and fine-tunes the ``[embed]`` encoder on the tiles of the encoder
  slides only, with their slide labels, into ``OUT/training/encoder/``
  (:func:`~wsi_convnext.finetune.finetune_encoder`; rerunning resumes or finds it finished).
  Its ``encoder_weights`` output makes the per-slide ``embed`` stage that follows use them.
  After the ``pretrain`` stage (:mod:`.pretraining`) it starts from the pretrained encoder.
* ``mil`` cross-validates ``[mil]`` on the held-out slides, which the encoder never saw, and
  saves the model in ``OUT/training/mil/`` (:func:`~wsi_convnext.mil.api.train`: metrics,
  ROC, out-of-fold predictions; a rerun with the same inputs keeps it). MIL is never trained
  on the encoder's slides: a fine-tuned encoder carries each of those slides' label on all its
  tiles, and MIL would learn that shortcut instead of the lesion (measured in
  ``benchmarks/mil.py --finetune``). Without ``[finetune]``, ``[mil] labels`` trains on every
  labelled slide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text, json_sha256
from ..config import RunConfig
from ..errors import ConfigError
from .stages import Resources, StageSpec, register_stage

if TYPE_CHECKING:
    from ..inputs import SlideSpec

__all__ = ["DEFAULT_HELD_OUT", "finetune_stage", "mil_stage", "training_dir", "training_resources"]

logger = logging.getLogger(__name__)

#: Share of the labelled patients kept away from the encoder (for MIL) by default.
DEFAULT_HELD_OUT = 0.5


def training_dir(config: RunConfig) -> Path:
    """``OUT/training``: the split, the fine-tuned encoder and the MIL model."""
    if config.out is None:
        raise ConfigError("run config: no output folder ('out')")
    return Path(config.out) / "training"


def _split(config: RunConfig, slide_ids: Sequence[str]) -> tuple[Any, Any]:
    """(encoder, MIL) label tables of the labelled slides among ``slide_ids``.

    Without ``[finetune]`` the encoder part is None and MIL gets every labelled slide.
    """
    from ..labels.table import read_labels
    from ..labels.splits import holdout_split

    if config.labels is None:
        raise ConfigError("run config: the training stages need 'finetune.labels' or 'mil.labels'")
    table = read_labels(config.labels)
    cohort = set(slide_ids)
    present = [s for s in table.slide_ids if s in cohort]
    if not present:
        raise ConfigError(f"{config.labels}: none of its slides is in this run's cohort")
    table = table.subset(present)
    if not config.finetune.labels:
        return None, table
    held_out = DEFAULT_HELD_OUT if config.finetune.held_out is None else config.finetune.held_out
    enc_ids, mil_ids = holdout_split(table, held_out, seed=config.finetune.seed or 0)
    if not enc_ids or not mil_ids:
        raise ConfigError(f"{config.labels}: too few patients per class to keep {held_out:g} of them from the encoder")
    return table.subset(enc_ids), table.subset(mil_ids)


def finetune_stage(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Fine-tune the ``[embed]`` encoder on the encoder slides' tiles (weak slide labels).

    Returns:
        ``encoder_weights`` (the fine-tuned ``encoder.safetensors``, used by the later
        ``embed`` stage), ``encoder_dir``, and the encoder and MIL slide counts.
    """
    from ..finetune import FinetuneConfig, finetune_encoder
    from ..labels.table import write_labels

    spec = config.encoder_config()
    if spec is None:
        raise ConfigError("run config: [finetune] needs [embed] model")
    enc, mil = _split(config, [s.slide_id for s in slides])
    out = training_dir(config)
    labels = write_labels(out / "encoder_labels.csv", enc)
    write_labels(out / "mil_labels.csv", mil)
    stores = tuple(str(states[s]["store"]) for s in enc.slide_ids)
    options = {f: v for f, v in vars(config.finetune).items() if v is not None and f not in ("labels", "held_out")}
    options.setdefault("device", config.embed.device or "auto")
    start = {"weights": spec.weights, "pretrained": spec.pretrained, "stem": spec.stem}
    pretrained = states[enc.slide_ids[0]].get("encoder_weights")
    if pretrained:  # the cohort's `pretrain` stage ran first: continue its encoder
        start = {"weights": pretrained, "pretrained": False, "stem": states[enc.slide_ids[0]].get("encoder_stem")}
    ft = FinetuneConfig(
        data=stores, labels=str(labels), out=str(out / "encoder"), model=spec.model, stem_init=spec.stem_init,
        overwrite=config.overwrite, **start, **options,
    )  # fmt: skip
    enc_dir = finetune_encoder(ft)
    return {
        "encoder_weights": str(enc_dir / "encoder.safetensors"),
        "encoder_dir": str(enc_dir),
        "encoder_slides": len(enc.slide_ids),
        "mil_slides": len(mil.slide_ids),
    }


def mil_stage(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Cross-validate and save a MIL model on the slides the encoder never saw (every labelled
    slide without ``[finetune]``).

    A rerun with the same ``[mil]`` settings, labels, slides and feature key finds the model
    there (``OUT/training/mil/stage.json``) and does not retrain, unless ``overwrite``.

    Returns:
        ``model_dir``, ``feature_key``, ``slides`` and ``cv_auc`` (pooled out-of-fold AUC).
    """
    from ..mil.api import train
    from ..labels.table import write_labels

    _, mil = _split(config, [s.slide_id for s in slides])
    out = training_dir(config)
    keys = {states[s].get("feature_key") for s in mil.slide_ids}
    if len(keys) != 1 or None in keys:
        raise ConfigError(f"the mil stage needs one feature key on every slide, got {sorted(map(str, keys))}")
    (key,) = keys
    labels = write_labels(out / "mil_labels.csv", mil)
    stores = [str(states[s]["store"]) for s in mil.slide_ids]
    mil_config = config.mil_config()
    inputs = {"mil": dataclasses.asdict(mil_config), "feature_key": key, "stores": stores, "labels": labels.read_text()}
    inputs_fingerprint = json_sha256(inputs, round_floats=6)
    record = out / "mil" / "stage.json"
    if not config.overwrite and record.is_file() and (out / "mil" / "model.safetensors").is_file():
        with contextlib.suppress(ValueError, KeyError):
            done = json.loads(record.read_text())
            if done["fingerprint"] == inputs_fingerprint:
                logger.info("mil: the model in %s is up to date; not retrained", out / "mil")
                return dict(done["result"])
    report = train(stores, labels, out / "mil", mil_config, feature_key=key, overwrite=True)
    pooled = report.metrics.get("pooled", {}).get("auc", {})
    result = {"model_dir": str(out / "mil"), "feature_key": key, "slides": len(mil.slide_ids), "cv_auc": pooled.get("value")}
    atomic_write_text(record, json.dumps({"fingerprint": inputs_fingerprint, "result": result}, indent=1) + "\n")
    return result


def _finetunes(config: RunConfig) -> bool:
    return bool(config.finetune.labels and config.embed.model)


def _trains_mil(config: RunConfig) -> bool:
    return bool(config.labels is not None and config.embed.model)


def training_resources(section: str, config: RunConfig) -> Resources:
    """``"cpu"`` when the ``[section]`` device (else ``[embed]``'s) is the CPU, else ``"gpu"``
    (for a training stage's ``resources``, as ``functools.partial(training_resources, section)``)."""
    return "cpu" if (getattr(config, section).device or config.embed.device or "auto") == "cpu" else "gpu"


register_stage(
    StageSpec(
        "finetune", finetune_stage, resources=partial(training_resources, "finetune"), scope="cohort", enabled=_finetunes,
        doc="weak-label fine-tuning of the encoder on the encoder slides (before embed)",
    ),  # fmt: skip
    before="embed",
)
register_stage(StageSpec("mil", mil_stage, scope="cohort", enabled=_trains_mil, doc="MIL on the slides the encoder never saw"))
