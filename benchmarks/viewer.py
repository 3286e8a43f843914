"""Deep Zoom tile serving of `wsi-convnext view`: cold and cached, against OpenSlide's own generator.

    python benchmarks/viewer.py [--slide ../shared/slides/CMU-1-Small-Region.svs] [--repeat 3]

Every tile of the 3 finest Deep Zoom levels is produced three ways, in the same run:

- baseline: ``openslide.deepzoom.DeepZoomGenerator.get_tile`` + Pillow JPEG q90 (what
  OpenSlide's example Deep Zoom server does per request);
- ``DeepZoom.tile`` cold (an empty cache: read, resample, JPEG q90);
- ``DeepZoom.tile`` warm (the same tiles again: a pan back or a zoom back).

Then the same tiles over HTTP from a running ``ViewerServer`` (4 client threads), cold and warm.
Prints tiles/s and the ratios against the baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=REPO.parent / "shared" / "slides" / "CMU-1-Small-Region.svs")
    ap.add_argument("--repeat", type=int, default=3, help="Best of this many passes per method.")
    args = ap.parse_args()

    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    from wsi_convnext.outputs.viewer import DeepZoom, SlideSource, TileCache, ViewerServer
    from wsi_convnext.slide import open_slide

    print(f"slide {args.slide.name}, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    reader = open_slide(args.slide)
    dz = DeepZoom(SlideSource(reader), TileCache(256 << 20), "bench")
    grid = dz.grid
    top = grid.level_count - 1
    tiles = [(lv, c, r) for lv in range(top - 2, top + 1) for c in range(grid.level_tiles(lv)[0]) for r in range(grid.level_tiles(lv)[1])]
    print(f"{len(tiles)} tiles of levels {top - 2}..{top}")

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with OpenSlide(str(args.slide)) as osr:
        ref = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)

        def baseline() -> None:
            for lv, c, r in tiles:
                buf = io.BytesIO()
                ref.get_tile(lv, (c, r)).save(buf, "JPEG", quality=90)

        t_base = best(baseline)

    def cold() -> None:
        dz.cache = TileCache(256 << 20)
        for t in tiles:
            dz.tile(*t)

    t_cold = best(cold)

    def warm() -> None:
        for t in tiles:
            dz.tile(*t)

    t_warm = best(warm)
    reader.close()

    server = ViewerServer(args.slide, port=0)
    base = server.start().rstrip("/")
    sid = next(iter(server.catalog.slides))
    urls = [f"{base}/dzi/{sid}_files/{lv}/{c}_{r}.jpeg" for lv, c, r in tiles]

    def fetch_all() -> None:
        with ThreadPoolExecutor(4) as pool:
            for n in pool.map(lambda u: len(urllib.request.urlopen(u).read()), urls):
                assert n > 0

    t = time.perf_counter()
    fetch_all()
    t_http_cold = time.perf_counter() - t
    t_http_warm = best(fetch_all)
    server.stop()

    n = len(tiles)
    rows = [
        ("baseline: DeepZoomGenerator + PIL JPEG", t_base),
        ("DeepZoom.tile, cold cache", t_cold),
        ("DeepZoom.tile, warm cache", t_warm),
        ("HTTP, cold cache (4 clients)", t_http_cold),
        ("HTTP, warm cache (4 clients)", t_http_warm),
    ]
    for name, secs in rows:
        print(f"{name:<42} {n / secs:9.0f} tiles/s  {t_base / secs:6.2f}x baseline")


if __name__ == "__main__":
    main()
