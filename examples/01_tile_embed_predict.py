"""From slides to slide probabilities with the Python API: tile, embed, train MIL, predict.

Runs on a generated cohort (``wsi_convnext.synthetic``) with a random-weight ConvNeXt-atto
(pass real weights with ``build_encoder(..., weights=PATH)`` / ``embed_stores(weights=...)``).
Usage: ``python examples/01_tile_embed_predict.py [--out DIR] [--quick]``
"""

import argparse
from pathlib import Path

from wsi_convnext.embed import embed_stores
from wsi_convnext.inputs import discover_slides
from wsi_convnext.mil.api import predict, train
from wsi_convnext.mil.training import TrainConfig
from wsi_convnext.synthetic import make_cohort
from wsi_convnext.tiling.tiler import TileParams, tile_slides

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("example-01"))
parser.add_argument("--quick", action="store_true", help="6 small slides, 5 epochs (a test-sized run)")
args = parser.parse_args()

n, size = (6, (2000, 1600)) if args.quick else (16, (4500, 4000))
make_cohort(args.out / "slides", n, size=size, mpp=0.5, lesion_fraction=(0.05, 0.1), seed=0)  # + labels.csv
tiled = tile_slides(discover_slides([args.out / "slides"]), args.out / "tiles", TileParams(mpp=0.5, tile_size=224))
stores = [r.store_path for r in tiled if r.status != "failed"]
embed_stores(stores, model="convnext_atto", stem="overlap", device="cpu", batch_size=32)
config = TrainConfig(aggregator="abmil", folds=2, epochs=5 if args.quick else 60)
report = train(stores, args.out / "slides" / "labels.csv", args.out / "model", config, overwrite=True)
print(report.table)
for p in predict(args.out / "model", stores):
    print(p.slide_id, p.predicted, {c: round(v, 3) for c, v in p.probabilities.items()})
