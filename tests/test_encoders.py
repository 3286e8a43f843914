"""Encoders: families, ConvNeXt stems, function-preserving stem conversion, weights, pretrained cache, devices."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wsi_convnext.params import ParameterError
from wsi_convnext.encoders import (
    FAMILIES,
    STEMS,
    EncoderConfig,
    EncoderFamily,
    build_encoder,
    convert_patch_stem_to_overlap,
    family_for,
    load_weights,
    register_family,
    resolve_device,
    save_encoder_weights,
)
from wsi_convnext.errors import (
    ConfigError,
    DeviceError,
    EncoderError,
    InputNotFoundError,
    WeightsError,
)

MODEL = "convnext_atto"
ATTO_FEATURES = 320
# Level-0 (x, y) of 224-px regions of CMU-1-Small-Region.svs: three in tissue, one mostly background.
REGIONS = [(1120, 896), (1344, 896), (672, 2464), (0, 0)]


@pytest.fixture(scope="module")
def tiles(cmu_slide: Path) -> np.ndarray:
    """Real H&E tiles, uint8 (4, 224, 224, 3), read with OpenSlide."""
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as slide:
        out = [np.asarray(slide.read_region(xy, 0, (224, 224)).convert("RGB")) for xy in REGIONS]
    return np.stack(out)


def _perturbed_patch_state_dict(model: str = MODEL) -> dict[str, torch.Tensor]:
    """A random patch-stem state dict whose every part matters (timm inits layer scale at 1e-6)."""
    torch.manual_seed(1)
    net = build_encoder(model, stem="patch").model
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    for key, value in sd.items():
        if key.endswith("gamma"):
            sd[key] = torch.rand(value.shape, generator=gen) * 0.5 + 0.25
        elif key.startswith("stem.") and key != "stem.0.weight":  # conv bias, norm weight/bias
            sd[key] = value + 0.3 * torch.randn(value.shape, generator=gen)
    return sd


@pytest.fixture(scope="module")
def patch_ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same patch-stem checkpoint as safetensors and as a torch state dict."""
    sd = _perturbed_patch_state_dict()
    folder = tmp_path_factory.mktemp("weights")
    save_file(sd, folder / "atto_patch.safetensors")
    torch.save(sd, folder / "atto_patch.pth")
    return {"safetensors": folder / "atto_patch.safetensors", "pth": folder / "atto_patch.pth"}


@pytest.fixture(scope="module")
def patch_reference(patch_ckpt: dict[str, Path], tiles: np.ndarray) -> torch.Tensor:
    """Embeddings of the real tiles by the patch-stem checkpoint."""
    return build_encoder(MODEL, stem="patch", weights=patch_ckpt["safetensors"])(tiles)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_embeddings_shape_finite_and_batch_independent(stem: str, tiles: np.ndarray) -> None:
    enc = build_encoder(MODEL, stem=stem)
    assert enc.num_features == ATTO_FEATURES
    batch = enc(tiles)
    assert batch.shape == (len(tiles), ATTO_FEATURES)
    assert batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    single = enc(tiles[1:2])
    torch.testing.assert_close(single[0], batch[1], atol=1e-5, rtol=0)
    # Different tiles give different embeddings (the model is not degenerate).
    assert (batch[0] - batch[3]).abs().max() > 1e-3


def test_bigger_model_shape() -> None:
    enc = build_encoder("convnext_femto", stem="overlap")
    out = enc(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert out.shape == (2, 384) == (2, enc.num_features)


def test_stem_registry_matches_timm() -> None:
    assert {"patch", "overlap", "overlap_tiered", "overlap_act"} <= set(STEMS)
    for name in ("overlap", "overlap_tiered", "overlap_act"):
        stem = build_encoder(MODEL, stem=name).model.stem
        convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
        assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3), (2, 2))] * 2
        assert convs[0].out_channels == (24 if name == "overlap_tiered" else 40)
    with pytest.raises(ParameterError, match=r"stem must be one of 'patch', .* \(the stems of 'convnext_atto'\), got 'wide'"):
        build_encoder(MODEL, stem="wide")  # checked where it enters, before any model is built


# --------------------------------------------------------------------------- stem conversion


@pytest.mark.parametrize("mid_chs", [12, 16, 40])
def test_conversion_index_algebra(mid_chs: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    sd = {"stem.0.weight": w, "stem.0.bias": b, "stem.1.weight": torch.ones(8), "stages.x": torch.zeros(1)}
    out = convert_patch_stem_to_overlap(sd, "overlap", mid_chs=mid_chs)
    assert out["stem.0.weight"].shape == (mid_chs, 3, 3, 3)
    assert out["stem.1.weight"].shape == (8, mid_chs, 3, 3)
    assert out["stem.2.weight"] is sd["stem.1.weight"] and out["stages.x"] is sd["stages.x"]
    x = torch.randn(2, 3, 36, 28, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x, w, b, stride=4)
    h = F.conv2d(x, out["stem.0.weight"], out["stem.0.bias"], stride=2, padding=1)
    y = F.conv2d(h, out["stem.1.weight"], out["stem.1.bias"], stride=2, padding=1)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)


def test_conversion_refuses_impossible_targets() -> None:
    sd = {"stem.0.weight": torch.zeros(8, 3, 4, 4)}
    with pytest.raises(EncoderError, match="at least 12"):
        convert_patch_stem_to_overlap(sd, "overlap", mid_chs=8)
    with pytest.raises(EncoderError, match="overlap_act"):
        convert_patch_stem_to_overlap(sd, "overlap_act")
    with pytest.raises(WeightsError, match="no 4x4 patch stem"):
        convert_patch_stem_to_overlap({"stem.0.weight": torch.zeros(8, 3, 3, 3)}, "overlap")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("stem", ["overlap", "overlap_tiered"])
def test_patch_checkpoint_into_overlap_stem_preserves_function(
    stem: str, fmt: str, patch_ckpt: dict[str, Path], patch_reference: torch.Tensor, tiles: np.ndarray
) -> None:
    path = patch_ckpt[fmt]
    enc = build_encoder(MODEL, stem=stem, weights=path)
    assert enc.weights_sha256 == _sha256(path)
    assert enc.key == f"{MODEL}-{stem}-{_sha256(path)[:12]}"
    out = enc(tiles)
    assert (patch_reference.abs().max()) > 0.1  # the check below is not vacuous
    torch.testing.assert_close(out, patch_reference, atol=1e-4, rtol=0)


def test_overlap_act_refused_unless_fresh_stem(patch_ckpt: dict[str, Path], tiles: np.ndarray) -> None:
    path = patch_ckpt["safetensors"]
    with pytest.raises(EncoderError, match="stem_init='random'"):
        build_encoder(MODEL, stem="overlap_act", weights=path)
    a = build_encoder(MODEL, stem="overlap_act", weights=path, stem_init="random")
    b = build_encoder(MODEL, stem="overlap_act", weights=path, stem_init="random")
    assert a.key.endswith("-stemrand")
    ckpt = _perturbed_patch_state_dict()
    model_sd = a.model.state_dict()
    assert torch.equal(model_sd["stages.2.blocks.3.mlp.fc1.weight"], ckpt["stages.2.blocks.3.mlp.fc1.weight"])
    # The fresh stem is seeded, hence reproducible.
    torch.testing.assert_close(a(tiles), b(tiles), atol=0, rtol=0)


def test_overlap_checkpoint_loads_plainly_but_not_into_patch(tmp_path: Path, tiles: np.ndarray) -> None:
    src = build_encoder(MODEL, stem="overlap")
    path = tmp_path / "atto_overlap.safetensors"
    save_file(src.model.state_dict(), path)
    same = build_encoder(MODEL, stem="overlap", weights=path)
    torch.testing.assert_close(same(tiles), src(tiles), atol=0, rtol=0)
    with pytest.raises(WeightsError, match="cannot be converted to stem 'patch'") as info:
        build_encoder(MODEL, stem="patch", weights=path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="shape mismatch stem.0.weight"):
        build_encoder(MODEL, stem="overlap_tiered", weights=path)


# ---------------------------------------------------------------------------- weights files


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict"),
        pytest.param(lambda sd: {"model": {"module." + k: v for k, v in sd.items()}}, id="model-module"),
        pytest.param(lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}, id="compiled"),
        pytest.param(lambda sd: {**sd, "head.fc.weight": torch.ones(9, 320), "head.fc.bias": torch.ones(9)}, id="fc"),
    ],
)
def test_wrappers_prefixes_and_classifier_are_accepted(wrap, tmp_path: Path) -> None:
    sd = _perturbed_patch_state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(sd), path)
    enc = build_encoder(MODEL, weights=path)
    assert enc.weights_sha256 == _sha256(path)
    loaded = enc.model.state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def _to_facebook_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key layout of the original facebookresearch/ConvNeXt checkpoints."""
    out = {}
    for key, value in sd.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        out[key] = value
    out["head.weight"], out["head.bias"] = torch.zeros(9, 320), torch.zeros(9)
    return out


def test_original_facebook_layout_is_remapped(
    tmp_path: Path, patch_reference: torch.Tensor, tiles: np.ndarray
) -> None:
    path = tmp_path / "convnext_atto_fb.pth"
    torch.save({"model": _to_facebook_layout(_perturbed_patch_state_dict())}, path)
    enc = build_encoder(MODEL, stem="overlap", weights=path)
    torch.testing.assert_close(enc(tiles), patch_reference, atol=1e-4, rtol=0)


def test_load_weights_returns_sha(patch_ckpt: dict[str, Path]) -> None:
    net = build_encoder(MODEL, stem="overlap").model
    sha = load_weights(net, patch_ckpt["pth"], stem="overlap")
    assert sha == _sha256(patch_ckpt["pth"])


def test_bad_keys_are_named(tmp_path: Path) -> None:
    sd = _perturbed_patch_state_dict()
    del sd["stages.1.blocks.0.conv_dw.weight"]
    sd["extra.layer.weight"] = torch.zeros(3)
    path = tmp_path / "bad_keys.safetensors"
    save_file(sd, path)
    with pytest.raises(WeightsError) as info:
        build_encoder(MODEL, weights=path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert "stages.1.blocks.0.conv_dw.weight" in msg and "extra.layer.weight" in msg


def test_bad_shapes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "femto.safetensors"
    save_file(build_encoder("convnext_femto").model.state_dict(), path)
    with pytest.raises(WeightsError, match=r"shape mismatch stem.0.weight \(48, 3, 4, 4\) vs model \(40, 3, 4, 4\)"):
        build_encoder(MODEL, weights=path)


def test_pickle_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _perturbed_patch_state_dict(), "payload": Payload()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_encoder(MODEL, weights=path)
    assert not marker.exists()


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(InputNotFoundError, match="nope.safetensors"):
        build_encoder(MODEL, weights=missing)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="garbage.bin"):
        build_encoder(MODEL, weights=garbage)
    truncated = tmp_path / "trunc.safetensors"
    save_file({"a": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="trunc.safetensors"):
        build_encoder(MODEL, weights=truncated)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsError, match="not a state dict"):
        build_encoder(MODEL, weights=listed)


# ------------------------------------------------------------------------- pretrained cache


def _isolate_caches(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))


def test_pretrained_offline_absent_names_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_caches(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        build_encoder(MODEL, pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "hub") in msg and "timm/convnext_atto.d2_in1k" in msg and "--weights PATH" in msg
    # The exact place and file name the cache expects, and why nothing was downloaded.
    repo = tmp_path / "hub" / "models--timm--convnext_atto.d2_in1k"
    assert f"{repo}/snapshots/<commit>/model.safetensors" in msg and f"{repo}/refs/main" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert not repo.exists()  # nothing half-made in the cache


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_pretrained_from_local_hf_cache(
    stem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch_ckpt: dict[str, Path],
    patch_reference: torch.Tensor, tiles: np.ndarray,
) -> None:
    _isolate_caches(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--timm--convnext_atto.d2_in1k"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "model.safetensors").write_bytes(patch_ckpt["safetensors"].read_bytes())
    enc = build_encoder(MODEL, stem=stem, pretrained=True)
    assert enc.weights_path == str(snapshot / "model.safetensors")
    assert enc.weights_sha256 == _sha256(patch_ckpt["safetensors"])
    assert enc.attrs()["pretrained"] is True
    torch.testing.assert_close(enc(tiles), patch_reference, atol=1e-4, rtol=0)


def test_weights_and_pretrained_conflict(patch_ckpt: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="not both"):
        build_encoder(MODEL, weights=patch_ckpt["pth"], pretrained=True)


# ------------------------------------------------------------------------ names and devices


@pytest.mark.parametrize("name", ["convnext_does_not_exist", "not_a_timm_model"])
def test_unknown_names_refused(name: str) -> None:
    with pytest.raises(EncoderError, match=re.escape("timm.list_models('convnext*')")) as info:
        build_encoder(name)
    assert name in str(info.value)
    # Other timm names go to the generic family (tests/test_encoders_timm_generic.py).


def test_reserved_timm_kwargs_refused() -> None:
    with pytest.raises(EncoderError, match="num_classes"):
        build_encoder(MODEL, num_classes=10)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(DeviceError, match=r"device must be auto, cpu, cuda, cuda:N or mps, got 'gpu0'"):
        resolve_device("gpu0")
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda:99"):
            resolve_device("cuda:99")
    else:
        assert resolve_device("auto").type != "cuda"
        with pytest.raises(DeviceError, match="CUDA is not available") as info:
            resolve_device("cuda")
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- preprocessing, attrs


def test_preprocess_values_layout_and_resize(tiles: np.ndarray) -> None:
    enc = build_encoder(MODEL)
    pre = enc.preprocessing
    assert pre["resize"] == "none" and pre["input_size"] == [3, 224, 224]
    x = enc.preprocess(tiles)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
    mean, std = torch.tensor(pre["mean"]), torch.tensor(pre["std"])
    expected = (torch.from_numpy(tiles[0]).float() / 255 - mean) / std
    torch.testing.assert_close(x[0].permute(1, 2, 0), expected, atol=1e-5, rtol=0)
    enc.to(channels_last=True)
    assert enc.preprocess(tiles).is_contiguous(memory_format=torch.channels_last)
    small = torch.from_numpy(tiles[:, :112, :112])
    assert enc.preprocess(small).shape[-2:] == (112, 112)  # default policy: never resize
    resized = build_encoder(MODEL, resize="input_size")
    assert resized.preprocess(small).shape[-2:] == (224, 224)
    assert resized.key.endswith("-resize_input_size")
    with pytest.raises(EncoderError, match="uint8"):
        enc.preprocess(torch.zeros(1, 224, 224, 3))
    with pytest.raises(EncoderError, match=r"\(B, H, W, 3\)"):
        enc.preprocess(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def test_random_weights_warn_and_attrs_are_json(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wsi_convnext.encoders"):
        enc = EncoderConfig(model=MODEL, stem="overlap").build()
    assert any("RANDOM" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert enc.weights_sha256 == "random" and enc.key == f"{MODEL}-overlap-random"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", enc.key)
    attrs = json.loads(json.dumps(enc.attrs()))
    assert attrs["num_features"] == ATTO_FEATURES and attrs["stem"] == "overlap"
    assert attrs["weights_sha256"] == "random" and attrs["weights_path"] is None
    assert attrs["timm_version"] and attrs["wsi_convnext_version"]
    assert attrs["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert enc.config == EncoderConfig(model=MODEL, stem="overlap", stem_init="checkpoint", resize="none")
    assert not enc.model.training


# --------------------------------------------------------------------------- family registry


class _ToyNet(torch.nn.Module):
    """A tiny CNN shaped like a timm backbone: stem, stages, final norm, pretrained_cfg, group_matcher."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 4, stride=4)
        self.stages = torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.GELU()),
            torch.nn.Sequential(torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)),
        )
        self.norm = torch.nn.LayerNorm(2 * width)
        self.num_features = 2 * width
        self.pretrained_cfg = {
            "architecture": "toy_cnn", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
            "input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
            "first_conv": "stem", "classifier": "fc",
        }  # fmt: skip

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)).mean((2, 3)))


class _ToyStem:
    def __init__(self, name: str, width: int) -> None:
        self.name, self.width, self.description = name, width, f"4x4 stride-4 conv, {width} channels"


class _ToyFamily(EncoderFamily):
    name = "toy"
    stems = {"narrow": _ToyStem("narrow", 8), "wide": _ToyStem("wide", 16)}
    default_stem = "narrow"
    model_hint = "the toy family builds 'toy_cnn'"

    def owns(self, model: str) -> bool:
        return model.split(".")[0] == "toy_cnn"

    def create_model(self, model: str, stem, **timm_kwargs) -> torch.nn.Module:
        return _ToyNet(stem.width)

    def checkpoint_filter(self, state_dict, model, *, stem, fresh_stem, source):
        return state_dict

    def init_stem(self, model, generator) -> None:
        with torch.no_grad():
            model.stem.weight.normal_(0.0, 0.02, generator=generator)
            model.stem.bias.zero_()


@pytest.fixture
def toy_family():
    """The toy family, registered for one test only."""
    assert "toy" not in FAMILIES
    family = register_family(_ToyFamily())
    yield family
    FAMILIES.unregister("toy")


def test_unregistered_model_names_every_family_hint() -> None:
    with pytest.raises(EncoderError, match="unknown model 'toy_cnn'") as info:
        build_encoder("toy_cnn")
    assert "timm.list_models('convnext*')" in str(info.value) and "\n" not in str(info.value)
    assert family_for(MODEL).name == "convnext"


def test_registered_toy_family_is_built_saved_and_reloaded(toy_family, tmp_path: Path) -> None:
    assert family_for("toy_cnn") is toy_family and family_for(MODEL).name == "convnext"
    enc = build_encoder("toy_cnn")
    assert isinstance(enc.model, _ToyNet) and enc.family is toy_family and enc.stem.name == "narrow"
    assert enc.key == "toy_cnn-narrow-random" and enc.num_features == 16
    assert enc.preprocessing["mean"] == [0.5, 0.5, 0.5]
    tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert enc(tiles).shape == (3, 16)
    assert list(enc.parameter_groups()) == ["stem", "stages.0", "stages.1", "head"]
    assert [n for n, _ in enc.named_parameter_groups()["head"]] == ["norm.weight", "norm.bias"]
    with pytest.raises(ParameterError, match=r"stem must be one of 'narrow', 'wide' \(the stems of 'toy_cnn'\), got 'patch'"):
        build_encoder("toy_cnn", stem="patch")
    # Generic weights I/O: a saved toy encoder reloads with its stem picked up from the metadata.
    wide = build_encoder("toy_cnn", stem="wide")
    with torch.no_grad():
        for p in wide.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    path = tmp_path / "toy.safetensors"
    sha = save_encoder_weights(wide, path)
    again = build_encoder("toy_cnn", weights=path)
    assert again.stem.name == "wide" and again.weights_sha256 == sha == _sha256(path)
    assert again.key == f"toy_cnn-wide-{sha[:12]}"
    torch.testing.assert_close(again(tiles), wide(tiles), atol=0, rtol=0)
    # stem_init="random" uses the family's own stem initialisation, seeded.
    fresh = build_encoder("toy_cnn", weights=path, stem_init="random")
    assert not torch.equal(fresh.model.stem.weight, wide.model.stem.weight)
    assert torch.equal(fresh.model.stages[1][0].weight, wide.model.stages[1][0].weight)
    assert fresh.key.endswith("-stemrand")


# ------------------------------------------------------------------- training API: modes, groups


@pytest.mark.parametrize("stem", ["patch", "overlap", "overlap_act"])
def test_parameter_groups_cover_each_parameter_once_and_freeze(stem: str) -> None:
    enc = build_encoder(MODEL, stem=stem)
    groups = enc.parameter_groups()
    assert list(groups) == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in enc.model.parameters()}
    assert {id(p) for p in groups["stem"]} == {id(p) for p in enc.model.stem.parameters()}
    assert {id(p) for p in groups["stages.2"]} == {id(p) for p in enc.model.stages[2].parameters()}
    assert {n for n, _ in enc.named_parameter_groups()["head"]} == {"head.norm.weight", "head.norm.bias"}
    # Freezing the stem group: a backward pass leaves its grads None and fills everything else.
    for p in groups["stem"]:
        p.requires_grad_(False)
    enc.train()
    x = enc.preprocess(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    enc.model(x).square().mean().backward()
    assert all(p.grad is None for p in groups["stem"])
    for name in ("stages.0", "stages.3", "head"):
        assert all(p.grad is not None for p in groups[name]), name
    assert any(p.grad.abs().sum() > 0 for p in groups["stages.0"])


def test_train_and_eval_modes() -> None:
    enc = build_encoder(MODEL, stem="overlap", drop_path_rate=0.5)
    assert not enc.training and not any(m.training for m in enc.model.modules())
    assert enc.train() is enc and enc.training and all(m.training for m in enc.model.modules())
    x = enc.preprocess(np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = enc.model(x), enc.model(x)
    assert not torch.allclose(a, b)  # stochastic depth is active in train mode
    assert enc.eval() is enc and not enc.training and not any(m.training for m in enc.model.modules())
    torch.testing.assert_close(enc(x), enc(x), atol=0, rtol=0)
    assert enc.train(False) is enc and not enc.training


def test_preprocess_applies_a_transform_in_unit_range(tiles: np.ndarray) -> None:
    enc = build_encoder(MODEL)
    seen: list[tuple[float, float]] = []

    def invert(x: torch.Tensor) -> torch.Tensor:
        seen.append((float(x.min()), float(x.max())))
        return 1.0 - x

    out = enc.preprocess(tiles, transform=invert)
    assert seen and 0.0 <= seen[0][0] and seen[0][1] <= 1.0 and seen[0][1] > 0.5
    expected = enc.preprocess(np.ascontiguousarray(255 - tiles))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # No transform: exactly the numbers of the plain path.
    torch.testing.assert_close(enc.preprocess(tiles, transform=None), enc.preprocess(tiles), atol=0, rtol=0)
    with pytest.raises(EncoderError, match="changed the batch shape"):
        enc.preprocess(tiles, transform=lambda x: x[:, :, :8])


# ------------------------------------------------------- classifier heads, metadata, folders


@pytest.mark.parametrize("stem", ["patch", "overlap"])
def test_checkpoint_with_a_classifier_head_loads(stem: str, tmp_path: Path) -> None:
    """The classifier named by timm's pretrained_cfg ('head.fc') is dropped; the trunk loads exactly."""
    torch.manual_seed(4)
    import timm

    clf = timm.create_model(MODEL, num_classes=5).eval()
    assert clf.pretrained_cfg["classifier"] == "head.fc"
    path = tmp_path / "classifier.safetensors"
    save_file(clf.state_dict(), path)
    assert "head.fc.weight" in clf.state_dict()
    enc = build_encoder(MODEL, stem=stem, weights=path)
    x = enc.preprocess(np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        ref = clf.forward_head(clf.forward_features(x), pre_logits=True)
    torch.testing.assert_close(enc(x), ref, atol=1e-4, rtol=0)


def _random_encoder(stem: str):
    """A random-weight atto whose every part matters (as a fine-tuned encoder would be)."""
    enc = build_encoder(MODEL, stem=stem)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in enc.model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.25)
    return enc


@pytest.mark.parametrize("stem", ["overlap", "overlap_act"])
def test_weights_metadata_stem_is_picked_up_and_checked(stem: str, tmp_path: Path) -> None:
    src = _random_encoder(stem)
    path = tmp_path / "encoder.safetensors"
    sha = save_encoder_weights(src, path, metadata={"fingerprint": "abc"})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["wsi_convnext.model"] == MODEL and meta["wsi_convnext.stem"] == stem
    assert meta["wsi_convnext.fingerprint"] == "abc"
    # The one reader gives back what the one writer recorded (finetune writes with it too).
    from wsi_convnext.encoders import META_PREFIX, read_weights_metadata, weights_metadata

    written = weights_metadata(MODEL, stem, {"fingerprint": "abc"})
    assert read_weights_metadata(path) == {k: v for k, v in written.items() if k.startswith(META_PREFIX)}
    x = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    enc = build_encoder(MODEL, weights=path)  # stem=None: from the metadata
    assert enc.stem.name == stem and enc.config.stem == stem
    assert enc.key == f"{MODEL}-{stem}-{sha[:12]}" and enc.weights_sha256 == _sha256(path)
    torch.testing.assert_close(enc(x), src(x), atol=0, rtol=0)
    assert build_encoder(MODEL, stem=stem, weights=path).stem.name == stem  # an agreeing stem is fine
    with pytest.raises(EncoderError) as info:
        build_encoder(MODEL, stem="patch", weights=path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and repr(stem) in msg and "'patch'" in msg
    with pytest.raises(WeightsError) as info:
        build_encoder("convnext_femto", weights=path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and MODEL in msg and "convnext_femto" in msg


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"wsi_convnext.model": MODEL, "wsi_convnext.stem": "overlap"}, id="dotted"),
        pytest.param({"encoder": {"model": MODEL, "stem": "overlap"}, "epochs": 3}, id="encoder-object"),
    ],
)
def test_config_json_beside_the_weights_is_read(config: dict, tmp_path: Path) -> None:
    src = _random_encoder("overlap")
    path = tmp_path / "plain.pth"
    torch.save(src.model.state_dict(), path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    enc = build_encoder(MODEL, weights=path)
    assert enc.stem.name == "overlap"
    with pytest.raises(EncoderError, match="'overlap'"):
        build_encoder(MODEL, stem="overlap_tiered", weights=path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json"):
        build_encoder(MODEL, weights=path)


def test_weights_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(WeightsError) as info:
        build_encoder(MODEL, weights=folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and "is a folder" in msg
    save_file(_random_encoder("overlap").model.state_dict(), folder / "encoder.safetensors")
    with pytest.raises(WeightsError, match="is a folder"):  # no metadata: not recognised
        build_encoder(MODEL, weights=folder)
    src = _random_encoder("overlap")
    sha = save_encoder_weights(src, folder / "encoder.safetensors")
    enc = build_encoder(MODEL, weights=folder)
    assert enc.weights_path == str(folder / "encoder.safetensors") and enc.weights_sha256 == sha
    assert enc.stem.name == "overlap"


def test_cli_embed_picks_the_stem_up_from_a_finetune_folder(cmu_slide: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cmu_stores import read_cmu_tiles, write_store
    from wsi_convnext.cli import app
    from wsi_convnext.store import open_store

    tiles, coords = read_cmu_tiles(cmu_slide, 4, size=64)
    store = write_store(tmp_path / "cmu.zarr", tiles, coords)
    src = _random_encoder("overlap")
    (tmp_path / "enc").mkdir()
    sha = save_encoder_weights(src, tmp_path / "enc" / "encoder.safetensors")
    runner = CliRunner()
    args = ["embed", str(store), "--model", MODEL, "--weights", str(tmp_path / "enc"), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    key = f"{MODEL}-overlap-{sha[:12]}"
    opened = open_store(store)
    feats = torch.from_numpy(np.asarray(opened.features(key), dtype=np.float32))
    torch.testing.assert_close(feats, src(opened.read_tiles(slice(None))), atol=1e-2, rtol=1e-2)  # float16 store
    bad = runner.invoke(app, [*args, "--stem", "patch"])
    assert bad.exit_code != 0 and "overlap" in bad.output and "Traceback" not in bad.output


def test_import_is_light_and_offline() -> None:
    """Importing the encoders touches neither torch, timm nor the hub (so nothing reaches the network)."""
    import subprocess
    import sys

    code = (
        "import sys, wsi_convnext.encoders as e; "
        "print(sorted(m for m in ('torch', 'timm', 'huggingface_hub', 'safetensors') if m in sys.modules)); "
        "print(sorted(e.FAMILIES), sorted(e.STEMS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "['convnext', 'preset', 'timm'] ['overlap', 'overlap_act', 'overlap_tiered', 'patch']"
