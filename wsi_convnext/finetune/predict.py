"""Per-tile class probabilities of a fine-tuned encoder + head (``wsi-convnext predict-tiles``).

Tiles are centre-cropped to the run's ``eval_size`` (the validation size; never rescaled). The
CSV follows the one predictions dialect: ``path`` (as given in DATA's CSV, or relative to the
folder) or ``slide_id,tile``, then ``true_label`` when known, ``predicted``, ``prob_<class>``...
For stores, per-tile probabilities (N, C) float32 are also written into each store under
``scores/<name>`` (attrs: ``kind="tile_class_probabilities"``, ``classes``, ``columns``,
``model_dir``), where ``heatmap`` finds them.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import cpu_count
from ..data.labelled import CorruptTileError, LabelledTileDataset, LabelledTiles, collate_tiles, load_labelled_tiles

__all__ = ["TilePredictions", "predict_tiles", "write_tile_predictions_csv"]


@dataclass
class TilePredictions:
    """Result of :func:`predict_tiles`.

    Attributes:
        tiles: The tiles predicted (unreadable ones are left out and listed in ``skipped``).
        probs: (N, C) class probabilities, rows aligned with ``tiles``.
        classes: Class names (columns of ``probs``).
        labelled: Whether ``tiles.y`` holds true labels.
        metrics: ``wsi_convnext.labels.metrics.compute_metrics`` output when labelled, else None.
        csv: The CSV written, or None.
        score_name: Name of the per-tile scores written into stores, or None.
        tiles_per_second: Inference throughput (decode + forward).
        skipped: ``(ref, reason)`` of unreadable tiles.
    """

    tiles: LabelledTiles
    probs: np.ndarray
    classes: list[str]
    labelled: bool
    metrics: dict[str, Any] | None
    csv: Path | None
    score_name: str | None
    tiles_per_second: float
    skipped: list[tuple[str, str]]


def write_tile_predictions_csv(
    path: str | os.PathLike[str], tiles: LabelledTiles, probs: np.ndarray, classes: Sequence[str], *, labelled: bool
) -> Path:
    """Write per-tile predictions in the one predictions dialect (:mod:`wsi_convnext.outputs.predictions`).

    Keys: ``slide_id, tile`` for stores, else ``path`` (as given in DATA's CSV, or relative to
    the folder); then ``true_label`` when known, ``predicted``, ``prob_<class>``.
    """
    from ..outputs.predictions import PredictionRow, write_predictions

    stores = tiles.kind == "stores"
    rows = [
        PredictionRow(
            key={"slide_id": tiles.slide_ids[i], "tile": int(tiles.tile_of[i])} if stores else {"path": tiles.refs[i]},
            predicted=classes[int(np.argmax(probs[i]))],
            probabilities={c: float(v) for c, v in zip(classes, probs[i])},
            true_label=classes[int(tiles.y[i])] if labelled else None,
        )
        for i in range(len(tiles))
    ]
    return write_predictions(path, rows, classes=list(classes))


def _score_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).lstrip("_.-")
    return clean or "tiles"


def predict_tiles(
    enc_dir: str | os.PathLike[str],
    data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    out_csv: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int | None = None,
    strict: bool = False,
    write_scores: bool = True,
    name: str | None = None,
    n_boot: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> TilePredictions:
    """Class probabilities for every tile of an image folder, a CSV or stores.

    Args:
        enc_dir: Output folder of ``wsi-convnext finetune``.
        data: Image folder, CSV (``path[,label][,group]``) or stores / folders of stores.
        labels: Labels CSV for stores (optional; every tile takes its slide's label).
        out_csv: Where to write the CSV (None: not written).
        batch_size: Tiles per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        num_workers: Decoding worker processes (default: up to 4, leaving one core).
        strict: Fail on an unreadable tile instead of skipping it.
        write_scores: For stores, write ``scores/<name>`` (N, C) into each store.
        name: Score name (default: the ENC_DIR folder name).
        n_boot: Bootstrap resamples for the metrics' CIs.
        progress: ``progress(done_tiles, total_tiles)``.

    Raises:
        InputNotFoundError: Not a finetune output, or no tiles.
        LabelsError: A label outside the model's classes.
        CorruptTileError: ``strict`` and an unreadable tile.
    """
    import torch
    from torch.utils.data import DataLoader

    from .._io import check_output_file
    from ..encoders import resolve_precision
    from ..labels.metrics import compute_metrics
    from .outputs import load_finetuned

    if out_csv is not None:
        check_output_file(out_csv)
    model = load_finetuned(enc_dir, device=device)
    enc, head, classes = model.encoder, model.head, model.classes
    labelled = True
    items = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]
    tiles = load_labelled_tiles(items, labels=labels, classes=classes, strict=strict, require_label=False)
    if tiles.kind == "stores":
        labelled = labels is not None
    elif tiles.kind == "csv":
        with open(tiles.source, newline="", encoding="utf-8-sig") as fh:
            header = [h.strip().lower() for h in next(csv.reader(fh))]
        labelled = "label" in header
    size = int(model.eval_size or tiles.sizes.min())
    size = min(size, int(tiles.sizes.min()))
    ds = LabelledTileDataset(tiles, size=size, train=False)
    dev = enc.device
    workers = max(0, min(4, cpu_count() - 1)) if num_workers is None else num_workers
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_tiles)
    probs = np.full((len(tiles), len(classes)), np.nan, dtype=np.float32)
    skipped: list[tuple[str, str]] = list(tiles.skipped)
    ok = np.ones(len(tiles), dtype=bool)
    done = 0
    t0 = time.perf_counter()
    prec = resolve_precision(dev)
    enc.to(channels_last=prec.channels_last)
    with torch.inference_mode():
        for batch in loader:
            for i, reason in batch.bad:
                if strict:
                    raise CorruptTileError(f"{reason}; remove it or drop --strict to skip it")
                ok[i] = False
                skipped.append((str(tiles.refs[i]), reason))
            if len(batch.y):
                x = enc.preprocess(batch.tiles, device=dev)
                with prec.autocast(dev):
                    logits = head(enc.model(x))
                probs[batch.index.numpy()] = torch.softmax(logits.float(), -1).cpu().numpy()
            done += len(batch.y) + len(batch.bad)
            if progress is not None:
                progress(done, len(tiles))
    seconds = time.perf_counter() - t0
    all_tiles = tiles
    if tiles.kind == "stores" and write_scores:
        from .. import __version__
        from ..store import open_store

        score_name = _score_name(name or Path(enc_dir).resolve().name)
        for s, path in enumerate(tiles.store_paths):
            sel = np.flatnonzero(tiles.store_of == s)
            st = open_store(path)
            scores = np.full((len(st), len(classes)), np.nan, dtype=np.float32)
            scores[tiles.tile_of[sel]] = probs[sel]
            st.write_scores(score_name, scores, {
                "kind": "tile_class_probabilities", "model": score_name, "model_dir": str(Path(enc_dir).resolve()),
                "score": "tile probability", "classes": list(classes), "columns": list(classes),
                "package_version": __version__,
            }, overwrite=True)  # fmt: skip
    else:
        score_name = None
    keep = np.flatnonzero(ok)
    tiles = all_tiles.subset(keep)
    probs = probs[keep]
    metrics = None
    if labelled and len(tiles) and len(np.unique(tiles.y)) > 1:
        metrics = compute_metrics(tiles.y, probs.astype(np.float64), classes, n_boot=n_boot)
    csv_path = write_tile_predictions_csv(out_csv, tiles, probs, classes, labelled=labelled) if out_csv else None
    return TilePredictions(
        tiles, probs, list(classes), labelled, metrics, csv_path, score_name,
        len(tiles) / seconds if seconds > 0 else float("nan"), skipped,
    )  # fmt: skip
