"""OUT/report.html: self-contained (inline CSS, PNG data URIs), every slide listed."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdp import find_chromium
from wsi_convnext.outputs.manifest import ManifestRow, RunManifest
from wsi_convnext.outputs.report import summarise, write_report


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "link" and a.get("href"):
            self.links.append(str(a["href"]))
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = colour
    arr[::7, :, 0] = 255
    Image.fromarray(arr).save(path)


@pytest.fixture
def run_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    with RunManifest(out / "manifest.csv") as m:
        m.record(ManifestRow("ok-1", "tile", "done", path="/s/ok-1.svs", tiles=120, slide_mpp=0.499, seconds=3.2, worker="n1/0"))
        m.record(ManifestRow("ok-1", "embed", "done", path="/s/ok-1.svs", tiles=120, seconds=5.0))
        m.record(ManifestRow("old-2", "tile", "skipped", path="/s/old-2.svs", tiles=80, slide_mpp=0.25, seconds=0.1))
        m.record(ManifestRow("old-2", "embed", "skipped", path="/s/old-2.svs", tiles=80, seconds=0.1))
        m.record(ManifestRow("bad<3>", "tile", "failed", path="/s/bad.svs", error_type="SlideReadError",
                             error="/s/bad.svs: Bogus marker length & more"))  # fmt: skip
        m.record(ManifestRow("dead-4", "tile", "done", path="/s/dead.svs", tiles=9, slide_mpp=0.5))
        m.record(ManifestRow("dead-4", "embed", "failed", path="/s/dead.svs", error_type="KilledWorker",
                             error="Attempted to run task embed-x on 3 different workers"))  # fmt: skip
    _png(out / "qc" / "ok-1.png", (1200, 900), (230, 180, 200))
    _png(out / "qc" / "old-2.png", (300, 200), (200, 150, 220))
    _png(out / "qc" / "dead-4.png", (64, 64), (120, 120, 120))
    _png(out / "heatmaps" / "ok-1.png", (400, 300), (20, 40, 200))
    (out / "predictions.csv").write_text("slide_id,label,p_normal,p_tumor\nok-1,tumor,0.1,0.9\n")
    return out


def test_report_is_self_contained_and_lists_every_slide(run_out: Path) -> None:
    path = write_report(run_out, title="cohort A")
    assert path == run_out / "report.html"
    page = parse(path)
    text = " ".join(page.text)
    for sid in ("ok-1", "old-2", "bad<3>", "dead-4"):
        assert sid in text  # html-unescaped by the parser: escaping was right
    assert "SlideReadError" in text and "KilledWorker" in text
    assert "tumor" in text and "0.90" in text  # prediction shown
    assert page.scripts == 0 and page.links == []
    assert "<style>" in path.read_text()
    # 3 QC thumbnails + 1 heatmap, each a decodable, downscaled PNG data URI.
    assert len(page.imgs) == 4
    for img in page.imgs:
        src = str(img["src"])
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "PNG" and max(im.size) <= 360
    # The failed slide with a QC picture is shown first.
    assert "dead-4" in str(page.imgs[0]["alt"])


def test_status_counts(run_out: Path) -> None:
    from wsi_convnext.outputs.manifest import read_manifests

    slides = {s.slide_id: s for s in summarise(read_manifests(run_out))}
    assert slides["ok-1"].status == "done" and slides["ok-1"].tiles == 120 and slides["ok-1"].seconds == pytest.approx(8.2)
    assert slides["old-2"].status == "skipped"
    assert slides["bad<3>"].status == "failed" and slides["bad<3>"].error.startswith("tile: SlideReadError:")
    assert slides["dead-4"].status == "failed" and slides["dead-4"].error_type == "KilledWorker"
    html_text = write_report(run_out).read_text()
    assert ">failed<b>2</b>" in html_text and ">skipped<b>1</b>" in html_text and ">done<b>1</b>" in html_text


def test_image_cap(run_out: Path) -> None:
    page = parse(write_report(run_out, report_images=1))
    assert len(page.imgs) == 1
    assert "Showing 1 of 3 slides" in " ".join(page.text)


def test_report_without_pictures_or_rows(tmp_path: Path) -> None:
    page = parse(write_report(tmp_path / "empty"))
    assert page.imgs == [] and "0 slides" in " ".join(page.text)


_chromium = find_chromium

_CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]

# Appended to a copy of the report (the report itself has no scripts): after the load event,
# records every <img>'s decoded width so --dump-dom shows whether each picture loaded.
_IMG_PROBE = (
    "<script>window.addEventListener('load', () => { document.body.dataset.imgs = JSON.stringify("
    "[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])); });</script>"
)


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH for a headless browser check (apt-get install chromium)")
def test_report_renders_in_chromium(run_out: Path, tmp_path: Path) -> None:
    chromium = str(_chromium())
    report = write_report(run_out)
    # Every <img> decodes in a real browser (naturalWidth > 0).
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", _IMG_PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [chromium, *_CHROMIUM_ARGS, "--dump-dom", probe.as_uri()], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    match = re.search(r'data-imgs="([^"]*)"', dom)
    assert match, f"the load probe did not run; chromium printed: {dom[:300]!r}"
    imgs = json.loads(html.unescape(match.group(1)))
    assert len(imgs) == len(parse(report).imgs) == 4
    for alt, complete, width, height in imgs:
        assert complete and width > 0 and height > 0, f"<img alt={alt!r}> did not load in chromium"
    # The screenshot of the page itself is not blank.
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *_CHROMIUM_ARGS, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB")).astype(np.int16)
    assert arr.shape[:2] == (1600, 1200)
    background = np.median(arr.reshape(-1, 3), axis=0)
    drawn = np.abs(arr - background).max(axis=2) > 40
    assert arr.std() > 5 and drawn.mean() > 0.01, "the screenshot of report.html is blank"
    # The pictures are painted, not only laid out: a QC thumbnail's pink is on screen.
    pink = (np.abs(arr - np.array([230, 180, 200])).max(axis=2) < 30).mean()
    assert pink > 0.001, "no QC thumbnail colour in the screenshot"


def test_report_links_to_a_running_viewer(run_out: Path) -> None:
    plain = write_report(run_out).read_text(encoding="utf-8")
    assert "/view/" not in plain
    page = write_report(run_out, path=run_out / "linked.html", viewer_url="http://127.0.0.1:8000/").read_text(encoding="utf-8")
    assert '<a href="http://127.0.0.1:8000/view/ok-1">ok-1</a>' in page
    assert 'href="http://127.0.0.1:8000/view/bad%3C3%3E">bad&lt;3&gt;</a>' in page  # quoted and escaped
