"""Heatmaps: per-tile scores drawn at their true position on the slide thumbnail, and top-k montages."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import inside
from ..errors import ConfigError, OnFailure, StoreError, fail_or_raise
from ..store import TileStore

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeatmapPaths:
    """Pictures written for one slide.

    Attributes:
        heatmap: Thumbnail with the score of each tile overlaid and a colour bar (PNG).
        montage: The top-k tiles by score, best first (PNG).
    """

    heatmap: Path
    montage: Path


def render_heatmap(
    store: TileStore,
    scores: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    label: str = "attention",
    top_k: int = 16,
    name: str | None = None,
    title: str | None = None,
) -> HeatmapPaths:
    """Draw ``scores`` of a slide's tiles as a heatmap and a montage of the ``top_k`` tiles.

    Args:
        store: The slide's store (thumbnail, coords in level-0 pixels, tiles).
        scores: (N,) one score per tile, in store order. NaN tiles are not painted.
        out_dir: Folder for ``<name>.heatmap.png`` and ``<name>.topk.png``.
        label: Colour-bar label.
        top_k: Number of tiles in the montage (at least 1).
        name: File stem; defaults to the store's folder name without ``.zarr``. It must follow
            the slide-id policy, and the pictures must land inside ``out_dir``.
        title: Picture title; defaults to the slide id and ``label``. The tissue outline
            is drawn from the store's mask.

    Raises:
        ConfigError: ``top_k`` < 1, or an unsafe ``name``.
        UnsafePathError: A picture path would leave ``out_dir``.
    """
    from ..inputs import check_slide_id
    from .qc import montage, overlay_scores, save_png

    _check_top_k(top_k)

    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape[0] != len(store):
        raise StoreError(f"{store.path}: {scores.shape[0]} scores for {len(store)} tiles")
    out = Path(out_dir)
    # The folder name, not the slide_id attr: a store's attrs are input, never trusted as a path.
    stem = check_slide_id(name or store.path.name.removesuffix(".zarr"), f"heatmap name for {store.path}")
    thumb_ds = float(store.attrs["thumbnail_downsample"])
    picture = overlay_scores(
        store.thumbnail, thumb_ds, store.coords, store.extent0, scores, label=label, mask=store.tissue_mask,
        title=title or f"{stem}: {label}",
    )  # fmt: skip
    finite = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.argsort(-finite, kind="stable")[: max(1, min(top_k, len(store)))]
    tiles = store.read_tiles(np.sort(order))  # every read (and its checks) before the first picture
    rank = {int(i): k for k, i in enumerate(np.sort(order))}
    tiles = tiles[[rank[int(i)] for i in order]]
    labels = [f"#{k + 1} {scores[i]:.3g}" for k, i in enumerate(order)]
    heat = save_png(inside(out, f"{stem}.heatmap.png"), picture)
    mont = save_png(inside(out, f"{stem}.topk.png"), montage(tiles, labels=labels))
    return HeatmapPaths(heatmap=heat, montage=mont)


def heatmaps(
    model_dir: str | os.PathLike[str],
    stores: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    top_k: int = 16,
    on_failure: OnFailure | None = None,
) -> dict[str, HeatmapPaths]:
    """Score every tile of each store with a trained MIL model and draw its heatmap and top-k montage.

    The scores (attention or instance score, per the aggregator) are also written into each
    store under ``scores/<model name>``. For multi-class models with per-class scores, the
    column of the predicted class is drawn.

    Args:
        on_failure: Called as ``on_failure(store_path, one-line error)`` for a store that
            cannot be drawn (damaged, replaced, lacking embeddings); the others are still
            drawn. None: such a store raises. (MIL models only.)

    Returns:
        Paths of the pictures by slide id.
    """
    from .._io import ensure_dir
    from ..mil.api import predict
    from ..store import find_stores, open_store

    _check_top_k(top_k)
    ensure_dir(out_dir)
    paths = find_stores(stores)
    if _is_finetune_dir(model_dir):
        return _tile_classifier_heatmaps(model_dir, paths, out_dir, top_k=top_k)
    preds = predict(model_dir, paths, write_scores=True, on_error="raise" if on_failure is None else "record")
    out: dict[str, HeatmapPaths] = {}
    for pred in preds:
        if pred.status == "failed":
            on_failure(Path(pred.store), pred.error)  # type: ignore[misc]
            continue
        try:
            store = open_store(pred.store)
            name = _score_name_for(store, model_dir)
            scores = store.scores(name)
            attrs = store.score_attrs(name)
            if scores.ndim == 2:
                scores = scores[:, list(attrs["columns"]).index(pred.predicted)]
            label = f"{attrs.get('score', 'score')} ({pred.predicted} {pred.probabilities[pred.predicted]:.2f})"
            title = heatmap_title(pred.slide_id, attrs)
            out[pred.slide_id] = render_heatmap(store, scores, out_dir, label=label, top_k=top_k, title=title)
        except StoreError as exc:
            fail_or_raise(Path(pred.store), exc, on_failure, _log)
    return out


def heatmap_title(slide_id: str, score_attrs: Mapping[str, Any]) -> str:
    """``"<slide>: predicted <class> (p = 0.93); attention per tile"`` from a score array's attrs."""
    score = score_attrs.get("score", "score")
    predicted = score_attrs.get("predicted_class")
    probs = score_attrs.get("probabilities") or {}
    if predicted is None:
        return f"{slide_id}: {score} per tile"
    prob = probs.get(predicted)
    p = f" (p = {float(prob):.2f})" if prob is not None else ""
    return f"{slide_id}: predicted {predicted}{p}; {score} per tile"


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"--top-k must be a whole number of at least 1, got {top_k}")


def _score_name_for(store: TileStore, model_dir: str | os.PathLike[str]) -> str:
    """The score array that ``model_dir`` wrote into ``store`` (matched on the model folder)."""
    target = str(Path(model_dir).resolve())
    for name in store.score_keys:
        if store.score_attrs(name).get("model_dir") == target:
            return name
    raise StoreError(f"{store.path}: no scores of model {model_dir}; run `wsi-convnext predict` first")


def _is_finetune_dir(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` is an ENC_DIR written by ``wsi-convnext finetune`` (a tile classifier)."""
    import json

    cfg = Path(model_dir) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("kind") == "wsi_convnext.finetune"
    except (OSError, ValueError):
        return False


def _tile_classifier_heatmaps(
    enc_dir: str | os.PathLike[str], paths: list[Path], out_dir: str | os.PathLike[str], *, top_k: int
) -> dict[str, HeatmapPaths]:
    """Heatmaps of a fine-tuned tile classifier: per slide, the probability of its most likely class."""
    from ..finetune.predict import predict_tiles
    from ..store import open_store

    res = predict_tiles(enc_dir, paths, write_scores=True, n_boot=0)
    out: dict[str, HeatmapPaths] = {}
    for path in res.tiles.store_paths:
        store = open_store(path)
        probs = store.scores(res.score_name)
        col = int(np.nanargmax(np.nanmean(probs, axis=0)))
        label = f"tile probability of {res.classes[col]}"
        out[store.slide_id] = render_heatmap(store, probs[:, col], out_dir, label=label, top_k=top_k)
    return out
