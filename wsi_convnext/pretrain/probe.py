"""Linear and kNN probes of a tile encoder on labelled tiles (how the field compares encoders).

:func:`run_probe` embeds the labelled tiles (centre crop at the tiles' µm/px), fits a
logistic-regression probe (standardised features, L2, ``C = 1``) and a cosine kNN (``k = 20``,
votes weighted by ``exp(cos / 0.07)`` as in DINO's evaluation) on the training part, and scores
the held-out part: balanced accuracy and macro one-vs-rest AUC, each with a 95% percentile
interval from resampling the held-out *groups* (slides / fields) with replacement. Without a
test set the split is group-disjoint and stratified by class (:func:`~wsi_convnext.data.labelled.grouped_split`).

``baseline=True`` adds the first-order pixel-statistics baseline: per-channel mean, standard
deviation and 10/50/90 % percentiles (15 numbers per tile, no spatial structure) through the same
linear probe, the data set's shortcut ceiling printed beside the encoder's score.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_write_text
from ..errors import ConfigError, InputNotFoundError

if TYPE_CHECKING:
    import torch

    from ..data.labelled import LabelledTiles
    from ..encoders import Encoder

__all__ = ["PROBE_FILE", "ProbeResult", "embed_tiles", "fit_probes", "group_bootstrap", "load_probe_encoder", "pixel_statistics",
           "probe_probabilities", "run_probe", "score_features"]

logger = logging.getLogger(__name__)

PROBE_FILE = "probe.json"
TABLE_FILE = "probe.md"
KNN_K = 20
KNN_TEMPERATURE = 0.07


def embed_tiles(
    backbone: Callable[[torch.Tensor], torch.Tensor], encoder: Encoder, tiles: LabelledTiles, *, size: int | None = None,
    device: Any = "cpu", autocast: Callable[[], Any] | None = None, batch_size: int = 64, num_workers: int = 0,
    pixel_stats: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """(features (n, D) float32, kept tile indices (n,), first-order pixel statistics (n, 15) or None).

    Tiles are centre-cropped to ``size`` px (default: the smallest tile side); tiles that do not
    decode are left out (logged).
    """
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    from ..data.labelled import LabelledTileDataset, collate_tiles

    ds = LabelledTileDataset(tiles, size=size, train=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_tiles)
    feats, idx, stats = [], [], []
    ctx = autocast or contextlib.nullcontext
    with torch.no_grad():
        for batch in loader:
            for _, reason in batch.bad:
                logger.warning("probe: skipped unreadable tile %s", reason)
            if not len(batch.y):
                continue
            x = encoder.preprocess(batch.tiles, device=device)
            with ctx():
                feats.append(backbone(x).float().cpu().numpy())
            idx.append(batch.index.numpy())
            if pixel_stats:
                stats.append(pixel_statistics(batch.tiles.numpy()))
    if not feats:
        raise InputNotFoundError(f"{tiles.source}: none of its tiles could be read")
    return np.concatenate(feats), np.concatenate(idx), np.concatenate(stats) if pixel_stats else None


def pixel_statistics(tiles: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 → (B, 15): per channel mean, sd and 10/50/90 % percentiles (first order only)."""
    x = tiles.reshape(len(tiles), -1, 3).astype(np.float32)
    q = np.percentile(x, [10, 50, 90], axis=1)  # (3, B, 3)
    return np.concatenate([x.mean(1), x.std(1), *q], axis=1)


def _knn_probs(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, n_classes: int, k: int = KNN_K) -> np.ndarray:
    a = xtr / np.maximum(np.linalg.norm(xtr, axis=1, keepdims=True), 1e-12)
    b = xte / np.maximum(np.linalg.norm(xte, axis=1, keepdims=True), 1e-12)
    sim = b @ a.T
    k = min(k, len(ytr))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, 1) / KNN_TEMPERATURE - 1 / KNN_TEMPERATURE)
    p = np.zeros((len(xte), n_classes))
    np.add.at(p, (np.repeat(np.arange(len(xte)), k), ytr[top].reshape(-1)), w.reshape(-1))
    return p / np.maximum(p.sum(1, keepdims=True), 1e-300)


def _linear_probs(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(sc.transform(xtr), ytr)
    p = np.zeros((len(xte), n_classes))
    p[:, clf.classes_] = clf.predict_proba(sc.transform(xte))
    return p


def group_bootstrap(y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Balanced accuracy and macro AUC with 95% percentile intervals over group resamples."""
    from ..labels.metrics import balanced_accuracy, roc_auc

    def both(yy: np.ndarray, pp: np.ndarray) -> tuple[float, float]:
        auc = roc_auc(yy, pp) if len(np.unique(yy)) > 1 else float("nan")
        return balanced_accuracy(yy, pp), auc

    point = both(y, p)
    uniq, inv = np.unique(groups.astype(str), return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        sel = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        draws.append(both(y[sel], p[sel]))
    out = {}
    for j, name in enumerate(("balanced_accuracy", "auc")):
        v = np.array([d[j] for d in draws], dtype=np.float64)
        v = v[np.isfinite(v)]
        lo, hi = (np.quantile(v, [0.025, 0.975]) if len(v) else (np.nan, np.nan))
        out[name] = {"value": float(point[j]), "ci_low": float(lo), "ci_high": float(hi)}
    return out


def probe_probabilities(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, n_classes: int, *, seed: int = 0, knn: bool = True
) -> dict[str, np.ndarray]:
    """Class probabilities (n_test, C) of the held-out features: ``{"linear": ..., "knn": ...}``."""
    res = {"linear": _linear_probs(xtr, ytr, xte, n_classes, seed)}
    if knn:
        res["knn"] = _knn_probs(xtr, ytr, xte, n_classes)
    return res


def score_features(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, groups_te: np.ndarray, n_classes: int,
    *, seed: int = 0, n_boot: int = 1000, knn: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Linear (and kNN) probe scores on the held-out part: ``{"linear": {...}, "knn": {...}}``."""
    res = probe_probabilities(xtr, ytr, xte, n_classes, seed=seed, knn=knn)
    return {name: _summary(yte, p, groups_te, n_boot, seed) for name, p in res.items()}


def _summary(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    if n_boot:
        return {"n": int(len(y)), **group_bootstrap(y, p, groups, n_boot=n_boot, seed=seed)}
    from ..labels.metrics import balanced_accuracy, roc_auc

    return {"n": int(len(y)), "balanced_accuracy": balanced_accuracy(y, p), "auc": roc_auc(y, p) if len(np.unique(y)) > 1 else float("nan")}


def _split(tiles: LabelledTiles, test: LabelledTiles | None, seed: int, test_frac: float) -> tuple[np.ndarray, np.ndarray]:
    from ..data.labelled import grouped_split

    if test is not None:
        return np.arange(len(tiles)), np.arange(len(test))
    train, val, held = grouped_split(tiles, val_frac=test_frac, seed=seed)
    te = held if len(held) else val
    if not len(te):
        raise ConfigError(f"{tiles.source}: no held-out part; give it a split column with test rows, or pass --test")
    return train, te


def fit_probes(
    backbone: Callable[[torch.Tensor], torch.Tensor], encoder: Encoder, tiles: LabelledTiles, *, test: LabelledTiles | None = None,
    device: Any = "cpu", autocast: Callable[[], Any] | None = None, seed: int = 0, n_boot: int = 1000,
    test_frac: float = 0.3, baseline: bool = False, batch_size: int = 64, num_workers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Embed, split (group-disjoint unless ``test``), fit and score; the probe part of ``probe.json``."""
    tr, te = _split(tiles, test, seed, test_frac)
    train_t = tiles.subset(tr)
    test_t = test if test is not None else tiles.subset(te)
    kw = {"device": device, "autocast": autocast, "batch_size": batch_size, "num_workers": num_workers, "pixel_stats": baseline}
    ftr, itr, str_ = embed_tiles(backbone, encoder, train_t, **kw)
    fte, ite, ste = embed_tiles(backbone, encoder, test_t, size=int(train_t.sizes.min()) if test is not None else None, **kw)
    ytr, yte, gte = train_t.y[itr], test_t.y[ite], test_t.groups[ite]
    n_classes = len(tiles.classes)
    out: dict[str, Any] = {
        "n_train": int(len(ytr)), "n_test": int(len(yte)), "n_train_groups": int(len(np.unique(train_t.groups[itr]))),
        "n_test_groups": int(len(np.unique(gte))), "classes": list(tiles.classes),
        **score_features(ftr, ytr, fte, yte, gte, n_classes, seed=seed, n_boot=n_boot),
    }  # fmt: skip
    if baseline:
        out["baseline"] = score_features(str_, ytr, ste, yte, gte, n_classes, seed=seed, n_boot=n_boot, knn=False)["linear"]
    return out


def load_probe_encoder(encoder: str, *, model: str | None = None, stem: str | None = None) -> Encoder:
    """ENCODER of ``probe``: an ENC_DIR or weights file, ``random`` or ``pretrained`` (``model``'s timm tag).

    Raises:
        ConfigError: ``random``/``pretrained`` without ``model``.
        InputNotFoundError, WeightsError, EncoderError: See :func:`~wsi_convnext.encoders.build_encoder`.
    """
    from ..encoders import build_encoder
    from ..encoders.weights import META_MODEL, read_weights_metadata, resolve_weights_path

    if encoder in ("random", "pretrained"):
        if not model:
            raise ConfigError(f"ENCODER {encoder!r} needs --model")
        return build_encoder(model, stem=stem, pretrained=encoder == "pretrained")
    path = resolve_weights_path(encoder)
    meta_model = read_weights_metadata(path).get(META_MODEL)
    if not (model or meta_model):
        raise ConfigError(f"weights file {path} does not record its model; pass --model")
    return build_encoder(model or meta_model, stem=stem, weights=path)


@dataclass
class ProbeResult:
    """What :func:`run_probe` wrote: ``doc`` (probe.json) and ``table`` (probe.md)."""

    doc: dict[str, Any]
    table: str
    out: Path


def _cell(e: dict[str, Any] | None, key: str) -> str:
    if not e or key not in e:
        return ""
    m = e[key]
    if isinstance(m, dict):
        if m.get("ci_low") is None or not np.isfinite(m.get("ci_low", np.nan)):
            return f"{m['value']:.3f}"
        return f"{m['value']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})"
    return f"{m:.3f}"


def probe_table(doc: dict[str, Any]) -> str:
    """Markdown table of a probe.json document."""
    lines = [f"Probe of {doc['encoder']['key']} on {doc['data']} (test: {doc['test']}); "
             f"{doc['n_train']} train / {doc['n_test']} test tiles, {doc['n_test_groups']} test groups; 95% group-bootstrap CIs.", "",
             "| features | probe | balanced accuracy | macro AUC |", "|---|---|---:|---:|"]  # fmt: skip
    for name in ("linear", "knn"):
        lines.append(f"| encoder | {name} | {_cell(doc.get(name), 'balanced_accuracy')} | {_cell(doc.get(name), 'auc')} |")
    if "baseline" in doc:
        b = doc["baseline"]
        lines.append(f"| first-order pixel statistics (baseline) | linear | {_cell(b, 'balanced_accuracy')} | {_cell(b, 'auc')} |")
    return "\n".join(lines) + "\n"


def run_probe(
    encoder: str, data: Sequence[str | os.PathLike[str]] | str, *, out: str | os.PathLike[str], test: str | None = None,
    model: str | None = None, stem: str | None = None, baseline: bool = False, device: str = "auto", seed: int = 0,
    n_boot: int = 1000, test_frac: float = 0.3, batch_size: int = 64, num_workers: int = 0, strict: bool = False,
) -> ProbeResult:  # fmt: skip
    """Probe ``encoder`` on labelled tiles; writes ``probe.json`` and ``probe.md`` into ``out``.

    Raises:
        InputNotFoundError, LabelsError, CorruptTileError: Bad labelled tiles.
        ConfigError, WeightsError, EncoderError, DeviceError: See :func:`load_probe_encoder`.
    """
    from ..data.labelled import load_labelled_tiles
    from ..encoders import resolve_device, resolve_precision

    dev = resolve_device(device)
    enc = load_probe_encoder(encoder, model=model, stem=stem)
    enc.to(dev)
    tiles = load_labelled_tiles(data, strict=strict)
    tiles.require_classes(2)
    test_tiles = None
    if test is not None:
        test_tiles = load_labelled_tiles(test, classes=tiles.classes, strict=strict)
        shared = sorted(set(tiles.groups.astype(str)) & set(test_tiles.groups.astype(str)))
        if shared and tiles.kind != "folder":
            logger.warning("probe: %d group(s) are in both the training data and --test (e.g. %s)", len(shared), shared[0])

    def autocast() -> Any:
        return resolve_precision(dev).autocast(dev)

    res = fit_probes(enc.model, enc, tiles, test=test_tiles, device=dev, autocast=autocast, seed=seed, n_boot=n_boot,
                     test_frac=test_frac, baseline=baseline, batch_size=batch_size, num_workers=num_workers)  # fmt: skip
    doc = {"kind": "wsi_convnext.probe", "encoder": enc.attrs(), "data": str(data if isinstance(data, str) else ", ".join(map(str, data))),
           "test": test or "group-disjoint split", "seed": seed, "n_boot": n_boot, **res}  # fmt: skip
    from ..labels.metrics import metrics_to_json

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    table = probe_table(doc)
    atomic_write_text(outp / PROBE_FILE, metrics_to_json(doc) + "\n")
    atomic_write_text(outp / TABLE_FILE, table)
    return ProbeResult(json.loads(metrics_to_json(doc)), table, outp)
