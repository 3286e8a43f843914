"""The same commands produce the same stores: a run pinned against arrays of an earlier version.

``fixtures/pinned_store.npz`` was written by wsi-convnext at commit ``aa2d022`` (before the
package was restructured into ``slide/``, ``encoders/``, ``data/``, ``cohort/``...): a generated
slide tiled with ``wsi-convnext tile --mpp 0.5`` and embedded with
``wsi-convnext embed --model convnext_atto --stem overlap`` (random weights, fixed seed).
Re-running the same commands must give the same coords, tissue fractions, tile bytes and
features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_convnext.cli import app
from wsi_convnext.store import open_store
from wsi_convnext.synthetic import SyntheticSlideSpec, TissueSpec, write_synthetic_slide

FIXTURE = Path(__file__).parent / "fixtures" / "pinned_store.npz"


@pytest.mark.slow
def test_tile_and_embed_reproduce_the_pinned_store(tmp_path: Path) -> None:
    pinned = np.load(FIXTURE)
    spec = SyntheticSlideSpec(width=2400, height=1800, mpp=0.5, seed=11, downsamples=(1, 4), lesions=1,
                              tissue=TissueSpec(n_blobs=2, coverage=0.4))  # fmt: skip
    slide = write_synthetic_slide(tmp_path / "pinned.svs", spec)
    runner = CliRunner()
    tiles = tmp_path / "tiles"
    r = runner.invoke(app, ["tile", str(slide.path), "--out", str(tiles), "--mpp", "0.5", "--workers", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["embed", str(tiles), "--model", "convnext_atto", "--stem", "overlap", "--device", "cpu",
                            "--batch-size", "16"])  # fmt: skip
    assert r.exit_code == 0, r.output

    store = open_store(tiles / "pinned.zarr")
    np.testing.assert_array_equal(store.coords, pinned["coords"])
    np.testing.assert_array_equal(store.tissue_fraction, pinned["tissue_fraction"])
    raw = store.tile_bytes(slice(None))
    sha = np.array([hashlib.sha256(bytes(t)).hexdigest()[:16] for t in raw])
    np.testing.assert_array_equal(sha, pinned["tile_sha"])
    key = str(pinned["key"])
    assert store.feature_keys == [key]
    # float16 features; 1e-3 leaves room for BLAS differences between machines, not for a change.
    np.testing.assert_allclose(store.features(key).astype(np.float32), pinned["features"].astype(np.float32),
                               atol=1e-3, rtol=1e-3)  # fmt: skip
