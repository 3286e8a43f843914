"""What checking every chunk on read costs: embed throughput with the checks against without.

One store of ``--tiles`` synthetic H&E-like JPEG tiles (default 3,600, as a small slide) is
built once; then, interleaved ``--repeats`` times, in one process:

- *read*: every tile read and decoded (``TileStore.read_tiles``), no model: the worst case,
  where hashing competes only with JPEG decoding;
- *embed*: :func:`wsi_convnext.embed.embed_stores` with ``--model`` (random weights) from the
  store path to written features (``--overwrite``), tiles/s.

Each once with the read-path checks (every chunk's sha256 compared with its record before
zarr decodes it) and once without (``wsi_convnext.store._CHECK_READS = False``, a switch that
exists for this measurement only). The best of the repeats is reported, with the ratio
checked / unchecked (1.0 = free). Example::

    python benchmarks/integrity.py                       # CPU, convnext_atto, 3,600 tiles
    python benchmarks/integrity.py --device cuda --model convnext_tiny --batch-size 256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import make_store  # noqa: E402  (the embedding benchmark's synthetic store)


def _read_all(path: Path) -> tuple[float, float]:
    """(tiles/s, tiles per CPU-second of this process) of reading and decoding every tile."""
    from wsi_convnext.store import open_store

    t0, c0 = time.perf_counter(), time.process_time()
    store = open_store(path)
    n = 0
    for start in range(0, len(store), 256):
        n += len(store.read_tiles(slice(start, start + 256)))
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _embed(path: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(tiles/s, tiles per CPU-second of this process) of embedding the store."""
    from wsi_convnext.embed import embed_stores

    t0, c0 = time.perf_counter(), time.process_time()
    (res,) = embed_stores([path], model=args.model, device=args.device, batch_size=args.batch_size, overwrite=True)
    if res.status != "done":
        raise SystemExit(f"embed failed: {res.error}")
    return res.n_tiles / (time.perf_counter() - t0), res.n_tiles / (time.process_time() - c0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, default=3600)
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is reported")
    p.add_argument("--no-embed", action="store_true", help="only the read + decode measurement")
    args = p.parse_args(argv)

    import wsi_convnext.store as store_mod

    root = Path(tempfile.mkdtemp(prefix="wsi-integrity-"))
    try:
        path = make_store(root, args.tiles, args.tile_size)
        size = sum(f.stat().st_size for f in (path / "tiles").rglob("c/*"))
        blob = os.urandom(64 << 20)
        t0 = time.perf_counter()
        hashlib.sha256(blob).digest()
        sha_gbs = len(blob) / (time.perf_counter() - t0) / 1e9
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}; sha256 {sha_gbs:.2f} GB/s")  # fmt: skip
        print(f"# store: {args.tiles} tiles of {args.tile_size} px, {size / 1e6:.1f} MB of JPEG in tiles/")
        best: dict[tuple[str, bool], float] = {}
        best_cpu: dict[tuple[str, bool], float] = {}
        kinds = ["read"] + ([] if args.no_embed else ["embed"])
        if not args.no_embed:
            _embed(path, args)  # warm-up: model build paths, thread budget
        for _ in range(args.repeats):
            for kind in kinds:
                for checked in (True, False):
                    store_mod._CHECK_READS = checked
                    rate, cpu_rate = _read_all(path) if kind == "read" else _embed(path, args)
                    best[kind, checked] = max(best.get((kind, checked), 0.0), rate)
                    best_cpu[kind, checked] = max(best_cpu.get((kind, checked), 0.0), cpu_rate)
        store_mod._CHECK_READS = True
        print("| measurement | checked tiles/s | unchecked tiles/s | **checked / unchecked** | same, per CPU-second |")
        print("|---|---|---|---|---|")
        for kind in kinds:
            on, off = best[kind, True], best[kind, False]
            cpu = best_cpu[kind, True] / best_cpu[kind, False]
            what = "read + decode (no model)" if kind == "read" else f"embed, {args.model}, {args.device}, batch {args.batch_size}"
            print(f"| {what} | {on:.1f} | {off:.1f} | **{on / off:.3f}** | {cpu:.3f} |")
        # Hashing's share, from this run's figures: the tile bytes at the measured sha256 speed.
        hash_s = size / (sha_gbs * 1e9)
        for kind in kinds:
            print(f"# {kind}: sha256 of every tile chunk ≈ {hash_s * 1e3:.0f} ms = "
                  f"{hash_s / (args.tiles / best[kind, False]):.2%} of the unchecked run")  # fmt: skip
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
