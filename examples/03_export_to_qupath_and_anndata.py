"""Hand the stores to QuPath (GeoJSON) and scverse (AnnData), and read the results back.

Usage: ``python examples/03_export_to_qupath_and_anndata.py tiles/ --out exports/``
(stores from ``wsi-convnext tile`` + ``embed`` (+ ``predict`` for attention scores), e.g.
``examples/01_tile_embed_predict.py``). In QuPath: open the slide, File → Import objects →
``exports/qupath/<slide_id>.geojson``. Needs ``pip install "wsi-convnext[scverse]"`` for AnnData.
"""

import argparse
import json
from pathlib import Path

import anndata

from wsi_convnext.outputs.export import export_features

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("stores", nargs="+", type=Path)
parser.add_argument("--out", type=Path, default=Path("exports"))
args = parser.parse_args()

for path in export_features(args.stores, args.out / "qupath", fmt="geojson", overwrite=True):
    kinds = [f["properties"]["objectType"] for f in json.loads(path.read_text())["features"]]
    print(f"{path}: {kinds.count('annotation')} tissue annotation, {kinds.count('detection')} tile detections")

(cohort,) = export_features(args.stores, args.out, fmt="anndata", cohort=True, overwrite=True)
ad = anndata.read_h5ad(cohort)
print(f"{cohort}: {ad.n_obs} tiles × {ad.n_vars} features from {ad.obs['slide_id'].nunique()} slides; "
      f"obs columns {list(ad.obs.columns)}; mpp {ad.uns['wsi_convnext']['mpp']}")
