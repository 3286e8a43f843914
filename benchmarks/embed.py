"""Embedding pipeline efficiency: zarr → decode → ConvNeXt → written features vs the bare model.

For every model and stem, in one process with the same batch size and the same CPU budget:

- *bare*: forward passes on a preprocessed batch already on the device (``inference_mode``,
  same precision policy and memory layout as the pipeline, torch's default threads), tiles/s;
- *pipeline*: :func:`wsi_convnext.embed.embed_stores` on ``--stores`` stores of synthetic
  JPEG tiles (``--tiles`` in all), from the store paths to every written ``features/<key>``
  (one stream across the stores, automatic thread budget unless ``--num-workers``), tiles/s;
- *pipeline/bare*: the efficiency of the loader (targets: >= 0.95 for atto, >= 0.97 for tiny);
- with ``--cli``, also the whole ``wsi-convnext embed`` process (interpreter start, imports,
  encoder build included) against the same bare figure;
- *overlap/patch*: bare throughput of the overlap stem relative to the patch stem.

The measurements are repeated (interleaved, so a noisy neighbour hurts them alike) and the
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


def make_stores(root: Path, n: int, size: int, n_stores: int = 1) -> list[Path]:
    """``n_stores`` stores holding ``n`` synthetic JPEG tiles in all (sizes differ by at most one)."""
    encoded = synthetic_tiles(min(n, 256), size)
    counts = [n // n_stores + (k < n % n_stores) for k in range(n_stores)]
    return [make_store(root, c, size, encoded, name=f"bench{k:02d}") for k, c in enumerate(counts)]


def make_store(root: Path, n: int, size: int, encoded: list[bytes] | None = None, name: str = "bench") -> Path:
    from wsi_convnext.store import TILES_PER_CHUNK, TileStoreWriter

    encoded = encoded or synthetic_tiles(min(n, 256), size)
    encoded = [encoded[i % len(encoded)] for i in range(n)]
    w = TileStoreWriter(root / f"{name}.zarr", n, size)
    for start in range(0, n, TILES_PER_CHUNK):
        w.write_tiles(encoded[start : start + TILES_PER_CHUNK])
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1) * size
    attrs = {"slide_id": name, "target_mpp": 0.5, "slide_mpp": 0.25, "extent0": 2.0 * size}
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


def pipeline_throughput(stores: list[Path], model: str, stem: str, args, dev, encoder=None) -> tuple[float, float]:
    """(tiles/s, tiles per CPU-second) of :func:`embed_stores`: store paths to written features.

    Builds the encoder from ``model``/``stem`` (counted) unless ``encoder`` is given (e.g. compiled).
    """
    from wsi_convnext.embed import embed_stores

    t0, c0 = time.perf_counter(), time.process_time()
    res = embed_stores(
        stores, model=model, stem=stem, encoder=encoder, batch_size=args.batch_size, device=dev, overwrite=True,
        num_workers=args.num_workers, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        decode_on=getattr(args, "decode_on", "host"),
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bad = [r for r in res if r.status != "done"]
    if bad:
        raise RuntimeError(f"embedding failed: {bad[0].error}")
    return sum(r.n_tiles for r in res) / wall, sum(r.n_tiles for r in res) / cpu


def cli_throughput(stores: list[Path], model: str, stem: str, args) -> float:
    """tiles/s of the whole ``wsi-convnext embed`` process (start-up, imports and encoder build included)."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("wsi-convnext")
    cmd = [str(exe), "embed", *map(str, stores), "--model", model, "--stem", stem,
           "--batch-size", str(args.batch_size), "--device", args.device, "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return args.tiles / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnext_tiny", "convnext_atto"])
    p.add_argument("--stems", nargs="+", default=["patch"])
    p.add_argument("--stores", type=int, default=4, help="stores the tiles are spread over")
    p.add_argument("--cli", action="store_true", help="also time the whole `wsi-convnext embed` process")
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

    from wsi_convnext.embed import prepare_forward
    from wsi_convnext.encoders import build_encoder, resolve_device

    logging.getLogger("wsi_convnext.encoders").setLevel(logging.ERROR)  # "random weights" warnings
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    workers = "auto (measured)" if args.num_workers is None else args.num_workers
    root = args.keep or Path(tempfile.mkdtemp(prefix="wsi-convnext-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        stores = make_stores(root, args.tiles, args.tile_size, args.stores)
        size_mb = sum(f.stat().st_size for s in stores for f in (s / "tiles").rglob("*") if f.is_file()) / 1e6
        kb = size_mb / args.tiles * 1e3
        print(f"stores: {args.tiles} synthetic JPEG tiles of {args.tile_size} px in {len(stores)} stores "
              f"({kb:.0f} kB/tile), built in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        gpu = f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
        print(f"device: {dev}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {workers} decode threads, "
              f"batch {args.batch_size}, amp={args.amp}, channels_last={args.channels_last}, "
              f"compile={args.compile}")  # fmt: skip
        from wsi_convnext.store import open_store

        batch = open_store(stores[0]).read_tiles(slice(0, args.batch_size))
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
                bare, pipe, cli = [], [], []
                for _ in range(args.repeats):
                    bare.append(bare_throughput(enc, forward, dev, batch, args.tiles))
                    # a compiled model is reused (passed in); otherwise the encoder build is counted
                    pipe.append(pipeline_throughput(stores, model, stem, args, dev, enc if args.compile else None))
                    if args.cli:
                        cli.append(cli_throughput(stores, model, stem, args))
                b, q = max(w for w, _ in bare), max(w for w, _ in pipe)
                bc, qc = max(c for _, c in bare), max(c for _, c in pipe)
                c = max(cli) if cli else float("nan")
                rows.append((model, stem, prec.name, b, q, bc, qc, c))
                print(f"  {model} {stem}: bare {['%.1f' % w for w, _ in bare]}, "
                      f"pipeline {['%.1f' % w for w, _ in pipe]} tiles/s; pipeline/bare {q / b:.3f} "
                      f"(per CPU-s {qc / bc:.3f})" + (f"; whole process {['%.1f' % w for w in cli]} tiles/s, "
                      f"{c / b:.3f} of bare" if cli else ""), flush=True)  # fmt: skip

        print()
        print("best of each; 'per CPU-s' counts all threads' CPU time (less sensitive to other processes)")
        print(f"{'model':<16}{'stem':<9}{'precision':<11}{'bare tiles/s':>14}{'pipeline tiles/s':>18}"
              f"{'pipeline/bare':>15}{'same, per CPU-s':>17}{'process/bare':>14}")  # fmt: skip
        for model, stem, prec, b, q, bc, qc, c in rows:
            print(f"{model:<16}{stem:<9}{prec:<11}{b:>14.1f}{q:>18.1f}{q / b:>15.3f}{qc / bc:>17.3f}{c / b:>14.3f}")
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
