"""The prepared GPU benchmark (driver of ``benchmarks/gpu.sh``): one run, one table.

On one CUDA GPU (sized for <= 8 minutes on an H100/H200) it measures, in one process:

- embed (:func:`wsi_convnext.embed.embed_stores` over several stores, zarr to written
  features) against the bare model forward, for ``convnext_tiny`` and ``convnext_base``, AMP
  bfloat16, channels-last, with and without ``torch.compile``, batch 256, decode threads =
  the machine's cores;
- embed tiles/s at batch 256 with 16 decode threads;
- the same with JPEG decoding on the GPU (torchvision / nvJPEG, ``decode_on="device"``);
- the loader alone (read + decode, no model) with the machine's cores;
- the fine-tuning step throughput (forward + backward + AdamW step under bf16 autocast on the
  encoder's model) when ``wsi_convnext.finetune`` is importable; the row is skipped otherwise;
- the self-supervised pretraining step (DINO, 2 × 96-px global + 4 × 48-px local crops, bf16,
  channels-last; ``benchmarks/pretrain.py``): the bare step on views in GPU memory against
  ``pretrain_encoder`` from the stores (tiles/s on one GPU; a 1-against-N-GPU row is not wired
  up: run ``torchrun --nproc-per-node N "$(command -v wsi-convnext)" pretrain ...`` by hand).

The stores are generated here: a synthetic slide (:mod:`wsi_convnext.synthetic`), tiled with
:func:`wsi_convnext.tiling.tiler.tile_slide`, copied to reach ``--tiles``. No downloads, random weights.

Without a CUDA GPU it prints why and exits 0 without measuring; ``--dry-run`` runs every row
on the CPU at tiny sizes (``convnext_atto``, no compile), to check the script itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_stores(root: Path, n_tiles: int, side: int, workers: int) -> list[Path]:
    """Stores of a generated slide: one tiled slide, copied until ``n_tiles`` tiles in all."""
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from wsi_convnext.tiling.tiler import TileParams, tile_slide

    slide = write_synthetic_slide(root / "slide.svs", SyntheticSlideSpec(width=side, height=side, mpp=0.5, seed=1),
                                  workers=workers).path  # fmt: skip
    first = tile_slide(slide, root / "stores", TileParams(workers=workers)).store_path
    per = _n_tiles(first)
    if per == 0:
        raise SystemExit(f"the generated slide {slide} gave no tiles")
    stores = [first]
    while per * len(stores) < n_tiles:
        dst = first.with_name(f"copy{len(stores):03d}.zarr")
        shutil.copytree(first, dst)
        stores.append(dst)
    return stores


def _n_tiles(store: Path) -> int:
    from wsi_convnext.store import open_store

    return len(open_store(store))


def loader_throughput(stores: list[Path], batch_size: int, workers: int, pin: bool) -> float:
    """tiles/s of the loader alone: read and decode every tile, no model."""
    from wsi_convnext.data import StoreTileStream

    n = 0
    t0 = time.perf_counter()
    with StoreTileStream(stores, batch_size, num_workers=workers, pin_memory=pin) as stream:
        for batch in stream:
            n += batch.n
    return n / (time.perf_counter() - t0)


def finetune_step_throughput(model_name: str, dev: Any, batch_size: int, steps: int, amp: bool) -> float:
    """tiles/s of training steps (forward, backward, AdamW) on random tiles with a linear head."""
    import torch

    from wsi_convnext.encoders import build_encoder

    enc = build_encoder(model_name)
    enc.to(dev, channels_last=dev.type == "cuda")
    model = enc.model.train()
    head = torch.nn.Linear(enc.num_features, 2).to(dev)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-5)
    x = torch.randn(batch_size, 3, 224, 224, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps * batch_size / (time.perf_counter() - t0)


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test at tiny sizes (no GPU needed)")
    p.add_argument("--models", nargs="+", default=None, help="default convnext_tiny convnext_base")
    p.add_argument("--tiles", type=int, default=None, help="tiles per measurement (default 16384; dry run 48)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (dry run 8)")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: the machine's cores)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--repeats", type=int, default=2, help="pipeline repeats; the best is reported")
    p.add_argument("--keep", type=Path, default=None, help="build the stores in this folder and keep them")
    args = p.parse_args(argv)

    import logging

    import torch

    from embed import bare_throughput, pipeline_throughput

    from wsi_convnext._io import cpu_count
    from wsi_convnext.embed import prepare_forward
    from wsi_convnext.encoders import build_encoder

    logging.getLogger("wsi_convnext.encoders").setLevel(logging.ERROR)  # "random weights" warnings
    if not args.dry_run and not torch.cuda.is_available():
        print(f"benchmarks/gpu.sh: no CUDA GPU visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing measured. Run it on a GPU machine, or pass "
              "--dry-run for a CPU smoke test.", file=sys.stderr)  # fmt: skip
        return 0
    dry = args.dry_run
    dev = torch.device("cpu" if dry else "cuda")
    cores = cpu_count()
    workers = args.workers or cores
    models = args.models or (["convnext_atto"] if dry else ["convnext_tiny", "convnext_base"])
    n_tiles = args.tiles or (48 if dry else 16384)
    bs = args.batch_size or (8 if dry else 256)
    compiles = [False] if (dry or args.no_compile) else [False, True]
    amp = not dry
    bench = argparse.Namespace(batch_size=bs, num_workers=workers, amp=amp, channels_last=not dry, compile=False,
                               decode_on="host", device=str(dev))  # fmt: skip

    root = args.keep or Path(tempfile.mkdtemp(prefix="wsi-convnext-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str, str]] = []

    def row(what: str, config: str, bare: float | None, pipe: float | None, note: str = "") -> None:
        ratio = f"{pipe / bare:.3f}" if bare and pipe else ""
        rows.append((what, config, f"{bare:.0f}" if bare else "", f"{pipe:.0f}" if pipe else "", ratio or note))
        print(f"  {what:<22} {config:<44} bare {rows[-1][2]:>7} embed {rows[-1][3]:>7}  {rows[-1][4]}", flush=True)

    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        stores = make_stores(root, n_tiles, 1500 if dry else 12000, cores)
        total = sum(_n_tiles(s) for s in stores)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
        print(f"device: {dev} ({name}); torch {torch.__version__}; {cores} CPU cores; {total} tiles in "
              f"{len(stores)} stores, generated in {time.perf_counter() - t0:.0f} s"
              + (" [DRY RUN on CPU: tiny sizes, figures meaningless]" if dry else ""), flush=True)  # fmt: skip

        for model in models:
            enc = build_encoder(model)
            for comp in compiles:
                bench.compile = comp
                forward, prec = prepare_forward(enc, dev, amp=amp, channels_last=not dry, compile=comp)
                batch = _batch(stores[0], bs)
                bare_throughput(enc, forward, dev, batch, 2 * bs)  # warm-up, compilation
                bare = bare_throughput(enc, forward, dev, batch, total)[0]
                pipe = max(pipeline_throughput(stores, model, "patch", bench, dev, enc)[0]
                           for _ in range(args.repeats))  # fmt: skip
                layout = "channels_last" if enc.channels_last else "contiguous"
                row(model, f"{prec.name}, {layout}, compile={comp}, batch {bs}, {workers} decode thr", bare,
                    pipe)  # fmt: skip

        model = models[0]
        enc = build_encoder(model)
        bench.compile = False
        forward, _ = prepare_forward(enc, dev, amp=amp, channels_last=not dry)
        bench.num_workers = 16
        pipe = max(pipeline_throughput(stores, model, "patch", bench, dev, enc)[0] for _ in range(args.repeats))
        row(model, f"batch {bs}, 16 decode threads", None, pipe)
        bench.num_workers = workers
        if dev.type == "cuda":
            bench.decode_on = "device"
            try:
                pipe = max(pipeline_throughput(stores, model, "patch", bench, dev, enc)[0] for _ in range(args.repeats))
                row(model, f"batch {bs}, JPEG decoded on the GPU (nvJPEG)", None, pipe)
            except Exception as exc:  # torchvision without the CUDA decoder
                row(model, "JPEG decoded on the GPU", None, None, f"skipped: {type(exc).__name__}: {exc}"[:80])
            bench.decode_on = "host"
        else:
            row(model, "JPEG decoded on the GPU", None, None, "skipped: needs CUDA")
        row("loader alone", f"read + decode, batch {bs}, {workers} decode thr", None,
            loader_throughput(stores, bs, workers, pin=dev.type == "cuda"))  # fmt: skip

        if importlib.util.find_spec("wsi_convnext.finetune") is not None:
            ft_bs = 8 if dry else 128
            rate = finetune_step_throughput(model, dev, ft_bs, 2 if dry else 20, amp)
            row("fine-tuning step", f"{model}, batch {ft_bs}, bf16={amp}, AdamW", None, rate)
        else:
            row("fine-tuning step", "-", None, None, "skipped: wsi_convnext.finetune not importable")
        if importlib.util.find_spec("wsi_convnext.pretrain") is not None:
            from pretrain import bare_steps_per_second, pipeline_steps_per_second

            from wsi_convnext.pretrain import PretrainConfig

            pt_bs, pt_steps = (8, 3) if dry else (256, 30)
            pcfg = PretrainConfig(
                data=tuple(str(s) for s in stores), out=str(root / "pretrain-enc"), model=model, method="dino",
                steps=pt_steps + 3, batch_size=pt_bs, global_size=64 if dry else 96, local_size=32 if dry else 48,
                n_local=2 if dry else 4, device=str(dev), num_workers=0 if dry else workers, probe_every=10**9,
                checkpoint_every=10**9, overwrite=True,
            )  # fmt: skip
            bare_pt = bare_steps_per_second(pcfg, dev, pt_steps) * pt_bs
            pipe_pt = pipeline_steps_per_second(pcfg, 2) * pt_bs
            row("pretraining step", f"{model} DINO, batch {pt_bs}, 2+{pcfg.n_local} crops, stores→step", bare_pt, pipe_pt)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"wsi-convnext GPU benchmark, {time.strftime('%Y-%m-%d')}, {name}, {os.uname().nodename}, "
          f"{time.perf_counter() - t_start:.0f} s")  # fmt: skip
    head = ("measure", "configuration", "bare tiles/s", "embed tiles/s", "embed/bare")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


def _batch(store: Path, bs: int):
    import numpy as np

    from wsi_convnext.store import open_store

    tiles = open_store(store).read_tiles(slice(0, bs))
    return np.concatenate([tiles] * (-(-bs // len(tiles))))[:bs]


if __name__ == "__main__":
    raise SystemExit(main())
