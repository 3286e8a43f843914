"""Cohort-scope training stages: weak-label fine-tuning of the encoder, and MIL on the cohort.

With ``[finetune] labels = "labels.csv"`` one run config does tile → ``finetune`` → embed
(with the fine-tuned encoder) → ``mil``:

* ``finetune`` (a GPU task when the cluster has GPU workers) holds out ``test_frac`` of the
  labelled patients (stratified, :func:`~wsi_convnext.mil.splits.holdout_split`), writes
  ``OUT/training/{train,test}_labels.csv`` and fine-tunes the ``[embed]`` encoder on the
  tiles of the training slides only, with their slide labels, into ``OUT/training/encoder/``
  (:func:`~wsi_convnext.finetune.finetune_encoder`; rerunning resumes or finds it finished).
  Its ``encoder_weights`` output makes the per-slide ``embed`` stage that follows use them.
* ``mil`` cross-validates ``[mil]`` on the training slides and saves the model in
  ``OUT/training/mil/`` (:func:`~wsi_convnext.mil.api.train`); the held-out slides, which
  neither the encoder nor the MIL model saw, are evaluated into ``OUT/training/test/``
  (``metrics.json``, ``predictions.csv``). Without ``[finetune]``, ``[mil] labels`` trains
  on every labelled slide (cross-validation only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text
from ..config import RunConfig
from ..errors import ConfigError
from .stages import Resources, StageSpec, register_stage

if TYPE_CHECKING:
    from ..inputs import SlideSpec

__all__ = ["DEFAULT_TEST_FRAC", "finetune_stage", "mil_stage", "training_dir"]

#: Share of the labelled patients held out from fine-tuning and MIL training by default.
DEFAULT_TEST_FRAC = 0.25


def training_dir(config: RunConfig) -> Path:
    """``OUT/training``: the split, the fine-tuned encoder, the MIL model and the test metrics."""
    if config.out is None:
        raise ConfigError("run config: no output folder ('out')")
    return Path(config.out) / "training"


def _write_labels(path: Path, table: Any) -> Path:
    rows = [f"{s},{lab},{p}" for s, lab, p in zip(table.slide_ids, table.labels, table.patient_ids)]
    atomic_write_text(path, "slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    return path


def _split(config: RunConfig, slide_ids: Sequence[str]) -> tuple[Any, Any]:
    """(training, held-out) label tables of the labelled slides among ``slide_ids``."""
    from ..mil.data import read_labels
    from ..mil.splits import holdout_split

    if config.labels is None:
        raise ConfigError("run config: the training stages need 'finetune.labels' or 'mil.labels'")
    table = read_labels(config.labels)
    present = [s for s in table.slide_ids if s in set(slide_ids)]
    if not present:
        raise ConfigError(f"{config.labels}: none of its slides is in this run's cohort")
    table = table.subset(present)
    test_frac = 0.0 if not config.finetune.labels else config.finetune.test_frac
    test_frac = DEFAULT_TEST_FRAC if test_frac is None else test_frac
    seed = config.finetune.seed if config.finetune.seed is not None else 0
    fit_ids, test_ids = holdout_split(table, test_frac, seed=seed)
    return table.subset(fit_ids), table.subset(test_ids) if test_ids else None


def finetune_stage(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Fine-tune the ``[embed]`` encoder on the training slides' tiles (weak slide labels).

    Returns:
        ``encoder_weights`` (the fine-tuned ``encoder.safetensors``, used by the later
        ``embed`` stage), ``encoder_dir``, and the training and held-out slide counts.
    """
    from ..finetune import FinetuneConfig, finetune_encoder

    spec = config.encoder_config()
    if spec is None:
        raise ConfigError("run config: [finetune] needs [embed] model")
    fit, test = _split(config, [s.slide_id for s in slides])
    out = training_dir(config)
    labels = _write_labels(out / "train_labels.csv", fit)
    if test is not None:
        _write_labels(out / "test_labels.csv", test)
    stores = tuple(str(states[s]["store"]) for s in fit.slide_ids)
    options = {f: v for f, v in vars(config.finetune).items() if v is not None and f not in ("labels", "test_frac")}
    options.setdefault("device", config.embed.device or "auto")
    ft = FinetuneConfig(
        data=stores, labels=str(labels), out=str(out / "encoder"), model=spec.model, stem=spec.stem or "patch",
        weights=spec.weights, pretrained=spec.pretrained, stem_init=spec.stem_init, overwrite=config.overwrite,
        **options,
    )  # fmt: skip
    enc_dir = finetune_encoder(ft)
    return {
        "encoder_weights": str(enc_dir / "encoder.safetensors"),
        "encoder_dir": str(enc_dir),
        "train_slides": len(fit.slide_ids),
        "test_slides": 0 if test is None else len(test.slide_ids),
    }


def mil_stage(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Cross-validate and save a MIL model on the training slides; evaluate the held-out ones.

    Returns:
        ``model_dir``, ``cv_auc`` (pooled out-of-fold AUC on the training slides) and, with
        held-out slides, ``test_auc`` and ``test_dir``.
    """
    from ..mil.api import evaluate, train

    fit, test = _split(config, [s.slide_id for s in slides])
    out = training_dir(config)
    keys = {states[s].get("feature_key") for s in fit.slide_ids}
    if len(keys) != 1 or None in keys:
        raise ConfigError(f"the mil stage needs one feature key on every training slide, got {sorted(map(str, keys))}")
    (key,) = keys
    labels = _write_labels(out / "train_labels.csv", fit)
    report = train([str(states[s]["store"]) for s in fit.slide_ids], labels, out / "mil", config.mil_config(),
                   feature_key=key, overwrite=True)  # fmt: skip
    result: dict[str, Any] = {"model_dir": str(out / "mil"), "feature_key": key}
    pooled = report.metrics.get("pooled", {}).get("auc", {})
    result["cv_auc"] = pooled.get("value")
    if test is not None:
        test_labels = _write_labels(out / "test_labels.csv", test)
        m = evaluate(out / "mil", [str(states[s]["store"]) for s in test.slide_ids], test_labels, out / "test")
        result.update(test_auc=m["auc"]["value"], test_dir=str(out / "test"))
    return result


def _finetunes(config: RunConfig) -> bool:
    return bool(config.finetune.labels and config.embed.model)


def _trains_mil(config: RunConfig) -> bool:
    return bool(config.labels is not None and config.embed.model)


def _finetune_resources(config: RunConfig) -> Resources:
    return "cpu" if (config.finetune.device or config.embed.device or "auto") == "cpu" else "gpu"


register_stage(
    StageSpec(
        "finetune", finetune_stage, resources=_finetune_resources, scope="cohort", enabled=_finetunes,
        doc="weak-label fine-tuning of the encoder on the training slides (before embed)",
    ),  # fmt: skip
    before="embed",
)
register_stage(
    StageSpec("mil", mil_stage, scope="cohort", enabled=_trains_mil, doc="MIL on the training slides; test on the held-out")
)
