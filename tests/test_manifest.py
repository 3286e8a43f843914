"""OUT/manifest.csv: one row per slide and stage, readable mid-run, crash-tolerant."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from wsi_convnext.outputs.manifest import (
    MANIFEST_FIELDS,
    ManifestRow,
    RunManifest,
    manifest_name,
    read_manifest,
    read_manifests,
)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_record_is_visible_on_disk_immediately(tmp_path: Path) -> None:
    path = tmp_path / "out" / "manifest.csv"
    m = RunManifest(path)
    m.record(ManifestRow("s1", "tile", "running", path="/x/s1.svs"))
    # Another process reading mid-run sees the row (appended and flushed).
    assert [(r.slide_id, r.stage, r.status) for r in read_manifest(path)] == [("s1", "tile", "running")]
    m.record(ManifestRow("s1", "tile", "done", path="/x/s1.svs", tiles=12, slide_mpp=0.499, seconds=1.23456, worker="h/0"))
    rows = read_manifest(path)
    assert len(rows) == 1 and rows[0].status == "done" and rows[0].tiles == 12
    assert rows[0].slide_mpp == pytest.approx(0.499) and rows[0].seconds == pytest.approx(1.235)
    assert rows[0].finished.endswith("+00:00")  # ISO 8601, UTC
    assert m.status("s1", "tile") == "done" and m.status("s1", "embed") is None
    m.close()
    raw = _csv_rows(path)
    assert list(raw[0]) == list(MANIFEST_FIELDS)
    assert len(raw) == 1  # compacted: one row per slide and stage


def test_reopen_keeps_rows_and_updates(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    with RunManifest(path) as m:
        m.record({"slide_id": "a", "stage": "tile", "status": "done", "tiles": 3})
        m.record({"slide_id": "b", "stage": "tile", "status": "failed", "error_type": "MppError", "error": "no mpp"})
    m2 = RunManifest(path)
    assert len(m2) == 2
    assert m2.get("b", "tile").error_type == "MppError"
    m2.record(ManifestRow("b", "tile", "done", tiles=5))
    m2.record(ManifestRow("a", "embed", "skipped"))
    m2.close()
    rows = read_manifest(path)
    assert [(r.slide_id, r.stage, r.status) for r in rows] == [
        ("a", "tile", "done"),
        ("b", "tile", "done"),
        ("a", "embed", "skipped"),
    ]
    assert rows[1].error == ""


def test_errors_are_one_line_and_bounded(tmp_path: Path) -> None:
    m = RunManifest(tmp_path / "m.csv")
    row = m.record(ManifestRow("a", "tile", "failed", error_type="SlideReadError", error="line1\nline2, with comma\n" + "x" * 2000))
    assert "\n" not in row.error and row.error.startswith("line1 line2, with comma")
    assert len(row.error) <= 500
    m.close()
    assert read_manifest(tmp_path / "m.csv")[0].error == row.error


def test_truncated_last_line_is_tolerated(tmp_path: Path) -> None:
    """A run killed mid-write leaves a cut line; the next run must still read and append."""
    path = tmp_path / "manifest.csv"
    with RunManifest(path) as m:
        m.record(ManifestRow("a", "tile", "done", tiles=1))
        m.record(ManifestRow("b", "tile", "done", tiles=2))
    text = path.read_text()
    path.write_text(text + "c,/x/c.svs,tile,do")  # cut short, no newline
    rows = read_manifest(path)
    assert {r.slide_id for r in rows} == {"a", "b"}
    m = RunManifest(path)  # rewrites the file cleanly
    m.record(ManifestRow("c", "tile", "done", tiles=3))
    assert {r.slide_id: r.tiles for r in read_manifest(path)} == {"a": 1, "b": 2, "c": 3}
    m.close()


def test_growth_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    m = RunManifest(path)
    for i in range(1500):
        m.record(ManifestRow("same", "tile", "running" if i % 2 else "done", tiles=i))
    lines = path.read_text().count("\n")
    assert lines < 1100  # rewritten along the way, not 1500 appended rows
    assert read_manifest(path)[0].tiles == 1499
    m.close()
    assert path.read_text().count("\n") == 2


def test_bad_rows_are_rejected(tmp_path: Path) -> None:
    m = RunManifest(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="status"):
        m.record(ManifestRow("a", "tile", "finished"))
    with pytest.raises(ValueError, match="unknown manifest column"):
        m.record({"slide_id": "a", "stage": "tile", "status": "done", "colour": "red"})


def test_shard_manifests_merge(tmp_path: Path) -> None:
    assert manifest_name() == "manifest.csv"
    assert manifest_name((2, 8)) == "manifest-shard-2-of-8.csv"
    with RunManifest(tmp_path / manifest_name((0, 2))) as m0:
        m0.record(ManifestRow("a", "tile", "done", finished="2026-01-01T00:00:02+00:00"))
        m0.record(ManifestRow("b", "tile", "running"))
    with RunManifest(tmp_path / manifest_name((1, 2))) as m1:
        m1.record(ManifestRow("b", "tile", "failed", error_type="KilledWorker", finished="2026-01-01T00:00:01+00:00"))
        m1.record(ManifestRow("c", "tile", "done"))
    merged = {r.slide_id: r.status for r in read_manifests(tmp_path)}
    assert merged == {"a": "done", "b": "failed", "c": "done"}


def test_tiler_rows_fit(tmp_path: Path) -> None:
    """The `tile` command records tile_manifest_row rows with the same writer."""
    from wsi_convnext.outputs.manifest import tile_manifest_row
    from wsi_convnext.tiling.tiler import TileResult

    result = TileResult(slide_id="s", store_path=tmp_path / "s.zarr", n_tiles=7, seconds=0.5, slide_mpp=0.5,
                        path=tmp_path / "s.svs")  # fmt: skip
    with RunManifest(tmp_path / "manifest.csv") as m:
        m.record(tile_manifest_row(result))
    (row,) = read_manifest(tmp_path / "manifest.csv")
    assert (row.slide_id, row.stage, row.status, row.tiles, row.slide_mpp) == ("s", "tile", "done", 7, 0.5)


# --- CSV cells a spreadsheet would run as formulas (issue 20) -----------------------------------

FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+2", "-cmd|' /C calc'!A0", "@SUM(A1)", "'=already quoted", "\tx"]


def test_csv_escape_only_text_and_round_trips() -> None:
    from wsi_convnext._io import csv_escape, csv_unescape

    for text in FORMULAS:
        assert csv_escape(text).startswith("'") and csv_unescape(csv_escape(text)) == text
    for number in ("-0.25", "+1e-3", "-3", "0.5", "-.5E+2"):
        assert csv_escape(number) == number  # numeric columns stay numeric
    for plain in ("a", "", "'plain", "x=1"):
        assert csv_escape(plain) == plain == csv_unescape(plain)


def test_manifest_cells_cannot_become_formulas(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    m = RunManifest(path)
    m.record(ManifestRow("s1", "tile", "failed", path='=HYPERLINK("x").svs', error="-1+1 @x", error_type="@T", seconds=1.5))
    m.record(ManifestRow("s2", "tile", "done", path="/ok/s2.svs", slide_mpp=0.25, seconds=2.0))
    for stage in ("appended", "compacted"):
        raw = {r["slide_id"]: r for r in _csv_rows(path)}
        assert raw["s1"]["path"] == "\'=HYPERLINK(\"x\").svs" and raw["s1"]["error"] == "\'-1+1 @x", stage
        assert raw["s1"]["error_type"] == "\'@T" and raw["s1"]["seconds"] == "1.500" and raw["s2"]["path"] == "/ok/s2.svs"
        back = {r.slide_id: r for r in read_manifest(path)}  # the project reads its own file back
        assert back["s1"].path == '=HYPERLINK("x").svs' and back["s1"].error == "-1+1 @x" and back["s1"].error_type == "@T"
        m.close()


def test_predictions_and_labels_escape_text_and_keep_numbers(tmp_path: Path) -> None:
    from wsi_convnext.labels.table import LabelTable, read_labels, write_labels
    from wsi_convnext.outputs.predictions import PredictionRow, read_predictions, write_predictions

    rows = [
        PredictionRow({"slide_id": f"s{i}"}, predicted=f, probabilities={f: 1.0}, true_label=f, extra={"note": f, "delta": -0.5})
        for i, f in enumerate(FORMULAS)
    ]  # fmt: skip
    path = write_predictions(tmp_path / "p.csv", rows)
    raw = _csv_rows(path)
    assert all(r["predicted"].startswith("'") and r["note"].startswith("'") for r in raw)
    assert {r["delta"] for r in raw} == {"-0.5"}
    back = read_predictions(path)
    assert [(r.predicted, r.true_label, r.extra["note"]) for r in back] == [(f, f, f) for f in FORMULAS]

    ids = [f"s{i}" for i in range(4)]
    table = LabelTable._validated(ids, ["=a", "-b", "=a", "-b"], ["@p1", "@p1", "p2", "p2"], None, None, "t")
    path = write_labels(tmp_path / "labels.csv", table)
    assert all(r["label"].startswith("'") for r in _csv_rows(path))
    again = read_labels(path)
    assert again.labels == table.labels and again.patient_ids == table.patient_ids
