"""Pretraining pipeline efficiency: stores → multi-crop views → optimiser step vs the bare step.

In one process, same model, stem, method, global batch and crops:

- *bare*: the method's training step (forward of student and teacher, loss, backward, AdamW
  step, EMA) on one batch of views already preprocessed on the device, steps/s;
- *pipeline*: :func:`wsi_convnext.pretrain.pretrain_encoder` on ``--stores`` stores of
  synthetic JPEG tiles (benchmarks/embed.py's), from the store paths through decoding, cropping,
  HED/brightness/contrast jitter and blur in the DataLoader workers to each optimiser step;
  timed between progress events after ``--skip`` warm-up steps (evaluations excluded), steps/s;
- *pipeline/bare*: the loader's efficiency (target >= 0.9: the data never starves the step).

Examples::

    python benchmarks/pretrain.py --quick                       # CPU, convnext_atto, a few steps
    python benchmarks/pretrain.py --device cuda --model convnext_tiny --batch-size 128 --steps 60 --workers 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed import make_stores  # noqa: E402


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_steps_per_second(cfg, dev, steps: int) -> float:
    """Steps/s of the method's training step on one fixed batch of preprocessed views."""
    import torch

    from wsi_convnext.encoders import build_encoder
    from wsi_convnext.pretrain.methods import build_method

    enc = build_encoder(cfg.model, stem=cfg.stem)
    method = build_method(cfg.method, enc.model, enc.num_features, cfg).to(dev).train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=cfg.lr)
    b, n_local = cfg.batch_size, cfg.n_local if cfg.method == "dino" else 0
    gen = torch.Generator().manual_seed(0)
    xg = torch.randn(2, b, 3, cfg.global_size, cfg.global_size, generator=gen).to(dev)
    xl = torch.randn(n_local, b, 3, cfg.local_size, cfg.local_size, generator=gen).to(dev) if n_local else None
    cuda = dev.type == "cuda"
    if cuda:
        method.to(memory_format=torch.channels_last)

    def step(i: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
            loss, _ = method(xg, xl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_step(i + 1, steps)

    for i in range(2):
        step(i)
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(dev)
    return steps / (time.perf_counter() - t0)


def pipeline_steps_per_second(cfg, skip: int) -> float:
    from wsi_convnext.pretrain import pretrain_encoder

    stamps: list[float] = []

    def on(p) -> None:
        if p.event == "step":
            stamps.append(time.perf_counter())

    pretrain_encoder(cfg, progress=on)
    return (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short CPU calibration (about 3 minutes on 2 cores)")
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--stem", default="patch")
    p.add_argument("--method", default="dino")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--global-size", type=int, default=96)
    p.add_argument("--local-size", type=int, default=48)
    p.add_argument("--n-local", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the pipeline timing")
    p.add_argument("--tiles", type=int, default=2048)
    p.add_argument("--stores", type=int, default=4)
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the library's choice)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_size, a.steps, a.tiles, a.global_size, a.local_size, a.n_local = 16, 8, 512, 64, 32, 2
    import torch

    from wsi_convnext.encoders import resolve_device
    from wsi_convnext.pretrain import PretrainConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    with tempfile.TemporaryDirectory(prefix="wsi-pretrain-bench-") as tmp:
        stores = make_stores(Path(tmp), a.tiles, a.tile_size, a.stores)
        cfg = PretrainConfig(
            data=tuple(str(s) for s in stores), out=str(Path(tmp) / "enc"), model=a.model, stem=a.stem, method=a.method,
            steps=a.steps + a.skip + 1, batch_size=a.batch_size, global_size=a.global_size, local_size=a.local_size,
            n_local=a.n_local, device=a.device, num_workers=a.workers, threads=a.threads, compile=a.compile,
            probe_every=10**9, checkpoint_every=10**9,
        )  # fmt: skip
        bare = bare_steps_per_second(cfg, dev, a.steps)
        pipe = pipeline_steps_per_second(cfg, a.skip)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f}, device {dev}, torch {torch.__version__}")  # fmt: skip
    print(f"{a.model} {a.stem} {a.method}: global batch {a.batch_size}, crops 2×{a.global_size} + {a.n_local}×{a.local_size} px")
    print(f"bare step:      {bare:8.3f} steps/s  ({bare * a.batch_size:8.1f} tiles/s)")
    print(f"pipeline:       {pipe:8.3f} steps/s  ({pipe * a.batch_size:8.1f} tiles/s)")
    print(f"pipeline/bare:  {pipe / bare:8.3f}  (target >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
