"""The cohort-scope training stages: tile → (pretrain, no labels) → finetune (weak labels, training
slides) → embed → mil, from one run config, on a real Dask LocalCluster with real (tiny) training runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi_convnext.cohort import run_cohort, stage_plan, training_dir
from wsi_convnext.config import load_config
from wsi_convnext.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_convnext.synthetic import make_cohort

    root = tmp_path_factory.mktemp("training-cohort")
    make_cohort(root / "slides", 12, size=(2200, 1800), seed=3, pale_fraction=0.0, pen_fraction=0.0,
                lesion_fraction=(0.05, 0.08))  # fmt: skip
    return root / "slides"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


def _config(cohort: Path, out: Path, **extra: Any) -> Any:
    """The run config of these tests; an ``extra`` key set to None is left out."""
    return load_config(None, {k: v for k, v in {
        "slides": str(cohort), "out": str(out), "report": False, "embed.model": "convnext_atto",
        "embed.stem": "overlap", "embed.device": "cpu", "embed.batch_size": 32, "tile.mpp": 0.5,
        "finetune.labels": str(cohort / "labels.csv"), "finetune.steps": 3, "finetune.batch_size": 8,
        "finetune.crop_size": 64, "finetune.eval_size": 64, "finetune.val_frac": 0.0, "finetune.threads": 1,
        "finetune.held_out": 0.5, "mil.aggregator": "mean", "mil.folds": 2, "mil.epochs": 3, "mil.min_epochs": 1,
        "mil.n_boot": 0, **extra,
    }.items() if v is not None})  # fmt: skip


def test_finetune_embed_mil_from_one_config(cohort: Path, tmp_path: Path, client: Any) -> None:
    from wsi_convnext.store import open_store

    cfg = _config(cohort, tmp_path / "out")
    assert tuple(s.name for s in stage_plan(cfg)) == ("tile", "finetune", "embed", "mil")
    summary = run_cohort(cfg, client=client)
    assert summary.ok, summary.failures
    assert summary.done == 12
    ft, mil = summary.cohort["finetune"], summary.cohort["mil"]
    assert ft.status == "done" and mil.status == "done"
    tdir = training_dir(cfg)
    enc_ids = [line.split(",")[0] for line in (tdir / "encoder_labels.csv").read_text().splitlines()[1:]]
    mil_ids = [line.split(",")[0] for line in (tdir / "mil_labels.csv").read_text().splitlines()[1:]]
    assert len(enc_ids) >= 4 and len(mil_ids) >= 4 and not set(enc_ids) & set(mil_ids)
    assert ft.data["encoder_slides"] == len(enc_ids) and ft.data["mil_slides"] == len(mil_ids) == mil.data["slides"]

    # The encoder was trained on its slides only, and embed used it on every slide.
    enc_dir = Path(ft.data["encoder_dir"])
    config = json.loads((enc_dir / "config.json").read_text())
    trained_on = {Path(p).name.removesuffix(".zarr") for p in config["config"]["data"]}
    assert trained_on == set(enc_ids)
    store = open_store(tmp_path / "out" / f"{mil_ids[0]}.zarr")
    (key,) = store.feature_keys
    assert key == mil.data["feature_key"] and "random" not in key
    assert store.feature_attrs(key)["weights_sha256"] not in ("random", None)

    # MIL was cross-validated on the slides the encoder never saw.
    oof = (tdir / "mil" / "oof_predictions.csv").read_text().splitlines()
    assert oof[0].startswith("slide_id,true_label,predicted")
    assert sorted(r.split(",")[0] for r in oof[1:]) == sorted(mil_ids)
    assert (tdir / "mil" / "model.safetensors").is_file() and 0 <= mil.data["cv_auc"] <= 1

    # A rerun finds the fine-tuned encoder finished, the features there and the MIL model up to date.
    model_mtime = (tdir / "mil" / "model.safetensors").stat().st_mtime_ns
    again = run_cohort(cfg, client=client)
    assert again.ok and again.cohort["finetune"].data["encoder_dir"] == str(enc_dir)
    assert again.skipped == 12
    assert again.cohort["mil"].data == mil.data
    assert (tdir / "mil" / "model.safetensors").stat().st_mtime_ns == model_mtime
    # Other [mil] settings retrain it.
    other = run_cohort(_config(cohort, tmp_path / "out", **{"mil.epochs": 4}), client=client)
    assert other.ok and (tdir / "mil" / "model.safetensors").stat().st_mtime_ns != model_mtime


_PRETRAIN = {
    "pretrain.enabled": True, "pretrain.steps": 2, "pretrain.batch_size": 8, "pretrain.global_size": 64,
    "pretrain.local_size": 32, "pretrain.n_local": 2, "pretrain.out_dim": 64, "pretrain.threads": 1,
    "pretrain.num_workers": 0,
}  # fmt: skip


def test_pretrain_before_embed_then_before_finetune(cohort: Path, tmp_path: Path, client: Any) -> None:
    from wsi_convnext._io import file_sha256
    from wsi_convnext.store import open_store

    out = tmp_path / "out"
    # Without labels: tile → pretrain (every slide, no labels) → embed with the pretrained encoder.
    cfg = _config(cohort, out, **_PRETRAIN, **{"finetune.labels": None})
    assert tuple(s.name for s in stage_plan(cfg)) == ("tile", "pretrain", "embed")
    summary = run_cohort(cfg, client=client)
    assert summary.ok, summary.failures
    pre = summary.cohort["pretrain"]
    assert pre.status == "done" and pre.data["pretrain_slides"] == 12 and pre.data["encoder_stem"] == "overlap"
    weights = Path(pre.data["encoder_weights"])
    assert weights == training_dir(cfg) / "pretrain" / "encoder.safetensors"
    pre_cfg = json.loads((weights.parent / "config.json").read_text())
    assert len(pre_cfg["config"]["data"]) == 12 and pre_cfg["resolved"]["total_steps"] == 2
    store = open_store(sorted(out.glob("*.zarr"))[0])
    (key,) = store.feature_keys
    assert store.feature_attrs(key)["weights_sha256"] == file_sha256(weights)
    assert store.feature_attrs(key)["stem"] == "overlap"

    # With labels, in the same folder: the finished pretraining is found (not redone) and finetune
    # starts from it; embed then uses the fine-tuned encoder.
    mtime = weights.stat().st_mtime_ns
    cfg2 = _config(cohort, out, **_PRETRAIN)
    assert tuple(s.name for s in stage_plan(cfg2)) == ("tile", "pretrain", "finetune", "embed", "mil")
    again = run_cohort(cfg2, client=client)
    assert again.ok, again.failures
    assert again.cohort["pretrain"].data == pre.data and weights.stat().st_mtime_ns == mtime
    ft_start = json.loads((Path(again.cohort["finetune"].data["encoder_dir"]) / "config.json").read_text())["start"]
    assert Path(ft_start["weights_path"]) == weights and ft_start["stem_converted"] is False


def test_training_config_errors(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'finetune.lr' must be positive, got 0"):
        _config(cohort, tmp_path, **{"finetune.lr": 0})
    with pytest.raises(ConfigError, match=r"'finetune.held_out' must be in \(0, 1\)"):
        _config(cohort, tmp_path, **{"finetune.held_out": 1.0})
    with pytest.raises(ConfigError, match="'mil.folds' must be at least 2"):
        _config(cohort, tmp_path, **{"mil.folds": 1})
    with pytest.raises(ConfigError, match="without 'shard'"):
        _config(cohort, tmp_path, shard="0/2")
    with pytest.raises(ConfigError, match="need 'embed.model'"):
        load_config(None, {"slides": "a", "out": "o", "finetune.labels": "l.csv"})
    with pytest.raises(ConfigError, match="'pretrain.enabled' needs 'embed.model'"):
        load_config(None, {"slides": "a", "out": "o", "pretrain.enabled": True})
    with pytest.raises(ConfigError, match="'pretrain.lr' must be positive, got 0"):
        _config(cohort, tmp_path, **_PRETRAIN, **{"pretrain.lr": 0})
    with pytest.raises(ConfigError, match=r"\[pretrain\] trains on the whole cohort"):
        _config(cohort, tmp_path, **_PRETRAIN, **{"finetune.labels": None}, shard="0/2")
