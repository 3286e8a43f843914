"""The one predictions CSV dialect, written by ``predict``, ``evaluate``, ``train`` (out-of-fold) and ``run``.

Columns, in this order:

- the key: ``slide_id`` (slide-level), ``path`` (one image file per row, e.g. tile images),
  or ``slide_id,tile`` (one store tile per row);
- ``true_label``, only when at least one row has a known label;
- ``predicted``: the predicted class (empty when the prediction failed);
- ``prob_<class>`` for each class, in the model's class order (6 decimals);
- then any extra columns a writer adds (e.g. ``patient_id``, ``fold``, ``n_tiles``, ``store``,
  ``heatmap``, ``error``), in first-seen order.

:func:`write_predictions` writes atomically (and with ``merge`` merges into an existing
file under its lock, a row per key, the new one winning); :func:`read_predictions` reads
this dialect back, and also the older ``run`` dialect (``label`` holding the predicted class,
``p_<class>`` probabilities).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_text, check_output_file, csv_text, csv_unescape, path_lock
from ..errors import ConfigError

__all__ = ["KEYS", "PredictionRow", "prediction_rows", "read_predictions", "write_predictions"]

#: The key column sets a file may use.
KEYS: tuple[tuple[str, ...], ...] = (("slide_id",), ("path",), ("slide_id", "tile"))
PROB_PREFIX = "prob_"
_LEGACY_PROB_PREFIX = "p_"


@dataclass
class PredictionRow:
    """One row: the key, the known label (or None), the prediction and its class probabilities.

    Attributes:
        key: Values of the key columns (``{"slide_id": ...}``, ``{"path": ...}`` or
            ``{"slide_id": ..., "tile": ...}``).
        predicted: The predicted class, or None when the prediction failed.
        probabilities: Probability by class name.
        true_label: The known label, or None.
        extra: Further columns (strings or numbers).
    """

    key: dict[str, Any]
    predicted: str | None
    probabilities: dict[str, float] = field(default_factory=dict)
    true_label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slide_id(self) -> str | None:
        """The ``slide_id`` key value, if the file is keyed by slide."""
        v = self.key.get("slide_id")
        return None if v is None else str(v)


def _key_columns(rows: Sequence[PredictionRow]) -> tuple[str, ...]:
    cols = {tuple(r.key) for r in rows}
    if len(cols) > 1:
        raise ValueError(f"prediction rows mix key columns: {sorted(cols)}")
    key = cols.pop() if cols else ("slide_id",)
    if key not in KEYS:
        raise ValueError(f"prediction key must be one of {KEYS}, got {key}")
    return key


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def _render(rows: Sequence[PredictionRow], classes: Sequence[str] | None) -> str:
    key = _key_columns(rows)
    if classes is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r.probabilities))
        classes = list(seen)
    with_label = any(r.true_label not in (None, "") for r in rows)
    extra: dict[str, None] = {}
    for r in rows:
        extra.update(dict.fromkeys(k for k in r.extra if k not in extra))
    header = [*key, *(["true_label"] if with_label else []), "predicted", *[f"{PROB_PREFIX}{c}" for c in classes], *extra]
    lines = []
    for r in rows:
        line = [_fmt(r.key[k]) for k in key]
        if with_label:
            line.append(_fmt(r.true_label))
        line.append(r.predicted or "")
        for c in classes:
            p = r.probabilities.get(c)
            line.append("" if p is None or not math.isfinite(float(p)) else f"{float(p):.6f}")
        line += [_fmt(r.extra.get(k)) for k in extra]
        lines.append(line)
    return csv_text(header, lines)


def write_predictions(
    path: str | os.PathLike[str],
    rows: Iterable[PredictionRow],
    *,
    classes: Sequence[str] | None = None,
    merge: bool = False,
) -> Path:
    """Write prediction rows in the one dialect, atomically.

    Args:
        path: The CSV file.
        rows: The rows (all with the same key columns).
        classes: Probability columns in this order (default: classes in first-seen order).
        merge: Keep the rows already in ``path`` whose key is not among ``rows`` (a resumed
            run); the merge happens under the file's lock, so concurrent writers lose nothing.

    Returns:
        ``path`` as a Path.
    """
    p = check_output_file(path)
    rows = list(rows)
    if not merge:
        return atomic_write_text(p, _render(rows, classes))
    with path_lock(p):
        old = read_predictions(p) if p.is_file() else []
        new_keys = {tuple(str(v) for v in r.key.values()) for r in rows}
        kept = [r for r in old if tuple(str(v) for v in r.key.values()) not in new_keys]
        merged = sorted(kept + rows, key=lambda r: tuple(str(v) for v in r.key.values()))
        if classes is not None:
            extra = [c for r in merged for c in r.probabilities if c not in classes]
            classes = [*classes, *dict.fromkeys(extra)]
        return atomic_write_text(p, _render(merged, classes))


def read_predictions(path: str | os.PathLike[str]) -> list[PredictionRow]:
    """Read a predictions CSV (this dialect, or the older ``label``/``p_<class>`` one of ``run``).

    Raises:
        ConfigError: The file has none of the key columns.
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        key = next((k for k in reversed(KEYS) if all(c in header for c in k)), None)
        if key is None:
            raise ConfigError(f"{p}: not a predictions CSV (needs a slide_id or path column)")
        legacy = "predicted" not in header
        prefix = _LEGACY_PROB_PREFIX if legacy else PROB_PREFIX
        probs_cols = [c for c in header if c.startswith(prefix)]
        known = {*key, "true_label", "predicted", *probs_cols} | ({"label"} if legacy else set())
        out: list[PredictionRow] = []
        for raw in reader:
            raw = {k: csv_unescape(v) if isinstance(v, str) else v for k, v in raw.items()}
            if not all(raw.get(k) for k in key):
                continue
            probs: dict[str, float] = {}
            for c in probs_cols:
                v = (raw.get(c) or "").strip()
                if v:
                    try:
                        probs[c[len(prefix):]] = float(v)
                    except ValueError:
                        pass
            predicted = (raw.get("label") if legacy else raw.get("predicted")) or None
            out.append(
                PredictionRow(
                    key={k: raw[k] for k in key}, predicted=predicted, probabilities=probs,
                    true_label=raw.get("true_label") or None,
                    extra={k: v for k, v in raw.items() if k is not None and k not in known and v not in (None, "")},
                )  # fmt: skip
            )
        return out


def prediction_rows(predictions: Mapping[str, Mapping[str, Any]]) -> list[PredictionRow]:
    """Rows from a ``slide_id -> {"predicted" (or "label"), "probabilities", ...}`` mapping (as ``run`` keeps them)."""
    rows = []
    for sid, pred in predictions.items():
        extra = {k: v for k, v in pred.items() if k not in ("label", "predicted", "probabilities", "true_label")}
        rows.append(
            PredictionRow(
                key={"slide_id": sid}, predicted=str(pred.get("predicted", pred.get("label", "")) or "") or None,
                probabilities={str(k): float(v) for k, v in (pred.get("probabilities") or {}).items()},
                true_label=pred.get("true_label"), extra=extra,
            )  # fmt: skip
        )
    return rows
