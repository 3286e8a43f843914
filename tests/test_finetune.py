"""Fine-tuning the encoder: learning on real H&E, outputs, embed round trip, starting points,
resume after SIGKILL, predict-tiles, and every bad-input case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_data_labelled import _lc25000_stores, colour_folder, lc25000_sample  # noqa: E402

from wsi_convnext.cli import app  # noqa: E402
from wsi_convnext.errors import ConfigError, DeviceError, WeightsError  # noqa: E402
from wsi_convnext.finetune import FinetuneConfig, finetune_encoder, load_finetuned, predict_tiles, prepare_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
# Small, fast runs: 1 torch thread (much faster than 2 on a busy shared CPU), no worker processes.
FAST = {"model": "convnext_atto", "batch_size": 8, "threads": 1, "num_workers": 0, "device": "cpu"}


def _tiny(tmp_path: Path, out: str, **kw: object) -> Path:
    data = tmp_path / "colour"
    if not data.exists():
        colour_folder(data, n=12, size=64)
    cfg = FinetuneConfig(data=(str(data),), out=str(tmp_path / out), **{**FAST, "steps": 2, "val_frac": 0.25, **kw})
    return finetune_encoder(cfg)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny fine-tuning run per stem (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("tiny")
    return {stem: _tiny(tmp, f"enc-{stem}", stem=stem) for stem in ("patch", "overlap")}


# ------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_finetuning_learns_on_real_he_tiles(tmp_path: Path) -> None:
    """From scratch on 10 lc25000 groups per class; validation on 3 unseen groups per class."""
    split = {}
    train_csv = lc25000_sample(tmp_path / "all.csv", 13)
    import csv

    with open(train_csv, newline="") as fh:
        groups = sorted({r["group"] for r in csv.DictReader(fh)})
    for g in groups:
        split[g] = "val" if int(g.rsplit("-", 1)[1]) % 4 == 3 else "train"
    data = lc25000_sample(tmp_path / "split.csv", 13, split=split)
    cfg = FinetuneConfig(
        data=(str(data),), out=str(tmp_path / "enc"), stem="overlap", steps=40, batch_size=24, crop_size=64,
        eval_size=96, lr=2e-3, warmup=0.1, model="convnext_atto", threads=1, num_workers=1, device="cpu",
    )  # fmt: skip
    out = finetune_encoder(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best_val"]
    assert best["n"] > 100
    # chance is 1/3 (balanced accuracy) and 0.5 (AUC); 40 steps of 24 random 64-px crops from scratch
    assert best["balanced_accuracy"]["value"] > 0.55, metrics["history"]
    assert best["auc"]["value"] > 0.65, metrics["history"]


# ------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(("eval_size", "expected"), [(48, 48), (None, 64)])
def test_prediction_size_without_a_validation_part(tmp_path: Path, eval_size: int | None, expected: int) -> None:
    """With --val-frac 0, predictions use --eval-size (default: the tile size), not the training crop."""
    out = _tiny(tmp_path, "enc", val_frac=0.0, crop_size=32, eval_size=eval_size)
    assert json.loads((out / "config.json").read_text())["resolved"]["eval_size"] == expected


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_outputs_metadata_config_and_metrics(tiny_runs: dict[str, Path], stem: str) -> None:
    from safetensors import safe_open

    out = tiny_runs[stem]
    for name in ("encoder.safetensors", "head.safetensors", "config.json", "metrics.json", "metrics.md", "curves.png"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "encoder.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["wsi_convnext.model"] == "convnext_atto" and meta["wsi_convnext.stem"] == stem
    assert len(meta["wsi_convnext.fingerprint"]) == 64
    assert not any(k.startswith("head.fc") for k in keys)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fingerprint"] == meta["wsi_convnext.fingerprint"]
    assert cfg["start"]["kind"] == "scratch" and cfg["start"]["init_seed"] == 0
    assert cfg["classes"] == ["blue", "red"] and cfg["config"]["stem"] == stem
    assert FinetuneConfig.from_dict(cfg["config"]).training_fingerprint(cfg["data"]["fingerprint"], "random") == cfg["fingerprint"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [set(r) >= {"train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc"} for r in metrics["history"]] == [True]
    assert "95% CI" in (out / "metrics.md").read_text()
    assert not list(out.parent.glob(f".{out.name}.work"))  # the work folder is gone


def test_rerun_with_the_same_config_is_a_no_op_and_another_config_needs_overwrite(tiny_runs: dict[str, Path]) -> None:
    out = tiny_runs["patch"]
    before = (out / "encoder.safetensors").stat().st_mtime_ns
    data = str(out.parent / "colour")
    cfg = FinetuneConfig(data=(data,), out=str(out), stem="patch", **{**FAST, "steps": 2, "val_frac": 0.25})
    assert finetune_encoder(cfg) == out and (out / "encoder.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        finetune_encoder(FinetuneConfig(data=(data,), out=str(out), stem="patch", **{**FAST, "steps": 3, "val_frac": 0.25}))


# ----------------------------------------------------------------------------- embed round trip


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_embed_with_finetuned_weights_equals_the_trained_models_forward(
    tiny_runs: dict[str, Path], stem: str, tmp_path: Path
) -> None:
    import torch

    from wsi_convnext.store import open_store

    stores, _ = _lc25000_stores(tmp_path, groups_per_class=1, tiles_per_store=4)
    enc = tiny_runs[stem] / "encoder.safetensors"
    r = runner.invoke(app, ["embed", str(stores[0]), "--model", "convnext_atto", "--stem", stem, "--weights", str(enc),
                            "--dtype", "float32", "--device", "cpu", "--batch-size", "4"])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = open_store(stores[0])
    (key,) = st.feature_keys
    from wsi_convnext._io import file_sha256

    assert file_sha256(enc)[:12] in key
    stored = st.features(key)
    model = load_finetuned(tiny_runs[stem], device="cpu")
    with torch.no_grad():
        own = model.encoder.model(model.encoder.preprocess(torch.from_numpy(st.read_tiles(slice(None))), device=torch.device("cpu")))
    np.testing.assert_allclose(stored, own.numpy(), rtol=1e-4, atol=1e-4)


def test_stem_mismatch_is_a_one_line_error(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    stores, _ = _lc25000_stores(tmp_path, groups_per_class=1, tiles_per_store=2)
    enc = tiny_runs["overlap"] / "encoder.safetensors"
    r = runner.invoke(app, ["embed", str(stores[0]), "--model", "convnext_atto", "--stem", "patch", "--weights", str(enc), "--device", "cpu"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "trained with stem 'overlap'" in r.output and str(enc) in r.output
    # Without --stem the stem recorded with the weights is used.
    r = runner.invoke(app, ["embed", str(stores[0]), "--model", "convnext_atto", "--weights", str(enc), "--device", "cpu"])
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------------------- starting points


def test_patch_checkpoint_into_overlap_starts_from_the_same_function(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from wsi_convnext.encoders import build_encoder

    patch_enc = tiny_runs["patch"] / "encoder.safetensors"
    ref = build_encoder("convnext_atto", stem="patch", weights=patch_enc)
    cfg = FinetuneConfig(data=("unused",), out=str(tmp_path / "o"), stem="overlap", weights=str(patch_enc), **FAST)
    encoder, head, start = prepare_model(cfg, ["blue", "red"])
    assert start.kind == "finetune" and start.stem_converted
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(encoder.model(x).numpy(), ref.model(x).numpy(), rtol=1e-5, atol=1e-5)
    # starting from the earlier output folder loads its head too (same classes)
    cfg2 = FinetuneConfig(data=("unused",), out=str(tmp_path / "o"), stem="patch", weights=str(tiny_runs["patch"]), **FAST)
    _, head2, start2 = prepare_model(cfg2, ["blue", "red"])
    saved = load_finetuned(tiny_runs["patch"]).head
    assert start2.head_loaded and torch.equal(head2.weight, saved.weight)


def test_weights_for_another_model_or_an_unreachable_stem_are_errors(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    overlap = tiny_runs["overlap"] / "encoder.safetensors"
    with pytest.raises(WeightsError, match="trained for model 'convnext_atto'"):
        prepare_model(FinetuneConfig(data=("x",), out=str(tmp_path / "o"), **{**FAST, "model": "convnext_femto"}, weights=str(overlap)), ["a", "b"])
    with pytest.raises(WeightsError, match="overlapping stem"):
        prepare_model(FinetuneConfig(data=("x",), out=str(tmp_path / "o"), stem="patch", weights=str(overlap), **FAST), ["a", "b"])


# -------------------------------------------------------------------------------------- resume


def _cli_finetune(data: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "wsi-convnext"), "finetune", str(data), "--out", str(out), "--model", "convnext_atto",
            "--stem", "overlap", "--epochs", "4", "--batch-size", "6", "--val-frac", "0.25", "--seed", "5",
            "--threads", "1", "--num-workers", "0", "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from wsi_convnext.finetune import work_dir

    data = colour_folder(tmp_path / "colour", n=12, size=64)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ref = tmp_path / "ref"
    subprocess.run(_cli_finetune(data, ref), check=True, env=env, capture_output=True, timeout=900)

    out = tmp_path / "killed"
    ckpt = work_dir(out) / "checkpoint.pt"
    proc = subprocess.Popen(_cli_finetune(data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.is_file(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "encoder.safetensors").exists()  # nothing that looks like a result
    killed_at = json.loads(torch.load(ckpt, map_location="cpu", weights_only=True)["state"])["epoch"]
    assert 1 <= killed_at < 4  # the rerun below really resumes mid-run
    r = subprocess.run(_cli_finetune(data, out), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(ref / "encoder.safetensors")), load_file(str(out / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    ma, mb = (json.loads((p / "metrics.json").read_text())["history"] for p in (ref, out))
    assert [h["train_loss"] for h in ma] == [h["train_loss"] for h in mb]


# -------------------------------------------------------------------------------- predict-tiles


def test_predict_tiles_folder_csv_dialect_and_metrics(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    import csv

    out = tmp_path / "tiles.csv"
    r = runner.invoke(app, ["predict-tiles", str(tiny_runs["overlap"]), str(tiny_runs["overlap"].parent / "colour"),
                            "--out", str(out), "--device", "cpu", "--num-workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["path", "true_label", "predicted", "prob_blue", "prob_red"]
    assert len(rows) == 24 and rows[0]["path"] == "blue/blue00.png"
    assert all(abs(float(r["prob_blue"]) + float(r["prob_red"]) - 1) < 1e-4 for r in rows)
    assert "AUC" in r.output


def test_predict_tiles_on_stores_writes_scores_for_heatmaps(tmp_path: Path) -> None:
    import csv

    from wsi_convnext.store import open_store

    stores, labels = _lc25000_stores(tmp_path, groups_per_class=1, tiles_per_store=6)
    enc = finetune_encoder(FinetuneConfig(data=(str(tmp_path / "stores"),), labels=str(labels), out=str(tmp_path / "enc"),
                                          **{**FAST, "steps": 1, "crop_size": 64, "eval_size": 64, "val_frac": 0.0}))  # fmt: skip
    cfg = json.loads((enc / "config.json").read_text())
    assert cfg["resolved"]["balance"] == "class_group" and cfg["data"]["kind"] == "stores"
    res = predict_tiles(enc, [tmp_path / "stores"], labels=labels, out_csv=tmp_path / "t.csv", device="cpu", num_workers=0)
    assert res.score_name == "enc" and res.metrics is not None
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert list(rows[0])[:4] == ["slide_id", "tile", "true_label", "predicted"] and len(rows) == 18
    st = open_store(stores[0])
    scores = st.scores("enc")
    assert scores.shape == (6, 3) and np.allclose(scores.sum(1), 1, atol=1e-4)
    assert st.score_attrs("enc")["columns"] == ["lung_aca", "lung_n", "lung_scc"]
    from wsi_convnext.outputs.heatmap import heatmaps

    drawn = heatmaps(enc, [tmp_path / "stores"], tmp_path / "pictures", top_k=4)
    assert len(drawn) == 3 and all(p.heatmap.is_file() and p.montage.is_file() for p in drawn.values())


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"freeze": "stages"}, "^freeze must be none, stem or stages:K"),
        ({"freeze": "trunk"}, "^freeze must be none, stem or stages:K"),
        ({"epochs": 2, "steps": 3}, "either --epochs or --steps"),
        ({"batch_size": 0}, "^batch_size must be at least 1, got 0$"),
        ({"crop_size": 30}, "^crop_size must be a multiple of 4 and >= 32 px, got 30$"),
        ({"on_size": "stretch"}, "^on_size must be one of 'crop', 'refuse', got 'stretch'$"),
        ({"weights": "w.safetensors", "pretrained": True}, "either --weights or --pretrained"),
    ],
)
def test_config_is_validated_on_construction(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(data=("d",), out="o", **kw)


def test_cli_bad_inputs_exit_with_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    one = colour_folder(tmp_path / "one", n=2, classes=("only",))
    cases = [
        ([str(tmp_path / "empty")], "no image files"),
        ([str(one)], "only 1 class"),
        ([str(one), "--freeze", "stages:x"], "--freeze must be none, stem or stages:K"),
    ]
    for args, match in cases:
        r = runner.invoke(app, ["finetune", *args, "--out", str(tmp_path / "o"), "--device", "cpu"])
        assert r.exit_code == 2, (args, r.output)
        assert match in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_freeze_more_stages_than_the_model_has(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only 4 stages"):
        _tiny(tmp_path, "o", freeze="stages:5")


def test_freeze_stages_trains_only_the_stem_and_the_head(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = _tiny(tmp_path, "frozen", freeze="stages:4", weights=None, steps=1, val_frac=0.0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["freeze"]["frozen"] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    # same seed, same scratch init: the frozen stages equal a fresh model's
    from wsi_convnext.finetune import FinetuneConfig as C

    enc0, _, _ = prepare_model(C(data=("x",), out="o", **FAST), ["blue", "red"])
    sd = load_file(str(out / "encoder.safetensors"))
    ref = enc0.model.state_dict()
    assert all(np.array_equal(sd[k].numpy(), ref[k].numpy()) for k in sd if k.startswith("stages."))
    assert not all(np.array_equal(sd[k].numpy(), ref[k].numpy()) for k in sd if k.startswith("stem."))


def test_corrupt_file_is_listed_in_metrics_or_fails_under_strict(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "colour", n=12, size=64)
    (data / "red" / "broken.png").write_text("not a png")
    out = _tiny(tmp_path, "skip", steps=1)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_skipped"] == 1 and m["skipped"][0]["tile"] == "red/broken.png"
    r = runner.invoke(app, ["finetune", str(data), "--out", str(tmp_path / "strict"), "--strict", "--device", "cpu"])
    assert r.exit_code != 0 and "broken.png" in r.output and not (tmp_path / "strict").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_but_absent(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        _tiny(tmp_path, "cuda", device="cuda")
    r = runner.invoke(app, ["finetune", str(tmp_path / "colour"), "--out", str(tmp_path / "c"), "--device", "cuda"])
    assert r.exit_code == 2 and "CUDA" in r.output


# ------------------------------------------------------------------------------ demo --finetune


def test_compare_finetuned_keeps_encoder_and_mil_slides_apart(tmp_path: Path) -> None:
    """Tiny generated cohort (64-px tiles): split by patient, fine-tune, MIL per aggregator on both feature sets."""
    import csv

    from wsi_convnext.finetune import compare_finetuned, hold_out_patients
    from wsi_convnext.inputs import discover_slides
    from wsi_convnext.labels import read_labels
    from wsi_convnext.store import open_store
    from wsi_convnext.synthetic import make_cohort
    from wsi_convnext.tiling.tiler import TileParams, tile_slides

    make_cohort(tmp_path / "slides", 12, size=(1600, 1400), mpp=0.5, seed=0, lesion_fraction=(0.05, 0.1),
                pen_fraction=0.0, pale_fraction=0.0)  # fmt: skip
    results = tile_slides(discover_slides([tmp_path / "slides"]), tmp_path / "tiles", TileParams(mpp=1.0, tile_size=64))
    stores = [str(r.store_path) for r in results]
    split = hold_out_patients(stores, tmp_path / "slides" / "labels.csv", tmp_path / "cmp", held_out=0.5)
    enc_t, held_t = read_labels(split.encoder_labels), read_labels(split.held_out_labels)
    assert set(enc_t.labels) == set(held_t.labels) == {"normal", "tumor"}  # stratified
    assert not set(enc_t.patient_ids) & set(held_t.patient_ids)  # grouped by patient
    assert len(split.encoder_stores) + len(split.held_out_stores) == 12

    recipe = {"steps": 2, "batch_size": 8, "crop_size": 64, "eval_size": 64, "val_frac": 0.0, "num_workers": 0, "device": "cpu"}
    cmp = compare_finetuned(split.encoder_stores, split.encoder_labels, split.held_out_stores, split.held_out_labels,
                            tmp_path / "cmp", aggregators=["abmil", "mean"], recipe=recipe, folds=2)  # fmt: skip
    assert [(a.aggregator, a.features) for a in cmp.arms] == [
        ("abmil", "random"), ("abmil", "finetuned"), ("mean", "random"), ("mean", "finetuned")]  # fmt: skip
    assert all(0.0 <= a.auc <= 1.0 and a.auc_ci[0] <= a.auc_ci[1] for a in cmp.arms)
    assert cmp.best("finetuned").auc == max(cmp.auc(n)["finetuned"] for n in ("abmil", "mean"))
    # The encoder saw the encoder slides' tiles and nothing else ...
    cfg = json.loads((cmp.encoder_dir / "config.json").read_text())
    assert sorted(cfg["config"]["data"]) == sorted(split.encoder_stores)
    assert cfg["data"]["n_tiles"] == sum(len(open_store(s)) for s in split.encoder_stores)
    assert cfg["config"]["steps"] == 2 and cfg["config"]["crop_size"] == 64  # the recipe reached FinetuneConfig
    # ... and MIL ran on the held-out slides only, each of them predicted out of fold.
    for arm in cmp.arms:
        with open(tmp_path / "cmp" / f"mil-{arm.aggregator}-{arm.features}" / "oof_predictions.csv", newline="") as fh:
            assert sorted(r["slide_id"] for r in csv.DictReader(fh)) == sorted(held_t.slide_ids)
    keys = {f: cmp.arm("abmil", f).feature_key for f in ("random", "finetuned")}
    assert keys["random"].endswith("-random") and keys["finetuned"] != keys["random"]
    assert all(set(keys.values()) <= set(open_store(s).feature_keys) for s in split.held_out_stores)
    assert not any(keys["finetuned"] in open_store(s).feature_keys for s in split.encoder_stores)
    table = cmp.table()
    assert table.count("\n| abmil |") == 1 and table.count("\n| mean |") == 1 and "held-out" in table
    with pytest.raises(ConfigError, match="both encoder and held-out"):
        compare_finetuned(split.encoder_stores, split.encoder_labels, split.encoder_stores[:1], split.held_out_labels,
                          tmp_path / "x")  # fmt: skip
    with pytest.raises(ConfigError, match="unknown finetune config key"):
        compare_finetuned(split.encoder_stores, split.encoder_labels, split.held_out_stores, split.held_out_labels,
                          tmp_path / "x", recipe={"stepz": 3})  # fmt: skip


@pytest.mark.slow
def test_demo_finetune_compares_random_and_finetuned_features_on_held_out_slides(tmp_path: Path) -> None:
    from wsi_convnext.demo import run_demo

    r = run_demo(tmp_path / "demo", n_slides=12, slide_size=(2500, 2000), finetune=True, finetune_steps=4)
    assert r.finetune_auc is not None and set(r.finetune_auc) == {"random", "finetuned"}
    assert all(0.0 <= v <= 1.0 for v in r.finetune_auc.values())
    assert "held-out" in r.finetune_table
    cfg = json.loads((tmp_path / "demo" / "finetune" / "encoder" / "config.json").read_text())
    train_ids = {line.split(",")[0] for line in (tmp_path / "demo" / "finetune" / "encoder_labels.csv").read_text().split()[1:]}
    test_ids = {line.split(",")[0] for line in (tmp_path / "demo" / "finetune" / "held_out_labels.csv").read_text().split()[1:]}
    assert train_ids and test_ids and not train_ids & test_ids
    assert cfg["data"]["kind"] == "stores" and cfg["data"]["n_groups"] <= len(train_ids)  # only held-in slides


def test_a_second_run_on_one_output_folder_waits_for_the_first(tmp_path: Path) -> None:
    """Issue 12 item 2: one writer per ENC_DIR; the other run waits instead of writing beside it."""
    import threading

    from wsi_convnext._io import path_lock

    results: list[Path] = []
    with path_lock(tmp_path / "enc-locked"):  # another run holds ENC_DIR
        t = threading.Thread(target=lambda: results.append(_tiny(tmp_path, "enc-locked", stem="patch")))
        t.start()
        t.join(3.0)
        assert t.is_alive() and not (tmp_path / "enc-locked").exists()  # waiting, nothing written
    t.join(300)
    assert results and (results[0] / "encoder.safetensors").is_file()


# ----------------------------------------------------------------------- other encoder families


def test_finetune_a_timm_vit_then_embed_with_it(tmp_path: Path) -> None:
    """A non-ConvNeXt timm model fine-tunes from scratch (its own init), with no stem, and loads back."""
    import torch

    from wsi_convnext.encoders import build_encoder

    out = _tiny(tmp_path, "vit", model="vit_tiny_patch16_224", freeze="stem", layer_decay=0.8)
    info = json.loads((out / "config.json").read_text())
    assert info["stem"] == "none" and info["start"]["kind"] == "scratch" and info["start"]["stem_converted"] is False
    assert "stem" in info["freeze"]["frozen"]
    model = load_finetuned(out)
    assert model.encoder.family.name == "timm" and model.encoder.key.startswith("vit_tiny_patch16_224-")
    again = build_encoder("vit_tiny_patch16_224", weights=out)  # the stem "none" comes from the metadata
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(again(x), model.encoder(x))
    r = runner.invoke(app, ["finetune", str(tmp_path / "colour"), "-o", str(tmp_path / "o2"), "--model",
                            "vit_tiny_patch16_224", "--stem", "overlap", "--steps", "1", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2 and "no stem choices" in r.output
