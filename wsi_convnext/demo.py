"""The end-to-end demo on a generated cohort: tile → embed → train with CV → metrics, ROC, heatmaps."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .encoders.convnext import OVERLAP_STEM
from .mil.config import ProgressFn

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the demo wrote.

    Attributes:
        out_dir: The demo folder.
        slides: Folder of generated slides (with ``labels.csv``).
        tiles: Folder of tile stores (with ``manifest.csv`` and ``qc/``).
        model: Trained model folder (metrics, ROC curve, out-of-fold predictions).
        heatmaps: Folder of heatmaps and top-k montages.
        metrics_table: The cross-validation metrics as a readable table.
        pictures: Paths of the pictures, by role.
        finetune_table: With ``finetune``: random against fine-tuned MIL AUC, side by side.
        finetune_auc: With ``finetune``: ``{"random": AUC, "finetuned": AUC}`` on the held-out slides.
    """

    out_dir: Path
    slides: Path
    tiles: Path
    model: Path
    heatmaps: Path
    metrics_table: str
    pictures: dict[str, list[Path]] = field(default_factory=dict)
    finetune_table: str | None = None
    finetune_auc: dict[str, float] | None = None


def run_demo(
    out_dir: str | os.PathLike[str] = "wsi-convnext-demo",
    *,
    n_slides: int = 32,
    slide_size: tuple[int, int] = (4500, 4000),
    model: str = "convnext_atto",
    stem: str = OVERLAP_STEM,
    aggregator: str = "dsmil",
    folds: int = 5,
    seed: int = 0,
    finetune: bool = False,
    finetune_steps: int = 60,
    progress: ProgressFn | None = None,
) -> DemoResult:
    """Generate a labelled cohort of H&E-like slides and run the whole pipeline on it.

    Small enough for a 2-core laptop (about 3 minutes, 6 with ``finetune``). Re-running reuses
    the finished slides, stores, embeddings and fine-tuned encoder and retrains the MIL models.

    Args:
        out_dir: Output folder.
        n_slides: Slides in the cohort (half carry small lesions).
        slide_size: Level-0 (width, height) of each slide at 0.5 µm/px.
        model, stem: Encoder (random weights: no weights can be downloaded here).
        aggregator: MIL aggregator.
        folds: Cross-validation folds.
        seed: Cohort and training seed.
        finetune: Also fine-tune the encoder on the weak (slide) labels of half of the patients'
            slides, embed the other half with it, and compare MIL cross-validation on those
            held-out slides on random against fine-tuned features
            (:func:`~wsi_convnext.finetune.compare.compare_finetuned`). Off by default: at the
            demo's budget the sign of that difference is noise (random 0.958 against fine-tuned
            0.931 was seen); the measured comparison over seeds is ``benchmarks/mil.py --finetune``
            (BENCHMARKS.md, "Weak-label fine-tuning for MIL").
        finetune_steps: Optimiser steps of that fine-tuning (batch 32, 112-px crops).
        progress: ``progress(stage, done, total)``.
    """
    with _random_weights_warning_once():
        return _run_demo(out_dir, n_slides, slide_size, model, stem, aggregator, folds, seed, finetune, finetune_steps, progress)


@contextmanager
def _random_weights_warning_once() -> Iterator[None]:
    """Let the encoders' random-weights warning through once per demo run (it builds several encoders)."""
    seen: list[bool] = []

    def once(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or "RANDOM weights" not in str(record.msg):
            return True
        seen.append(True)
        return len(seen) == 1

    lg = logging.getLogger("wsi_convnext.encoders.base")
    lg.addFilter(once)
    try:
        yield
    finally:
        lg.removeFilter(once)


def _run_demo(
    out_dir: str | os.PathLike[str], n_slides: int, slide_size: tuple[int, int], model: str, stem: str,
    aggregator: str, folds: int, seed: int, finetune: bool, finetune_steps: int, progress: ProgressFn | None,
) -> DemoResult:  # fmt: skip
    from .embed import embed_stores
    from .outputs.heatmap import heatmaps
    from .inputs import discover_slides
    from .outputs.manifest import recorded_slide_ids
    from .mil.api import train
    from .labels.table import read_labels
    from .mil.training import TrainConfig
    from .synthetic import make_cohort
    from .tiling.tiler import TileParams, tile_slides

    def report(stage: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(stage, done, total) if progress else None

    from ._io import ensure_dir

    out = ensure_dir(out_dir)
    slides_dir, tiles_dir, model_dir, heat_dir = out / "slides", out / "tiles", out / "model", out / "heatmaps"
    labels = slides_dir / "labels.csv"
    if not labels.is_file():
        make_cohort(
            slides_dir, n_slides, size=slide_size, mpp=0.5, seed=seed, lesion_fraction=(0.02, 0.06),
            progress=report("generate slides"),
        )  # fmt: skip
    specs = discover_slides([slides_dir], recorded=recorded_slide_ids(tiles_dir))
    tile_results = tile_slides(specs, tiles_dir, TileParams(mpp=0.5, tile_size=224), on_result=_counter(report("tile"), len(specs)))
    stores = [r.store_path for r in tile_results if r.status != "failed"]
    failed = [r for r in tile_results if r.status == "failed"]
    for r in failed:
        logger.warning("demo: %s failed to tile: %s", r.slide_id, r.error)
    embed_results = embed_stores(
        stores, model=model, stem=stem, batch_size=32, on_result=_counter(report("embed"), len(stores))
    )
    stores = [r.store_path for r in embed_results if r.status != "failed"]
    # Small cohorts cannot fill many patient-grouped folds with both classes.
    folds = max(2, min(folds, len(stores) // 4))
    trained = train(
        stores, labels, model_dir, TrainConfig(aggregator=aggregator, folds=folds, seed=seed), overwrite=True,
        progress=lambda what, done, total: progress(f"train ({what})", done, total) if progress else None,
    )  # fmt: skip
    table = read_labels(labels)
    tumor = {sid for sid, lab in zip(table.slide_ids, table.labels) if lab == "tumor"}
    positives = [Path(s) for s in stores if Path(s).name.removesuffix(".zarr") in tumor]
    drawn = heatmaps(model_dir, positives[:4], heat_dir) if positives else {}
    pictures = {
        "qc": sorted((tiles_dir / "qc").glob("*.png"))[:4],
        "roc": [p for p in [trained.files.get("roc")] if p],
        "heatmaps": [d.heatmap for d in drawn.values()],
        "top-k montages": [d.montage for d in drawn.values()],
    }
    ft_table = ft_auc = None
    if finetune:
        from .finetune.compare import compare_finetuned, hold_out_patients

        split = hold_out_patients(stores, labels, out / "finetune", held_out=0.5, seed=seed)
        comparison = compare_finetuned(
            split.encoder_stores, split.encoder_labels, split.held_out_stores, split.held_out_labels, out / "finetune",
            model=model, stem=stem, aggregators=[aggregator], folds=folds, recipe={"steps": finetune_steps}, seed=seed,
            progress=progress,
        )  # fmt: skip
        ft_table, ft_auc = comparison.table(), comparison.auc(aggregator)
    return DemoResult(
        out_dir=out, slides=slides_dir, tiles=tiles_dir, model=model_dir, heatmaps=heat_dir,
        metrics_table=trained.table, pictures=pictures, finetune_table=ft_table, finetune_auc=ft_auc,
    )  # fmt: skip


def _counter(fn: Callable[[int, int], None], total: int) -> Callable[[object], None]:
    state = {"n": 0}

    def on_result(_: object) -> None:
        state["n"] += 1
        fn(state["n"], total)

    return on_result
