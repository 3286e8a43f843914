"""The scripts in examples/ run, on a generated cohort (01 --quick), and 02 needs nothing but zarr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow  # 01 generates, tiles, embeds and trains: a few minutes on 2 cores


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def example_01(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ex") / "ex01"
    res = _run(str(EXAMPLES / "01_tile_embed_predict.py"), "--out", str(out), "--quick")
    lines = res.stdout.strip().splitlines()
    preds = [ln for ln in lines if ln.startswith("slide_")]
    assert len(preds) == 6 and all("'tumor':" in ln for ln in preds)
    assert "pooled out-of-fold" in res.stdout
    return out


def test_01_tile_embed_predict(example_01: Path) -> None:
    stores = sorted((example_01 / "tiles").glob("*.zarr"))
    assert len(stores) == 6 and (example_01 / "model" / "model.safetensors").is_file()
    assert len((EXAMPLES / "01_tile_embed_predict.py").read_text().splitlines()) < 40


def test_02_reads_the_store_without_wsi_convnext(example_01: Path) -> None:
    store = sorted((example_01 / "tiles").glob("*.zarr"))[0]
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('imported wsi_convnext:', any(m.startswith('wsi_convnext') for m in sys.modules))")  # fmt: skip
    res = _run(str(EXAMPLES / "02_read_store_with_plain_zarr.py"), str(store), code=code)
    assert "imported wsi_convnext: False" in res.stdout
    assert "features/convnext_atto-overlap-random: (" in res.stdout and "scores/" in res.stdout


def test_03_export_to_qupath_and_anndata(example_01: Path, tmp_path: Path) -> None:
    pytest.importorskip("anndata", reason='anndata not installed (pip install "wsi-convnext[scverse]")')
    res = _run(str(EXAMPLES / "03_export_to_qupath_and_anndata.py"), str(example_01 / "tiles"), "--out", str(tmp_path))
    assert len(list((tmp_path / "qupath").glob("*.geojson"))) == 6 and (tmp_path / "cohort.h5ad").is_file()
    assert "from 6 slides" in res.stdout


def test_04_compare_stems(tmp_path: Path) -> None:
    res = _run(str(EXAMPLES / "04_compare_stems.py"), "--quick", "--out", str(tmp_path / "ex04"))
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.startswith(("patch ", "overlap "))]
    assert [r[0] for r in rows] == ["patch", "overlap"]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)  # validation balanced accuracy
    for stem in ("patch", "overlap"):
        cfg = (tmp_path / "ex04" / f"{stem}-0" / "config.json").read_text()
        assert f'"stem": "{stem}"' in cfg and (tmp_path / "ex04" / f"{stem}-0" / "encoder.safetensors").is_file()
