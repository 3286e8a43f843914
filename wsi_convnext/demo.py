"""The end-to-end demo on a generated cohort: tile → embed → train with CV → metrics, ROC, heatmaps."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Progress callback: ``progress(stage, done, total)``.
StageProgress = Callable[[str, int, int], None]


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
    stem: str = "overlap",
    aggregator: str = "dsmil",
    folds: int = 5,
    seed: int = 0,
    finetune: bool = False,
    finetune_steps: int = 60,
    progress: StageProgress | None = None,
) -> DemoResult:
    """Generate a labelled cohort of H&E-like slides and run the whole pipeline on it.

    Small enough for a 2-core laptop (a few minutes). Re-running reuses the finished slides,
    stores and embeddings and retrains the model.

    Args:
        out_dir: Output folder.
        n_slides: Slides in the cohort (half carry small lesions).
        slide_size: Level-0 (width, height) of each slide at 0.5 µm/px.
        model, stem: Encoder (random weights: no weights can be downloaded here).
        aggregator: MIL aggregator.
        folds: Cross-validation folds.
        seed: Cohort and training seed.
        finetune: Also hold out a third of the patients, fine-tune the encoder on the weak
            (slide) labels of the other slides, re-embed, and compare MIL on random against
            fine-tuned features on the held-out slides (see :func:`finetune_comparison`).
        finetune_steps: Optimiser steps of that fine-tuning (batch 32, 112-px crops).
        progress: ``progress(stage, done, total)``.
    """
    from .embed import embed_stores
    from .outputs.heatmap import heatmaps
    from .inputs import discover_slides
    from .mil.api import train
    from .mil.data import read_labels
    from .mil.training import TrainConfig
    from .synthetic import make_cohort
    from .tiler import TileParams, tile_slides

    def report(stage: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(stage, done, total) if progress else None

    out = Path(out_dir)
    slides_dir, tiles_dir, model_dir, heat_dir = out / "slides", out / "tiles", out / "model", out / "heatmaps"
    labels = slides_dir / "labels.csv"
    if not labels.is_file():
        make_cohort(
            slides_dir, n_slides, size=slide_size, mpp=0.5, seed=seed, lesion_fraction=(0.02, 0.06),
            progress=report("generate slides"),
        )  # fmt: skip
    specs = discover_slides([slides_dir])
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
        ft_table, ft_auc = finetune_comparison(
            stores, labels, out / "finetune", model=model, stem=stem, aggregator=aggregator, seed=seed,
            steps=finetune_steps, progress=progress,
        )  # fmt: skip
    return DemoResult(
        out_dir=out, slides=slides_dir, tiles=tiles_dir, model=model_dir, heatmaps=heat_dir,
        metrics_table=trained.table, pictures=pictures, finetune_table=ft_table, finetune_auc=ft_auc,
    )  # fmt: skip


def finetune_comparison(
    stores: list[str | os.PathLike[str]], labels: Path, out_dir: Path, *, model: str, stem: str, aggregator: str,
    seed: int = 0, steps: int = 60, test_fraction: float = 1 / 3, progress: StageProgress | None = None,
) -> tuple[str, dict[str, float]]:  # fmt: skip
    """Random against weak-label fine-tuned features, MIL evaluated on slides the encoder never saw.

    Patients are split (stratified, grouped) into a training part and a held-out test part.
    The encoder is fine-tuned on the tiles of the training slides only (slide labels, batches
    balanced over slides and classes), all stores are embedded with it, and for each feature
    set a MIL model is cross-validated on the training slides and scored on the test slides.

    Returns:
        A readable table and ``{"random": test AUC, "finetuned": test AUC}``.
    """
    import numpy as np

    from .embed import embed_stores
    from .finetune import FinetuneConfig, finetune_encoder
    from .mil.api import evaluate, train
    from .mil.data import read_labels
    from .mil.splits import inner_validation_split
    from .mil.training import TrainConfig
    from .store import open_store

    table = read_labels(labels)
    by_id = {open_store(s).slide_id: str(s) for s in stores}
    ids = [s for s in table.slide_ids if s in by_id]
    sub = table.subset(ids)
    idx = np.arange(len(ids))
    fit, test = inner_validation_split(sub.y, np.asarray(sub.patient_ids), idx, val_fraction=test_fraction, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Path] = {}
    for name, sel in (("train", fit), ("test", test)):
        rows = [f"{sub.slide_ids[i]},{sub.labels[i]},{sub.patient_ids[i]}" for i in sel]
        parts[name] = out_dir / f"{name}_labels.csv"
        parts[name].write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    train_stores = [by_id[sub.slide_ids[i]] for i in fit]
    test_stores = [by_id[sub.slide_ids[i]] for i in test]
    if progress:
        progress("fine-tune encoder", 0, steps)
    enc_dir = finetune_encoder(
        FinetuneConfig(
            data=tuple(train_stores), labels=str(parts["train"]), out=str(out_dir / "encoder"), model=model, stem=stem,
            steps=steps, batch_size=32, crop_size=112, eval_size=112, val_frac=0.25, seed=seed, threads=1,
            overwrite=True,
        ),
        progress=(lambda p: progress("fine-tune encoder", p.step, p.total_steps)) if progress else None,
    )  # fmt: skip
    weights = enc_dir / "encoder.safetensors"
    embedded = embed_stores(stores, model=model, stem=stem, weights=weights, batch_size=32)
    ft_key = next(r.key for r in embedded if r.status != "failed")
    keys = [k for k in open_store(stores[0]).feature_keys if k != ft_key]
    random_key = next((k for k in keys if k == f"{model}-{stem}-random"), keys[0])
    folds = max(2, min(5, len(fit) // 4))
    auc: dict[str, float] = {}
    lines = ["| features | CV AUC (training slides) | test AUC (held-out slides) |", "|---|---:|---:|"]
    for name, key in (("random", random_key), ("finetuned", ft_key)):
        report = train(train_stores, parts["train"], out_dir / f"mil-{name}",
                       TrainConfig(aggregator=aggregator, folds=folds, seed=seed), feature_key=key, overwrite=True)  # fmt: skip
        cv_auc = report.metrics["pooled"]["auc"]["value"] if "pooled" in report.metrics else float("nan")
        m = evaluate(out_dir / f"mil-{name}", test_stores, parts["test"], out_dir / f"eval-{name}")
        auc[name] = float(m["auc"]["value"])
        lines.append(f"| {name} ({key}) | {cv_auc:.3f} | {auc[name]:.3f} |")
    lines.append(f"\n{len(fit)} training and {len(test)} held-out slides; the encoder never saw the held-out ones.")
    return "\n".join(lines), auc


def _counter(fn: Callable[[int, int], None], total: int) -> Callable[[object], None]:
    state = {"n": 0}

    def on_result(_: object) -> None:
        state["n"] += 1
        fn(state["n"], total)

    return on_result
