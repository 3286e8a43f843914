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
from wsi_convnext.embed import embed_store, embed_stores
from wsi_convnext.encoders import build_encoder
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
    assert res.status == "done" and not res.skipped and not res.error
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
        # A tile that cannot be decoded is damage: the message says to re-tile.
        expected = "StoreDamagedError" if sid == "d_corrupt" else "StoreError"
        assert r.status == "failed" and r.error_type == expected, r
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
    with pytest.raises(ConfigError, match="^dtype must be one of 'float16', 'float32', got 'float64'$") as info:
        embed_store(store_path, encoders["patch"], dtype="float64", device="cpu")
    assert info.value.as_flag().startswith("--dtype must be one of")  # what the CLI prints
    with pytest.raises(ConfigError, match="^batch_size must be at least 1, got 0$") as info:
        embed_stores([store_path], model=MODEL, batch_size=0, device="cpu")
    assert info.value.as_flag() == "--batch-size must be at least 1, got 0"


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


@pytest.fixture(scope="module")
def cohort_folder(template_store: Path, cmu_tiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real stores of 40, 7 and 40 tiles: batches of 16 cross both store boundaries."""
    folder = tmp_path_factory.mktemp("cohort3")
    shutil.copytree(template_store, folder / "a.zarr")
    tiles, coords = cmu_tiles
    write_store(folder / "b.zarr", tiles[5:12], coords[5:12])
    shutil.copytree(template_store, folder / "c.zarr")
    return folder


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


@pytest.fixture(scope="module")
def weights_file(encoders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The patch encoder's random weights as a file, so other processes build the same encoder."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "atto.safetensors"
    save_file({k: v.contiguous() for k, v in encoders["patch"].model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def embedded_alone(cohort_folder: Path, weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three stores embedded one by one (float32), the reference for the stream tests."""
    alone = _copy(cohort_folder, tmp_path_factory.mktemp("alone") / "stores")
    enc = build_encoder(MODEL, stem="patch", weights=weights_file)
    for name in ("a", "b", "c"):
        embed_store(alone / f"{name}.zarr", enc, batch_size=BATCH, device="cpu", dtype="float32")
    return alone


def _assert_same_features(folder: Path, reference: Path, key: str, tol: float = 1e-5) -> None:
    for name in ("a", "b", "c"):
        got, want = open_store(folder / f"{name}.zarr"), open_store(reference / f"{name}.zarr")
        np.testing.assert_allclose(got.features(key), want.features(key), atol=tol, rtol=tol)


def test_many_stores_stream_through_one_loader(
    cohort_folder: Path, embedded_alone: Path, weights_file: Path, tmp_path: Path
) -> None:
    """Cross-store batches give each slide the rows that embedding it alone gives, in store order."""
    together = _copy(cohort_folder, tmp_path / "together")
    got, seen = [], []
    results = embed_stores(
        [together], model=MODEL, stem="patch", weights=weights_file, batch_size=BATCH, device="cpu",
        dtype="float32", num_workers=2, on_result=lambda r: got.append(r.store_path.stem),
        progress=lambda d, t: seen.append((d, t)),
    )  # fmt: skip
    assert [r.store_path.stem for r in results] == got == ["a", "b", "c"]
    assert [(r.status, r.n_tiles) for r in results] == [("done", 40), ("done", 7), ("done", 40)]
    # batch 3 holds a's last 8 tiles, all 7 of b and c's first one: no partial batch in between
    assert seen[:5] == [(16, 40), (32, 40), (40, 40), (7, 7), (1, 40)] and seen[-1] == (40, 40)
    (key,) = {r.key for r in results}
    _assert_same_features(together, embedded_alone, key)
    assert not _decode_threads()


def test_auto_thread_budget_is_measured_and_restored(cohort_folder: Path, embedded_alone: Path,
                                                     weights_file: Path, tmp_path: Path) -> None:  # fmt: skip
    from wsi_convnext.embed.threads import _THREAD_PLANS

    folder = _copy(cohort_folder, tmp_path / "auto")
    threads = torch.get_num_threads()
    enc = build_encoder(MODEL, stem="patch", weights=weights_file)
    _THREAD_PLANS.clear()
    results = embed_stores([folder], model=MODEL, stem="patch", weights=weights_file, batch_size=BATCH,
                           device="cpu", dtype="float32")  # fmt: skip
    assert [r.status for r in results] == ["done"] * 3
    (plan,) = _THREAD_PLANS.values()  # decided after a warm-up and two timed full batches
    assert sum(plan) <= threads and plan[1] >= 1
    assert torch.get_num_threads() == threads  # restored
    _assert_same_features(folder, embedded_alone, enc.key)
    assert not _decode_threads()


class _Invert:
    """A trivial tile transform (float RGB in [0, 1] -> 1 - x) with the TileTransform interface."""

    key = "invert-0001"
    attrs = {"name": "invert", "reference": None}

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.shape[1] == 3 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        self.calls += 1
        return 1.0 - x

    def stats(self) -> dict[str, int]:
        return {"batches": self.calls}


def test_tile_transform_is_applied_before_normalisation(store_path: Path, encoders) -> None:
    enc = encoders["patch"]
    res = embed_store(store_path, enc, batch_size=BATCH, device="cpu", dtype="float32", transform=_Invert())
    assert res.status == "done" and res.key == f"{enc.key}-invert-0001"
    store = open_store(store_path)
    assert store.feature_keys == [res.key]
    attrs = store.feature_attrs(res.key)
    assert attrs["transform"] == {"key": "invert-0001", "attrs": {"name": "invert", "reference": None},
                                  "stats": {"batches": 3}}  # fmt: skip
    assert attrs["key"] == res.key and attrs["model"] == MODEL
    feats = store.features(res.key)
    for i in (0, 39):
        inverted = enc((255 - store.tile(i))[None]).numpy()[0]
        np.testing.assert_allclose(feats[i], inverted, atol=1e-4, rtol=1e-4)
    assert np.abs(feats[0] - enc(store.tile(0)[None]).numpy()[0]).max() > 1e-2  # not the plain embedding


def test_tiles_too_small_for_the_model(cmu_tiles, template_store: Path, tmp_path: Path) -> None:
    """A store tiled at 8 px fails with one line naming the store and the minimum; the others go on."""
    from typer.testing import CliRunner

    from wsi_convnext.cli import app

    tiles, coords = cmu_tiles
    folder = tmp_path / "stores"
    write_store(folder / "tiny.zarr", np.ascontiguousarray(tiles[:5, :8, :8]), coords[:5])
    shutil.copytree(template_store, folder / "ok.zarr")
    res = CliRunner().invoke(app, ["embed", str(folder), "--model", MODEL, "--device", "cpu", "--batch-size", "16"])
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert str(folder / "tiny.zarr") in line and "8 px" in line and "at least 32 px" in line and "--tile-size 32" in line
    assert "Traceback" not in res.output
    assert open_store(folder / "ok.zarr").feature_keys and not open_store(folder / "tiny.zarr").feature_keys


def test_split_stores_balances_tiles() -> None:
    from wsi_convnext.embed import split_stores

    assert split_stores([40, 7, 40], 2) == [[0, 1], [2]]
    assert split_stores([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert split_stores([3], 3) == [[0], [], []]
    shards = split_stores([100, 1, 1, 1, 90, 10], 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    assert [sum([100, 1, 1, 1, 90, 10][i] for i in s) for s in shards] == [102, 101]


@pytest.mark.slow
def test_devices_split_stores_over_processes(cohort_folder: Path, embedded_alone: Path, weights_file: Path,
                                             tmp_path: Path) -> None:  # fmt: skip
    """`--devices cpu,cpu` runs two real processes; the stores get the single-process features."""
    import multiprocessing

    folder = _copy(cohort_folder, tmp_path / "two")
    children: list[list[str]] = []

    def progress(done: int, total: int) -> None:
        children.append(sorted(p.name for p in multiprocessing.active_children()))

    results = embed_stores(
        [folder], model=MODEL, stem="patch", weights=weights_file, batch_size=BATCH, devices=["cpu", "cpu"],
        dtype="float32", progress=progress,
    )  # fmt: skip
    assert [(r.store_path.stem, r.status) for r in results] == [("a", "done"), ("b", "done"), ("c", "done")]
    assert children[0] == ["wsi-convnext-embed-0-cpu", "wsi-convnext-embed-1-cpu"]
    assert not multiprocessing.active_children()
    _assert_same_features(folder, embedded_alone, results[0].key, tol=1e-4)


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
    assert attrs["attrs"]["name"] == "macenko" and attrs["key"] == macenko.key and attrs["attrs"]["reference"] == "built-in"
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



def test_features_written_by_another_run_meanwhile_are_kept(store_path: Path, encoders) -> None:
    """Issue 12 item 2: when another run writes the same key while this one computes, its array is kept."""
    enc = encoders["patch"]

    class OtherRunWrites(_Invert):
        """On the first batch, "another run" commits features/<key> (through the locked writer)."""

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            if self.calls == 0:
                store = open_store(store_path)
                store.write_features(f"{enc.key}-{self.key}", np.full((len(store), enc.num_features), 7, np.float16),
                                     {"model": "other run"})  # fmt: skip
            return super().__call__(x)

    res = embed_store(store_path, enc, batch_size=BATCH, device="cpu", transform=OtherRunWrites())
    assert res.status == "skipped" and res.skipped
    store = open_store(store_path)
    np.testing.assert_array_equal(store.features(res.key), 7)
    assert store.feature_attrs(res.key)["model"] == "other run"
