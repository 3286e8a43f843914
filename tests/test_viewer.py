"""`wsi-convnext view`: Deep Zoom math against OpenSlide's, the catalog, the HTTP app, the CLI, and the page in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cdp import Browser, find_chromium
from wsi_convnext.cli import app
from wsi_convnext.errors import InputNotFoundError
from wsi_convnext.outputs.predictions import PredictionRow, write_predictions
from wsi_convnext.outputs.viewer import (
    DeepZoom, DeepZoomGrid, SlideSource, ThumbnailSource, TileCache, ViewerServer, build_catalog,
)  # fmt: skip
from wsi_convnext.slide import open_slide
from wsi_convnext.store import open_store

runner = CliRunner()
CMU_ID = "CMU-1-Small-Region"


def _tile(slides: list[Path], out: Path) -> None:
    result = runner.invoke(app, ["tile", *map(str, slides), "--out", str(out), "--mpp", "1.0", "--tile-size", "112", "--workers", "1"])
    assert result.exit_code in (0, 1), result.output


def _add_scores(store_path: Path) -> None:
    st = open_store(store_path)
    xy = st.coords.astype(np.float64)
    att = np.exp(-((xy[:, 0] - 700) ** 2 + (xy[:, 1] - 1500) ** 2) / (2 * 450.0**2)).astype(np.float32)
    st.write_scores("attention", att, {"kind": "attention", "score": "attention", "model": "test"})
    st.write_scores("tile_probs", np.stack([att, 1 - att], 1), {"kind": "tile_class_probabilities", "columns": ["tumour", "normal"]})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    """A tile output folder: CMU tiled (with attention and class scores), an unreadable slide failed, predictions."""
    out = tmp_path_factory.mktemp("viewer") / "run"
    _tile([slides_dir / "CMU-1-Small-Region.svs", slides_dir / "openslide-unreadable.svs"], out)
    _add_scores(out / f"{CMU_ID}.zarr")
    write_predictions(out / "predictions.csv", [PredictionRow({"slide_id": CMU_ID}, "tumour", {"tumour": 0.83, "normal": 0.17})])
    return out


@pytest.fixture(scope="module")
def moved_dir(tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path) -> Path:
    """A store whose slide file was deleted after tiling."""
    root = tmp_path_factory.mktemp("moved")
    slide = root / "moved.svs"
    shutil.copy(cmu_slide, slide)
    _tile([slide], root / "out")
    slide.unlink()
    return root / "out"


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[ViewerServer]:
    s = ViewerServer(run_dir, port=0)
    s.start()
    yield s
    s.stop()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""


# --- Deep Zoom tile math ----------------------------------------------------------------------


@pytest.mark.parametrize("tile_size,overlap", [(254, 1), (256, 0), (510, 2)])
@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "openslide-boxes.tiff"])
def test_deepzoom_grid_matches_openslide(slides_dir: Path, name: str, tile_size: int, overlap: int) -> None:
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    with OpenSlide(str(slides_dir / name)) as osr:
        ref = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap, limit_bounds=False)
        grid = DeepZoomGrid(*osr.dimensions, tile_size=tile_size, overlap=overlap)
        assert grid.level_count == ref.level_count
        for level in range(grid.level_count):
            assert grid.level_dimensions(level) == ref.level_dimensions[level]
            assert grid.level_tiles(level) == ref.level_tiles[level]
            cols, rows = grid.level_tiles(level)
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                left, top, right, bottom = grid.tile_bounds(level, col, row)
                assert (right - left, bottom - top) == ref.get_tile_dimensions(level, (col, row))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_deepzoom_tiles_show_the_slide(cmu_slide: Path, backend: str) -> None:
    """Tiles read through our readers match OpenSlide's own Deep Zoom tiles of CMU-1 (full-res and downsampled)."""
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import Image

    import io

    with open_slide(cmu_slide, backend=backend) as reader, OpenSlide(str(cmu_slide)) as osr:
        dz = DeepZoom(SlideSource(reader), TileCache(), "cmu")
        ref = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        top = dz.grid.level_count - 1
        for level, col, row in [(top, 3, 5), (top, 5, 3), (top - 2, 1, 1), (top - 4, 0, 0)]:
            left, up, right, bottom = dz.grid.tile_bounds(level, col, row)
            pixels = dz.source.region(dz.grid.level0_box(level, col, row), (right - left, bottom - up)).astype(np.float64)
            theirs = np.asarray(ref.get_tile(level, (col, row)).convert("RGB"), dtype=np.float64)
            assert pixels.shape == theirs.shape
            assert pixels.std() > 5, "the tile is blank"
            # Same pixels at full resolution; downsampled levels differ only by the resampling
            # filter, so they agree once fine texture is averaged out (8×8 blocks): same place, same scale.
            if level != top:
                pixels, theirs = _blocks(pixels), _blocks(theirs)
            assert np.abs(pixels - theirs).mean() < 1.5, f"level {level} tile ({col},{row}) differs from OpenSlide's"
            served = np.asarray(Image.open(io.BytesIO(dz.tile(level, col, row))).convert("RGB"), dtype=np.float64)
            pixels = dz.source.region(dz.grid.level0_box(level, col, row), (right - left, bottom - up)).astype(np.float64)
            psnr = 10 * np.log10(255**2 / np.mean((served - pixels) ** 2))
            assert psnr > 27, f"JPEG tile at {psnr:.1f} dB"  # quality 90, 4:2:0 chroma, on dense H&E texture


def _blocks(a: np.ndarray, k: int = 8) -> np.ndarray:
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))


def test_deepzoom_grid_edges_and_cache() -> None:
    g = DeepZoomGrid(1, 1)
    assert g.level_count == 1 and g.level_dimensions(0) == (1, 1) and g.tile_bounds(0, 0, 0) == (0, 0, 1, 1)
    g = DeepZoomGrid(1000, 300, tile_size=254, overlap=1)
    assert g.level_count == 11 and g.downsample(10) == 1 and g.level_dimensions(9) == (500, 150)
    assert g.tile_bounds(10, 1, 0) == (253, 0, 509, 255)
    assert g.level0_box(9, 1, 0) == (506, 0, 1000, 300)  # clipped to the image
    for bad in [(10, 4, 0), (10, 0, 2), (11, 0, 0), (-1, 0, 0)]:
        with pytest.raises(IndexError):
            g.tile_bounds(*bad)
    with pytest.raises(ValueError):
        DeepZoomGrid(0, 5)
    cache = TileCache(max_bytes=10)
    cache.put(("a",), b"12345")
    cache.put(("b",), b"12345")
    assert cache.get(("a",)) == b"12345"  # a is now the most recent
    cache.put(("c",), b"123")
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and cache.get(("c",)) is not None
    assert cache.hits == 3 and cache.misses == 1


def test_deepzoom_tiles_are_cached(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as reader:
        cache = TileCache()
        dz = DeepZoom(SlideSource(reader), cache, "cmu")
        first = dz.tile(dz.grid.level_count - 1, 2, 2)
        assert dz.tile(dz.grid.level_count - 1, 2, 2) is first and cache.hits == 1 and cache.misses == 1


def test_coarse_tiles_of_a_flat_slide_come_from_an_overview(tmp_path: Path) -> None:
    """A slide without a pyramid never needs a whole-level read for a coarse tile."""
    from conftest import write_pyramid_tiff

    yy, xx = np.mgrid[0:1000, 0:1500]
    image = np.stack([xx * 255 // 1499, yy * 255 // 999, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    path = write_pyramid_tiff(tmp_path / "flat.svs", image, downsamples=(1,))
    with open_slide(path) as reader:
        assert reader.level_count == 1
        src = SlideSource(reader, max_read_pixels=200_000, overview_size=512)
        dz = DeepZoom(src, TileCache(), "flat")
        top = dz.grid.level_count - 1
        full = dz.source.region(dz.grid.level0_box(top, 1, 1), (256, 256))
        assert src._overview is None and np.abs(full.astype(int) - image[253:509, 253:509]).max() <= 1
        level = top - 3  # 8× down: the whole slide in one 188×125 tile, 1.5 Mpx to read
        left, up, right, bottom = dz.grid.tile_bounds(level, 0, 0)
        coarse = dz.source.region(dz.grid.level0_box(level, 0, 0), (right - left, bottom - up))
        assert src._overview is not None and coarse.shape == (125, 188, 3)
        expected = image[::8, ::8][:125, :188].astype(int)
        assert np.abs(coarse.astype(int) - expected)[2:-2, 2:-2].mean() < 3


def test_thumbnail_source_maps_level0_boxes() -> None:
    thumb = np.zeros((100, 50, 3), np.uint8)
    thumb[:50, :25] = (255, 0, 0)
    src = ThumbnailSource(thumb, 4.0, (200, 400))  # 4 level-0 px per thumbnail px
    red = src.region((0, 0, 100, 200), (10, 20))
    inner = red[1:-1, 1:-1]  # the filter blends the edge row with the neighbouring pixels
    assert red.shape == (20, 10, 3) and (inner[..., 0] > 250).all() and (inner[..., 1] < 5).all()
    black = src.region((100, 200, 200, 400), (10, 20))
    assert black[1:-1, 1:-1].max() < 5
    assert (src.region((500, 500, 600, 600), (4, 4)) == 255).all()  # outside the thumbnail: white


# --- catalog --------------------------------------------------------------------------------


def test_catalog_of_an_output_folder(run_dir: Path) -> None:
    cat = build_catalog(run_dir)
    assert cat.has_run and set(cat.slides) == {CMU_ID, "openslide-unreadable"}
    ok, bad = cat.slides[CMU_ID], cat.slides["openslide-unreadable"]
    assert ok.status == "done" and ok.tiles == len(open_store(run_dir / f"{CMU_ID}.zarr")) and ok.viewable
    assert ok.prediction == {"label": "tumour", "probabilities": {"tumour": 0.83, "normal": 0.17}}
    assert bad.status == "failed" and "SlideReadError" in bad.error and bad.store is None
    info = cat.view(CMU_ID).info()
    assert (info["width"], info["height"]) == (2220, 2967) and info["slide_mpp"] == pytest.approx(0.499)
    assert info["source"] == "slide" and info["message"] == "" and info["score_arrays"] == ["attention", "tile_probs"]
    ov = cat.view(CMU_ID).overlays()
    assert set(ov["scores"]) == {"attention", "tile_probs_tumour", "tile_probs_normal"}
    assert len(ov["coords"]) == len(ov["tissue_fraction"]) == len(ov["scores"]["attention"]["values"]) == ok.tiles
    assert ov["outline"] and all(len(ring) >= 4 for poly in ov["outline"] for ring in poly)
    cat.close()


def test_a_malformed_predictions_csv_hides_no_slide(run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(run_dir / f"{CMU_ID}.zarr", out / f"{CMU_ID}.zarr")
    (out / "predictions.csv").write_text("no,key,columns\n1,2,3\n")
    cat = build_catalog(out)
    assert list(cat.slides) == [CMU_ID] and cat.slides[CMU_ID].prediction is None
    assert "predictions not shown" in caplog.text


def test_catalog_of_a_store_a_slide_and_bad_paths(run_dir: Path, cmu_slide: Path, tmp_path: Path) -> None:
    assert list(build_catalog(run_dir / f"{CMU_ID}.zarr").slides) == [CMU_ID]
    cat = build_catalog(cmu_slide)
    assert list(cat.slides) == [CMU_ID] and cat.slides[CMU_ID].store is None
    info = cat.view(CMU_ID).info()
    assert info["source"] == "slide" and info["tiles"] is None and not info["has_store"] and cat.view(CMU_ID).overlays()["coords"] == []
    cat.close()
    with pytest.raises(InputNotFoundError, match="no such file"):
        build_catalog(tmp_path / "nope")
    with pytest.raises(InputNotFoundError, match="holds no stores"):
        build_catalog(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputNotFoundError, match="not a slide file"):
        build_catalog(tmp_path / "notes.txt")


def test_missing_slide_shows_stored_thumbnail_and_overlays(moved_dir: Path) -> None:
    cat = build_catalog(moved_dir)
    view = cat.view("moved")
    info = view.info()
    assert info["source"] == "thumbnail" and "missing" in info["message"] and "moved.svs" in info["message"]
    assert (info["width"], info["height"]) == (2220, 2967)
    assert len(view.overlays()["coords"]) == info["tiles"] > 0
    from PIL import Image

    import io

    tile = np.asarray(Image.open(io.BytesIO(view.deepzoom.tile(view.deepzoom.grid.level_count - 4, 0, 0))))
    assert tile.std() > 5  # the thumbnail's tissue, not a blank
    data, mime = view.stored_tile(0)
    assert mime == "image/jpeg" and data[:2] == b"\xff\xd8"


# --- HTTP ----------------------------------------------------------------------------------


def test_http_routes(server: ViewerServer, run_dir: Path) -> None:
    base = server.url.rstrip("/")
    assert server.url.startswith("http://127.0.0.1:")
    status, ctype, body = _get(base + "/")
    page = body.decode()
    assert status == 200 and f'href="/view/{CMU_ID}"' in page and "SlideReadError" in page and "tumour" in page
    # The failed slide's file is still there: it can be looked at, with its error.
    assert 'href="/view/openslide-unreadable"' in page
    info = json.loads(_get(f"{base}/api/slides/openslide-unreadable")[2])
    assert info["status"] == "failed" and "Bogus marker" in info["error"] and not info["has_store"]
    assert _get(f"{base}/dzi/openslide-unreadable_files/4/0_0.jpeg")[0] == 500  # corrupt tile data: an error, not a blank
    status, _, body = _get(f"{base}/api/slides/{CMU_ID}")
    info = json.loads(body)
    assert status == 200 and info["prediction"]["label"] == "tumour"
    status, ctype, body = _get(f"{base}/dzi/{CMU_ID}.dzi")
    assert status == 200 and b'Width="2220" Height="2967"' in body
    status, ctype, body = _get(f"{base}/dzi/{CMU_ID}_files/12/3_5.jpeg")
    assert status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert _get(f"{base}/dzi/{CMU_ID}_files/12/99_5.jpeg")[0] == 404
    status, ctype, body = _get(f"{base}/api/slides/{CMU_ID}/tiles/0")
    assert status == 200 and ctype == "image/jpeg" and body == bytes(open_store(run_dir / f"{CMU_ID}.zarr").tile_bytes(slice(0, 1))[0])
    assert _get(f"{base}/api/slides/{CMU_ID}/tiles/100000")[0] == 404
    # The run report, served with links to the views.
    status, _, body = _get(base + "/report")
    assert status == 200 and f'href="{base}/view/{CMU_ID}"' in body.decode()


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py", "/static/%2e%2e/catalog.py", "/static/..%2f..%2f..%2fpyproject.toml",
        "/view/..%2f..%2fetc%2fpasswd", "/dzi/..%2F..%2Fetc%2Fpasswd.dzi", "/api/slides/%2Fetc%2Fpasswd",
        "/api/slides/..", "//etc/passwd", "/etc/passwd", "/api/slides/CMU-1-Small-Region/tiles/..%2f..%2fzarr.json",
        "/CMU-1-Small-Region.zarr/zarr.json", "/dzi/nope.dzi", "/report/../CMU-1-Small-Region.zarr/zarr.json",
    ],
)  # fmt: skip
def test_path_traversal_is_refused(server: ViewerServer, path: str) -> None:
    import http.client

    # http.client sends the path as written (urllib would normalise some of it).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status in (403, 404), (path, resp.status)
    assert b"root:" not in body and b"wsi-convnext.tiles" not in body


def test_slide_list_follows_a_running_output_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "growing"
    shutil.copytree(run_dir / f"{CMU_ID}.zarr", out / "first.zarr")
    s = ViewerServer(out, port=0)
    base = s.start().rstrip("/")
    try:
        assert [x["slide_id"] for x in json.loads(_get(base + "/api/slides")[2])] == ["first"]
        shutil.copy(run_dir / "manifest.csv", out / "manifest.csv")
        # The slide file of a listed slide is viewable before its store exists; its overlays come once it does.
        assert CMU_ID in {x["slide_id"] for x in json.loads(_get(base + "/api/slides")[2])}
        assert json.loads(_get(f"{base}/api/slides/{CMU_ID}")[2])["has_store"] is False
        assert json.loads(_get(f"{base}/api/slides/{CMU_ID}/overlays")[2])["coords"] == []
        shutil.copytree(run_dir / f"{CMU_ID}.zarr", out / f"{CMU_ID}.zarr")
        shutil.copytree(run_dir / f"{CMU_ID}.zarr", out / "second.zarr")
        slides = {x["slide_id"]: x for x in json.loads(_get(base + "/api/slides")[2])}
        assert set(slides) == {"first", "second", CMU_ID, "openslide-unreadable"}
        assert slides["openslide-unreadable"]["status"] == "failed"
        assert _get(f"{base}/api/slides/second")[0] == 200 and 'href="/report"' in _get(base + "/")[2].decode()
        assert len(json.loads(_get(f"{base}/api/slides/{CMU_ID}/overlays")[2])["coords"]) == slides[CMU_ID]["tiles"]
    finally:
        s.stop()


def test_missing_slide_served_from_the_store(moved_dir: Path) -> None:
    s = ViewerServer(moved_dir, port=0)
    base = s.start().rstrip("/")
    try:
        info = json.loads(_get(f"{base}/api/slides/moved")[2])
        assert info["source"] == "thumbnail" and "missing" in info["message"]
        status, ctype, _ = _get(f"{base}/dzi/moved_files/10/0_0.jpeg")
        assert status == 200 and ctype == "image/jpeg"
    finally:
        s.stop()


# --- CLI -------------------------------------------------------------------------------------


def test_cli_view_help_and_bad_path(tmp_path: Path) -> None:
    result = runner.invoke(app, ["view", "--help"])
    assert result.exit_code == 0 and "--port" in result.output and "127.0.0.1" in result.output
    result = runner.invoke(app, ["view", str(tmp_path / "nope")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_cli_view_serves_and_prints_url(run_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from wsi_convnext.cli import app; app()", "view", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"no URL printed: {line!r}"
        status, _, body = _get(match.group(0))
        assert status == 200 and CMU_ID in body.decode()
        proc.send_signal(signal.SIGINT)  # Ctrl-C is the normal way to stop it
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_cli_view_port_in_use(run_dir: Path, server: ViewerServer) -> None:
    result = runner.invoke(app, ["view", str(run_dir), "--port", str(server.port)])
    assert result.exit_code == 2 and "another --port" in result.output


# --- the page in a real Chromium ------------------------------------------------------------------


def _open_view(browser: Browser, base: str, sid: str) -> None:
    browser.goto(f"{base}/view/{sid}")
    browser.wait_for("window.wsiView && wsiView.ready && wsiView.fullyLoaded()")
    assert not browser.console, browser.console


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH for a headless browser check (apt-get install chromium)")
def test_viewer_in_chromium(server: ViewerServer, tmp_path: Path) -> None:
    base = server.url.rstrip("/")
    browser = Browser(str(find_chromium()), tmp_path / "profile")
    try:
        # The slide list links to the view.
        browser.goto(base + "/")
        assert browser.js(f"document.querySelector('a[href=\"/view/{CMU_ID}\"]') !== null")
        _open_view(browser, base, CMU_ID)
        # Deep Zoom tiles loaded with HTTP 200.
        dz = [(u, s) for u, s in browser.responses if "/dzi/" in u and u.endswith(".jpeg")]
        assert len(dz) >= 4 and all(s == 200 for _, s in dz), dz[:10]
        assert browser.js("document.getElementById('prediction').textContent").startswith("predicted tumour")
        # The overlays are drawn: outline paths, one grid square per tile, heatmap on attention.
        n = len(open_store(server.catalog.root / f"{CMU_ID}.zarr"))
        assert browser.js("document.querySelectorAll('#layer-grid rect').length") == n
        assert browser.js("document.querySelectorAll('#layer-outline path').length") >= 1
        assert browser.js("document.getElementById('heatmap').value") == "attention"
        assert browser.js("document.getElementById('scalebar-text').textContent").endswith(("µm", "mm"))
        # The opacity slider sets the heatmap's opacity.
        browser.js("(() => { const o = document.getElementById('opacity'); o.value = '0.9'; o.dispatchEvent(new Event('input')); })()")
        assert browser.js("document.getElementById('layer-heat').getAttribute('opacity')") == "0.9"
        # Toggling the attention heatmap changes what is on screen.
        with_heat = browser.screenshot().astype(np.int16)
        browser.js("(() => { const s = document.getElementById('heatmap'); s.value = ''; s.dispatchEvent(new Event('input')); })()")
        without = browser.screenshot().astype(np.int16)
        changed = (np.abs(with_heat - without).max(axis=2) > 30).mean()
        assert changed > 0.02, f"toggling the attention overlay changed only {changed:.4f} of the screen"
        # Clicking a tile (a real mouse click at its centre) shows its index and level-0 coordinates.
        coords = open_store(server.catalog.root / f"{CMU_ID}.zarr").coords
        extent = open_store(server.catalog.root / f"{CMU_ID}.zarr").extent0
        i = len(coords) // 2
        x, y = browser.js(f"wsiView.imageToPage({coords[i][0] + extent / 2}, {coords[i][1] + extent / 2})")
        browser.click(x, y)
        browser.wait_for("!document.getElementById('tile-info').hidden")
        cells = browser.js("Object.fromEntries([...document.querySelectorAll('#tile-table tr')].map(r => [r.dataset.key, r.cells[1].textContent]))")
        assert cells["index"] == str(i) and cells["level-0 x"] == str(coords[i][0]) and cells["level-0 y"] == str(coords[i][1])
        assert "attention" in cells and "tissue fraction" in cells
        browser.wait_for("document.getElementById('tile-image').complete && document.getElementById('tile-image').naturalWidth > 0")
        assert browser.js("document.getElementById('tile-image').naturalWidth") == 112
    finally:
        browser.close()


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH for a headless browser check (apt-get install chromium)")
def test_view_of_real_pipeline_and_run_outputs(tmp_path: Path, cmu_slide: Path) -> None:
    """The CLI pipeline's own outputs in the viewer, in Chromium: tile → embed → train → predict, then `run`."""
    from wsi_convnext.synthetic import make_cohort

    make_cohort(tmp_path / "slides", 8, size=(1600, 1400), seed=5, pen_fraction=0.0, pale_fraction=0.0,
                lesion_fraction=(0.04, 0.08))  # fmt: skip
    shutil.copy(cmu_slide, tmp_path / "CMU-1.svs")
    tiles = tmp_path / "tiles"
    for args in (
        lambda: ["tile", str(tmp_path / "slides"), str(tmp_path / "CMU-1.svs"), "--out", str(tiles), "--workers", "1"],
        lambda: ["embed", str(tiles), "--model", "convnext_atto", "--batch-size", "16"],
        lambda: ["train", *map(str, sorted(tiles.glob("slide_*.zarr"))), "--labels", str(tmp_path / "slides" / "labels.csv"),
                 "--aggregator", "abmil", "--folds", "2", "--epochs", "3", "--out", str(tmp_path / "model")],
        lambda: ["predict", str(tmp_path / "model"), str(tiles), "--out", str(tiles / "predictions.csv")],
    ):  # fmt: skip
        result = runner.invoke(app, args())
        assert result.exit_code == 0, f"{args()[0]}: {result.output}"
    cat = build_catalog(tiles)
    assert cat.has_run and len(cat.slides) == 9 and all(s.status == "done" and s.prediction for s in cat.slides.values())
    ov = cat.view("CMU-1").overlays()
    attention = [name for name, col in ov["scores"].items() if col["kind"] == "attention"]
    assert len(attention) == 1 and len(ov["scores"][attention[0]]["values"]) == len(ov["coords"]) > 0
    cat.close()
    _check_cmu_view(tiles, tmp_path / "profile", attention[0], len(ov["coords"]))

    # The same slides through `wsi-convnext run` (tile → embed → predict on a LocalCluster): the
    # viewer reads the run folder (stores, manifest.csv, predictions.csv).
    run_out = tmp_path / "run"
    res = subprocess.run(
        [str(Path(sys.executable).parent / "wsi-convnext"), "run", "--slides", str(tmp_path / "slides"), "--slides", str(tmp_path / "CMU-1.svs"),
         "--out", str(run_out), "--model", "convnext_atto", "--predict", str(tmp_path / "model"), "--workers", "1"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    cat = build_catalog(run_out)
    assert cat.has_run and len(cat.slides) == 9 and all(s.status == "done" and s.prediction for s in cat.slides.values())
    cat.close()
    _check_cmu_view(run_out, tmp_path / "profile-run", attention[0], len(open_store(run_out / "CMU-1.zarr")))


def _check_cmu_view(root: Path, profile: Path, heatmap: str, n_tiles: int) -> None:
    """The slide list links CMU-1, whose view shows its grid, outline, ``heatmap`` and prediction, tiles HTTP 200."""
    server = ViewerServer(root, port=0)
    base = server.start().rstrip("/")
    browser = Browser(str(find_chromium()), profile)
    try:
        browser.goto(base + "/")
        assert browser.js("document.querySelector('a[href=\"/view/CMU-1\"]') !== null")
        _open_view(browser, base, "CMU-1")
        assert browser.js("document.querySelectorAll('#layer-grid rect').length") == n_tiles
        assert browser.js("document.querySelectorAll('#layer-heat rect').length") == n_tiles
        assert browser.js("document.querySelectorAll('#layer-outline path').length") >= 1
        assert browser.js("document.getElementById('heatmap').value") == heatmap
        assert browser.js("document.getElementById('prediction').textContent").startswith("predicted ")
        dz = [s for u, s in browser.responses if "/dzi/" in u and u.endswith(".jpeg")]
        assert dz and set(dz) == {200}
    finally:
        browser.close()
        server.stop()
