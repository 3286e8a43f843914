"""Tile-transform throughput: stain normalisation and augmentations on a batch of real H&E tiles.

Reports tiles/s of each registered transform on a (B, 3, 224, 224) batch of CMU-1 tiles on
the chosen device, next to a bare ConvNeXt forward pass on the same batch (the cost the
transform adds to embedding), best of ``--repeats``. Example::

    python benchmarks/transforms.py --device cpu --batch-size 64
    python benchmarks/transforms.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    import numpy as np
    import openslide
    import torch

    from wsi_convnext.encoders import build_encoder
    from wsi_convnext.transforms import TRANSFORMS, build_transform

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_slide = Path(os.environ.get("WSI_TEST_SLIDES", "../shared/slides")) / "CMU-1-Small-Region.svs"
    ap.add_argument("--slide", type=Path, default=default_slide)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="convnext_tiny")
    args = ap.parse_args()

    with openslide.OpenSlide(str(args.slide)) as s:
        region = np.asarray(s.read_region((0, 560), 0, (2016, 1344)).convert("RGB"))
    tiles = region.reshape(6, 224, 9, 224, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 224, 224, 3)
    idx = np.arange(args.batch_size) % len(tiles)
    dev = torch.device(args.device)
    x = torch.from_numpy(tiles[idx].copy()).permute(0, 3, 1, 2).float().div(255).to(dev)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return len(x) / min(times)

    enc = build_encoder(args.model).to(dev)
    with torch.inference_mode():
        model_tps = best(lambda: enc.model(x.sub(0.45).div(0.225)))
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else os.cpu_count()} "
          f"{'' if dev.type == 'cuda' else 'cores'}), batch {len(x)}, torch threads {torch.get_num_threads()}, "
          f"load {open('/proc/loadavg').read().split()[:3]}")  # fmt: skip
    print(f"{'transform':<22}{'tiles/s':>10}{'+ time vs ' + args.model:>26}{'fallbacks (all calls)':>24}")
    print(f"{args.model + ' forward':<22}{model_tps:>10.1f}")
    for name in TRANSFORMS:
        t = build_transform(name)
        with torch.inference_mode():
            tps = best(lambda: t(x))
        stats = t.stats()
        print(f"{name:<22}{tps:>10.1f}{model_tps / tps:>25.2f}×"
              f"{stats.get('identity_fallbacks', '-')!s:>24}")  # fmt: skip


if __name__ == "__main__":
    main()
