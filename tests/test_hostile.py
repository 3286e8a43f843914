"""Reproductions of the hostile-user holes of issue 12 (items 1-4, 6) and the predictions dialect (issue 8).

Each test failed before its fix. They use the real CMU-1 slide, generated slides and real
zarr stores on disk; concurrency is reproduced with two real ``wsi-convnext tile`` processes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmu_stores import edit_store_attrs
from wsi_convnext._io import lock_path, path_lock, remove_dead_partials, temp_sibling
from wsi_convnext.cli import app
from wsi_convnext.errors import BusyError, ConfigError, StoreDamagedError, StoreError, StoreExistsError, UnsafePathError
from wsi_convnext.inputs import discover_slides
from wsi_convnext.store import open_store, verify_store
from wsi_convnext.tiling.tiler import TileParams, tile_slide, tile_slides

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from wsi_convnext.cli import app; app()"]
FAST = TileParams(workers=1)


def _one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[-1]


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory, cmu_slide) -> Path:
    """The real CMU-1 slide tiled once, with a (random, real zarr) feature set written into it."""
    out = tmp_path_factory.mktemp("cmu")
    res = tile_slide(cmu_slide, out, FAST, slide_id="CMU-1")
    store = open_store(res.store_path)
    rng = np.random.default_rng(0)
    store.write_features("enc-test", rng.normal(size=(len(store), 8)).astype(np.float16), {"model": "test"})
    return res.store_path


@pytest.fixture()
def store_copy(cmu_store, tmp_path) -> Path:
    dest = tmp_path / "tiles" / cmu_store.name
    shutil.copytree(cmu_store, dest)
    return dest


def _chunk(store: Path, array: str) -> Path:
    files = sorted(p for p in (store / array).rglob("*") if p.is_file() and p.name != "zarr.json")
    assert files, f"no chunk files in {store / array}"
    return files[0]


def _strip_integrity(store: Path) -> None:
    """Make the store look like one written before integrity records (schema 1, older writer)."""
    meta_file = store / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"].pop("integrity")
    meta["attributes"].pop("metadata_sha256")
    meta["attributes"]["schema_version"] = 1
    meta_file.write_text(json.dumps(meta))


# --- item 1: a slide id can write, and with --overwrite delete, outside --out ----------------


@pytest.mark.parametrize("bad_id", ["../../escaped", "/abs/escaped", "a/b", ".hidden", "x.zarr", "..", "a\\b", ""])
def test_unsafe_manifest_slide_id_is_refused_naming_the_row(tmp_path, cmu_slide, bad_id):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,slide_id\n{cmu_slide},ok-id\n{cmu_slide.parent / 'openslide-small.svs'},{bad_id}\n")
    if bad_id == "":
        assert [s.slide_id for s in discover_slides([manifest])] == ["ok-id", "openslide-small"]
        return
    with pytest.raises(ConfigError, match=r"m\.csv:3: slide_id .* is not a safe name"):
        discover_slides([manifest])
    res = runner.invoke(app, ["tile", str(manifest), "--out", str(tmp_path / "out")])
    assert "m.csv:3" in _one_line_error(res)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_stem_derived_ids_are_sanitised(tmp_path):
    for name in ("x.zarr.svs", ".hidden.svs", "a b.svs"):
        (tmp_path / name).write_bytes(b"x")
    ids = {s.path.name: s.slide_id for s in discover_slides([tmp_path / "x.zarr.svs", tmp_path / "a b.svs"])}
    assert ids == {"x.zarr.svs": "x", "a b.svs": "a_b"}  # never x.zarr.zarr


def test_library_refuses_an_id_that_escapes_out(tmp_path, cmu_slide):
    for bad in ("../../escaped", str(tmp_path / "abs")):
        with pytest.raises(ConfigError):
            tile_slide(cmu_slide, tmp_path / "out", FAST, slide_id=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path, cmu_slide):
    out = tmp_path / "out"
    victim = out / "victim.zarr"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a wsi-convnext store"):
        tile_slide(cmu_slide, out, FAST, slide_id="victim", overwrite=True)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_output_path_through_a_symlink_is_refused(tmp_path, cmu_slide):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "evil.zarr").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        tile_slide(cmu_slide, out, FAST, slide_id="evil", overwrite=True)
    assert [p.name for p in outside.iterdir()] == ["precious.txt"]


def test_store_slide_id_attr_is_not_trusted(store_copy, tmp_path):
    from wsi_convnext.outputs.heatmap import render_heatmap

    store = open_store(store_copy)
    with pytest.raises(ConfigError, match="not a safe name"):
        render_heatmap(store, np.zeros(len(store)), tmp_path / "hm", name="../../evil")
    paths = render_heatmap(store, np.arange(len(store), dtype=np.float32), tmp_path / "hm", top_k=2)
    assert paths.heatmap == tmp_path / "hm" / "CMU-1.heatmap.png"  # from the folder name
    edit_store_attrs(store_copy, slide_id="../../evil")  # a writer that recorded a bad id
    with pytest.raises(StoreError, match="unsafe slide_id"):
        open_store(store_copy)


# --- item 2: two runs on one --out --------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_path_lock_excludes_other_processes_and_breaks_stale_locks(tmp_path, caplog):
    target = tmp_path / "thing.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from wsi_convnext._io import path_lock\n"
         "with path_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)", str(target)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"process {holder.pid}"):
            with path_lock(target, wait=False):
                pass
        t0 = time.monotonic()
        with pytest.raises(BusyError):
            with path_lock(target, timeout=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5
    finally:
        holder.kill()
        holder.wait()
    # The holder died holding it: the kernel dropped the flock; its pid is recognised as dead.
    assert lock_path(target).exists()
    with caplog.at_level(logging.INFO, logger="wsi_convnext._io"), path_lock(target, wait=False):
        assert f"stale lock of dead process {holder.pid}" in caplog.text
    assert not lock_path(target).exists()


def test_partials_are_removed_only_when_their_owner_is_dead(tmp_path):
    final = tmp_path / "s.zarr"
    live = temp_sibling(final)  # this process: alive
    dead = final.with_name(f".s.zarr.partial-{_dead_pid()}-abcd1234")
    for p in (live, dead):
        p.mkdir()
    assert remove_dead_partials(final) == 1
    assert live.exists() and not dead.exists()


@pytest.mark.slow
def test_two_concurrent_tile_processes_on_one_slide(tmp_path):
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "big.svs", SyntheticSlideSpec(width=9000, height=9000, mpp=0.5, seed=3)).path
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [*CLI, "tile", str(slide), "--out", str(out), "--workers", "1"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".big.zarr.partial-*")):  # the first run is writing its partial store
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 0, second.stderr
    assert "is writing it; waiting" in second.stderr  # the clear message
    store = open_store(out / "big.zarr")
    assert verify_store(out / "big.zarr").status == "ok"
    assert len(store.read_tiles(slice(0, len(store)))) == len(store)
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # One row, merged from both runs (the later one, which found the store finished, wins); never "failed".
    assert [(r["slide_id"], r["status"]) for r in rows] == [("big", "skipped")]
    assert not list(out.glob(".big.zarr.*"))  # no partial, no lock file left


def test_manifest_updates_of_two_writers_are_merged(tmp_path):
    from wsi_convnext.outputs.manifest import ManifestRow, RunManifest, read_manifest

    path = tmp_path / "manifest.csv"
    a, b = RunManifest(path), RunManifest(path)  # two processes' views of one file
    a.record(ManifestRow("s1", "tile", "running"))
    b.record(ManifestRow("s2", "tile", "done", tiles=3))
    a.record(ManifestRow("s1", "tile", "done", tiles=5))
    b.close()  # before: b's rewrite dropped s1
    a.close()  # before: a's rewrite dropped s2
    rows = {r.slide_id: (r.status, r.tiles) for r in read_manifest(path)}
    assert rows == {"s1": ("done", 5), "s2": ("done", 3)}


def test_feature_writes_are_locked_and_dead_partials_only_removed(store_copy):
    store = open_store(store_copy)
    live_partial = temp_sibling(store_copy / "features" / "k2")
    live_partial.mkdir()  # a concurrent writer (this pid) mid-write: must survive
    store.write_features("k2", np.ones((len(store), 4), np.float32), {"model": "m"})
    assert live_partial.exists()
    with pytest.raises(StoreExistsError, match="already exists"):
        store.write_features("k2", np.zeros((len(store), 4), np.float32), {"model": "m"})
    np.testing.assert_array_equal(open_store(store_copy).features("k2"), 1)


# --- item 3: missing or truncated chunks read as zeros ----------------------------------------


@pytest.mark.parametrize("array", ["coords", "tissue_fraction", "tiles", "thumbnail"])
def test_missing_group_chunk_is_damage_at_open(store_copy, array):
    _chunk(store_copy, array).unlink()
    with pytest.raises(StoreDamagedError, match=rf"store damaged: {array}: chunk .* is missing; re-tile"):
        open_store(store_copy)


def test_missing_feature_chunk_never_reads_as_zeros(store_copy, tmp_path):
    _chunk(store_copy, "features/enc-test").unlink()
    store = open_store(store_copy)  # group arrays are fine
    with pytest.raises(StoreDamagedError, match="features/enc-test: chunk .* is missing; re-embed"):
        store.features("enc-test")
    res = runner.invoke(app, ["export", str(store_copy), "--out", str(tmp_path / "x")])
    assert "store damaged" in _one_line_error(res, 1)
    assert not (tmp_path / "x" / "CMU-1.h5").exists()


def test_truncated_chunk_is_one_line_damage_not_a_zstd_traceback(store_copy, tmp_path):
    chunk = _chunk(store_copy, "coords")
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreDamagedError, match="truncated"):
        open_store(store_copy)
    # An older store without an integrity record: the read itself fails, in one line.
    _strip_integrity(store_copy)
    store = open_store(store_copy)
    with pytest.raises(StoreDamagedError, match="store damaged: coords: cannot read"):
        store.coords
    res = runner.invoke(app, ["export", str(store_copy), "--out", str(tmp_path / "x")])
    assert "store damaged" in _one_line_error(res, 1)


def test_v1_store_without_record_opens_with_warning_and_missing_tiles_chunk_is_caught(store_copy, caplog):
    _strip_integrity(store_copy)
    with caplog.at_level(logging.WARNING, logger="wsi_convnext.store"):
        store = open_store(store_copy)
    assert "cannot be verified" in caplog.text
    assert len(store.coords) == len(store)
    assert verify_store(store_copy).status == "unverifiable"
    _chunk(store_copy, "tiles").unlink()
    with pytest.raises(StoreDamagedError, match="tiles: chunk c/0 is missing"):
        open_store(store_copy)


def test_verify_command_rehashes_every_chunk(store_copy):
    res = runner.invoke(app, ["verify", str(store_copy)])
    assert res.exit_code == 0 and "ok" in res.output, res.output
    chunk = _chunk(store_copy, "features/enc-test")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: open_store's cheap check passes
    chunk.write_bytes(bytes(data))
    open_store(store_copy)
    res = runner.invoke(app, ["verify", str(store_copy)])
    assert res.exit_code == 1
    assert "features/enc-test: chunk c/0/0 fails its sha256 checksum" in res.output


def test_export_checks_feature_rows_equal_coords_rows(store_copy, tmp_path):
    import zarr

    store = open_store(store_copy)
    n = len(store)
    arr = zarr.create_array(str(store_copy / "features" / "short"), shape=(n - 4, 8), dtype="float32", zarr_format=3)
    arr[...] = 1.0
    arr.attrs.update({"complete": True, "model": "foreign"})  # a writer that recorded no integrity
    res = runner.invoke(app, ["export", str(store_copy), "--out", str(tmp_path / "x"), "--features", "short"])
    assert f"{n - 4} rows for {n} tiles" in _one_line_error(res, 1)


# --- item 4: slide ids stable under additions; --fingerprint full ------------------------------


def test_ids_do_not_move_when_a_slide_is_added(tmp_path, caplog):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.svs").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="wsi_convnext.inputs"):
        before = {s.path: s.slide_id for s in discover_slides([tmp_path])}
    assert sorted(before.values()) == ["a-x", "b-x"]
    assert str(tmp_path / "a" / "x.svs") in caplog.text and str(tmp_path / "b" / "x.svs") in caplog.text
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "x.svs").write_bytes(b"x")
    after = {s.path: s.slide_id for s in discover_slides([tmp_path])}
    assert {p: after[p] for p in before} == before and after[tmp_path / "0" / "x.svs"] == "0-x"


def test_id_collision_with_an_existing_store_names_both_paths(tmp_path, cmu_slide):
    out = tmp_path / "out"
    tile_slide(cmu_slide, out, FAST, slide_id="x")
    other = tmp_path / "b" / "x.svs"  # another slide (same pixels, other bytes) that claims the id
    other.parent.mkdir()
    other.write_bytes(cmu_slide.read_bytes() + b"\0" * 4096)
    with pytest.raises(StoreExistsError, match="slide id collision") as info:
        tile_slide(other, out, FAST, slide_id="x")
    assert str(cmu_slide.resolve()) in str(info.value) and str(other) in str(info.value)


def test_fingerprint_full_sees_a_same_size_edit_in_the_middle(tmp_path, cmu_slide):
    slide = tmp_path / "s.svs"
    # CMU-1 is under 2 MiB, so its first and last MiB cover every byte; pad it to 6 MiB.
    padded = cmu_slide.read_bytes() + b"\0" * (6 << 20)
    slide.write_bytes(padded)
    out = tmp_path / "out"
    full = TileParams(workers=1, fingerprint="full")
    first = tile_slide(slide, out, full)
    assert open_store(first.store_path).attrs["source"]["fingerprint_mode"] == "full"
    with slide.open("r+b") as fh:  # flip one byte in the middle: same size, same head and tail
        fh.seek(slide.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(StoreExistsError, match="the slide file changed"):
        tile_slide(slide, out, full)
    # The default quick fingerprint of a quick store does not see it: the documented blind spot.
    quick_out = tmp_path / "quick"
    slide.write_bytes(padded)
    tile_slide(slide, quick_out, FAST)
    with slide.open("r+b") as fh:
        fh.seek(slide.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert tile_slide(slide, quick_out, FAST).skipped
    res = runner.invoke(app, ["tile", str(slide), "--out", str(tmp_path / "o3"), "--fingerprint", "sha1"])
    assert "--fingerprint" in _one_line_error(res)


# --- item 6: one line per failure; one bad item never stops the others -------------------------


def test_self_referencing_symlink_is_skipped_and_the_rest_is_tiled(tmp_path, cmu_slide, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "self.svs").symlink_to(folder / "self.svs")
    (folder / "dangling.svs").symlink_to(folder / "nowhere.svs")
    shutil.copy(cmu_slide, folder / "cmu.svs")
    with caplog.at_level(logging.WARNING, logger="wsi_convnext.inputs"):
        specs = discover_slides([folder])
    assert [s.slide_id for s in specs] == ["cmu"]
    assert "self.svs" in caplog.text and "dangling.svs" in caplog.text


def test_manifest_row_with_too_many_fields_and_bom(tmp_path, cmu_slide):
    m = tmp_path / "m.csv"
    m.write_text(f"path,slide_id\n{cmu_slide},a\n{cmu_slide},b,extra\n")
    with pytest.raises(ConfigError, match=r"m\.csv:3: row has 3 fields but the header has 2"):
        discover_slides([m])
    m.write_bytes(b"\xef\xbb\xbf" + f"path,slide_id\n{cmu_slide},a\n".encode())
    assert [s.slide_id for s in discover_slides([m])] == ["a"]


@pytest.fixture()
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk ({exc}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_line_with_the_path_and_leaves_nothing(tiny_disk, cmu_slide, slides_dir):
    out = tiny_disk / "out"
    small = slides_dir / "openslide-small.svs"
    results = tile_slides(
        [s for s in discover_slides([cmu_slide])], out, TileParams(workers=1, encoding="png")
    )  # fmt: skip
    (r,) = results
    assert r.status == "failed" and r.error_type == "OutputWriteError", r
    assert "No space left on device" in r.error and str(out) in r.error and "\n" not in r.error
    leftovers = [p.relative_to(out) for p in out.rglob("*")]
    assert leftovers == [] or leftovers == [Path("qc")], leftovers  # no store, no partial, no QC picture
    assert small.exists()


def test_cli_option_holes(tmp_path, cmu_slide):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--out" in _one_line_error(runner.invoke(app, ["tile", str(cmu_slide), "--out", str(a_file)]))
    assert "--mpp" in _one_line_error(runner.invoke(app, ["tile", str(cmu_slide), "--out", str(tmp_path / "o"), "--mpp", "inf"]))
    assert "--workers" in _one_line_error(runner.invoke(app, ["tile", str(cmu_slide), "--out", str(tmp_path / "o"), "--workers", "-3"]))
    for k in ("0", "-1"):
        res = runner.invoke(app, ["heatmap", str(tmp_path / "model"), str(tmp_path), "--top-k", k])
        assert "--top-k" in _one_line_error(res)


def _model(model_dir: Path, store: Path) -> Path:
    from wsi_convnext.mil.checkpoint import save_model
    from wsi_convnext.mil.model import FeatureStats, TrainedModel, new_model

    (key,) = open_store(store).feature_keys
    stats = FeatureStats(np.zeros(8, np.float32), np.ones(8, np.float32))
    module, kwargs = new_model("abmil", 8, 2, stats, {})
    model = TrainedModel(module, ("normal", "tumor"), "abmil", kwargs, feature_key=key, positive_class="tumor")
    return save_model(model_dir, model, name="mil-test")


def test_predict_out_folder_fails_before_anything_is_written(store_copy, tmp_path):
    model = _model(tmp_path / "model", store_copy)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    res = runner.invoke(app, ["predict", str(model), str(store_copy), "--out", str(folder)])
    assert "is a folder" in _one_line_error(res)
    assert open_store(store_copy).score_keys == []  # no store was touched


def test_predict_records_a_failed_store_and_goes_on(store_copy, tmp_path):
    model = _model(tmp_path / "model", store_copy)
    bare = tmp_path / "tiles" / "bare.zarr"  # a store without embeddings
    shutil.copytree(store_copy, bare)
    shutil.rmtree(bare / "features" / "enc-test")
    edit_store_attrs(bare, slide_id="bare")
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", str(model), str(tmp_path / "tiles"), "--out", str(out)])
    assert res.exit_code == 1, res.output
    with out.open() as fh:
        reader = csv.DictReader(fh)
        rows = {r["slide_id"]: r for r in reader}
        header = reader.fieldnames
    assert header[:4] == ["slide_id", "predicted", "prob_normal", "prob_tumor"]
    assert rows["CMU-1"]["predicted"] in ("normal", "tumor") and rows["CMU-1"]["error"] == ""
    assert rows["bare"]["predicted"] == "" and "no feature set" in rows["bare"]["error"]
    assert "mil-test" in open_store(store_copy).score_keys
    assert not list(tmp_path.glob(".preds.csv*"))  # written atomically


# --- issue 8: one predictions CSV dialect ------------------------------------------------------


def test_one_predictions_dialect_round_trip_and_legacy(tmp_path):
    from wsi_convnext.cohort import write_predictions as run_writes
    from wsi_convnext.outputs.predictions import PredictionRow, read_predictions, write_predictions

    path = tmp_path / "p.csv"
    write_predictions(path, [
        PredictionRow({"slide_id": "s1"}, "tumor", {"normal": 0.25, "tumor": 0.75}, true_label="normal", extra={"fold": 1}),
        PredictionRow({"slide_id": "s2"}, None, {}, extra={"error": "boom"}),
    ], classes=["normal", "tumor"])  # fmt: skip
    assert path.read_text().splitlines()[0] == "slide_id,true_label,predicted,prob_normal,prob_tumor,fold,error"
    back = {r.slide_id: r for r in read_predictions(path)}
    assert back["s1"].predicted == "tumor" and back["s1"].true_label == "normal" and back["s1"].probabilities["tumor"] == 0.75
    assert back["s2"].predicted is None and back["s2"].extra == {"error": "boom"}

    # `run` writes the same dialect: the predicted class goes to `predicted`, never to `label`.
    run_csv = tmp_path / "run.csv"
    run_csv.write_text("slide_id,label,p_normal,p_tumor\nold,normal,0.9,0.1\n")  # a file from an older run
    run_writes(run_csv, {"new": {"label": "tumor", "probabilities": {"normal": 0.2, "tumor": 0.8}}})
    with run_csv.open() as fh:
        reader = csv.DictReader(fh)
        rows = {r["slide_id"]: r for r in reader}
    assert reader.fieldnames == ["slide_id", "predicted", "prob_normal", "prob_tumor"]
    assert rows["new"]["predicted"] == "tumor" and rows["old"]["predicted"] == "normal"  # merged, legacy read

    for key in ({"path": "img/a.png"}, {"slide_id": "s1", "tile": 3}):
        write_predictions(path, [PredictionRow(key, "tumor", {"tumor": 1.0})])
        assert path.read_text().startswith(",".join(key) + ",predicted,prob_tumor\n")
        assert read_predictions(path)[0].key == {k: str(v) for k, v in key.items()}
