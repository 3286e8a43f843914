"""Checkpoints: safetensors + JSON round trip, no pickles, clear errors on damaged folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_convnext.errors import InputNotFoundError, WeightsError
from wsi_convnext.mil.aggregators import AGGREGATORS
from wsi_convnext.mil.checkpoint import load_model, save_model
from wsi_convnext.mil.data import Bag
from wsi_convnext.mil.model import TrainedModel, compute_feature_stats, new_model


def _model(name: str, n_classes: int = 2, dim: int = 24, seed: int = 0) -> tuple[TrainedModel, list[Bag]]:
    rng = np.random.default_rng(seed)
    bags = [Bag(f"s{i}", (rng.normal(size=(int(rng.integers(20, 60)), dim)) * 3 + 1).astype(np.float16)) for i in range(4)]
    torch.manual_seed(seed)
    module, kwargs = new_model(name, dim, n_classes, compute_feature_stats(bags), {})
    classes = tuple(f"class_{c}" for c in range(n_classes))
    return TrainedModel(module, classes, name, kwargs, feature_key="convnext_atto-224", positive_class=classes[1] if n_classes == 2 else None, info={"seed": 0}), bags


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_round_trip_identical_predictions(tmp_path: Path, name: str, n_classes: int) -> None:
    model, bags = _model(name, n_classes)
    save_model(tmp_path / "m", model, name="my-model")
    loaded = load_model(tmp_path / "m")
    assert loaded.classes == model.classes and loaded.aggregator == name
    assert loaded.feature_key == "convnext_atto-224" and loaded.info["name"] == "my-model"
    for bag in bags:
        p1, s1 = model.predict(bag)
        p2, s2 = loaded.predict(bag)
        assert p1.shape == (n_classes,) and s1.shape == (len(bag),)
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(s1, s2)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k]), k


def test_files_are_json_and_safetensors_only(tmp_path: Path) -> None:
    model, _ = _model("dsmil")
    out = save_model(tmp_path / "m", model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "wsi-convnext-mil" and cfg["aggregator"] == "dsmil"
    assert cfg["in_dim"] == 24 and cfg["classes"] == ["class_0", "class_1"]
    assert cfg["aggregator_kwargs"]["hidden_dim"] == 128
    assert len(cfg["normalization"]["mean"]) == 24 and len(cfg["normalization"]["std"]) == 24
    assert cfg["package_version"] and cfg["feature_key"] == "convnext_atto-224" and cfg["name"] == "m"
    raw = (out / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])  # safetensors: plain JSON header + raw tensor bytes
    assert header["__metadata__"]["format"] == "wsi-convnext-mil"
    assert "norm_mean" not in header and any(k.startswith("aggregator.") for k in header)
    for blob in (raw, (out / "config.json").read_bytes()):
        assert b"\x80\x04\x95" not in blob and b"\x80\x02" not in blob[:2]  # no pickle protocol markers


def _saved(tmp_path: Path) -> Path:
    model, _ = _model("abmil")
    return save_model(tmp_path / "m", model)


def test_missing_folder_or_files(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="not found"):
        load_model(tmp_path / "nowhere")
    d = _saved(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(InputNotFoundError, match="no model.safetensors"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(InputNotFoundError, match="no config.json"):
        load_model(d)


def test_corrupt_weights(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(WeightsError, match="checksum"):
        load_model(d)
    # Without a recorded checksum, the safetensors reader itself reports the damage.
    cfg = json.loads((d / "config.json").read_text())
    cfg["weights"].pop("sha256")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="cannot be read as safetensors"):
        load_model(d)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: "{not json", "not valid JSON"),
        (lambda c: json.dumps({**c, "format": "other"}), "not a wsi-convnext-mil config"),
        (lambda c: json.dumps({**c, "format_version": 99}), "format_version 99"),
        (lambda c: json.dumps({k: v for k, v in c.items() if k != "classes"}), "lacks key.*classes"),
        (lambda c: json.dumps({**c, "aggregator": "nope"}), "unknown aggregator 'nope'"),
        (lambda c: json.dumps({**c, "in_dim": 25}), "does not fit|shape"),
        (lambda c: json.dumps({**c, "aggregator_kwargs": {**c["aggregator_kwargs"], "hidden_dim": 64}}), "shape"),
    ],
)
def test_corrupt_config(tmp_path: Path, edit, match: str) -> None:  # noqa: ANN001
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(edit(cfg))
    with pytest.raises(WeightsError, match=match) as exc:
        load_model(d)
    assert "\n" not in str(exc.value)
