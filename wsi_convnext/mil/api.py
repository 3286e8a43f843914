"""High-level MIL entry points: :func:`train`, :func:`evaluate`, :func:`predict` (what the CLI calls).

Torch, scikit-learn and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import ConfigError, LabelsError, OnFailure, StoreError, listing
from .config import ProgressFn
from ..labels.table import LabelTable, match_labels, read_labels
from .data import Bag, index_stores, load_bags

if TYPE_CHECKING:
    from .model import TrainedModel
    from .training import CVResult, TrainConfig

__all__ = ["TrainReport", "SlidePrediction", "train", "evaluate", "predict"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

MODEL_FILES = ("model.safetensors", "config.json")


@dataclass
class TrainReport:
    """What :func:`train` did.

    Attributes:
        out_dir: Output folder (also the model folder, loadable with :func:`load_model`).
        metrics: Per-fold, fold-mean and pooled out-of-fold metrics (see ``metrics.json``).
        table: ``metrics.txt`` contents.
        cv: Full cross-validation result (probabilities, folds, tile scores).
        model: The final model (saved in ``out_dir``).
        final_model: How the final model was obtained (``"refit"`` or ``"split"``) and its epochs.
        unlabeled: Slide ids of stores without a label (ignored).
        failed_stores: Stores left out because they failed to read (``slide_id``, ``store``, ``error``).
        files: Written files by role (model, config, metrics_json, metrics_txt, roc, oof_predictions).
    """

    out_dir: Path
    metrics: dict[str, Any]
    table: str
    cv: CVResult
    model: TrainedModel
    final_model: dict[str, Any]
    unlabeled: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    failed_stores: list[dict[str, str]] = field(default_factory=list)


@dataclass
class SlidePrediction:
    """Prediction for one slide: class probabilities (by class name), predicted class, tile count.

    A failed slide (only with ``predict(..., on_error="record")``) has ``status == "failed"``,
    empty ``probabilities`` and ``predicted``, and the one-line ``error``.
    """

    slide_id: str
    probabilities: dict[str, float]
    predicted: str
    n_tiles: int
    store: str | None = None
    status: str = "done"
    error_type: str | None = None
    error: str | None = None


def _labeled_bags(
    stores: Sequence[PathLike],
    table: LabelTable,
    feature_key: str | None,
    *,
    require_all: bool,
    in_memory: bool,
    progress: ProgressFn | None,
    on_failure: OnFailure | None = None,
) -> tuple[list[Bag], LabelTable, list[str], list[dict[str, str]]]:
    """Open stores, match them to labels (errors/warnings as documented), load labelled bags.

    With ``on_failure``, a store that fails to read is left out and returned in the failed list
    (``slide_id`` from its ``<slide_id>.zarr`` name, ``store``, ``error``); its label row counts
    as failed, not as a label without a store.
    """
    if not stores:
        raise ConfigError("no stores given; pass the zarr stores of the slides")
    failed: list[dict[str, str]] = []

    def record(path: Path, error: str) -> None:
        failed.append({"slide_id": path.name.removesuffix(".zarr"), "store": str(path), "error": error})
        on_failure(path, error)  # type: ignore[misc]

    record_fn = record if on_failure is not None else None
    by_id = index_stores(stores, on_failure=record_fn)
    ids = list(by_id)
    if failed:
        gone = {f["slide_id"] for f in failed}
        if all(s in gone for s in table.slide_ids):
            raise LabelsError(f"{table.source}: the stores of all labelled slides failed to read ({listing(sorted(gone))})")
        table = table.subset([s for s in table.slide_ids if s not in gone])
    idx, unlabeled = match_labels(ids, table, require_all=require_all)
    matched = [ids[i] for i in idx]
    from .data import _open

    no_emb = [s for s in matched if not list(_open(by_id[s]).feature_keys)]
    if no_emb:
        raise LabelsError(
            f"{table.source}: {len(no_emb)} labelled slide(s) have no embeddings in their store: "
            f"{listing(no_emb)}; embed them first or remove the rows"
        )
    bags = load_bags(
        [by_id[s] for s in matched], feature_key, in_memory=in_memory, progress=progress, on_failure=record_fn
    )
    if not bags:
        raise LabelsError(f"{table.source}: the stores of all labelled slides failed to read ({listing(matched)})")
    return bags, table.subset([b.slide_id for b in bags]), unlabeled, failed


def _failed_lines(failed: Sequence[dict[str, str]]) -> str:
    """Lines for a metrics table naming the slides left out because their stores failed."""
    return "".join(f"left out (store failed): {f['slide_id']}: {f['error']}\n" for f in failed)


def _write_predictions_csv(
    path: Path, bags_ids: Sequence[str], table: LabelTable | None, probs: np.ndarray, classes: Sequence[str],
    fold_of: np.ndarray | None = None,
) -> Path:
    """Slide predictions in the one dialect (:mod:`wsi_convnext.outputs.predictions`); extras ``patient_id``, ``fold``."""
    from ..outputs.predictions import PredictionRow, write_predictions

    rows = []
    for i, sid in enumerate(bags_ids):
        p = probs[i]
        ok = bool(np.isfinite(p).all())
        extra: dict[str, Any] = {}
        if table is not None:
            extra["patient_id"] = table.patient_ids[i]
        if fold_of is not None:
            extra["fold"] = int(fold_of[i]) if fold_of[i] >= 0 else ""
        rows.append(
            PredictionRow(
                key={"slide_id": sid}, predicted=classes[int(np.argmax(p))] if ok else None,
                probabilities={c: float(v) for c, v in zip(classes, p)} if ok else {},
                true_label=table.labels[i] if table is not None else None, extra=extra,
            )  # fmt: skip
        )
    return write_predictions(path, rows, classes=classes)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    from .._io import ensure_dir

    ensure_dir(out_dir)
    existing = [n for n in MODEL_FILES if (out_dir / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out_dir} already holds a model ({', '.join(existing)}); pass overwrite or choose another folder")


def train(
    stores: Sequence[PathLike],
    labels_csv: PathLike,
    out_dir: PathLike,
    config: TrainConfig | None = None,
    *,
    feature_key: str | None = None,
    in_memory: bool = True,
    name: str | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_failure: OnFailure | None = None,
) -> TrainReport:
    """Cross-validate an aggregator on a labelled cohort and save a final model.

    Cross-validation is patient-grouped and stratified (or follows the CSV's ``split``/``fold``
    column). The final model is refitted on all labelled slides for the median best epoch count of
    the folds; with a ``split`` column it is the model trained on the train split (early-stopped on
    the val split) and the metrics are those of the test split.

    Writes into ``out_dir``: ``model.safetensors`` + ``config.json`` (the model), ``metrics.json``,
    ``metrics.txt``, ``roc.png``, ``oof_predictions.csv``.

    Args:
        stores: Zarr store paths (one per slide); stores without a label are ignored with a warning.
        labels_csv: Labels CSV (see :func:`~wsi_convnext.labels.read_labels`).
        out_dir: Output folder.
        config: Aggregator, folds, seed and optimisation settings
            (:class:`~wsi_convnext.mil.training.TrainConfig`; its default aggregator is ``dsmil``,
            the most accurate and best at localising small lesions in our benchmarks).
        feature_key: Feature set in the stores (default: the stores' only one).
        in_memory: Keep the cohort's features in memory (float16); False re-reads them from the
            stores each epoch.
        name: Model name stored in the config (default: the folder name).
        overwrite: Replace a model already in ``out_dir``.
        progress: ``progress(description, done, total)`` callback.
        on_failure: ``on_failure(store path, message)`` for a store that fails to read (damaged,
            replaced, missing chunk): its slide is left out, the others are trained on, and the
            outputs list it under ``failed_stores``. None: such a store stops the run.

    Raises:
        LabelsError: Label problems (see :func:`read_labels`, :func:`match_labels`, :func:`make_folds`),
            also when too few slides remain after failed stores are left out.
        ConfigError: Bad options or an existing model in ``out_dir`` without ``overwrite``.
        StoreError: A store fails to read (without ``on_failure``).
    """
    from .checkpoint import save_model
    from ..labels.metrics import format_metrics_table, metrics_to_json
    from .plots import plot_roc
    from .training import TrainConfig, cross_validate, train_model

    cfg = config or TrainConfig()
    seed, aggregator = cfg.seed, cfg.aggregator
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    table = read_labels(labels_csv)
    bags, table, unlabeled, failed = _labeled_bags(
        stores, table, feature_key, require_all=True, in_memory=in_memory, progress=progress, on_failure=on_failure
    )
    table.require_classes(2)
    key = bags[0].feature_key
    cv = cross_validate(bags, table, cfg, keep_models=table.split is not None, progress=progress)
    if table.split is not None:
        model = cv.folds[0].model
        assert model is not None
        model.feature_key = key
        model.info = {"train_config": cv.config.to_dict(), "seed": seed, "best_epoch": cv.folds[0].best_epoch,
                      "n_slides": len(cv.folds[0].train_ids), "n_val_slides": len(cv.folds[0].val_ids)}
        final = {"how": "split", "epochs": cv.folds[0].best_epoch,
                 "description": "model trained on the 'train' split, early-stopped on 'val'"}
        cv.folds[0].model = None
    else:
        final_epochs = cv.suggested_epochs
        model = train_model(bags, table, replace(cfg, epochs=final_epochs), feature_key=key, progress=progress)
        final = {"how": "refit", "epochs": final_epochs,
                 "description": "refitted on all labelled slides for the median best epoch of the CV folds"}
    model.info.update({"labels_csv": str(labels_csv), "cv_metrics_pooled": cv.metrics["pooled"], "final_model": final,
                       "failed_stores": failed})
    title = f"{aggregator} — {'test split' if table.split is not None else f'{len(cv.folds)}-fold CV'}"
    text = format_metrics_table(cv.metrics, title=title) + _failed_lines(failed)
    files: dict[str, Path] = {}
    save_model(out, model, name=name)
    files["model"] = out / "model.safetensors"
    files["config"] = out / "config.json"
    metrics_doc = {**cv.to_dict(), "final_model": final, "feature_key": key, "unlabeled_slides": unlabeled,
                   "failed_stores": failed}
    files["metrics_json"] = out / "metrics.json"
    files["metrics_json"].write_text(metrics_to_json(metrics_doc) + "\n", encoding="utf-8")
    files["metrics_txt"] = out / "metrics.txt"
    files["metrics_txt"].write_text(text, encoding="utf-8")
    pos = list(cv.classes).index(cv.positive_class) if cv.positive_class else 1
    tested = cv.fold_of >= 0
    files["roc"] = plot_roc(cv.y[tested], cv.probs[tested], cv.classes, out / "roc.png", positive=pos,
                            fold_of=cv.fold_of[tested], title=title)
    files["oof_predictions"] = _write_predictions_csv(
        out / "oof_predictions.csv", cv.slide_ids, table, cv.probs, cv.classes, cv.fold_of
    )
    return TrainReport(out, cv.metrics, text, cv, model, final, unlabeled, files, failed)


def evaluate(
    model_dir: PathLike,
    stores: Sequence[PathLike],
    labels_csv: PathLike,
    out_dir: PathLike | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    require_all: bool = True,
    progress: ProgressFn | None = None,
    on_failure: OnFailure | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on labelled stores.

    Returns :func:`~wsi_convnext.labels.metrics.compute_metrics` output plus ``"model"``, ``"classes"``,
    ``"unlabeled_slides"`` and ``"failed_stores"`` (stores left out through ``on_failure``, as in
    :func:`train`; without it a store that fails to read stops the evaluation). With ``out_dir``: writes ``metrics.json``, ``metrics.txt``,
    ``roc.png`` and ``predictions.csv`` there. A single-class evaluation set is allowed (AUC is then
    undefined: null), e.g. to measure specificity on negatives.

    Raises:
        LabelsError: A labelled slide has no store (``require_all``), a label is not one of the
            model's classes, or label-file errors.
    """
    from .._io import ensure_dir
    from .checkpoint import load_model
    from ..labels.metrics import compute_metrics, format_metrics_table, metrics_to_json
    from .plots import plot_roc

    if out_dir is not None:
        ensure_dir(out_dir)
    model = load_model(model_dir)
    table = read_labels(labels_csv, min_classes=1, check_splits=False)
    unknown = sorted(set(table.labels) - set(model.classes))
    if unknown:
        raise LabelsError(
            f"{table.source}: label(s) {listing(unknown)} are not classes of the model ({list(model.classes)})"
        )
    bags, table, unlabeled, failed = _labeled_bags(
        stores, table, model.feature_key, require_all=require_all, in_memory=False, progress=None,
        on_failure=on_failure,
    )
    lut = {c: i for i, c in enumerate(model.classes)}
    y = np.array([lut[lab] for lab in table.labels], dtype=np.int64)
    probs = np.zeros((len(bags), model.n_classes), dtype=np.float64)
    for i, bag in enumerate(bags):
        probs[i] = model.predict(bag)[0]
        if progress is not None:
            progress("evaluate", i + 1, len(bags))
    if len(set(y.tolist())) < 2:
        log.warning("%s: evaluation slides hold a single class; AUC is undefined", table.source)
    pos = model.positive_index
    metrics = compute_metrics(y, probs, model.classes, positive=pos, n_boot=n_boot, seed=seed)
    metrics.update({"model": str(model_dir), "classes": list(model.classes), "unlabeled_slides": unlabeled,
                    "failed_stores": failed})
    if out_dir is not None:
        out = Path(out_dir)
        (out / "metrics.json").write_text(metrics_to_json(metrics) + "\n", encoding="utf-8")
        (out / "metrics.txt").write_text(
            format_metrics_table(metrics, title=f"evaluation of {model_dir}") + _failed_lines(failed), encoding="utf-8"
        )
        plot_roc(y, probs, model.classes, out / "roc.png", positive=pos, title=f"evaluation of {Path(model_dir).name}")
        _write_predictions_csv(out / "predictions.csv", [b.slide_id for b in bags], table, probs, model.classes)
    return metrics


def _score_name(name: str) -> str:
    """A store array name: letters, digits, '_', '.', '-' and starting with a letter or digit."""
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).lstrip("_.-")
    return clean or "mil"


def predict(
    model_dir: PathLike,
    stores: Sequence[PathLike],
    *,
    out_csv: PathLike | None = None,
    write_scores: bool = True,
    name: str | None = None,
    progress: ProgressFn | None = None,
    on_error: str = "raise",
) -> list[SlidePrediction]:
    """Predict slides with a saved model, one store at a time.

    Args:
        model_dir: Folder written by :func:`train` / :func:`save_model`.
        stores: Zarr store paths.
        out_csv: Write the predictions here, in the one dialect of
            :mod:`wsi_convnext.outputs.predictions` (``slide_id, predicted, prob_<class>...``
            plus ``n_tiles, store, error``), atomically, after all slides. It is checked before
            any store is touched.
        write_scores: Write per-tile scores into each store with ``store.write_scores(name, scores,
            attrs)``: (N,) float32 (positive class for binary models), or (N, C) for multi-class
            aggregators with per-class scores. ``attrs`` describe the model, score kind
            (``attention``/``instance_logit``), classes and the slide's probabilities.
        name: Score name in the stores (default: the model's name from its config).
        progress: ``progress(description, done, total)`` callback.
        on_error: ``"raise"`` stops at the first bad store; ``"record"`` records it as a failed
            prediction (``status == "failed"``) and goes on, like ``tile`` and ``embed``.

    Raises:
        StoreError: A store lacks the model's feature set or has a different feature dimension
            (with ``on_error="raise"``).
        ConfigError: ``out_csv`` cannot be written (a folder, under a file), or a bad ``on_error``.
    """
    from .. import __version__
    from ..errors import WsiConvnextError, one_line
    from .._io import check_output_file
    from ..outputs.predictions import PredictionRow, write_predictions
    from .checkpoint import load_model

    if on_error not in ("raise", "record"):
        raise ConfigError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    if out_csv is not None:
        check_output_file(out_csv)
    model = load_model(model_dir)
    score_name = _score_name(name or model.info.get("name") or Path(model_dir).resolve().name)
    results: list[SlidePrediction] = []
    for i, path in enumerate(stores):
        try:
            results.append(_predict_one(model, model_dir, path, score_name, write_scores, __version__))
        except Exception as exc:
            if on_error == "raise":
                raise
            if isinstance(exc, WsiConvnextError):
                log.debug("%s failed", path, exc_info=True)
            else:
                log.warning("%s failed unexpectedly", path, exc_info=True)
            sid = Path(path).name.removesuffix(".zarr")
            results.append(SlidePrediction(sid, {}, "", 0, str(path), "failed", type(exc).__name__, one_line(exc)))
        if progress is not None:
            progress("predict", i + 1, len(stores))
    if out_csv is not None:
        rows = [
            PredictionRow(
                key={"slide_id": r.slide_id}, predicted=r.predicted or None, probabilities=r.probabilities,
                extra={"n_tiles": r.n_tiles if r.status != "failed" else "", "store": r.store, "error": r.error or ""},
            )  # fmt: skip
            for r in results
        ]
        write_predictions(out_csv, rows, classes=list(model.classes))
    return results


def _predict_one(
    model: Any, model_dir: PathLike, path: PathLike, score_name: str, write_scores: bool, version: str
) -> SlidePrediction:
    from .data import _open, resolve_feature_key

    store = _open(path)
    if write_scores:
        store.check_writable("scores")  # a read-only store: one line, recorded like any failure
    key = resolve_feature_key(store, model.feature_key, f"store {path}")
    bag = Bag(str(store.slide_id), store.features(key), np.asarray(store.coords), source=str(path), feature_key=key)
    if bag.features.shape[1] != model.in_dim:
        raise StoreError(
            f"store {path}: feature set {key!r} has dimension {bag.features.shape[1]} but the model expects "
            f"{model.in_dim}; use the encoder the model was trained with"
        )
    out = model.forward(bag)
    import torch

    probs = torch.softmax(out.logits.float(), -1).cpu().numpy()
    pred = model.classes[int(np.argmax(probs))]
    if write_scores:
        multi = model.n_classes > 2 and out.class_tile_scores is not None
        scores = (out.class_tile_scores if multi else out.tile_scores).float().cpu().numpy().astype(np.float32)
        attrs = {
            "kind": "mil_tile_scores",
            "model": score_name,
            "model_dir": str(Path(model_dir).resolve()),
            "aggregator": model.aggregator,
            "score": model.module.aggregator.score_kind,
            "classes": list(model.classes),
            "columns": list(model.classes) if multi else [model.positive_class or "predicted"],
            "feature_key": key,
            "predicted_class": pred,
            "probabilities": {c: float(p) for c, p in zip(model.classes, probs)},
            "package_version": version,
        }
        store.write_scores(score_name, scores, attrs)
    return SlidePrediction(bag.slide_id, {c: float(p) for c, p in zip(model.classes, probs)}, pred, len(bag), str(path))
