"""Random against weak-label fine-tuned features: MIL on slides the encoder never saw.

What ``wsi-convnext demo`` (fine-tuning step) and ``benchmarks/mil.py --finetune`` run:
:func:`hold_out_patients` splits one cohort by patient (or the caller brings a second
cohort); :func:`compare_finetuned` fine-tunes the encoder on the first part's tiles with their
slide labels, embeds the held-out slides with it and with the random-weight encoder, and for
each aggregator cross-validates MIL on the held-out slides, once per feature set, on the same
folds.

MIL never trains on slides the encoder was fine-tuned on: an encoder that fitted those slides'
labels carries the label on every tile of them, and MIL trained on such features learns a
shortcut that does not transfer (``benchmarks/mil.py --finetune``, seed 1: attention
aggregators trained on the encoder's own slides scored 0.64–0.69 test AUC on a new cohort).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StoreError

if TYPE_CHECKING:
    from ..mil.config import ProgressFn

__all__ = [
    "DEFAULT_RECIPE", "ArmResult", "FinetuneComparison", "HeldOutSplit", "compare_finetuned", "hold_out_patients",
]  # fmt: skip

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: :class:`~.config.FinetuneConfig` fields of the default fine-tuning step (the demo's: under
#: a minute on 2 CPU cores). ``data``, ``labels``, ``out``, ``model``, ``stem`` and ``seed``
#: are set by :func:`compare_finetuned`.
DEFAULT_RECIPE: Mapping[str, Any] = {
    "steps": 60, "batch_size": 32, "crop_size": 112, "eval_size": 112, "val_frac": 0.25, "threads": 1,
}  # fmt: skip

FEATURE_SETS = ("random", "finetuned")


@dataclass(frozen=True)
class HeldOutSplit:
    """A cohort split by patient: slides to fine-tune the encoder on, and slides held out from it.

    Attributes:
        encoder_stores: Stores of the slides the encoder is fine-tuned on.
        encoder_labels: Their labels CSV (``slide_id,label,patient_id``).
        held_out_stores: Stores of the other slides (MIL cross-validation).
        held_out_labels: Their labels CSV.
    """

    encoder_stores: tuple[str, ...]
    encoder_labels: Path
    held_out_stores: tuple[str, ...]
    held_out_labels: Path


@dataclass(frozen=True)
class ArmResult:
    """MIL with one aggregator on one feature set.

    Attributes:
        aggregator: Aggregator name.
        features: ``"random"`` or ``"finetuned"``.
        feature_key: The stores' ``features/<key>``.
        auc: Pooled out-of-fold AUC of cross-validation on the held-out slides.
        auc_ci: Bootstrap 95 % interval of ``auc``.
        seconds: Wall time of cross-validation and the final model, s.
    """

    aggregator: str
    features: str
    feature_key: str
    auc: float
    auc_ci: tuple[float, float]
    seconds: float


@dataclass
class FinetuneComparison:
    """What :func:`compare_finetuned` measured.

    Attributes:
        arms: One :class:`ArmResult` per (aggregator, feature set), aggregators in the order given.
        encoder_dir: The fine-tuned encoder's folder (ENC_DIR).
        n_encoder: Slides the encoder was fine-tuned on.
        n_held_out: Slides MIL was cross-validated on.
        folds: Cross-validation folds.
        finetune_seconds: Wall time of fine-tuning, s.
        embed_seconds: Wall time of embedding the held-out slides with the fine-tuned encoder, s.
        recipe: The fine-tuning fields used (:data:`DEFAULT_RECIPE` updated with the caller's).
    """

    arms: list[ArmResult]
    encoder_dir: Path
    n_encoder: int
    n_held_out: int
    folds: int
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

    def auc(self, aggregator: str) -> dict[str, float]:
        """``{"random": AUC, "finetuned": AUC}`` of one aggregator."""
        return {f: self.arm(aggregator, f).auc for f in FEATURE_SETS}

    def best(self, features: str) -> ArmResult:
        """The aggregator with the highest AUC on one feature set."""
        return max((a for a in self.arms if a.features == features), key=lambda a: a.auc)

    def table(self) -> str:
        """Markdown table, one row per aggregator: random and fine-tuned AUC side by side."""
        lines = [
            "| aggregator | random AUC (95% CI) | fine-tuned AUC (95% CI) | Δ AUC | MIL s random / fine-tuned |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in self.aggregators:
            r, f = self.arm(name, "random"), self.arm(name, "finetuned")
            lines.append(
                f"| {name} | {r.auc:.3f} [{r.auc_ci[0]:.3f}, {r.auc_ci[1]:.3f}] | {f.auc:.3f} "
                f"[{f.auc_ci[0]:.3f}, {f.auc_ci[1]:.3f}] | {f.auc - r.auc:+.3f} | {r.seconds:.0f} / {f.seconds:.0f} |"
            )
        keys = {f: self.arms[[a.features for a in self.arms].index(f)].feature_key for f in FEATURE_SETS}
        lines.append(
            f"\nAUC: pooled out-of-fold, {self.folds}-fold patient-grouped CV on the {self.n_held_out} held-out "
            f"slides, which the encoder never saw (it was fine-tuned on {self.n_encoder} other slides). "
            f"Features: random `{keys['random']}`, fine-tuned `{keys['finetuned']}` (fine-tuning "
            f"{self.finetune_seconds:.0f} s, embedding {self.embed_seconds:.0f} s)."
        )
        return "\n".join(lines)


def hold_out_patients(
    stores: Sequence[PathLike], labels: PathLike, out_dir: PathLike, *, held_out: float = 0.5, seed: int = 0
) -> HeldOutSplit:
    """Split a cohort's labelled stores by patient, stratified by label, into encoder and held-out slides.

    Writes ``encoder_labels.csv`` and ``held_out_labels.csv`` into ``out_dir``. Stores without
    a label are left out.

    Args:
        stores: Tile stores of the cohort.
        labels: Labels CSV (``slide_id,label[,patient_id]``).
        out_dir: Folder for the two labels CSVs (created).
        held_out: About this fraction of the slides is held out from the encoder.
        seed: Split seed.

    Raises:
        ConfigError: ``held_out`` outside (0, 1), or too few patients per class to hold any out.
    """
    from ..labels.table import read_labels, write_labels
    from ..labels.splits import holdout_split
    from ..store import open_store

    if not 0 < held_out < 1:
        raise ConfigError(f"held_out must be a fraction in (0, 1), got {held_out}")
    table = read_labels(labels)
    by_id = {open_store(s).slide_id: str(s) for s in stores}
    sub = table.subset([s for s in table.slide_ids if s in by_id])
    fit, rest = holdout_split(sub, held_out, seed=seed)
    if not rest:
        raise ConfigError(f"{sub.source}: too few patients per class ({len(sub)} slides) to hold any out")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name, ids in (("encoder", fit), ("held_out", rest)):
        parts[name] = (tuple(by_id[i] for i in ids), write_labels(out / f"{name}_labels.csv", sub.subset(ids)))
    return HeldOutSplit(*parts["encoder"], *parts["held_out"])


def compare_finetuned(
    encoder_stores: Sequence[PathLike],
    encoder_labels: PathLike,
    held_out_stores: Sequence[PathLike],
    held_out_labels: PathLike,
    out_dir: PathLike,
    *,
    model: str = "convnext_atto",
    stem: str | None = None,
    aggregators: Sequence[str] = ("dsmil",),
    recipe: Mapping[str, Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> FinetuneComparison:
    """Random against weak-label fine-tuned features, MIL cross-validated on slides the encoder never saw.

    The encoder is fine-tuned on the tiles of ``encoder_stores`` only (slide labels, batches
    balanced over slides and classes). The held-out slides are embedded with it and with the
    random-weight encoder (kept when already there), and for each aggregator MIL is
    cross-validated on them (patient-grouped, same folds for both feature sets).

    Args:
        encoder_stores: Tiled stores of the slides to fine-tune on.
        encoder_labels: Their labels CSV.
        held_out_stores: Tiled stores of the slides MIL is cross-validated on.
        held_out_labels: Their labels CSV.
        out_dir: Output folder: ``encoder/`` (ENC_DIR) and ``mil-<aggregator>-<features>/``.
        model: timm ConvNeXt name (both encoders).
        stem: Encoder stem (both encoders); None: the family's default.
        aggregators: MIL aggregators to run on both feature sets.
        recipe: :class:`~.config.FinetuneConfig` fields overriding :data:`DEFAULT_RECIPE`.
        folds: Cross-validation folds (fewer when a class has fewer held-out patients).
        seed: Seed of fine-tuning and of MIL training and folds.
        progress: ``progress(stage, done, total)``.

    Raises:
        ConfigError: No aggregator, a store in both sets, or an unknown recipe field.
    """
    from ..embed import embed_stores
    from ..mil.api import train
    from ..labels.table import read_labels
    from ..mil.training import TrainConfig
    from .config import FinetuneConfig
    from .train import finetune_encoder

    if not aggregators:
        raise ConfigError("compare_finetuned needs at least one aggregator")
    enc_stores, held = [str(s) for s in encoder_stores], [str(s) for s in held_out_stores]
    both = {os.path.realpath(s) for s in enc_stores} & {os.path.realpath(s) for s in held}
    if both:
        raise ConfigError(f"{len(both)} store(s) are both encoder and held-out slides, e.g. {sorted(both)[0]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used = {**DEFAULT_RECIPE, **(recipe or {})}
    cfg = FinetuneConfig.from_dict({
        **used, "data": tuple(enc_stores), "labels": str(encoder_labels), "out": str(out / "encoder"),
        "model": model, "stem": stem, "seed": seed, "overwrite": True,
    })  # fmt: skip

    def stage(name: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(name, done, total) if progress else None

    random_key = _only_key(embed_stores(held, model=model, stem=stem, batch_size=32, progress=stage("embed (random)")))
    stage("fine-tune encoder")(0, cfg.steps or 0)
    t0 = time.perf_counter()
    enc_dir = finetune_encoder(
        cfg, progress=(lambda p: progress("fine-tune encoder", p.step, p.total_steps)) if progress else None
    )
    t1 = time.perf_counter()
    weights = enc_dir / "encoder.safetensors"
    ft_key = _only_key(embed_stores(held, model=model, stem=stem, weights=weights, batch_size=32,
                                    progress=stage("embed (fine-tuned)")))  # fmt: skip
    t2 = time.perf_counter()
    logger.info("fine-tuned %s in %.0f s, embedded %d held-out stores in %.0f s", enc_dir, t1 - t0, len(held), t2 - t1)
    table = read_labels(held_out_labels)
    patients = [len({p for p, lab in zip(table.patient_ids, table.labels) if lab == c}) for c in table.classes]
    k = max(2, min(folds, *patients))
    arms = []
    todo = [(a, f) for a in aggregators for f in FEATURE_SETS]
    for i, (name, features) in enumerate(todo):
        stage("MIL")(i, len(todo))
        key = random_key if features == "random" else ft_key
        t = time.perf_counter()
        report = train(held, held_out_labels, out / f"mil-{name}-{features}",
                       TrainConfig(aggregator=name, folds=k, seed=seed), feature_key=key, overwrite=True)  # fmt: skip
        auc = report.metrics["pooled"]["auc"]
        arms.append(ArmResult(name, features, key, float(auc["value"]), (float(auc["ci_low"]), float(auc["ci_high"])),
                              time.perf_counter() - t))  # fmt: skip
        logger.info("%s on %s features: AUC %.3f", name, features, arms[-1].auc)
    stage("MIL")(len(todo), len(todo))
    return FinetuneComparison(arms, enc_dir, len(enc_stores), len(held), k, t1 - t0, t2 - t1, used)


def _only_key(results: Sequence[Any]) -> str:
    """The feature key of a set of :class:`~wsi_convnext.embed.EmbedResult`; a failed store is an error."""
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise StoreError(f"{len(failed)} store(s) failed to embed, e.g. {failed[0].store_path}: {failed[0].error}")
    return str(results[0].key)
