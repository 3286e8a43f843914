"""Embedding stores: real tiles (CMU-1 via OpenSlide) → real zarr store → real ConvNeXt (atto, random)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cmu_stores import read_cmu_tiles, write_store
from wsi_convnext import __version__
from wsi_convnext.embed import TileBatchLoader, embed_store, embed_stores
from wsi_convnext.encoder import build_encoder
from wsi_convnext.errors import ConfigError, DeviceError, InputNotFoundError
from wsi_convnext.store import open_store

MODEL = "convnext_atto"
N_TILES = 40
BATCH = 16  # 40 tiles -> batches of 16, 16 and a partial 8


@pytest.fixture(scope="module")
def cmu_tiles(cmu_slide: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_cmu_tiles(cmu_slide, N_TILES)


@pytest.fixture(scope="module")
def template_store(cmu_tiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiles, coords = cmu_tiles
    return write_store(tmp_path_factory.mktemp("template") / "cmu.zarr", tiles, coords)


@pytest.fixture
def store_path(template_store: Path, tmp_path: Path) -> Path:
    """A fresh copy of the real store (tests write features into it)."""
    dst = tmp_path / "stores" / template_store.name
    shutil.copytree(template_store, dst)
    return dst


@pytest.fixture(scope="module")
def encoders() -> dict[str, object]:
    torch.manual_seed(0)
    return {stem: build_encoder(MODEL, stem=stem) for stem in ("patch", "overlap")}


def _feature_entries(store: Path) -> list[str]:
    """Everything in ``features/`` but the group's own metadata (arrays, partials, trash)."""
    return sorted(p.name for p in (store / "features").iterdir() if p.name != "zarr.json")


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wsi-convnext-decode")]


@pytest.fixture(scope="module")
def embedded(template_store: Path, encoders, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One store embedded by both stems (default dtype), with the progress calls and results."""
    path = tmp_path_factory.mktemp("embedded") / "cmu.zarr"
    shutil.copytree(template_store, path)
    out: dict[str, object] = {"path": path}
    for stem, enc in encoders.items():
        seen: list[tuple[int, int]] = []
        res = embed_store(
            path, enc, batch_size=BATCH, device="cpu", num_workers=2,
            progress=lambda done, total: seen.append((done, total)),
        )  # fmt: skip
        out[stem] = (res, seen)
    return out


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_embeddings_match_single_tile_forward(embedded, encoders, stem: str) -> None:
    enc = encoders[stem]
    res, seen = embedded[stem]
    assert res.status == "done" and not res.skipped and res.error is None
    assert (res.n_tiles, res.key, res.slide_id, res.precision) == (N_TILES, enc.key, "cmu", "float32")
    assert seen == [(16, 40), (32, 40), (40, 40)]

    store = open_store(embedded["path"])
    feats = store.features(enc.key)
    assert feats.shape == (N_TILES, enc.num_features)
    assert feats.dtype == np.float16  # the default
    assert np.isfinite(feats).all()

    # Row i is the encoder applied to tile i alone (in the last, partial batch too).
    tol = 2e-3
    for i in (0, 17, 39):
        alone = enc(store.tile(i)[None]).numpy()[0]
        np.testing.assert_allclose(feats[i].astype(np.float32), alone, atol=tol, rtol=tol)
    # ... and not any other tile: rows are distinct.
    assert np.abs(feats[0].astype(np.float32) - feats[39].astype(np.float32)).max() > 10 * tol

    attrs = store.feature_attrs(enc.key)
    assert attrs["model"] == MODEL and attrs["stem"] == stem
    assert attrs["weights_sha256"] == "random"
    assert attrs["dtype"] == "float16" and attrs["compute_precision"] == "float32"
    assert attrs["preprocessing"]["mean"] == enc.preprocessing["mean"]
    assert attrs["package_version"] == __version__ and attrs["n_tiles"] == N_TILES
    assert not _decode_threads()


def test_two_encoders_coexist(embedded, encoders) -> None:
    store = open_store(embedded["path"])
    keys = [encoders["patch"].key, encoders["overlap"].key]
    assert keys[0] != keys[1]
    assert sorted(store.feature_keys) == sorted(keys)
    assert _feature_entries(embedded["path"]) == sorted(keys)
    assert [store.feature_attrs(k)["stem"] for k in keys] == ["patch", "overlap"]
    assert np.abs(store.features(keys[0]).astype(np.float32) - store.features(keys[1])).max() > 1e-2


def test_rerun_skips_and_overwrite_redoes(store_path: Path, encoders) -> None:
    enc = encoders["patch"]
    embed_store(store_path, enc, batch_size=BATCH, device="cpu")
    meta = store_path / "features" / enc.key / "zarr.json"
    before = (meta.stat().st_ino, meta.stat().st_mtime_ns)
    first = open_store(store_path).features(enc.key)

    again = embed_store(store_path, enc, batch_size=BATCH, device="cpu")
    assert again.skipped and again.status == "skipped" and again.n_tiles == N_TILES
    assert (meta.stat().st_ino, meta.stat().st_mtime_ns) == before

    redo = embed_store(store_path, enc, batch_size=BATCH, device="cpu", overwrite=True, dtype="float32")
    assert not redo.skipped and redo.status == "done" and redo.key == enc.key
    assert (meta.stat().st_ino, meta.stat().st_mtime_ns) != before
    store = open_store(store_path)
    assert store.feature_keys == [enc.key] and store.features(enc.key).dtype == np.float32
    redone = store.features(enc.key)
    np.testing.assert_allclose(redone, first.astype(np.float32), atol=2e-3, rtol=2e-3)
    # float32 output keeps full precision: equal to the single-tile forward, not just to fp16.
    np.testing.assert_allclose(redone[37], enc(store.tile(37)[None]).numpy()[0], atol=1e-5, rtol=1e-5)
    assert _feature_entries(store_path) == [enc.key]  # no trash, no partials


def _make_half_written(template: Path, dst: Path) -> Path:
    shutil.copytree(template, dst)
    meta_file = dst / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["complete"]  # killed before commit finished
    meta_file.write_text(json.dumps(meta))
    return dst


def test_bad_stores_are_reported_and_the_rest_continue(template_store: Path, cmu_tiles, tmp_path: Path) -> None:
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copytree(template_store, folder / "b_good.zarr")
    foreign = zarr.open_group(str(folder / "a_foreign.zarr"), mode="w")
    foreign.create_array("x", shape=(3,), dtype="i4")
    _make_half_written(template_store, folder / "c_half.zarr")
    tiles, coords = cmu_tiles
    encoded = [b"\xff\xd8 definitely not a jpeg" if i == 21 else None for i in range(N_TILES)]
    from wsi_convnext.store import encode_tile

    encoded = [e if e is not None else encode_tile(t) for e, t in zip(encoded, tiles)]
    write_store(folder / "d_corrupt.zarr", tiles, coords, encoded=encoded)

    got: list[str] = []
    results = embed_stores(
        [folder], model=MODEL, batch_size=BATCH, device="cpu", on_result=lambda r: got.append(r.store_path.name)
    )
    by_id = {r.store_path.name.removesuffix(".zarr"): r for r in results}
    assert got == ["a_foreign.zarr", "b_good.zarr", "c_half.zarr", "d_corrupt.zarr"]
    assert by_id["b_good"].status == "done" and by_id["b_good"].n_tiles == N_TILES
    for sid, words in {
        "a_foreign": "foreign zarr group",
        "c_half": "incomplete store",
        "d_corrupt": "tile 21 cannot be decoded",
    }.items():
        r = by_id[sid]
        assert r.status == "failed" and r.error_type == "StoreError", r
        assert words in r.error and str(folder / f"{sid}.zarr") in r.error
        assert "\n" not in r.error
    # The corrupt store got nothing, not even a hidden partial array.
    assert _feature_entries(folder / "d_corrupt.zarr") == []
    assert open_store(folder / "b_good.zarr").feature_keys == [by_id["b_good"].key]


def test_folder_without_stores(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no"):
        embed_stores([tmp_path / "empty"], model=MODEL, device="cpu")
    with pytest.raises(InputNotFoundError, match="missing"):
        embed_stores([tmp_path / "missing"], model=MODEL, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(store_path: Path, encoders) -> None:
    with pytest.raises(DeviceError, match="'cuda'.*--device cpu"):
        embed_stores([store_path], model=MODEL, device="cuda")
    with pytest.raises(DeviceError):
        embed_store(store_path, encoders["patch"], device="cuda")
    assert open_store(store_path).feature_keys == []


def test_bad_options(store_path: Path, encoders) -> None:
    with pytest.raises(ConfigError, match="--dtype"):
        embed_store(store_path, encoders["patch"], dtype="float64", device="cpu")
    with pytest.raises(ConfigError, match="--batch-size"):
        embed_stores([store_path], model=MODEL, batch_size=0, device="cpu")


def test_error_inside_the_loop_leaves_nothing(store_path: Path, encoders) -> None:
    """A run killed mid-way (here: the progress callback raises after batch 2) writes nothing."""

    def boom(done: int, total: int) -> None:
        if done >= 32:
            raise KeyboardInterrupt("killed")

    enc = encoders["overlap"]
    with pytest.raises(KeyboardInterrupt):
        embed_store(store_path, enc, batch_size=BATCH, device="cpu", num_workers=2, progress=boom)
    store = open_store(store_path)
    assert store.feature_keys == []
    assert _feature_entries(store_path) == []
    assert not _decode_threads()


@pytest.mark.parametrize("num_workers", [0, 3])
def test_loader_yields_every_tile_in_order(template_store: Path, num_workers: int) -> None:
    store = open_store(template_store)
    with TileBatchLoader(store, 12, num_workers=num_workers, prefetch=2, pad=True) as loader:
        spans = []
        for start, stop, batch in loader:
            assert batch.shape == (12, 224, 224, 3) and batch.dtype == torch.uint8
            np.testing.assert_array_equal(batch[: stop - start].numpy(), store.read_tiles(slice(start, stop)))
            assert not batch[stop - start :].any()  # padding rows are zero
            spans.append((start, stop))
    assert spans == [(0, 12), (12, 24), (24, 36), (36, 40)] and len(loader) == 4
    assert not _decode_threads()


@pytest.fixture
def small_store(cmu_tiles, tmp_path: Path) -> Path:
    """12 real tiles: 8 blank ones and 4 with tissue."""
    tiles, coords = cmu_tiles
    return write_store(tmp_path / "small" / "cmu12.zarr", tiles[:12], coords[:12])


def test_stain_normalised_embeddings_coexist_with_raw_ones(small_store: Path, encoders) -> None:
    from wsi_convnext.transforms import build_transform

    store_path, enc = small_store, encoders["patch"]
    raw = embed_store(store_path, enc, batch_size=BATCH, device="cpu")
    macenko = build_transform("macenko")
    normed = embed_store(store_path, enc, batch_size=BATCH, device="cpu", transform=macenko)
    assert normed.key == f"{enc.key}-{macenko.key}" != raw.key
    store = open_store(store_path)
    assert set(store.feature_keys) == {raw.key, normed.key}
    a, b = store.features(raw.key).astype(np.float32), store.features(normed.key).astype(np.float32)
    assert np.abs(a - b).mean() > 0.05 * np.abs(a).mean()  # measurably different
    attrs = store.feature_attrs(normed.key)["transform"]
    assert attrs["name"] == "macenko" and attrs["key"] == macenko.key and attrs["reference"] == "built-in"
    assert attrs["stats"] == {"tiles": 12, "identity_fallbacks": 8}  # the blank tiles are left as they are
    again = embed_store(store_path, enc, batch_size=BATCH, device="cpu", transform=build_transform("macenko"),
                        overwrite=True)  # fmt: skip
    assert again.key == normed.key
    np.testing.assert_array_equal(open_store(store_path).features(normed.key).astype(np.float32), b)  # deterministic


def test_cli_embed_with_stain(small_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_convnext.cli import app

    runner, store_path = CliRunner(), small_store
    args = ["embed", str(store_path), "--model", MODEL, "--device", "cpu", "--batch-size", "20"]
    res = runner.invoke(app, [*args, "--stain", "reinhard"])
    assert res.exit_code == 0, res.output
    (key,) = open_store(store_path).feature_keys
    assert re.fullmatch(rf"{MODEL}-patch-random-reinhard-[0-9a-f]{{8}}", key)
    res = runner.invoke(app, [*args, "--stain", "none", "--stain-reference", str(tmp_path / "ref.png")])
    assert res.exit_code == 2 and "--stain-reference" in res.output
    res = runner.invoke(app, [*args, "--stain", "hed_jitter"])
    assert res.exit_code == 2 and "none, macenko, reinhard" in res.output
