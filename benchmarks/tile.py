"""Tiling benchmark: `wsi-convnext tile` against a naive per-tile loop, peak memory, store size.

Usage:
    python benchmarks/tile.py [--size 40000] [--work /tmp/wsi-bench] [--naive-tiles 400] [--skip-4x]

Generates (once, cached in --work) a synthetic 0.25 µm/px slide of size×size px with a JPEG
pyramid at 1/4/16, tiles it to 224 px at 0.5 µm/px, and prints in one run:
- tiles/s of the full pipeline (tissue detection included) vs. a naive single-threaded loop
  over the same coordinates (one 448×448 level-0 openslide.read_region per tile, PIL resize
  to 224, JPEG q90 encode); the naive loop runs on a random sample of the tiles;
- peak RSS of tiling that slide and one of 4× the area (each in a fresh subprocess);
- store bytes per tile vs. source-slide bytes for the same area.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
from wsi_convnext.tiler import TileParams, tile_slide
t0 = time.perf_counter()
r = tile_slide(sys.argv[1], sys.argv[2], TileParams(mpp=0.5, tile_size=224, backend=sys.argv[3]), overwrite=True)
dt = time.perf_counter() - t0
print(json.dumps({"tiles": r.n_tiles, "seconds": dt, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_slide(path: Path, size: int, seed: int = 0) -> Path:
    from wsi_convnext.synthetic import SyntheticSlideSpec, TissueSpec, write_synthetic_slide

    if path.exists():
        return path
    spec = SyntheticSlideSpec(
        width=size, height=size, mpp=0.25, downsamples=(1, 4, 16), compression="jpeg", quality=90,
        seed=seed, tissue=TissueSpec(n_blobs=3, coverage=0.35), objective_power=40,
    )  # fmt: skip
    t0 = time.perf_counter()
    write_synthetic_slide(path, spec)
    print(f"generated {path.name} ({size}×{size} px) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def run_child(slide: Path, out: Path, backend: str = "auto") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(out), backend], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def naive(slide: Path, coords: np.ndarray, extent: int = 448, size: int = 224) -> float:
    """Tiles/s of the naive loop over ``coords``."""
    import openslide
    from PIL import Image

    s = openslide.OpenSlide(str(slide))
    t0 = time.perf_counter()
    for x, y in coords:
        img = s.read_region((int(x), int(y)), 0, (extent, extent)).convert("RGB")
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return len(coords) / (time.perf_counter() - t0)


def store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in (store / "tiles").rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40000, help="slide side in level-0 px (0.25 µm/px)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wsi-bench"))
    ap.add_argument("--naive-tiles", type=int, default=400, help="tiles sampled for the naive loop")
    ap.add_argument("--skip-4x", action="store_true", help="skip the 4×-area memory run")
    ap.add_argument("--backend", default="auto", help="slide backend of the pipeline run")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from wsi_convnext.store import open_store

    slide = make_slide(args.work / f"bench-{args.size}.svs", args.size)
    out = args.work / "out"
    res = run_child(slide, out, args.backend)
    store = open_store(out / f"bench-{args.size}.zarr")
    # The naive loop visits tiles in raster order (as a simple script would), a contiguous run
    # from the middle of the slide, so OpenSlide's tile cache helps it as much as it can.
    coords = store.coords[np.lexsort((store.coords[:, 0], store.coords[:, 1]))]
    start = max(0, len(coords) // 2 - args.naive_tiles // 2)
    sample = coords[start : start + args.naive_tiles]
    naive_rate = naive(slide, sample)
    pipe_rate = res["tiles"] / res["seconds"]

    # Source bytes for the area of one tile: level-0 JPEG bytes (file share of level 0) per level-0 px.
    import tifffile

    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[0]
        level0_bytes = sum(page.databytecounts)
    src_per_tile = level0_bytes / (args.size * args.size) * store.extent0**2
    store_per_tile = store_bytes(store.path) / len(store)

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"backend: {args.backend}")
    print(f"slide: {args.size}×{args.size} px @ 0.25 µm/px, JPEG q90 pyramid 1/4/16, {slide.stat().st_size / 1e9:.2f} GB")
    print(f"tiles kept: {res['tiles']} of {store.attrs['grid_tiles']} (224 px @ 0.5 µm/px)")
    print(f"pipeline:  {pipe_rate:8.1f} tiles/s  ({res['seconds']:.1f} s end to end, tissue detection included)")
    print(f"naive:     {naive_rate:8.1f} tiles/s  (single-threaded read_region 448 + resize + JPEG, {len(sample)} tiles)")
    print(f"speed-up:  {pipe_rate / naive_rate:8.2f}×  (target ≥ 3)")
    print(f"peak RSS:  {res['maxrss_kb'] / 1024:8.0f} MB main process + {res['worker_maxrss_kb'] / 1024:.0f} MB per worker "
          f"process (target < 1500 in all)")  # fmt: skip
    print(f"store bytes/tile {store_per_tile / 1024:.1f} KiB vs source {src_per_tile / 1024:.1f} KiB for the same area "
          f"(ratio {store_per_tile / src_per_tile:.2f})")  # fmt: skip
    if not args.skip_4x:
        big = make_slide(args.work / f"bench-{args.size * 2}.svs", args.size * 2, seed=1)
        res4 = run_child(big, out, args.backend)
        print(f"4× area:   {res4['tiles']} tiles, {res4['tiles'] / res4['seconds']:.1f} tiles/s, peak RSS "
              f"{res4['maxrss_kb'] / 1024:.0f} MB + {res4['worker_maxrss_kb'] / 1024:.0f} MB per worker, growth "
              f"{(res4['maxrss_kb'] + res4['worker_maxrss_kb']) / (res['maxrss_kb'] + res['worker_maxrss_kb']):.2f}× (target < 1.3)")  # fmt: skip


if __name__ == "__main__":
    main()
