"""Read a wsi-convnext tile store with nothing but zarr and imagecodecs (docs/store.md is the contract).

Usage: ``python examples/02_read_store_with_plain_zarr.py tiles/SLIDE.zarr``
This script never imports wsi_convnext: any tool can read the stores the same way.
"""

import json
import sys
import warnings
from pathlib import Path

import imagecodecs
import zarr

warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")  # vlen-bytes tiles
path = Path(sys.argv[1])
g = zarr.open_group(str(path), mode="r")
a = g.attrs
# Schema 2 adds metadata digests (docs/store.md, Integrity); the layout read here is the same as in 1.
assert a["kind"] == "wsi-convnext.tiles" and a["complete"] is True and a["schema_version"] in (1, 2), "not a store"
n, t = a["n_tiles"], a["tile_size"]
coords = g["coords"][:]  # (N, 2) int64, level-0 (x, y) of each tile's top-left corner
tissue = g["tissue_fraction"][:]  # (N,) float32 in [0, 1]
decode = {"jpeg": imagecodecs.jpeg_decode, "png": imagecodecs.png_decode}[a["tile_encoding"]]
tile0 = decode(g["tiles"][0:1][0])  # (T, T, 3) uint8 RGB
assert coords.shape == (n, 2) and tissue.shape == (n,) and tile0.shape == (t, t, 3)
print(f"{a['slide_id']}: {n} tiles of {t} px at {a['target_mpp']} µm/px, each {a['extent0']:.1f} level-0 px "
      f"(slide {a['slide_mpp']} µm/px); mask {g['tissue_mask'].shape} at {a['mask_downsample']:.1f} level-0 px/px")


def complete_arrays(folder: str) -> list[str]:
    """Finished arrays in features/ or scores/ (hidden names are writes in progress)."""
    root = path / folder
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    return [k for k in names if json.loads((root / k / "zarr.json").read_text())["attributes"].get("complete") is True]


for key in complete_arrays("features"):
    feats = zarr.open_array(str(path / "features" / key), mode="r")
    assert feats.shape[0] == n
    print(f"features/{key}: {feats.shape} {feats.dtype}, model {feats.attrs['model']}, stem {feats.attrs['stem']}")
for name in complete_arrays("scores"):
    scores = zarr.open_array(str(path / "scores" / name), mode="r")
    print(f"scores/{name}: {scores.shape}, {scores.attrs.get('score')}, top tile at {coords[scores[:].argmax(0)].tolist()}")
