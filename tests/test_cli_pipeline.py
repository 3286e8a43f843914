"""The whole path through the CLI: tile → embed → export → train → evaluate → predict → heatmap, and demo."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsi_convnext.cli import app
from wsi_convnext.store import open_store

runner = CliRunner()
pytestmark = pytest.mark.slow


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, f"{args}: {res.output}"
    return res.output


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, slides_dir) -> dict[str, Path]:
    """8 small generated slides plus the real CMU slide, tiled and embedded through the CLI."""
    from wsi_convnext.synthetic import make_cohort

    root = tmp_path_factory.mktemp("pipeline")
    make_cohort(root / "slides", 8, size=(2400, 2000), seed=5, pen_fraction=0.0, pale_fraction=0.0,
                lesion_fraction=(0.04, 0.08))  # fmt: skip
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", root / "CMU-1.svs")
    _ok(["tile", str(root / "slides"), str(root / "CMU-1.svs"), "--out", str(root / "tiles")])
    _ok(["embed", str(root / "tiles"), "--model", "convnext_atto", "--stem", "overlap", "--batch-size", "16"])
    return {"root": root, "tiles": root / "tiles", "labels": root / "slides" / "labels.csv"}


def test_embeddings_in_every_store(cohort):
    for store_path in sorted(cohort["tiles"].glob("*.zarr")):
        store = open_store(store_path)
        (key,) = store.feature_keys
        assert key.startswith("convnext_atto-overlap-random")
        feats = store.features(key)
        assert feats.shape == (len(store), 320) and feats.dtype == np.float16
        assert np.isfinite(feats.astype(np.float32)).all()


def test_embed_rerun_skips(cohort):
    out = _ok(["embed", str(cohort["tiles"]), "--model", "convnext_atto", "--stem", "overlap"])
    assert "skipped" in out


def test_export_h5(cohort, tmp_path):
    _ok(["export", str(cohort["tiles"]), "--out", str(tmp_path)])
    store = open_store(cohort["tiles"] / "CMU-1.zarr")
    with h5py.File(tmp_path / "CMU-1.h5") as f:
        np.testing.assert_array_equal(f["coords"][:], store.coords)
        np.testing.assert_allclose(f["features"][:], store.features().astype(np.float32))


def test_train_evaluate_predict_heatmap(cohort, tmp_path):
    model = tmp_path / "model"
    stores = [str(p) for p in sorted(cohort["tiles"].glob("slide_*.zarr"))]
    out = _ok(["train", *stores, "--labels", str(cohort["labels"]), "--aggregator", "abmil", "--folds", "2",
               "--epochs", "10", "--out", str(model)])  # fmt: skip
    assert "AUC" in out
    for name in ("model.safetensors", "config.json", "metrics.json", "metrics.txt", "roc.png"):
        assert (model / name).is_file(), name
    assert not list(model.glob("*.pt")) and not list(model.glob("*.pkl"))
    out = _ok(["evaluate", str(model), *stores, "--labels", str(cohort["labels"]), "--out", str(tmp_path / "ev")])
    assert "AUC" in out and (tmp_path / "ev" / "metrics.json").is_file()
    preds = tmp_path / "pred.csv"
    _ok(["predict", str(model), str(cohort["tiles"]), "--out", str(preds), "--heatmaps", str(tmp_path / "hm")])
    with preds.open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {p.name.removesuffix(".zarr") for p in cohort["tiles"].glob("*.zarr")}
    for r in rows.values():
        assert abs(float(r["prob_normal"]) + float(r["prob_tumor"]) - 1) < 1e-4
    # per-tile attention written into the real slide's store, and a heatmap drawn for it
    cmu = open_store(cohort["tiles"] / "CMU-1.zarr")
    (name,) = cmu.score_keys
    assert cmu.scores(name).shape == (len(cmu),)
    img = Image.open(tmp_path / "hm" / "CMU-1.heatmap.png")
    assert img.size[0] > cmu.thumbnail.shape[1]  # thumbnail plus a colour bar
    _ok(["heatmap", str(model), str(cohort["tiles"] / "CMU-1.zarr"), "--out", str(tmp_path / "hm2"), "--top-k", "4"])
    assert (tmp_path / "hm2" / "CMU-1.topk.png").is_file()


def test_train_bad_labels_is_one_line(cohort, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("slide_id,label\n" + "".join(f"{p.name[:-5]},tumor\n" for p in cohort["tiles"].glob("slide_*.zarr")))
    res = runner.invoke(app, ["train", str(cohort["tiles"]), "--labels", str(bad), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1 and "class" in res.output


def test_demo_end_to_end(tmp_path):
    # --no-finetune: the fine-tuning step (the default) is covered by test_finetune.py.
    out = _ok(["demo", "--out", str(tmp_path / "demo"), "--slides", "10", "--no-finetune"])
    assert "AUC" in out and "heatmaps" in out
    assert "fine-tuned AUC" not in out and not (tmp_path / "demo" / "finetune").exists()
    for line in out.splitlines():
        if line.strip().startswith(("roc:", "heatmaps:", "qc:")):
            assert Path(line.split(":", 1)[1].strip()).is_file()


def test_demo_fine_tunes_only_when_asked():
    """At the demo's budget the sign of random vs fine-tuned is noise: the side-by-side is behind --finetune."""
    import typer.main

    params = {p.name: p for p in typer.main.get_command(app).commands["demo"].params}
    assert params["finetune"].default is False and "--no-finetune" in params["finetune"].secondary_opts


def test_demo_warns_about_random_weights_once_per_run(caplog):
    import logging

    from wsi_convnext.demo import _random_weights_warning_once
    from wsi_convnext.encoders import build_encoder

    with caplog.at_level(logging.WARNING), _random_weights_warning_once():
        build_encoder("convnext_atto")
        build_encoder("convnext_atto", stem="overlap")
    assert sum("RANDOM weights" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_encoder("convnext_atto")  # outside a demo run, every build still warns
    assert sum("RANDOM weights" in r.getMessage() for r in caplog.records) == 1
