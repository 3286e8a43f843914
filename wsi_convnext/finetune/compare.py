"""Random against weak-label fine-tuned features: MIL scored on slides the encoder never saw.

What ``wsi-convnext demo --finetune`` and ``benchmarks/mil.py --finetune`` run:
:func:`hold_out_patients` splits one cohort by patient (or the caller brings a separate test
cohort), :func:`compare_finetuned` fine-tunes the encoder on the training slides' tiles with
their slide labels, embeds every store with it, and for each aggregator cross-validates MIL on
the training slides and scores the final model on the test slides, once per feature set.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StoreError

if TYPE_CHECKING:
    from ..mil.api import ProgressFn

__all__ = [
    "DEFAULT_RECIPE", "ArmResult", "FinetuneComparison", "HeldOutSplit", "compare_finetuned", "hold_out_patients",
]  # fmt: skip

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: :class:`~.config.FinetuneConfig` fields of the default fine-tuning step (the demo's: about
#: 2 minutes on 2 CPU cores). ``data``, ``labels``, ``out``, ``model``, ``stem`` and ``seed``
#: are set by :func:`compare_finetuned`.
DEFAULT_RECIPE: Mapping[str, Any] = {
    "steps": 60, "batch_size": 32, "crop_size": 112, "eval_size": 112, "val_frac": 0.25, "threads": 1,
}  # fmt: skip

FEATURE_SETS = ("random", "finetuned")


@dataclass(frozen=True)
class HeldOutSplit:
    """Training and test slides of one cohort, with a labels CSV for each.

    Attributes:
        train_stores: Stores of the training slides (fine-tuning and MIL training).
        train_labels: Their labels CSV (``slide_id,label,patient_id``).
        test_stores: Stores of the held-out slides.
        test_labels: Their labels CSV.
    """

    train_stores: tuple[str, ...]
    train_labels: Path
    test_stores: tuple[str, ...]
    test_labels: Path


@dataclass(frozen=True)
class ArmResult:
    """MIL with one aggregator on one feature set.

    Attributes:
        aggregator: Aggregator name.
        features: ``"random"`` or ``"finetuned"``.
        feature_key: The stores' ``features/<key>``.
        cv_auc: Pooled out-of-fold AUC of cross-validation on the training slides.
        test_auc: AUC of the final model on the test slides.
        test_auc_ci: Bootstrap 95 % interval of ``test_auc``.
        seconds: Wall time of training (CV + final model) and evaluation, s.
    """

    aggregator: str
    features: str
    feature_key: str
    cv_auc: float
    test_auc: float
    test_auc_ci: tuple[float, float]
    seconds: float


@dataclass
class FinetuneComparison:
    """What :func:`compare_finetuned` measured.

    Attributes:
        arms: One :class:`ArmResult` per (aggregator, feature set), aggregators in the order given.
        encoder_dir: The fine-tuned encoder's folder (ENC_DIR).
        n_train: Training slides.
        n_test: Test slides.
        finetune_seconds: Wall time of fine-tuning, s.
        embed_seconds: Wall time of embedding every store with the fine-tuned encoder, s.
        recipe: The fine-tuning fields used (:data:`DEFAULT_RECIPE` updated with the caller's).
    """

    arms: list[ArmResult]
    encoder_dir: Path
    n_train: int
    n_test: int
    finetune_seconds: float
    embed_seconds: float
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def aggregators(self) -> list[str]:
        """Aggregator names, in the order run."""
        return list(dict.fromkeys(a.aggregator for a in self.arms))

    def arm(self, aggregator: str, features: str) -> ArmResult:
        """The result of one aggregator on one feature set."""
        return next(a for a in self.arms if a.aggregator == aggregator and a.features == features)

    def test_auc(self, aggregator: str) -> dict[str, float]:
        """``{"random": test AUC, "finetuned": test AUC}`` of one aggregator."""
        return {f: self.arm(aggregator, f).test_auc for f in FEATURE_SETS}

    def best(self, features: str) -> ArmResult:
        """The aggregator with the highest test AUC on one feature set."""
        return max((a for a in self.arms if a.features == features), key=lambda a: a.test_auc)

    def table(self) -> str:
        """Markdown table, one row per aggregator: random and fine-tuned AUC side by side."""
        lines = [
            "| aggregator | random CV AUC | random test AUC | fine-tuned CV AUC | fine-tuned test AUC (95% CI) "
            "| Δ test AUC | MIL s random / fine-tuned |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in self.aggregators:
            r, f = self.arm(name, "random"), self.arm(name, "finetuned")
            lines.append(
                f"| {name} | {r.cv_auc:.3f} | {r.test_auc:.3f} | {f.cv_auc:.3f} | {f.test_auc:.3f} "
                f"[{f.test_auc_ci[0]:.3f}, {f.test_auc_ci[1]:.3f}] | {f.test_auc - r.test_auc:+.3f} "
                f"| {r.seconds:.0f} / {f.seconds:.0f} |"
            )
        keys = {f: self.arms[[a.features for a in self.arms].index(f)].feature_key for f in FEATURE_SETS}
        lines.append(
            f"\nCV AUC: cross-validation on the {self.n_train} training slides (on fine-tuned features not "
            f"a held-out measure: the encoder was trained on them); test AUC: the {self.n_test} held-out "
            f"slides, which the encoder never saw. Features: random "
            f"`{keys['random']}`, fine-tuned `{keys['finetuned']}` (fine-tuning {self.finetune_seconds:.0f} s, "
            f"embedding {self.embed_seconds:.0f} s)."
        )
        return "\n".join(lines)


def _write_labels(path: Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    from .._io import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "patient_id"])
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def hold_out_patients(
    stores: Sequence[PathLike], labels: PathLike, out_dir: PathLike, *, test_fraction: float = 1 / 3, seed: int = 0
) -> HeldOutSplit:
    """Split a cohort's labelled stores into training and test slides by patient, stratified by label.

    Writes ``train_labels.csv`` and ``test_labels.csv`` into ``out_dir``. Stores without a label
    are left out.

    Args:
        stores: Tile stores of the cohort.
        labels: Labels CSV (``slide_id,label[,patient_id]``).
        out_dir: Folder for the two labels CSVs (created).
        test_fraction: About this fraction of the slides is held out.
        seed: Split seed.

    Raises:
        ConfigError: ``test_fraction`` outside (0, 1), or too few patients per class to hold any out.
    """
    import numpy as np

    from ..mil.data import read_labels
    from ..mil.splits import inner_validation_split
    from ..store import open_store

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    table = read_labels(labels)
    by_id = {open_store(s).slide_id: str(s) for s in stores}
    sub = table.subset([s for s in table.slide_ids if s in by_id])
    fit, test = inner_validation_split(
        sub.y, np.asarray(sub.patient_ids, dtype=object), np.arange(len(sub)), val_fraction=test_fraction, seed=seed
    )
    if len(test) == 0:
        raise ConfigError(f"{sub.source}: too few patients per class ({len(sub)} slides) to hold any out for testing")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, sel in (("train", fit), ("test", test)):
        rows = [(sub.slide_ids[i], sub.labels[i], sub.patient_ids[i]) for i in sel]
        paths[name] = _write_labels(out / f"{name}_labels.csv", rows)
    fit_stores, test_stores = (tuple(by_id[sub.slide_ids[i]] for i in sel) for sel in (fit, test))
    return HeldOutSplit(fit_stores, paths["train"], test_stores, paths["test"])


def compare_finetuned(
    train_stores: Sequence[PathLike],
    train_labels: PathLike,
    test_stores: Sequence[PathLike],
    test_labels: PathLike,
    out_dir: PathLike,
    *,
    model: str = "convnext_atto",
    stem: str = "patch",
    aggregators: Sequence[str] = ("dsmil",),
    recipe: Mapping[str, Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> FinetuneComparison:
    """Random against weak-label fine-tuned features, MIL evaluated on slides the encoder never saw.

    The encoder is fine-tuned on the tiles of the training slides only (slide labels, batches
    balanced over slides and classes), every store is embedded with it and with the
    random-weight encoder (kept when already there), and for each feature set and aggregator a
    MIL model is cross-validated on the training slides and its final model scored on the test
    slides.

    Args:
        train_stores: Tiled stores of the training slides.
        train_labels: Their labels CSV.
        test_stores: Tiled stores of the test slides (never shown to the encoder).
        test_labels: Their labels CSV.
        out_dir: Output folder: ``encoder/`` (ENC_DIR), ``mil-<aggregator>-<features>/``,
            ``eval-<aggregator>-<features>/``.
        model: timm ConvNeXt name (both encoders).
        stem: Encoder stem (both encoders).
        aggregators: MIL aggregators to run on both feature sets.
        recipe: :class:`~.config.FinetuneConfig` fields overriding :data:`DEFAULT_RECIPE`.
        folds: Cross-validation folds on the training slides (fewer when a class has fewer patients).
        seed: Seed of fine-tuning and MIL training.
        progress: ``progress(stage, done, total)``.

    Raises:
        ConfigError: No aggregator, a store in both sets, or an unknown recipe field.
    """
    from ..embed import embed_stores
    from ..mil.api import evaluate, train
    from ..mil.data import read_labels
    from ..mil.training import TrainConfig
    from .config import FinetuneConfig
    from .train import finetune_encoder

    if not aggregators:
        raise ConfigError("compare_finetuned needs at least one aggregator")
    train_stores, test_stores = [str(s) for s in train_stores], [str(s) for s in test_stores]
    both = {os.path.realpath(s) for s in train_stores} & {os.path.realpath(s) for s in test_stores}
    if both:
        raise ConfigError(f"{len(both)} store(s) are both training and test slides, e.g. {sorted(both)[0]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used = {**DEFAULT_RECIPE, **(recipe or {})}
    cfg = FinetuneConfig.from_dict({
        **used, "data": tuple(train_stores), "labels": str(train_labels), "out": str(out / "encoder"),
        "model": model, "stem": stem, "seed": seed, "overwrite": True,
    })  # fmt: skip
    steps = cfg.steps or 0

    def stage(name: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(name, done, total) if progress else None

    everything = train_stores + test_stores
    random = embed_stores(everything, model=model, stem=stem, batch_size=32, progress=stage("embed (random)"))
    random_key = _only_key(random)
    stage("fine-tune encoder")(0, steps)
    t0 = time.perf_counter()
    enc_dir = finetune_encoder(
        cfg, progress=(lambda p: progress("fine-tune encoder", p.step, p.total_steps)) if progress else None
    )
    t1 = time.perf_counter()
    ft_key = _only_key(embed_stores(everything, model=model, stem=stem, weights=enc_dir / "encoder.safetensors",
                                    batch_size=32, progress=stage("embed (fine-tuned)")))  # fmt: skip
    t2 = time.perf_counter()
    logger.info("fine-tuned %s in %.0f s, embedded %d stores in %.0f s", enc_dir, t1 - t0, len(everything), t2 - t1)
    table = read_labels(train_labels)
    patients = {c: len({p for p, lab in zip(table.patient_ids, table.labels) if lab == c}) for c in table.classes}
    k = max(2, min(folds, min(patients.values())))
    arms = []
    todo = [(a, f) for a in aggregators for f in FEATURE_SETS]
    for i, (name, features) in enumerate(todo):
        stage("MIL")(i, len(todo))
        key = random_key if features == "random" else ft_key
        t = time.perf_counter()
        model_dir = out / f"mil-{name}-{features}"
        report = train(train_stores, train_labels, model_dir, TrainConfig(aggregator=name, folds=k, seed=seed),
                       feature_key=key, overwrite=True)  # fmt: skip
        m = evaluate(model_dir, test_stores, test_labels, out / f"eval-{name}-{features}", seed=seed)
        cv_auc = report.metrics["pooled"]["auc"]["value"] if "pooled" in report.metrics else float("nan")
        auc = m["auc"]
        arms.append(ArmResult(name, features, key, float(cv_auc), float(auc["value"]),
                              (float(auc["ci_low"]), float(auc["ci_high"])), time.perf_counter() - t))  # fmt: skip
        logger.info("%s on %s features: CV AUC %.3f, test AUC %.3f", name, features, arms[-1].cv_auc, arms[-1].test_auc)
    stage("MIL")(len(todo), len(todo))
    return FinetuneComparison(arms, enc_dir, len(train_stores), len(test_stores), t1 - t0, t2 - t1, used)


def _only_key(results: Sequence[Any]) -> str:
    """The feature key of a set of :class:`~wsi_convnext.embed.EmbedResult`; a failed store is an error."""
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise StoreError(f"{len(failed)} store(s) failed to embed, e.g. {failed[0].store_path}: {failed[0].error}")
    return str(results[0].key)
