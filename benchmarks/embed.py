"""Embedding pipeline efficiency: zarr → decode → ConvNeXt → written features vs the bare model.

For every model and stem, in one process with the same batch size and threads:

- *bare*: forward passes on a preprocessed batch already on the device (``inference_mode``,
  same precision policy and memory layout as the pipeline), tiles/s;
- *pipeline*: :func:`wsi_convnext.embed.embed_store` on a store of synthetic JPEG tiles, from
  opening the store to the written ``features/<key>``, tiles/s;
- *pipeline/bare*: the efficiency of the loader (target >= 0.95);
- *overlap/patch*: bare throughput of the overlap stem relative to the patch stem.

Both measurements are repeated (interleaved, so a noisy neighbour hurts both alike) and the
best of the repeats is reported. Examples::

    python benchmarks/embed.py                                   # CPU, tiny + atto, batch 32
    python benchmarks/embed.py --device cuda --tiles 8192 --batch-size 128 --compile
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_tiles(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG tiles that compress like H&E (smooth blobs plus grain), not like pure noise."""
    from PIL import Image

    from wsi_convnext.store import encode_tile

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(60, 250, (size // 16, size // 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = img + rng.normal(0, 6, img.shape).astype(np.int16)
        out.append(encode_tile(np.clip(img, 0, 255).astype(np.uint8), "jpeg", quality=90))
    return out


def make_store(root: Path, n: int, size: int) -> Path:
    from wsi_convnext.store import TILES_PER_CHUNK, TileStoreWriter

    encoded = synthetic_tiles(min(n, 256), size)
    encoded = [encoded[i % len(encoded)] for i in range(n)]
    w = TileStoreWriter(root / "bench.zarr", n, size)
    for start in range(0, n, TILES_PER_CHUNK):
        w.write_tiles(encoded[start : start + TILES_PER_CHUNK])
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1) * size
    attrs = {"slide_id": "bench", "target_mpp": 0.5, "slide_mpp": 0.25, "extent0": 2.0 * size}
    return w.commit(
        coords=coords, tissue_fraction=np.ones(n), thumbnail=np.zeros((8, 8, 3), np.uint8),
        tissue_mask=np.ones((8, 8), bool), attrs=attrs, overwrite=True,
    )  # fmt: skip


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_throughput(encoder, forward, dev, batch: np.ndarray, n_tiles: int) -> tuple[float, float]:
    """(tiles/s, tiles per CPU-second) of ``forward`` on one preprocessed batch already on the device."""
    import torch

    bs = len(batch)
    n_batches = max(1, n_tiles // bs)
    with torch.inference_mode():
        x = encoder.preprocess(torch.from_numpy(batch), device=dev)
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            y = forward(x)
        _sync(dev)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        del y
    return n_batches * bs / wall, n_batches * bs / cpu


def pipeline_throughput(store: Path, encoder, args, dev) -> tuple[float, float]:
    """(tiles/s, tiles per CPU-second) of :func:`embed_store`, zarr to written features."""
    from wsi_convnext.embed import embed_store

    t0, c0 = time.perf_counter(), time.process_time()
    res = embed_store(
        store, encoder, batch_size=args.batch_size, device=dev, overwrite=True, num_workers=args.num_workers,
        amp=args.amp, channels_last=args.channels_last, compile=args.compile,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return res.n_tiles / wall, res.n_tiles / cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnext_tiny", "convnext_atto"])
    p.add_argument("--stems", nargs="+", default=["patch", "overlap"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tiles", type=int, default=256, help="tiles per measurement (use thousands on a GPU)")
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is reported")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on for CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last layout (default: on for CUDA)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--num-workers", type=int, default=None, help="decode threads (default: embed_store's)")
    p.add_argument("--keep", type=Path, default=None, help="build the store in this folder and keep it")
    args = p.parse_args(argv)

    import logging

    import torch

    from wsi_convnext.embed import default_num_workers, prepare_forward
    from wsi_convnext.encoders import build_encoder, resolve_device

    logging.getLogger("wsi_convnext.encoders").setLevel(logging.ERROR)  # "random weights" warnings
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    workers = default_num_workers(dev.type) if args.num_workers is None else args.num_workers
    root = args.keep or Path(tempfile.mkdtemp(prefix="wsi-convnext-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        store = make_store(root, args.tiles, args.tile_size)
        size_mb = sum(f.stat().st_size for f in (store / "tiles").rglob("*") if f.is_file()) / 1e6
        kb = size_mb / args.tiles * 1e3
        print(f"store: {args.tiles} synthetic JPEG tiles of {args.tile_size} px ({kb:.0f} kB/tile), "
              f"built in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        gpu = f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
        print(f"device: {dev}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {workers} decode threads, "
              f"batch {args.batch_size}, amp={args.amp}, channels_last={args.channels_last}, "
              f"compile={args.compile}")  # fmt: skip
        from wsi_convnext.store import open_store

        batch = open_store(store).read_tiles(slice(0, args.batch_size))
        if len(batch) < args.batch_size:
            batch = np.concatenate([batch] * (-(-args.batch_size // len(batch))))[: args.batch_size]
        rows = []
        for model in args.models:
            for stem in args.stems:
                torch.manual_seed(0)
                enc = build_encoder(model, stem=stem)
                forward, prec = prepare_forward(enc, dev, amp=args.amp, channels_last=args.channels_last,
                                                compile=args.compile)  # fmt: skip
                # Warm up: allocator, oneDNN/cuDNN algorithm choice, compilation.
                bare_throughput(enc, forward, dev, batch, 2 * args.batch_size)
                bare, pipe = [], []
                for _ in range(args.repeats):
                    bare.append(bare_throughput(enc, forward, dev, batch, args.tiles))
                    pipe.append(pipeline_throughput(store, enc, args, dev))
                b, q = max(w for w, _ in bare), max(w for w, _ in pipe)
                bc, qc = max(c for _, c in bare), max(c for _, c in pipe)
                rows.append((model, stem, prec.name, b, q, bc, qc))
                print(f"  {model} {stem}: bare {['%.1f' % w for w, _ in bare]}, "
                      f"pipeline {['%.1f' % w for w, _ in pipe]} tiles/s; pipeline/bare {q / b:.3f} "
                      f"(per CPU-s {qc / bc:.3f})", flush=True)  # fmt: skip

        print()
        print("best of each; 'per CPU-s' counts all threads' CPU time (less sensitive to other processes)")
        print(f"{'model':<16}{'stem':<9}{'precision':<11}{'bare tiles/s':>14}{'pipeline tiles/s':>18}"
              f"{'pipeline/bare':>15}{'same, per CPU-s':>17}")  # fmt: skip
        for model, stem, prec, b, q, bc, qc in rows:
            print(f"{model:<16}{stem:<9}{prec:<11}{b:>14.1f}{q:>18.1f}{q / b:>15.3f}{qc / bc:>17.3f}")
        by = {(m, s): (b, q) for m, s, _, b, q, *_ in rows}
        if "patch" in args.stems and "overlap" in args.stems:
            print()
            print(f"{'model':<16}{'overlap/patch bare':>20}{'overlap/patch pipeline':>24}")
            for model in args.models:
                (bp, qp), (bo, qo) = by[(model, "patch")], by[(model, "overlap")]
                print(f"{model:<16}{bo / bp:>20.3f}{qo / qp:>24.3f}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
