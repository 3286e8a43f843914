"""Pathology foundation-model presets: architectures, feature recipes, preprocessing, hub-cache weights.

Architectures are built with random weights. The ViT-L/H/g presets are built on the meta device
for their shapes (a CPU forward of a 1.1 B-parameter ViT-g is too slow for the suite); the
recipe and loading tests shrink a preset's depth (a timm argument) to keep real forwards small.
The kaiko.ai presets and UNI embed real tiles offline (slow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from cmu_stores import read_cmu_tiles, write_store
from test_encoders_timm_generic import _isolate_hf, hub_snapshot
from wsi_convnext.cli import app
from wsi_convnext.encoders import PRESETS, build_encoder, family_for
from wsi_convnext.encoders.base import _preprocessing
from wsi_convnext.errors import WeightsError
from wsi_convnext.store import open_store

runner = CliRunner()
#: The published embedding sizes (model cards).
EXPECTED = {
    "uni": 1024, "uni2-h": 1536, "virchow": 2560, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
    "prov-gigapath": 1536, "kaiko-vits16": 384, "kaiko-vits8": 384, "kaiko-vitb16": 768, "kaiko-vitb8": 768,
    "kaiko-vitl14": 1024,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiles(cmu_slide: Path) -> np.ndarray:
    return read_cmu_tiles(cmu_slide, 2)[0]


def test_every_preset_is_listed() -> None:
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_architecture(name: str) -> None:
    """Feature size, pooling and preprocessing of each preset, by shape inference on the meta device."""
    preset = PRESETS[name]
    family = family_for(name)
    assert family.name == "preset"
    with torch.device("meta"):
        net = family.create_model(name, family.stem(None))
        out = net(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, EXPECTED[name]) == (2, preset.num_features)
    assert int(net.num_features) == EXPECTED[name]
    trunk = getattr(net, "trunk", net)
    assert trunk.dynamic_img_size  # tiles keep their µm/px; see the tile-size policy
    assert trunk.pretrained_cfg["hf_hub_id"] == preset.hf_repo
    assert trunk.pretrained_cfg["architecture"] == preset.arch and "tag" not in trunk.pretrained_cfg
    pre = _preprocessing(net, "none")
    assert pre["mean"] == pytest.approx(list(preset.mean)) and pre["std"] == pytest.approx(list(preset.std))
    assert pre["input_size"] == [3, 224, 224] and pre["crop"] == "none"
    # Pooling: the class token (timm's pooled output), or class token + mean patch tokens.
    assert preset.recipe == ("class_mean_patch" if name.startswith("virchow") else "class_token")
    if preset.recipe == "class_token":
        assert trunk.global_pool == "token"


def test_published_details() -> None:
    assert PRESETS["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert PRESETS["kaiko-vitb8"].mean == (0.5, 0.5, 0.5)
    uni2 = PRESETS["uni2-h"].timm_kwargs
    assert uni2["reg_tokens"] == 8 and uni2["embed_dim"] == 1536 and uni2["mlp_layer"] == "SwiGLUPacked"
    assert PRESETS["virchow2"].timm_kwargs["reg_tokens"] == 4
    assert PRESETS["prov-gigapath"].timm_kwargs["patch_size"] == 16
    assert all(p.license for p in PRESETS.values())
    assert PRESETS["uni"].gated and not PRESETS["kaiko-vits16"].gated


def test_virchow2_recipe_is_class_token_and_mean_patch_tokens(tiles: np.ndarray) -> None:
    """The Virchow2 recipe on real tiles: [cls, mean(patch tokens)], the 4 register tokens left out."""
    enc = build_encoder("virchow2", depth=1)
    assert enc.key == "virchow2-random" and enc.num_features == 2560
    trunk = enc.model.trunk
    assert trunk.num_prefix_tokens == 5
    out = enc(tiles)
    with torch.inference_mode():
        tokens = trunk.forward_features(enc.preprocess(tiles))
    assert tokens.shape[1] == 5 + 16 * 16
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))
    assert not torch.allclose(out[:, 1280:], tokens[:, 1:].mean(1))  # registers are not averaged in
    groups = enc.parameter_groups()
    assert list(groups) == ["stem", "stages.0", "head"]
    assert sum(len(v) for v in groups.values()) == len(list(enc.model.parameters()))


def _timm_checkpoint(preset: str, **overrides) -> dict[str, torch.Tensor]:
    """A random checkpoint in the authors' layout (plain timm keys), as their hub repos hold."""
    import timm

    p = PRESETS[preset]
    kwargs = {**p.create_kwargs(), **overrides}
    kwargs.pop("pretrained_cfg_overlay")
    torch.manual_seed(11)
    net = timm.create_model(p.arch, num_classes=0, **kwargs)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(("preset", "file", "overrides"), [
    ("kaiko-vits16", "model.safetensors", {}),
    ("virchow2", "pytorch_model.bin", {"depth": 1}),
])  # fmt: skip
def test_pretrained_preset_loads_from_hub_cache(
    preset: str, file: str, overrides: dict, tiles: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _isolate_hf(monkeypatch, tmp_path)
    sd = _timm_checkpoint(preset, **overrides)
    blob = tmp_path / file
    if file.endswith(".safetensors"):
        save_file(sd, str(blob))
    else:
        torch.save(sd, blob)
    snapshot = hub_snapshot(cache, PRESETS[preset].hf_repo, {file: blob.read_bytes()})
    enc = build_encoder(preset, pretrained=True, **overrides)
    assert enc.weights_path == str(snapshot / file)
    assert enc.key == f"{preset}-{enc.weights_sha256[:12]}"
    random = build_encoder(preset, **overrides)
    assert not torch.allclose(enc(tiles), random(tiles))
    trunk = getattr(enc.model, "trunk", enc.model)
    loaded = trunk.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_gated_preset_offline_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _isolate_hf(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as info:
        build_encoder("uni", pretrained=True, depth=1)
    msg = str(info.value)
    assert "\n" not in msg
    assert "CC-BY-NC-ND-4.0" in msg and "https://huggingface.co/MahmoodLab/UNI" in msg and "HF_TOKEN" in msg
    assert "HF_HUB_OFFLINE" in msg and str(cache / "models--MahmoodLab--UNI") in msg and "--weights PATH" in msg


def test_cohort_embed_section_accepts_presets() -> None:
    from wsi_convnext.config import load_config

    cfg = load_config(overrides={"embed.model": "kaiko-vits16"}, require_io=False)
    assert cfg.encoder_config().build().key == "kaiko-vits16-random"


@pytest.mark.slow
def test_presets_embed_offline_side_by_side(cmu_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four kaiko.ai presets, UNI and a plain timm ViT embed one store offline; their keys coexist."""
    _isolate_hf(monkeypatch, tmp_path / "hf")
    tiles, coords = read_cmu_tiles(cmu_slide, 3)
    store = write_store(tmp_path / "cmu.zarr", tiles, coords)
    names = ["kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "uni", "vit_small_patch16_224"]
    for name in names:
        result = runner.invoke(app, ["embed", str(store), "--model", name, "--device", "cpu", "--batch-size", "3"])
        assert result.exit_code == 0, result.output
    keys = open_store(store).feature_keys
    group = zarr.open_group(str(store), mode="r")
    for name in names:
        key = f"{name}-random"
        assert key in keys
        arr = group[f"features/{key}"]
        assert arr.shape == (3, EXPECTED.get(name, 384))
        assert np.isfinite(arr[:].astype(np.float32)).all()
        assert arr.attrs["model"] == name and arr.attrs["tile_size_policy"].startswith("dynamic_img_size")


def test_docs_table_lists_every_preset() -> None:
    """docs/encoders.md stays true: one row per preset with its feature size and licence."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "encoders.md").read_text()
    for name, preset in PRESETS.items():
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        cells = [c.strip() for c in row.split("|")]
        assert str(preset.num_features) in cells and f"`{preset.arch}`" in row and preset.hf_repo in row
        assert preset.license in row


@pytest.mark.parametrize("command", ["embed", "finetune"])
def test_cli_help_names_the_encoders(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=400)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "hf-hub:ORG/NAME" in text and "docs/encoders.md" in text
    assert all(name in text for name in ("uni2-h", "virchow2", "h-optimus-0", "prov-gigapath", "kaiko-vits16"))
