"""Integrity on every read (issue 20): one flipped bit in any chunk or in the defining metadata.

Every command that reads a store notices it, fails that store in one line and goes on with
the others (exit 1, no traceback; ``train`` and ``finetune`` train on the others and name it);
``embed`` never writes features over damaged tiles; an h5 export reads no tile chunk; a store
swapped under a reader by another run is reported as replaced, not as damaged.
Real stores of CMU-1 tiles, real ConvNeXt embeddings, a real MIL model, real zarr files.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmu_stores import read_cmu_tiles, write_store
from wsi_convnext.cli import app
from wsi_convnext.errors import StoreDamagedError, StoreReplacedError
from wsi_convnext.store import SCHEMA_VERSION, open_store, verify_store

runner = CliRunner()
N = 16
IDS = ("s0", "s1", "s2", "s3")
BAD = "s1"
MODEL = "convnext_atto"
THUMB = {"thumbnail_downsample": 512.0, "mask_downsample": 512.0}  # write_store's 8 × 8 thumbnail
LABELS = {"s0": "normal", "s1": "tumor", "s2": "normal", "s3": "tumor"}


@pytest.fixture(scope="module")
def cohort(cmu_slide, tmp_path_factory) -> dict[str, Path | str]:
    """Four embedded stores (real atto features), a saved MIL model, and its scores in every store."""
    from wsi_convnext.embed import embed_stores
    from wsi_convnext.mil.api import predict
    from wsi_convnext.mil.checkpoint import save_model
    from wsi_convnext.mil.model import FeatureStats, TrainedModel, new_model

    root = tmp_path_factory.mktemp("integrity")
    tiles, coords = read_cmu_tiles(cmu_slide, 3 * N)
    folder = root / "stores"
    for k, sid in enumerate(IDS):
        write_store(folder / f"{sid}.zarr", tiles[k * 8 : k * 8 + N], coords[k * 8 : k * 8 + N], attrs=THUMB)
    (res, *_) = embed_stores([folder], model=MODEL, device="cpu", batch_size=8)
    d = open_store(res.store_path).features(res.key).shape[1]
    stats = FeatureStats(np.zeros(d, np.float32), np.ones(d, np.float32))
    module, kwargs = new_model("abmil", d, 2, stats, {})
    model = TrainedModel(module, ("normal", "tumor"), "abmil", kwargs, feature_key=res.key, positive_class="tumor")
    model_dir = save_model(root / "model", model, name="mil-test")
    predict(model_dir, sorted(folder.iterdir()), write_scores=True)
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{s},{lab}\n" for s, lab in LABELS.items()))
    return {"folder": folder, "model": model_dir, "labels": labels, "key": res.key}


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _first_chunk(array_dir: Path) -> Path:
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json")[0]


def _only_array(folder: Path) -> Path:
    (array_dir,) = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return array_dir


def damage(store: Path, what: str) -> None:
    """Flip one bit of ``store``: in the middle of the first chunk of array ``what``, or in its metadata.

    ``zarr.json``: a digit of the group's ``target_mpp``; ``features-meta``: a letter of the
    feature array's ``model`` attr (both stay valid JSON).
    """
    if what == "zarr.json":
        meta = store / "zarr.json"
        m = re.search(rb'"target_mpp": 0\.\d*([1-9])', meta.read_bytes())
        _flip_bit(meta, m.start(1))
        return
    if what == "coords-meta":  # the row count: zarr alone would read 17 coords for 16 tiles
        meta = store / "coords" / "zarr.json"
        m = re.search(rb'"shape": \[\s*\d*(\d)', meta.read_bytes())
        _flip_bit(meta, m.start(1))
        return
    if what == "features-meta":
        meta = _only_array(store / "features") / "zarr.json"
        _flip_bit(meta, meta.read_bytes().index(b'"model": "convnext') + 12)
        return
    array_dir = _only_array(store / what) if what in ("features", "scores") else store / what
    chunk = _first_chunk(array_dir)
    _flip_bit(chunk, chunk.stat().st_size // 2)


@pytest.fixture()
def stores(cohort, tmp_path) -> Path:
    folder = tmp_path / "stores"
    shutil.copytree(cohort["folder"], folder)
    return folder


def _failed_one(res, bad: Path, *needles: str) -> str:
    """The command exited 1 without a traceback, and one error line names ``bad`` and each needle."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.output
    assert str(bad) in errors[0] and all(n in errors[0] for n in needles), errors[0]
    return errors[0]


def _damage_words(what: str) -> tuple[str, ...]:
    if what == "zarr.json":
        return ("store damaged", "zarr.json fails its metadata checksum")
    if what == "features-meta":
        return ("store damaged", "features/", "zarr.json fails its metadata checksum")
    if what == "coords-meta":
        return ("store damaged", "coords: zarr.json")
    return ("store damaged", f"{what}", "fails its sha256 checksum")


ALL = (
    "tiles", "coords", "tissue_fraction", "thumbnail", "tissue_mask", "features", "scores",
    "zarr.json", "features-meta", "coords-meta",
)  # fmt: skip


def test_a_sealed_store_is_schema_2_and_verifies(cohort) -> None:
    store = open_store(cohort["folder"] / "s0.zarr")
    assert store.attrs["schema_version"] == SCHEMA_VERSION == 2 and store.attrs["metadata_sha256"]
    assert verify_store(store.path).status == "ok"


@pytest.mark.parametrize("what", ALL)
def test_verify_notices_a_flipped_bit_and_goes_on(stores, what) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    res = runner.invoke(app, ["verify", str(stores)])
    _failed_one(res, bad, *_damage_words(what))
    assert "3 of 4 stores verified without damage" in res.output


@pytest.mark.parametrize("what", ["tiles", "zarr.json"])
def test_embed_overwrite_never_writes_features_over_damaged_tiles(stores, cohort, what) -> None:
    bad = stores / f"{BAD}.zarr"
    key = str(cohort["key"])
    meta = bad / "features" / key / "zarr.json"
    before = meta.read_bytes()
    damage(bad, what)
    res = runner.invoke(app, ["embed", str(stores), "--model", MODEL, "--device", "cpu", "--batch-size", "8", "--overwrite"])
    _failed_one(res, bad, *_damage_words(what))
    assert meta.read_bytes() == before  # no fresh checksums over features of corrupted tiles
    for sid in ("s0", "s2", "s3"):  # the others were re-embedded
        assert (stores / f"{sid}.zarr" / "features" / key / "zarr.json").read_bytes() != before


def test_predict_heatmaps_go_on_past_a_damaged_thumbnail(stores, cohort, tmp_path) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, "thumbnail")  # predict itself needs no thumbnail: only its heatmap fails
    hm = tmp_path / "hm"
    res = runner.invoke(app, ["predict", str(cohort["model"]), str(stores), "--out", str(tmp_path / "p.csv"), "--heatmaps", str(hm)])
    _failed_one(res, bad, *_damage_words("thumbnail"))
    assert sorted(p.name for p in hm.glob("*.heatmap.png")) == [f"{s}.heatmap.png" for s in ("s0", "s2", "s3")]


@pytest.mark.parametrize("what", ["features", "coords", "zarr.json", "features-meta", "coords-meta"])
def test_predict_fails_the_damaged_store_and_goes_on(stores, cohort, tmp_path, what) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", str(cohort["model"]), str(stores), "--out", str(out)])
    _failed_one(res, bad, *_damage_words(what))
    with out.open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows[BAD]["predicted"] == "" and "store damaged" in rows[BAD]["error"]
    assert all(rows[s]["predicted"] in ("normal", "tumor") for s in ("s0", "s2", "s3"))


@pytest.mark.parametrize(
    ("fmt", "what"),
    [("h5", "features"), ("h5", "coords"), ("h5", "zarr.json"), ("h5", "features-meta"),
     ("geojson", "tissue_mask"), ("geojson", "tissue_fraction"), ("geojson", "scores"), ("geojson", "coords")],
)  # fmt: skip
def test_export_fails_the_damaged_store_and_goes_on(stores, tmp_path, fmt, what) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    out = tmp_path / "out"
    res = runner.invoke(app, ["export", str(stores), "--format", fmt, "--out", str(out)])
    _failed_one(res, bad, *_damage_words(what))
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.{fmt}" for s in ("s0", "s2", "s3")]
    assert "wrote 3 file(s)" in res.output and "1 store(s) failed" in res.output


@pytest.mark.parametrize("what", ["tiles", "thumbnail", "tissue_mask", "tissue_fraction", "scores"])
def test_h5_export_reads_only_features_and_coords(stores, tmp_path, what) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    if what == "tiles":
        _first_chunk(bad / "tiles").unlink()  # a missing tile chunk: h5 does not need it either
    res = runner.invoke(app, ["export", str(stores), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*.h5"))) == 4
    import h5py

    with h5py.File(tmp_path / "out" / f"{BAD}.h5", "r") as f:  # bookkeeping stays in the store
        assert not {"metadata_sha256", "integrity", "complete"} & set(f["features"].attrs)


@pytest.mark.parametrize("what", ["scores", "thumbnail", "tiles", "features"])
def test_heatmap_fails_the_damaged_store_and_goes_on(stores, cohort, tmp_path, what) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    out = tmp_path / "hm"
    res = runner.invoke(app, ["heatmap", str(cohort["model"]), str(stores), "--out", str(out), "--top-k", "2"])
    if what == "scores":
        # heatmap re-predicts and rewrites the scores first: the damaged array is replaced, not read.
        assert res.exit_code == 0, res.output
        assert verify_store(bad).status == "ok"
        return
    _failed_one(res, bad, *_damage_words(what))
    assert sorted(p.name for p in out.glob("*.heatmap.png")) == [f"{s}.heatmap.png" for s in ("s0", "s2", "s3")]


@pytest.mark.parametrize(
    ("command", "what"),
    [("train", "features"), ("train", "coords"), ("train", "zarr.json"), ("finetune", "tiles"), ("finetune", "zarr.json")],
)
def test_training_fails_the_damaged_store_and_trains_on_the_others(
    stores, cohort, cmu_slide, tmp_path, command, what
) -> None:
    from wsi_convnext.embed import embed_stores

    tiles, coords = read_cmu_tiles(cmu_slide, 3 * N)  # a fifth slide: two of each class are left
    write_store(stores / "s4.zarr", tiles[2 * N :], coords[2 * N :], attrs=THUMB)
    (res,) = embed_stores([stores / "s4.zarr"], model=MODEL, device="cpu", batch_size=8)
    assert res.status == "done" and res.key == cohort["key"], res.error
    labels = tmp_path / "labels.csv"  # the damaged slide's row is reported as failed, not as a label without a store
    labels.write_text(Path(cohort["labels"]).read_text() + "s4,tumor\n")
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    out = tmp_path / "out"
    options = {
        "train": ["--aggregator", "mean", "--folds", "2", "--epochs", "1"],
        "finetune": ["--epochs", "1", "--device", "cpu", "--num-workers", "0", "--batch-size", "4"],
    }[command]
    res = runner.invoke(app, [command, str(stores), "--labels", str(labels), "--out", str(out), *options])
    _failed_one(res, bad, *_damage_words(what))
    # The model was written from the others, and its outputs name the slide left out.
    if command == "train":
        assert (out / "model.safetensors").is_file()
        metrics = json.loads((out / "metrics.json").read_text())
        assert [f["slide_id"] for f in metrics["failed_stores"]] == [BAD]
        assert "store damaged" in metrics["failed_stores"][0]["error"]
        assert f"left out (store failed): {BAD}:" in (out / "metrics.txt").read_text()
        assert json.loads((out / "config.json").read_text())["training"]["failed_stores"][0]["store"] == str(bad)
    else:
        assert (out / "encoder.safetensors").is_file()
        metrics = json.loads((out / "metrics.json").read_text())
        assert [f["store"] for f in metrics["failed_stores"]] == [str(bad)]
        config = json.loads((out / "config.json").read_text())
        assert config["data"]["failed_stores"] == metrics["failed_stores"]
        assert config["data"]["n_tiles"] == 4 * N  # the three others' tiles, none of the damaged store's
        assert f"Left out (store failed): {bad}:" in (out / "metrics.md").read_text()


def test_bag_and_tile_loaders_raise_or_record_a_damaged_store(stores, cohort) -> None:
    """One policy: without ``on_failure`` the loaders raise; with it they leave the store out and report it."""
    from wsi_convnext.data.labelled import store_tiles
    from wsi_convnext.mil.data import load_bags

    bad = stores / f"{BAD}.zarr"
    damage(bad, "tiles")
    damage(bad, "features")
    paths = sorted(stores.iterdir())
    # Lazy bags are read once to check when failures are recorded (else on first use, in training).
    for load in (lambda **kw: load_bags(paths, in_memory=not kw, **kw), lambda **kw: store_tiles(paths, cohort["labels"], **kw)):
        with pytest.raises(StoreDamagedError, match=str(bad)):
            load()
        failed: list[tuple[Path, str]] = []
        got = load(on_failure=lambda path, error: failed.append((path, error)))
        assert [p for p, _ in failed] == [bad] and "store damaged" in failed[0][1]
        ids = [b.slide_id for b in got] if isinstance(got, list) else sorted(set(got.slide_ids))
        assert ids == ["s0", "s2", "s3"]


@pytest.mark.parametrize("what", ["features", "zarr.json"])
def test_evaluate_fails_the_damaged_store_and_scores_the_others(stores, cohort, tmp_path, what) -> None:
    bad = stores / f"{BAD}.zarr"
    damage(bad, what)
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(cohort["model"]), str(stores), "--labels", str(cohort["labels"]), "--out", str(out)])
    _failed_one(res, bad, *_damage_words(what))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f["slide_id"] for f in metrics["failed_stores"]] == [BAD]
    with (out / "predictions.csv").open() as fh:
        assert sorted(r["slide_id"] for r in csv.DictReader(fh)) == ["s0", "s2", "s3"]


def test_store_replaced_during_a_read_is_reported_as_replaced(stores, cmu_slide) -> None:
    path = stores / "s0.zarr"
    store = open_store(path)
    tiles, coords = read_cmu_tiles(cmu_slide, 2 * N)
    write_store(path.parent / "s0.zarr", tiles[N:], coords[N:], overwrite=True)  # another run's `tile --overwrite`
    with pytest.raises(StoreReplacedError, match="replaced by another run") as info:
        store.read_tiles(slice(0, N))
    assert not isinstance(info.value, StoreDamagedError) and "damaged" not in str(info.value).replace("not damaged", "")
    with pytest.raises(StoreReplacedError):  # features of the old store never land in the new one
        store.write_features("k", np.zeros((N, 4), np.float32), {"model": "m"})
    assert open_store(path).feature_keys == [] and verify_store(path).status == "ok"


def test_embed_of_a_store_replaced_mid_run_says_replaced(stores, cmu_slide) -> None:
    from wsi_convnext.embed import embed_stores

    path = stores / "s0.zarr"
    tiles, coords = read_cmu_tiles(cmu_slide, 2 * N)
    replaced = []

    def progress(done: int, total: int) -> None:
        if not replaced:
            replaced.append(write_store(path, tiles[N:], coords[N:], overwrite=True))

    (res,) = embed_stores([path], model=MODEL, device="cpu", batch_size=4, overwrite=True, progress=progress)
    assert res.status == "failed" and res.error_type == "StoreReplacedError", res.error
    assert "replaced by another run" in res.error and "store damaged" not in res.error
    assert verify_store(path).status == "ok"  # the new store is untouched


def test_old_schema_1_store_reads_with_a_warning(stores, caplog) -> None:
    path = stores / "s0.zarr"
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    del meta["attributes"]["metadata_sha256"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="wsi_convnext.store"):
        store = open_store(path)
    assert "cannot be verified" in caplog.text
    assert len(store.features()) == N
    result = verify_store(path)
    assert result.status == "unverifiable" and "group metadata (schema 1)" in result.problems[0]
    # A schema-2 store that lost its digest is damaged, not old.
    meta["attributes"]["schema_version"] = 2
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreDamagedError, match="no metadata checksum"):
        open_store(path)
