"""The generic timm family: any timm name or hf-hub: id, pooled features, no stems, tile-size policy.

Real tiles (CMU-1 via OpenSlide), real timm models with random weights, a real Hugging Face
cache layout on disk (offline), real zarr stores and the real CLI.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from cmu_stores import read_cmu_tiles, write_store
from wsi_convnext.cli import app
from wsi_convnext.embed import embed_stores
from wsi_convnext.encoders import build_encoder, family_for, save_encoder_weights
from wsi_convnext.errors import ConfigError, EncoderError, WeightsError
from wsi_convnext.store import open_store

VIT = "vit_small_patch16_224"
TINY_VIT = "vit_tiny_patch16_224"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiles(cmu_slide: Path) -> np.ndarray:
    """Four real 224-px H&E tiles."""
    return read_cmu_tiles(cmu_slide, 4)[0]


@pytest.fixture(scope="module")
def vit() -> object:
    return build_encoder(VIT)


@pytest.fixture
def store(cmu_slide: Path, tmp_path: Path) -> Path:
    tiles, coords = read_cmu_tiles(cmu_slide, 6)
    return write_store(tmp_path / "cmu.zarr", tiles, coords)


def _isolate_hf(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def hub_snapshot(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` into the Hugging Face hub cache layout for ``repo``; returns the snapshot folder."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("model", "family"),
    [(VIT, "timm"), ("resnet18", "timm"), ("vit_small_patch16_224.augreg_in21k", "timm"),
     ("hf-hub:someone/some-model", "timm"), ("convnext_atto", "convnext"), ("uni", "preset")],
)  # fmt: skip
def test_names_go_to_their_family(model: str, family: str) -> None:
    assert family_for(model).name == family


def test_unknown_name_fails_in_one_line() -> None:
    with pytest.raises(EncoderError) as info:
        build_encoder("vit_does_not_exist_224")
    msg = str(info.value)
    assert "\n" not in msg and "vit_does_not_exist_224" in msg
    assert "timm.list_models()" in msg and "hf-hub:" in msg and "uni" in msg


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_stem_on_a_family_without_stems_is_one_line(stem: str) -> None:
    with pytest.raises(ConfigError, match="no stem choices") as info:
        build_encoder(VIT, stem=stem)
    assert "\n" not in str(info.value) and "drop --stem" in str(info.value)


def test_cli_stem_without_stems_exits_2(store: Path) -> None:
    result = runner.invoke(app, ["embed", str(store), "--model", VIT, "--stem", "overlap", "--device", "cpu"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no stem choices" in lines[0]


# ------------------------------------------------------------------------- features, policy


def test_vit_pooled_features_and_preprocessing(vit, tiles: np.ndarray) -> None:
    import timm
    from timm.data import resolve_model_data_config

    ref = timm.create_model(VIT, num_classes=0)
    cfg = resolve_model_data_config(ref)
    assert vit.num_features == 384
    assert vit.preprocessing["mean"] == pytest.approx(list(cfg["mean"]))
    assert vit.preprocessing["std"] == pytest.approx(list(cfg["std"]))
    assert vit.preprocessing["input_size"] == [3, 224, 224]
    assert vit.key == f"{VIT}-random"  # no stem part: the family has none
    attrs = vit.attrs()
    assert attrs["family"] == "timm" and attrs["stem"] == "none"
    assert attrs["tile_size_policy"].startswith("dynamic_img_size") and "16-px" in attrs["tile_size_policy"]
    out = vit(tiles)
    assert out.shape == (4, 384) and torch.isfinite(out).all()
    # Pooled = timm's class token after the final norm (ViT default global_pool="token").
    x = vit.preprocess(tiles)
    with torch.inference_mode():
        tokens = vit.model.forward_features(x)
    torch.testing.assert_close(out, tokens[:, 0])


def test_vit_takes_other_multiples_of_the_patch(vit, tiles: np.ndarray) -> None:
    """dynamic_img_size: a 160-px tile keeps its µm/px (no resize); position embeddings interpolate."""
    assert vit(tiles[:, :160, :160]).shape == (4, 384)
    assert vit.tile_size_error(160) is None
    why = vit.tile_size_error(200)
    assert why is not None and "\n" not in why and "multiple of the 16-px patches" in why
    assert "--tile-size 192 or 208" in why and "--resize input_size" in why


def test_convnet_native_policy(tiles: np.ndarray) -> None:
    enc = build_encoder("resnet18")
    assert enc.num_features == 512 and enc.attrs()["tile_size_policy"].startswith("native")
    assert enc(tiles[:, :200, :200]).shape == (4, 512)
    assert enc.tile_size_error(200) is None


def test_fixed_size_model_needs_resize(tiles: np.ndarray) -> None:
    enc = build_encoder("mixer_s16_224")  # takes no dynamic_img_size
    assert "fixed input size 224" in enc.attrs()["tile_size_policy"]
    assert "224-px inputs only" in enc.tile_size_error(256)
    resized = build_encoder("mixer_s16_224", resize="input_size")
    assert resized.tile_size_error(256) is None and resized.attrs()["tile_size_policy"].startswith("resize")
    big = np.concatenate([tiles, tiles[:, :32]], axis=1)[:, :256]
    big = np.concatenate([big, big[:, :, :32]], axis=2)[:, :, :256]
    assert resized(np.ascontiguousarray(big)).shape == (4, 512)


# ------------------------------------------------------------------------------- weights


def test_saved_weights_load_back(vit, tiles: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    sha = save_encoder_weights(vit, path)
    enc = build_encoder(VIT, weights=path)
    assert enc.weights_sha256 == sha and enc.key == f"{VIT}-{sha[:12]}"
    torch.testing.assert_close(enc(tiles), vit(tiles))


def test_hf_hub_id_from_local_cache(tiles: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An hf-hub: id whose config.json and weights are in the hub cache layout builds offline."""
    import timm

    cache = _isolate_hf(monkeypatch, tmp_path)
    torch.manual_seed(5)
    src = timm.create_model(TINY_VIT, num_classes=0, dynamic_img_size=True).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    config = {"architecture": TINY_VIT, "num_classes": 0,
              "pretrained_cfg": {"mean": [0.6, 0.5, 0.7], "std": [0.2, 0.25, 0.2], "input_size": [3, 224, 224]}}  # fmt: skip
    snapshot = hub_snapshot(cache, "local-lab/tiny-path-vit",
                            {"config.json": json.dumps(config).encode(), "model.safetensors": weights.read_bytes()})  # fmt: skip
    enc = build_encoder("hf-hub:local-lab/tiny-path-vit", pretrained=True)
    assert enc.weights_path == str(snapshot / "model.safetensors")
    assert enc.preprocessing["mean"] == pytest.approx([0.6, 0.5, 0.7])
    assert enc.key.startswith("hf-hub_local-lab_tiny-path-vit-") and "/" not in enc.key
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.6, 0.5, 0.7]).view(1, 3, 1, 1)) / (
        torch.tensor([0.2, 0.25, 0.2]).view(1, 3, 1, 1)
    )
    with torch.inference_mode():
        ref = src(x)
    torch.testing.assert_close(enc(tiles), ref, atol=1e-4, rtol=1e-4)


def test_hf_hub_id_offline_not_cached_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _isolate_hf(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as info:
        build_encoder("hf-hub:some-lab/gated-model")
    msg = str(info.value)
    assert "\n" not in msg
    assert "HF_TOKEN" in msg and "https://huggingface.co/some-lab/gated-model" in msg
    assert str(cache / "models--some-lab--gated-model") in msg


# ---------------------------------------------------------------------------------- embed


def test_cli_embed_vit_writes_the_model_key(store: Path) -> None:
    result = runner.invoke(app, ["embed", str(store), "--model", VIT, "--device", "cpu", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    s = open_store(store)
    key = f"{VIT}-random"
    assert key in s.feature_keys
    arr = zarr.open_group(str(store), mode="r")[f"features/{key}"]
    assert arr.shape == (6, 384)
    assert arr.attrs["family"] == "timm" and arr.attrs["tile_size_policy"].startswith("dynamic_img_size")


def test_embed_refuses_tiles_a_vit_cannot_take(cmu_slide: Path, tmp_path: Path) -> None:
    tiles, coords = read_cmu_tiles(cmu_slide, 3, size=200)
    path = write_store(tmp_path / "odd.zarr", tiles, coords)
    [result] = embed_stores([path], model=VIT, device="cpu")
    assert result.status == "failed" and "not a multiple of the 16-px patches" in result.error
    assert "\n" not in result.error
    # The alternative the message names works: resize to the model's input size.
    result = runner.invoke(app, ["embed", str(path), "--model", VIT, "--resize", "input_size", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    arr = zarr.open_group(str(path), mode="r")[f"features/{VIT}-random-resize_input_size"]
    assert arr.shape == (3, 384) and arr.attrs["tile_size_policy"].startswith("resize")


def test_cohort_embed_section_accepts_any_timm_name() -> None:
    from wsi_convnext.config import load_config

    cfg = load_config(overrides={"embed.model": "resnet18"}, require_io=False)
    enc = cfg.encoder_config().build()
    assert enc.key == "resnet18-random" and enc.family.name == "timm"


def test_param_groups_cover_every_parameter(vit) -> None:
    groups = vit.parameter_groups()
    assert list(groups)[0] == "stem" and list(groups)[-1] == "head"
    assert [g for g in groups if g.startswith("stages.")] == [f"stages.{i}" for i in range(12)]
    assert sum(len(v) for v in groups.values()) == len(list(vit.model.parameters()))
    assert re.match(r"^(cls_token|pos_embed|patch_embed)", next(n for n, _ in vit.named_parameter_groups()["stem"]))
