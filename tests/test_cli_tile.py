"""`wsi-convnext tile` and `info` through the CLI: outputs, bad input, exit codes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_pyramid_tiff
from wsi_convnext.cli import app
from wsi_convnext.store import open_store

runner = CliRunner()


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with (out / "manifest.csv").open() as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def _visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".zarr"))


def test_help_is_instant_and_lists_commands():
    # A fresh interpreter: --help must not import torch, dask or zarr.
    code = "import sys, wsi_convnext.cli as c; print(any(m in sys.modules for m in ('torch', 'dask', 'zarr', 'openslide')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("tile", "info", "embed", "export"):
        assert cmd in res.output


def test_no_help_text_is_swallowed_as_rich_markup():
    # Typer renders help through Rich: "[default: x]" or "[tile.tissue]" would vanish as a tag.
    import re

    import typer.main

    tag = re.compile(r"(?<!\\)\[[a-z#/@][^\[\]]*\]")
    group = typer.main.get_command(app)
    texts = [(name, group.commands[name].help or "") for name in group.commands]
    texts += [(f"{name} {p.name}", getattr(p, "help", None) or "") for name in group.commands
              for p in group.commands[name].params]  # fmt: skip
    assert [(where, text) for where, text in texts if tag.search(text)] == []
    res = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert "Epochs (default: 10 unless --steps)." in res.output


def test_info_json_on_real_slide(cmu_slide):
    res = runner.invoke(app, ["info", str(cmu_slide), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["backend"] == "openslide" and data["vendor"] == "aperio"
    assert data["mpp_x"] == pytest.approx(0.499)
    assert data["levels"][0]["width"] == 2220 and data["objective_power"] == 20
    assert set(data["associated_images"]) >= {"label", "macro", "thumbnail"}
    res = runner.invoke(app, ["info", str(cmu_slide), "--backend", "tiffslide"])
    assert res.exit_code == 0 and "tiffslide" in res.output


def test_tile_cohort_with_bad_slides(tmp_path, slides_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("CMU-1-Small-Region.svs", "openslide-unreadable.svs", "openslide-unopenable.tiff", "openslide-boxes.tiff"):
        (inputs / name).symlink_to(slides_dir / name)
    rng = np.random.default_rng(0)
    write_pyramid_tiff(inputs / "nompp.svs", rng.integers(0, 255, (600, 600, 3)), mpp=None)
    write_pyramid_tiff(inputs / "blank.svs", np.full((1200, 1200, 3), 245), mpp=0.5)
    (inputs / "truncated.svs").write_bytes((slides_dir / "CMU-1-Small-Region.svs").read_bytes()[:300_000])
    out = tmp_path / "out"
    res = runner.invoke(app, ["tile", str(inputs), "--out", str(out)])
    assert res.exit_code == 1, res.output
    rows = _manifest(out)
    assert rows["CMU-1-Small-Region"]["status"] == "done" and int(rows["CMU-1-Small-Region"]["tiles"]) > 20
    expected = {
        "openslide-unreadable": "SlideReadError",  # must fail, never "0 tissue tiles"
        "openslide-unopenable": "SlideOpenError",
        "openslide-boxes": "MppError",  # 352.8 µm/px from a 72-dpi tag is implausible
        "nompp": "MppError",
        "blank": "NoTissueError",
        "truncated": None,
    }
    for sid, etype in expected.items():
        assert rows[sid]["status"] == "failed", sid
        if etype:
            assert rows[sid]["error_type"] == etype, (sid, rows[sid])
        assert "\n" not in rows[sid]["error"] and rows[sid]["error"]
    assert "--slide-mpp" in rows["nompp"]["error"] and "nompp.svs" in rows["nompp"]["error"]
    # Only the good slide has a store; nothing half-written is visible.
    assert _visible(out) == ["CMU-1-Small-Region.zarr"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    open_store(out / "CMU-1-Small-Region.zarr")
    assert (out / "qc" / "CMU-1-Small-Region.png").is_file()
    # Slides that opened get a QC picture even when they failed, and their row points to it.
    for sid in ("nompp", "blank", "openslide-boxes", "CMU-1-Small-Region"):
        assert rows[sid]["qc"] == str(out / "qc" / f"{sid}.png") and Path(rows[sid]["qc"]).is_file(), sid
        assert sid == "CMU-1-Small-Region" or f"QC picture: {rows[sid]['qc']}" in rows[sid]["error"]
    for sid in ("openslide-unopenable", "truncated"):
        assert rows[sid]["qc"] == "" and not (out / "qc" / f"{sid}.png").exists()
    # errors are one line each on stderr, no traceback
    assert "Traceback" not in res.output

    # A rerun skips the finished slide; a mpp override rescues the no-mpp slide.
    res = runner.invoke(app, ["tile", str(inputs / "CMU-1-Small-Region.svs"), str(inputs / "nompp.svs"),
                              "--out", str(out), "--slide-mpp", "0.25", "--min-tissue", "0"])  # fmt: skip
    rows = _manifest(out)
    assert rows["nompp"]["status"] == "done"
    # CMU keeps its metadata mpp? No: --slide-mpp overrides every slide of the call, so the
    # parameters differ and the rerun is refused without --overwrite.
    assert rows["CMU-1-Small-Region"]["status"] == "failed"
    assert "--overwrite" in rows["CMU-1-Small-Region"]["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tile", "/nonexistent/slides"], "no such file or folder"),
        (["tile", "{empty}"], "no slides found"),
        (["tile", "{cmu}", "--mpp", "-1"], "--mpp must be positive"),
        (["tile", "{cmu}", "--slide-mpp", "0"], "--slide-mpp must be the level-0 µm/px, between 0.05 and 100"),
        (["tile", "{cmu}", "--overlap", "300"], "--overlap"),
        (["tile", "{cmu}", "--backend", "bioformats"], "bioformats"),
        (["info", "/nonexistent.svs"], "nonexistent.svs"),
        (["tile", "{cmu}", "--tissue", "bogus=1"], "--tissue: unknown tissue parameter 'bogus'"),
        (["tile", "{cmu}", "--tissue", "min_object_um2=lots"], "min_object_um2 must be a number"),
        (["tile", "{cmu}", "--tissue", "closing_um"], "must look like key=value"),
        (["tile", "{cmu}", "--tissue", "min_saturation=5"], "must be a saturation in [0, 1]"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, cmu_slide, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", cmu=cmu_slide) for a in args]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")] if args[0] == "tile" else args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_debug_shows_traceback(tmp_path):
    res = runner.invoke(app, ["--debug", "info", str(tmp_path / "x.svs")])
    assert res.exit_code != 0 and res.exception is not None


def test_console_script_end_to_end(tmp_path, cmu_slide):
    exe = shutil.which("wsi-convnext", path=str(Path(sys.executable).parent))
    assert exe, "console script not installed"
    proc = subprocess.run([exe, "tile", str(cmu_slide), "--out", str(tmp_path), "--workers", "2"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 slides tiled" in proc.stdout
    assert len(open_store(tmp_path / "CMU-1-Small-Region.zarr")) > 20


def test_tile_small_fragment_points_at_tissue_option(tmp_path, fragment_slide):
    """Issue 12 item 8 through the CLI: the failure names --tissue min_object_um2=..., the QC
    picture of the failed slide exists and the manifest points to it; the option fixes it."""
    import re

    out = tmp_path / "out"
    args = ["tile", str(fragment_slide), "--out", str(out), "--slide-mpp", "0.5", "--min-tissue", "0.05"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    row = _manifest(out)["ihc-fragment"]
    assert row["status"] == "failed" and row["error_type"] == "NoTissueError"
    assert row["qc"] == str(out / "qc" / "ihc-fragment.png") and Path(row["qc"]).is_file()
    assert f"QC picture: {row['qc']}" in row["error"] and "smaller than min_object_um2=2500" in row["error"]
    value = re.search(r"--tissue min_object_um2=([\d.]+)", row["error"]).group(1)

    res = runner.invoke(app, [*args, "--tissue", f"min_object_um2={value}", "--tissue", "remove_black_ink=false"])
    assert res.exit_code == 0, res.output
    row = _manifest(out)["ihc-fragment"]
    assert row["status"] == "done" and int(row["tiles"]) >= 1 and row["qc"]
    tissue = open_store(out / "ihc-fragment.zarr").attrs["tissue"]
    assert tissue["min_object_um2"] == float(value) and tissue["remove_black_ink"] is False


def test_ids_survive_a_colliding_newcomer_and_overwrite(tmp_path, cmu_slide):
    """``a_b.svs`` tiled, then ``a b.svs`` added: ``a_b.zarr`` stays ``a_b.svs``'s, even with --overwrite."""
    slides, out = tmp_path / "in", tmp_path / "out"
    slides.mkdir()
    first = slides / "a_b.svs"
    shutil.copy(cmu_slide, first)
    args = ["tile", str(slides), "--out", str(out), "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    newcomer = slides / "a b.svs"  # other bytes, a cleaned name equal to a_b
    newcomer.write_bytes(cmu_slide.read_bytes() + b"\0" * 4096)
    for extra in ([], ["--overwrite"]):
        res = runner.invoke(app, args + extra)
        assert res.exit_code == 0, res.output
        assert open_store(out / "a_b.zarr").attrs["source"]["path"] == str(first.resolve())
        (other,) = [n for n in _visible(out) if n != "a_b.zarr"]
        assert other.startswith("a_b-") and open_store(out / other).attrs["source"]["path"] == str(newcomer.resolve())
    rows = _manifest(out)
    assert Path(rows["a_b"]["path"]) == first and Path(rows[other[: -len(".zarr")]]["path"]) == newcomer


def test_overwrite_never_gives_a_store_to_another_file(tmp_path, cmu_slide):
    out = tmp_path / "out"
    assert runner.invoke(app, ["tile", str(cmu_slide), "--out", str(out), "--workers", "1"]).exit_code == 0
    other = tmp_path / "b.svs"
    other.write_bytes(cmu_slide.read_bytes() + b"\0" * 4096)
    (tmp_path / "m.csv").write_text(f"path,slide_id\n{other},CMU-1-Small-Region\n")
    res = runner.invoke(app, ["tile", str(tmp_path / "m.csv"), "--out", str(out), "--workers", "1", "--overwrite"])
    assert res.exit_code == 1 and "slide id collision" in res.output and "Traceback" not in res.output
    assert open_store(out / "CMU-1-Small-Region.zarr").attrs["source"]["path"] == str(cmu_slide.resolve())


def test_tile_absurd_upsampling_is_one_line(tmp_path, cmu_slide):
    res = runner.invoke(app, ["tile", str(cmu_slide), "--out", str(tmp_path / "o"), "--mpp", "1e-9", "--allow-upsample"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "less than one" in errors[0] and str(cmu_slide) in errors[0]
    assert not list((tmp_path / "o").glob("*.zarr"))
