"""Training: one bag per step, patient-grouped stratified cross-validation, final model.

Design choices (for cohorts of tens to thousands of slides, trained on CPU):

- One bag per optimisation step (no padding, no N×N attention), features cast to float32 per bag.
- Features are standardised with per-dimension mean/std of the *training part* of each fold; the
  statistics are part of the model (and of the checkpoint).
- Class imbalance: each bag's loss is weighted by ``n / (C · n_class)`` of the training part.
- Early stopping on the class-weighted validation loss of a held-out, patient-grouped part of each
  training fold; the weights of the best epoch are kept.
- Determinism: torch and numpy are seeded per fold from ``seed`` inside a forked RNG state and
  deterministic algorithms are enabled while training, so equal inputs give equal numbers (on the
  same machine and thread count).
- Final model (:func:`train_model` as used by :func:`wsi_convnext.mil.api.train`): refitted on all
  labelled slides for the median best epoch count of the CV folds (no held-out data left for early
  stopping); with a fixed ``split`` column it is the model trained on the train split instead.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, LabelsError
from .aggregators import aggregator_defaults
from ..labels.metrics import summarize_cv
from ..labels.table import LabelTable
from .data import Bag, labels_for_bags
from .model import FeatureStats, MILModel, TrainedModel, bag_tensor, compute_feature_stats, new_model
from .config import ProgressFn, TrainConfig
from ..labels.splits import Fold, inner_validation_split, make_folds

__all__ = ["TrainConfig", "FitResult", "FoldResult", "CVResult", "fit", "cross_validate", "train_model"]

log = logging.getLogger(__name__)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block (no-op for None)."""
    prev = torch.get_num_threads()
    if n is not None and n != prev:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def _auto_threads(cfg: TrainConfig, bags: Sequence[Bag]) -> int | None:
    if cfg.num_threads is not None:
        return cfg.num_threads
    sizes = [len(b) for b in bags]
    return 1 if sizes and float(np.median(sizes)) < 8192 else None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch inside a forked RNG state with deterministic algorithms on; restores both after."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def class_weights(y: np.ndarray, n_classes: int, enabled: bool = True) -> np.ndarray:
    """Per-class loss weights ``n / (C · n_c)`` (1 for absent classes or when disabled)."""
    if not enabled:
        return np.ones(n_classes)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)


@dataclass
class FitResult:
    """Output of :func:`fit`: the model (best-epoch weights), epochs and per-epoch history."""

    model: MILModel
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    stats: FeatureStats


def _bag_loss(model: MILModel, x: torch.Tensor, target: int, weight: float) -> torch.Tensor:
    out = model(x, target)
    loss = F.cross_entropy(out.logits[None].float(), torch.tensor([target], device=out.logits.device))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    return loss * weight


def _val_loss(model: MILModel, bags: Sequence[Bag], y: np.ndarray, w: np.ndarray) -> float:
    model.eval()
    total = 0.0
    wsum = 0.0
    with torch.inference_mode():
        for bag, t in zip(bags, y.tolist()):
            out = model(bag_tensor(bag))
            ce = F.cross_entropy(out.logits[None].float(), torch.tensor([t], device=out.logits.device))
            total += float(ce) * w[t]
            wsum += w[t]
    return total / wsum if wsum else math.nan


def fit(
    train_bags: Sequence[Bag],
    y_train: np.ndarray,
    val_bags: Sequence[Bag],
    y_val: np.ndarray,
    *,
    n_classes: int,
    config: TrainConfig | None = None,
    seed: int | None = None,
    fixed_epochs: int | None = None,
    progress: ProgressFn | None = None,
    desc: str = "train",
) -> FitResult:
    """Train one model.

    Args:
        train_bags, y_train: Bags and class indices to fit.
        val_bags, y_val: Early-stopping bags (may be empty: then all epochs run).
        n_classes: Number of classes C.
        config: Aggregator and optimisation settings.
        seed: Seed for initialisation, dropout, bag order and tile subsampling (default ``config.seed``).
        fixed_epochs: Run exactly this many epochs and ignore the validation part.
        progress: ``progress(desc, epoch, max_epochs)`` after each epoch.
    """
    cfg = config or TrainConfig()
    seed = cfg.seed if seed is None else seed
    y_train = np.asarray(y_train, dtype=np.int64)
    y_val = np.asarray(y_val, dtype=np.int64)
    if len(train_bags) == 0:
        raise LabelsError("no training slides in this fold")
    stats = compute_feature_stats(train_bags)
    in_dim = int(stats.mean.shape[0])
    max_epochs = int(fixed_epochs) if fixed_epochs is not None else cfg.epochs
    use_val = fixed_epochs is None and len(val_bags) > 0
    w = class_weights(y_train, n_classes, cfg.class_weighting)
    rng = np.random.default_rng(seed)
    device = torch.device(cfg.device)
    history: list[dict[str, float]] = []
    with seeded(seed), torch_threads(_auto_threads(cfg, train_bags)):
        model, _ = new_model(cfg.aggregator, in_dim, n_classes, stats, dict(cfg.aggregator_kwargs))
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best_loss, best_epoch, best_state = math.inf, max_epochs, None
        epoch = 0
        for epoch in range(1, max_epochs + 1):
            model.train()
            total = 0.0
            order = rng.permutation(len(train_bags)).tolist()
            k = cfg.bags_per_step
            for start in range(0, len(order), k):
                step = order[start : start + k]
                opt.zero_grad(set_to_none=True)
                for i in step:  # gradient accumulation: one bag in memory at a time
                    x = bag_tensor(train_bags[i])
                    if cfg.max_instances is not None and x.shape[0] > cfg.max_instances:
                        keep = np.sort(rng.choice(x.shape[0], cfg.max_instances, replace=False))
                        x = x[torch.from_numpy(keep)]
                    t = int(y_train[i])
                    loss = _bag_loss(model, x, t, float(w[t])) / len(step)
                    loss.backward()
                    total += float(loss.detach()) * len(step)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            rec = {"epoch": float(epoch), "train_loss": total / len(train_bags)}
            if use_val:
                vl = _val_loss(model, val_bags, y_val, w)
                rec["val_loss"] = vl
                # Tiny validation parts make early-epoch losses look good by chance (near-uniform
                # predictions); only epochs >= min_epochs can be kept.
                if epoch >= cfg.min_epochs and vl < best_loss - 1e-4:
                    best_loss, best_epoch = vl, epoch
                    best_state = copy.deepcopy(model.state_dict())
            history.append(rec)
            if progress is not None:
                progress(desc, epoch, max_epochs)
            if use_val and epoch >= cfg.min_epochs and epoch - best_epoch >= cfg.patience:
                break
        if use_val and best_state is not None:
            model.load_state_dict(best_state)
        else:
            best_epoch = epoch
    model.eval()
    return FitResult(model, int(best_epoch), int(epoch), history, stats)


@dataclass
class FoldResult:
    """One outer fold: slide ids on each side, test predictions, training summary."""

    index: int
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    test_probs: np.ndarray
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    test_tile_scores: list[np.ndarray] = field(default_factory=list, repr=False)
    model: TrainedModel | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.index,
            "n_train": len(self.train_ids),
            "n_val": len(self.val_ids),
            "n_test": len(self.test_ids),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "test_ids": self.test_ids,
            "val_ids": self.val_ids,
            "history": self.history,
        }


@dataclass
class CVResult:
    """Cross-validation output.

    Attributes:
        slide_ids: Cohort slide ids (row order of ``probs``).
        y: True class index per slide.
        classes: Class names.
        positive_class: Positive class for binary metrics.
        probs: Out-of-fold probabilities (n, C); NaN for slides never in a test fold.
        fold_of: Test fold per slide (-1 if never tested).
        tile_scores: Out-of-fold tile scores per slide id (N,).
        folds: Per-fold results.
        metrics: :func:`~wsi_convnext.labels.metrics.summarize_cv` output.
        aggregator, aggregator_kwargs, config, seed: What was run.
    """

    slide_ids: list[str]
    y: np.ndarray
    classes: tuple[str, ...]
    positive_class: str | None
    probs: np.ndarray
    fold_of: np.ndarray
    tile_scores: dict[str, np.ndarray]
    folds: list[FoldResult]
    metrics: dict[str, Any]
    aggregator: str
    aggregator_kwargs: dict[str, Any]
    config: TrainConfig
    seed: int

    @property
    def best_epochs(self) -> list[int]:
        return [f.best_epoch for f in self.folds]

    @property
    def suggested_epochs(self) -> int:
        """Median best epoch over folds: the epoch count for a model refitted on all slides."""
        return max(1, int(round(float(np.median(self.best_epochs)))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "aggregator": self.aggregator,
            "aggregator_kwargs": self.aggregator_kwargs,
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            "train_config": self.config.to_dict(),
            "seed": self.seed,
            "metrics": self.metrics,
            "folds": [f.to_dict() for f in self.folds],
        }


def _positive_index(classes: Sequence[str], positive_class: str | None) -> int:
    if positive_class is None:
        return 1 if len(classes) >= 2 else 0
    if str(positive_class) not in classes:
        raise ConfigError(f"positive class {positive_class!r} is not one of the classes {list(classes)}")
    return list(classes).index(str(positive_class))


def _resolved_kwargs(aggregator: str, agg_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    resolved = aggregator_defaults(aggregator)
    resolved.update({k: v for k, v in agg_kwargs.items() if v is not None})
    return resolved


def _predict(model: TrainedModel, bags: Sequence[Bag]) -> tuple[np.ndarray, list[np.ndarray]]:
    probs, scores = [], []
    for b in bags:
        p, s = model.predict(b)
        probs.append(p)
        scores.append(s)
    return (np.stack(probs) if probs else np.zeros((0, model.n_classes), np.float32)), scores


def cross_validate(
    bags: Sequence[Bag],
    labels: LabelTable | Mapping[str, object] | Sequence[object],
    config: TrainConfig | None = None,
    *,
    keep_models: bool = False,
    progress: ProgressFn | None = None,
) -> CVResult:
    """Patient-grouped, stratified k-fold cross-validation of one aggregator.

    Args:
        bags: One bag per slide.
        labels: :class:`LabelTable` (its ``patient_id``, ``split`` and ``fold`` columns are used),
            ``{slide_id: label}``, or one label per bag.
        config: What to train and how (default :class:`TrainConfig`).
        keep_models: Keep each fold's :class:`TrainedModel` in ``FoldResult.model``.
        progress: ``progress(description, done, total)`` callback.

    Raises:
        LabelsError: See :func:`~wsi_convnext.labels.splits.make_folds` and label matching.
        ConfigError: Unknown aggregator, option or positive class.
    """
    cfg = config or TrainConfig()
    seed = cfg.seed
    table = labels_for_bags(bags, labels)
    classes = table.classes
    pos = _positive_index(classes, cfg.positive_class)
    y = table.y
    fold_list = make_folds(table, folds=cfg.folds, seed=seed, val_fraction=cfg.val_fraction)
    n = len(bags)
    probs = np.full((n, len(classes)), np.nan, dtype=np.float64)
    fold_of = np.full(n, -1, dtype=np.int64)
    results: list[FoldResult] = []
    resolved: dict[str, Any] = {}
    for f in fold_list:
        fr, resolved = _run_fold(f, bags, y, classes, pos, cfg, len(fold_list), progress)
        probs[f.test] = fr.test_probs
        fold_of[f.test] = f.index
        if not keep_models:
            fr.model = None
        results.append(fr)
    tile_scores = {sid: s for fr in results for sid, s in zip(fr.test_ids, fr.test_tile_scores)}
    metrics = summarize_cv(y, np.nan_to_num(probs, nan=0.0), fold_of, classes, positive=pos, n_boot=cfg.n_boot, seed=seed)
    return CVResult(
        slide_ids=[b.slide_id for b in bags], y=y, classes=classes,
        positive_class=classes[pos] if len(classes) == 2 else None, probs=probs, fold_of=fold_of,
        tile_scores=tile_scores, folds=results, metrics=metrics, aggregator=cfg.aggregator,
        aggregator_kwargs=resolved, config=cfg, seed=seed,
    )


def _run_fold(
    f: Fold,
    bags: Sequence[Bag],
    y: np.ndarray,
    classes: tuple[str, ...],
    pos: int,
    cfg: TrainConfig,
    n_folds: int,
    progress: ProgressFn | None,
) -> tuple[FoldResult, dict[str, Any]]:
    fold_seed = cfg.seed * 1000 + f.index
    res = fit(
        [bags[i] for i in f.train], y[f.train], [bags[i] for i in f.val], y[f.val],
        n_classes=len(classes), config=cfg, seed=fold_seed, progress=progress, desc=f"fold {f.index + 1}/{n_folds}",
    )
    resolved = _resolved_kwargs(cfg.aggregator, cfg.aggregator_kwargs)
    tm = TrainedModel(res.model, classes, cfg.aggregator, resolved, positive_class=classes[pos] if len(classes) == 2 else None)
    test_bags = [bags[i] for i in f.test]
    probs, scores = _predict(tm, test_bags)
    log.info("fold %d: best epoch %d of %d", f.index, res.best_epoch, res.epochs_run)
    fr = FoldResult(
        index=f.index,
        train_ids=[bags[i].slide_id for i in f.train],
        val_ids=[bags[i].slide_id for i in f.val],
        test_ids=[b.slide_id for b in test_bags],
        test_probs=probs,
        best_epoch=res.best_epoch,
        epochs_run=res.epochs_run,
        history=res.history,
        test_tile_scores=scores,
        model=tm,
    )
    return fr, resolved


def train_model(
    bags: Sequence[Bag],
    labels: LabelTable | Mapping[str, object] | Sequence[object],
    config: TrainConfig | None = None,
    *,
    early_stopping: bool = False,
    feature_key: str | None = None,
    progress: ProgressFn | None = None,
) -> TrainedModel:
    """Train one model on all given bags.

    By default it runs exactly ``epochs`` epochs on every slide (use the CV's
    :attr:`CVResult.suggested_epochs`). With ``early_stopping=True`` a patient-grouped
    ``val_fraction`` of the slides is held out and training stops on its validation loss.
    Feature statistics come from the slides trained on.
    """
    cfg = config or TrainConfig()
    seed = cfg.seed
    table = labels_for_bags(bags, labels)
    y = table.y
    groups = np.asarray(table.patient_ids, dtype=object)
    idx = np.arange(len(bags))
    if early_stopping:
        fit_idx, val_idx = inner_validation_split(y, groups, idx, val_fraction=cfg.val_fraction, seed=seed)
    else:
        fit_idx, val_idx = idx, idx[:0]
    res = fit(
        [bags[i] for i in fit_idx], y[fit_idx], [bags[i] for i in val_idx], y[val_idx],
        n_classes=len(table.classes), config=cfg, seed=seed * 1000 + 999,
        fixed_epochs=None if early_stopping else cfg.epochs, progress=progress, desc="final model",
    )
    resolved = _resolved_kwargs(cfg.aggregator, cfg.aggregator_kwargs)
    pos = _positive_index(table.classes, cfg.positive_class)
    info = {
        "train_config": cfg.to_dict(),
        "seed": seed,
        "early_stopping": early_stopping,
        "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "n_slides": len(fit_idx),
        "n_val_slides": len(val_idx),
        "n_tiles": res.stats.n_tiles,
        "slides_per_class": {c: int((y[fit_idx] == i).sum()) for i, c in enumerate(table.classes)},
    }
    return TrainedModel(
        res.model, table.classes, cfg.aggregator, resolved, feature_key=feature_key,
        positive_class=table.classes[pos] if len(table.classes) == 2 else None, info=info,
    )
