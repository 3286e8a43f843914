"""`wsi-convnext run` through the CLI on a small real cohort."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "wsi-convnext"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def test_run_records_failures_and_resumes(tmp_path, slides_dir):
    cohort = tmp_path / "slides"
    cohort.mkdir()
    for name in ("CMU-1-Small-Region.svs", "openslide-unreadable.svs"):
        (cohort / name).symlink_to(slides_dir / name)
    args = ["run", "--slides", str(cohort), "--out", str(tmp_path / "out"), "--model", "convnext_atto"]
    first = _run(args)
    assert first.returncode == 1, first.stderr
    assert "Dask dashboard:" in first.stderr
    assert "openslide-unreadable (tile): SlideReadError" in first.stderr
    with (tmp_path / "out" / "manifest.csv").open() as fh:
        rows = {(r["slide_id"], r["stage"]): r for r in csv.DictReader(fh)}
    assert rows[("CMU-1-Small-Region", "tile")]["status"] == "done"
    assert rows[("CMU-1-Small-Region", "embed")]["status"] == "done"
    assert rows[("openslide-unreadable", "tile")]["status"] == "failed"
    assert (tmp_path / "out" / "report.html").is_file()
    second = _run(args)
    assert second.returncode == 1
    assert "1 skipped" in second.stdout


def test_run_config_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('slides = ["x"]\nout = "y"\n[tile]\nmsp = 0.5\n')
    res = _run(["run", str(bad)])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "msp" in res.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stem", "bogus"], "'embed.stem' must be one of 'patch',"),
        (["--slide-mpp", "0"], "'slide_mpp' must be the level-0 µm/px"),
        (["--model", "convnext_atto", "--mpp", "-1"], "'tile.mpp' must be positive and finite, got -1"),
    ],
)
def test_run_refuses_bad_values_before_any_slide_is_read(tmp_path, slides_dir, flags, message):
    out = tmp_path / "out"
    res = _run(["run", "--slides", str(slides_dir), "--out", str(out), *flags])
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and message in res.stderr
    assert not out.exists()  # refused before the run started


def test_run_summary_adds_up_and_ids_stay_after_a_colliding_newcomer(tmp_path, slides_dir):
    cohort, out = tmp_path / "slides", tmp_path / "out"
    cohort.mkdir()
    cmu = slides_dir / "CMU-1-Small-Region.svs"
    (cohort / "a_b.svs").symlink_to(cmu)
    args = ["run", "--slides", str(cohort), "--out", str(out), "--model", "convnext_atto", "--workers", "1"]
    first = _run(args)
    assert first.returncode == 0 and "1 slides: 1 done, 0 skipped, 0 failed" in first.stdout, first.stderr
    (cohort / "a b.svs").write_bytes(cmu.read_bytes() + b"\0" * 4096)  # cleans to a_b too
    second = _run(args)
    assert second.returncode == 0, second.stderr
    assert "2 slides: 1 done, 1 skipped, 0 failed" in second.stdout  # was "2 done, 1 skipped"
    from wsi_convnext.store import open_store

    assert open_store(out / "a_b.zarr").attrs["source"]["path"] == str(cmu.resolve())
    (new,) = [p for p in out.glob("a_b-*.zarr")]
    assert open_store(new).attrs["source"]["path"] == str((cohort / "a b.svs").resolve())
