"""``OUT/report.html``: a self-contained page summarising a cohort run.

The page has inline CSS and no scripts; every picture is a PNG embedded as a base64
``data:`` URI, so the file can be mailed or opened from any file system. It shows counts
of slides by status and of stage outcomes, a table of every slide (status, tiles, slide_mpp,
seconds, worker, error), and a grid of QC thumbnails (``OUT/qc/<slide_id>.png``, the
tissue mask and tile overlay written by the tiler) with, after prediction, the predicted
class and the tile-score heatmap (``OUT/heatmaps/<slide_id>.heatmap.png``).

Thumbnails are downscaled to at most :data:`THUMB_SIZE` px and capped at
``report_images`` slides (failed and then predicted slides first), so the page stays a few
MB for large cohorts; the table always lists every slide.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._io import atomic_write_text
from .manifest import ManifestRow, read_manifests

logger = logging.getLogger(__name__)

__all__ = ["THUMB_SIZE", "SlideSummary", "run_predictions", "summarise", "write_report"]

#: Longest side of an embedded thumbnail, in pixels.
THUMB_SIZE = 360

_STATUS_ORDER = ("failed", "running", "done", "skipped")
_COLOURS = {"done": "#1a7f37", "skipped": "#57606a", "failed": "#cf222e", "running": "#9a6700"}

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#57606a;margin-bottom:16px}
.counts{display:flex;gap:12px;flex-wrap:wrap}
.count{border:1px solid #d0d7de;border-radius:8px;padding:8px 16px;min-width:90px}
.count b{display:block;font-size:22px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.st{font-weight:600}
.st-done{color:#1a7f37}.st-skipped{color:#57606a}.st-failed{color:#cf222e}.st-running{color:#9a6700}
.err{color:#cf222e;max-width:520px;overflow-wrap:anywhere}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:14px}
.card{border:1px solid #d0d7de;border-radius:8px;padding:8px;break-inside:avoid}
.card img{max-width:100%;display:block;margin:4px auto;image-rendering:auto}
.card .id{font-weight:600;overflow-wrap:anywhere}
.pred{font-size:13px}
.note{color:#57606a}
"""


@dataclass
class SlideSummary:
    """One slide across its stages, as shown in the report.

    Attributes:
        status: ``failed`` if any stage failed, else ``running`` if any is unfinished,
            ``skipped`` if every stage was already finished before the run, else ``done``.
        stages: Stage name → status.
        error: ``"<stage>: <ErrorType>: <message>"`` of the first failed stage.
    """

    slide_id: str
    path: str = ""
    status: str = "done"
    stages: dict[str, str] = field(default_factory=dict)
    tiles: int | None = None
    slide_mpp: float | None = None
    seconds: float = 0.0
    worker: str = ""
    error: str = ""
    error_type: str = ""
    finished: str = ""


def summarise(rows: Sequence[ManifestRow]) -> list[SlideSummary]:
    """Fold manifest rows (one per slide and stage) into one summary per slide, in row order."""
    slides: dict[str, SlideSummary] = {}
    for r in rows:
        s = slides.get(r.slide_id)
        if s is None:
            s = slides[r.slide_id] = SlideSummary(r.slide_id)
        s.path = s.path or r.path
        s.stages[r.stage] = r.status
        if r.stage == "tile" and r.tiles is not None:
            s.tiles = r.tiles
        elif s.tiles is None and r.tiles is not None:
            s.tiles = r.tiles
        if r.slide_mpp is not None:
            s.slide_mpp = r.slide_mpp
        s.seconds += r.seconds or 0.0
        s.worker = r.worker or s.worker
        s.finished = max(s.finished, r.finished or "")
        if r.status == "failed" and not s.error:
            s.error_type = r.error_type
            s.error = f"{r.stage}: {r.error_type}: {r.error}" if r.error_type else f"{r.stage}: {r.error}"
    for s in slides.values():
        statuses = set(s.stages.values())
        if "failed" in statuses:
            s.status = "failed"
        elif "running" in statuses:
            s.status = "running"
        elif statuses == {"skipped"}:
            s.status = "skipped"
        else:
            s.status = "done"
    return list(slides.values())


def _png_data_uri(path: Path, max_size: int = THUMB_SIZE) -> str | None:
    """A downscaled copy of the picture ``path`` as a PNG data URI (None if unreadable)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
            im.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError) as exc:
        logger.warning("%s: cannot embed picture in the report (%s)", path, exc)
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    from .predictions import read_predictions

    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for row in read_predictions(path):
        if row.slide_id:
            pred: dict[str, Any] = {"label": row.predicted or "", "probabilities": row.probabilities}
            if row.extra.get("heatmap"):
                pred["heatmap"] = row.extra["heatmap"]
            out[row.slide_id] = pred
    return out


def run_predictions(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``slide_id -> {"label", "probabilities", ["heatmap"]}`` from a run's ``predictions.csv`` and its shards."""
    out = Path(out_dir)
    preds: dict[str, dict[str, Any]] = {}
    for f in [out / "predictions.csv", *sorted(out.glob("predictions-shard-*.csv"))]:
        preds.update(_read_predictions(f))
    return preds


def _fmt(value: Any, spec: str = "") -> str:
    if value is None or value == "":
        return ""
    return format(value, spec) if spec else str(value)


def _status(s: str) -> str:
    return f'<span class="st st-{html.escape(s)}">{html.escape(s)}</span>'


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    rows: Sequence[ManifestRow] | None = None,
    predictions: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "wsi-convnext run",
    report_images: int = 500,
    path: str | os.PathLike[str] | None = None,
    viewer_url: str | None = None,
) -> Path:
    """Write the run report (atomically) and return its path.

    Args:
        out_dir: The run's output folder (manifests, ``qc/``, ``heatmaps/``, ``predictions.csv``).
        rows: Manifest rows (default: :func:`~wsi_convnext.outputs.manifest.read_manifests` of ``out_dir``,
            i.e. every shard's manifest).
        predictions: ``slide_id -> {"label", "probabilities", ["heatmap"]}`` (default: read
            ``out_dir/predictions.csv`` and every shard's ``predictions-shard-*.csv``).
        title: Page title.
        report_images: Most slides shown with pictures.
        path: Where to write (default ``out_dir/report.html``).
        viewer_url: Base URL of a running ``wsi-convnext view`` of ``out_dir``; each slide id
            then links to its view there.
    """
    out = Path(out_dir)
    rows = list(rows) if rows is not None else read_manifests(out)
    preds = dict(predictions) if predictions is not None else run_predictions(out)
    slides = summarise(rows)
    by_status = Counter(s.status for s in slides)
    stages: dict[str, Counter[str]] = {}
    for r in rows:
        stages.setdefault(r.stage, Counter())[r.status] += 1
    target = Path(path) if path is not None else out / "report.html"

    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="meta">{len(slides)} slides · output {html.escape(str(out.resolve()))} · '
        f"written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}</div>",
        '<div class="counts">',
    ]
    parts.append(f'<div class="count">slides<b>{len(slides)}</b></div>')
    for st in _STATUS_ORDER:
        if by_status.get(st):
            parts.append(
                f'<div class="count" style="border-color:{_COLOURS[st]}">{st}<b>{by_status[st]}</b></div>'
            )
    parts.append("</div>")

    if stages:
        parts.append("<h2>Stages</h2><table><tr><th>stage</th>")
        parts += [f"<th>{st}</th>" for st in _STATUS_ORDER]
        parts.append("</tr>")
        for stage, c in stages.items():
            parts.append(f"<tr><td>{html.escape(stage)}</td>")
            parts += [f'<td class="num">{c.get(st, 0)}</td>' for st in _STATUS_ORDER]
            parts.append("</tr>")
        parts.append("</table>")

    with_pred = bool(preds)
    parts.append("<h2>Slides</h2><table><tr><th>slide</th><th>status</th><th>stages</th>")
    parts.append('<th>tiles</th><th>slide mpp (µm/px)</th><th>seconds</th>')
    if with_pred:
        parts.append("<th>prediction</th>")
    parts.append("<th>worker</th><th>error</th></tr>")
    order = {st: i for i, st in enumerate(_STATUS_ORDER)}
    for s in sorted(slides, key=lambda s: (order.get(s.status, 9), s.slide_id)):
        stage_txt = " ".join(f"{k}:{v}" for k, v in s.stages.items())
        sid = html.escape(s.slide_id)
        if viewer_url:
            sid = f'<a href="{html.escape(viewer_url.rstrip("/"))}/view/{html.escape(quote(s.slide_id))}">{sid}</a>'
        parts.append(
            f'<tr id="slide-{html.escape(s.slide_id)}"><td title="{html.escape(s.path)}">{sid}</td>'
            f"<td>{_status(s.status)}</td><td>{html.escape(stage_txt)}</td>"
            f'<td class="num">{_fmt(s.tiles)}</td><td class="num">{_fmt(s.slide_mpp, ".4g")}</td>'
            f'<td class="num">{s.seconds:.1f}</td>'
        )
        if with_pred:
            parts.append(f"<td>{html.escape(str(preds.get(s.slide_id, {}).get('label', '')))}</td>")
        parts.append(f"<td>{html.escape(s.worker)}</td><td class=\"err\">{html.escape(s.error)}</td></tr>")
    parts.append("</table>")

    # Pictures: failed slides with a QC picture first (they need a look), then predicted ones.
    pictured: list[tuple[SlideSummary, Path | None, Path | None]] = []
    for s in sorted(slides, key=lambda s: (s.status != "failed", s.slide_id not in preds, s.slide_id)):
        qc = out / "qc" / f"{s.slide_id}.png"
        heat_raw = preds.get(s.slide_id, {}).get("heatmap")
        candidates = [Path(heat_raw)] if heat_raw else []
        candidates += [out / "heatmaps" / f"{s.slide_id}.heatmap.png", out / "heatmaps" / f"{s.slide_id}.png"]
        qc_p = qc if qc.is_file() else None
        heat_p = next((c for c in candidates if c.is_file()), None)
        if qc_p or heat_p:
            pictured.append((s, qc_p, heat_p))
    if pictured:
        parts.append("<h2>QC thumbnails</h2>")
        if len(pictured) > report_images:
            parts.append(
                f'<p class="note">Showing {report_images} of {len(pictured)} slides with pictures; '
                f"all QC pictures are in {html.escape(str(out / 'qc'))}.</p>"
            )
        parts.append('<div class="grid">')
        for s, qc_p, heat_p in pictured[:report_images]:
            parts.append(f'<div class="card"><div class="id">{html.escape(s.slide_id)} {_status(s.status)}</div>')
            for label, pic in (("QC", qc_p), ("heatmap", heat_p)):
                if pic is None:
                    continue
                uri = _png_data_uri(pic)
                if uri:
                    parts.append(f'<img alt="{label} {html.escape(s.slide_id)}" src="{uri}">')
            pred = preds.get(s.slide_id)
            if pred:
                probs = pred.get("probabilities") or {}
                ptxt = ", ".join(f"{html.escape(str(k))} {float(v):.2f}" for k, v in probs.items())
                parts.append(
                    f'<div class="pred">predicted <b>{html.escape(str(pred.get("label", "")))}</b>'
                    + (f" ({ptxt})" if ptxt else "")
                    + "</div>"
                )
            detail = [f"{s.tiles} tiles" if s.tiles is not None else "", f"{s.slide_mpp:.3g} µm/px" if s.slide_mpp else ""]
            parts.append(f'<div class="note">{html.escape(" · ".join(d for d in detail if d))}</div>')
            if s.error:
                parts.append(f'<div class="err">{html.escape(s.error)}</div>')
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")

    atomic_write_text(target, "\n".join(parts))
    return target
