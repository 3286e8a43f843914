"""Does the stem matter? Train the same ConvNeXt with the patch and the overlapping stem.

Usage:
    python examples/04_compare_stems.py DATA [--out DIR] [--steps N] [--seeds K]
    python examples/04_compare_stems.py --quick          # generated tiles, a few seconds

DATA is an image folder (one sub-folder per class) or a CSV ``path,label[,group]``, e.g.
``../shared/tiles/lc25000-lung/labels.csv`` (split by ``group``). Each stem gets the same
budget, augmentations and seeds; the table shows the validation balanced accuracy and macro
AUC at each run's best epoch. For the full study with a held-out test split and confidence
intervals, see ``benchmarks/stem.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_convnext.finetune import FinetuneConfig, finetune_encoder


def generated_tiles(root: Path, n: int = 12, size: int = 64) -> Path:
    """Two classes of noisy tiles (reddish vs bluish): enough to show the script end to end."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("blue", "red")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            img[..., 0 if k else 2] += 120
            Image.fromarray(img).save(root / name / f"{name}{i:02d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", help="image folder or CSV path,label[,group]")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="generated tiles, 2 steps, 1 seed")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="stems-"))
    if args.quick:
        data, steps, seeds, size = str(generated_tiles(out / "tiles")), 2, 1, 64
    elif args.data:
        data, steps, seeds, size = args.data, args.steps, args.seeds, 112
    else:
        ap.error("give DATA or --quick")

    print(f"{'stem':<10} {'seed':>4} {'val bal. acc':>12} {'val AUC':>8}")
    summary: dict[str, list[float]] = {}
    for stem in ("patch", "overlap"):
        for seed in range(seeds):
            cfg = FinetuneConfig(
                data=(data,), out=str(out / f"{stem}-{seed}"), model="convnext_atto", stem=stem, steps=steps,
                batch_size=8 if args.quick else 32, crop_size=size, eval_size=size, seed=seed, device="cpu",
                num_workers=0, threads=1 if args.quick else None, val_frac=0.25,
            )  # fmt: skip
            enc_dir = finetune_encoder(cfg)
            best = json.loads((enc_dir / "metrics.json").read_text())["best_val"] or {}
            bal = (best.get("balanced_accuracy") or {}).get("value", float("nan"))
            auc = (best.get("auc") or {}).get("value", float("nan"))
            summary.setdefault(stem, []).append(bal)
            print(f"{stem:<10} {seed:>4} {bal:>12.3f} {auc:>8.3f}")
    for stem, values in summary.items():
        print(f"{stem}: mean val balanced accuracy {statistics.fmean(values):.3f} over {len(values)} seed(s)")
    print(f"encoders in {out}  (embed one with: wsi-convnext embed STORES --weights {out}/overlap-0)")


if __name__ == "__main__":
    main()
