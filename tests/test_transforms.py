"""Tile transforms: stain normalisation on real CMU-1 tiles and on Beer–Lambert tiles of known stains."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cmu_stores import read_cmu_tiles
from wsi_convnext.errors import ConfigError, InputNotFoundError
from wsi_convnext.transforms import TRANSFORMS, build_transform, stain_names
from wsi_convnext.transforms import _color
from wsi_convnext.transforms.macenko import BUILTIN_STAIN_MATRIX, estimate_stains
from wsi_convnext.transforms.reinhard import BUILTIN_LAB_MEAN, lab_statistics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IO = 240.0

# A known H&E stain matrix, deliberately not the built-in reference: OD columns (R, G, B) of H
# and E (an eosin that absorbs some red, so pure-eosin pixels pass Macenko's every-channel rule).
TRUE_STAINS = np.array([[0.650, 0.270], [0.704, 0.880], [0.286, 0.390]])
TRUE_STAINS /= np.linalg.norm(TRUE_STAINS, axis=0)


@pytest.fixture(scope="module")
def cmu_batch(cmu_slide: Path) -> torch.Tensor:
    """Real CMU-1 H&E tiles with tissue, (B, 3, 224, 224) float in [0, 1]."""
    tiles, _ = read_cmu_tiles(cmu_slide, 40)
    x = torch.from_numpy(tiles.copy()).permute(0, 3, 1, 2).float() / 255
    od = _color.optical_density(x.reshape(len(x), 3, -1), IO)
    keep = _color.tissue_pixels(od, 0.15).float().mean(1) > 0.3
    assert keep.sum() >= 8
    return x[keep][:8].contiguous()


def _synthetic(n: int = 6, size: int = 96, seed: int = 0, stains: np.ndarray = TRUE_STAINS) -> torch.Tensor:
    """Beer–Lambert tiles from a known stain matrix: pure H, pure E and mixed pixels, some glass."""
    rng = np.random.default_rng(seed)
    p = size * size
    kind = rng.choice(4, size=(n, p), p=[0.3, 0.3, 0.3, 0.1])  # H, E, mix, glass
    c = rng.uniform(0.6, 1.6, size=(n, 2, p))
    c[:, 1][kind == 0] = 0
    c[:, 0][kind == 1] = 0
    c[:, :, :][np.broadcast_to((kind == 3)[:, None], c.shape)] = 0.01
    od = np.einsum("cs,bsp->bcp", stains, c)
    rgb = (IO * np.exp(-od) - 1) / 255
    rgb = np.round(np.clip(rgb, 0, 1) * 255) / 255  # 8-bit, like real tiles
    return torch.from_numpy(rgb.reshape(n, 3, size, size)).float()


def _angles_deg(a: torch.Tensor, b: np.ndarray) -> np.ndarray:
    a = a.double().cpu().numpy()
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_registry_and_keys(tmp_path: Path, cmu_batch: torch.Tensor) -> None:
    assert build_transform("none") is None
    assert stain_names() == ["none", "macenko", "reinhard"]
    assert {"hed_jitter", "brightness_contrast"} <= set(TRANSFORMS)
    with pytest.raises(ConfigError, match="unknown tile transform 'vahadane'.*macenko"):
        build_transform("vahadane")
    with pytest.raises(ConfigError, match="macenko.*unexpected keyword"):
        build_transform("macenko", colour=1)
    with pytest.raises(ConfigError, match="drop --stain-reference"):
        build_transform("none", reference="x.png")
    with pytest.raises(InputNotFoundError, match="nope.png.*--stain-reference"):
        build_transform("macenko", reference=tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ConfigError, match="bad.png: not a readable image"):
        build_transform("reinhard", reference=tmp_path / "bad.png")
    glass = tmp_path / "glass.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 242, np.uint8)).save(glass)
    with pytest.raises(ConfigError, match="glass.png: too little"):
        build_transform("macenko", reference=glass)

    ref = tmp_path / "ref.png"
    Image.fromarray((cmu_batch[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(ref)
    for name in ("macenko", "reinhard"):
        builtin, fitted = build_transform(name), build_transform(name, reference=ref)
        assert re.fullmatch(rf"{name}-[0-9a-f]{{8}}", builtin.key) and re.fullmatch(rf"{name}-[0-9a-f]{{8}}", fitted.key)
        assert builtin.key != fitted.key and build_transform(name).key == builtin.key  # stable fingerprint
        assert builtin.attrs["reference"] == "built-in" and fitted.attrs["reference_sha256"]
        assert build_transform(name, beta=0.2).key != builtin.key  # parameters are part of the key


def test_lab_conversion_matches_skimage() -> None:
    from skimage.color import rgb2lab

    rgb = np.random.default_rng(0).random((1, 3, 16, 16))
    lab = _color.rgb_to_lab(torch.from_numpy(rgb))
    ref = rgb2lab(rgb[0].transpose(1, 2, 0)).transpose(2, 0, 1)
    np.testing.assert_allclose(lab[0].numpy(), ref, atol=2e-3)
    np.testing.assert_allclose(_color.lab_to_rgb(lab).numpy(), rgb, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_macenko_recovers_a_known_stain_matrix(device: str) -> None:
    x = _synthetic().to(device)
    stains, _, _, valid = estimate_stains(x)
    assert valid.all()
    for s in stains:
        assert _angles_deg(s, TRUE_STAINS).max() < 2.0  # H first, E second
    # Normalised to the built-in reference, the tiles carry the reference's stains.
    t = build_transform("macenko")
    y = t(x)
    assert y.shape == x.shape and y.device == x.device and torch.isfinite(y).all()
    out_stains, *_ = estimate_stains(y)
    for s in out_stains:
        assert _angles_deg(s, np.array(BUILTIN_STAIN_MATRIX)).max() < 3.0
    assert t.stats() == {"tiles": len(x), "identity_fallbacks": 0}


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_background_and_low_contrast_tiles_fall_back_to_identity(name: str, cmu_batch: torch.Tensor) -> None:
    rng = torch.Generator().manual_seed(0)
    glass = 0.94 + 0.02 * torch.rand((1, 3, 224, 224), generator=rng)
    flat = torch.tensor([0.55, 0.35, 0.6]).view(1, 3, 1, 1).expand(1, 3, 224, 224).clone()  # one colour
    black = torch.zeros(1, 3, 224, 224)
    x = torch.cat([glass, flat, black, cmu_batch[:2]])
    t = build_transform(name)
    y = t(x)
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    for i in range(3):
        assert torch.equal(y[i], x[i]), i
    assert (y[3:] - x[3:]).abs().mean() > 0.01
    assert t.stats() == {"tiles": 5, "identity_fallbacks": 3}
    t(x[:1])
    assert t.stats() == {"tiles": 6, "identity_fallbacks": 4}


@pytest.mark.parametrize("device", DEVICES)
def test_stain_normalisation_on_real_cmu_tiles(device: str, cmu_batch: torch.Tensor) -> None:
    x = cmu_batch.to(device)
    stains, _, max_conc, valid = estimate_stains(x)
    assert valid.all() and torch.isfinite(max_conc).all()
    for s in stains.cpu():
        h, e = s[:, 0], s[:, 1]
        assert h[0] > e[0] and e[1] > h[1]  # haematoxylin absorbs red, eosin green
        assert math.degrees(math.acos(float(h @ e))) > 10
    for name in ("macenko", "reinhard"):
        t = build_transform(name)
        y1, y2 = t(x), t(x)
        assert torch.equal(y1, y2)  # deterministic
        assert torch.isfinite(y1).all() and 0 <= y1.min() and y1.max() <= 1
        assert (y1 - x).abs().mean() > 0.005
    # Reinhard moves the tiles' stained-pixel L*a*b* means onto the reference.
    _, mean, _, _ = lab_statistics(build_transform("reinhard")(x))
    np.testing.assert_allclose(mean.cpu().numpy(), np.broadcast_to(BUILTIN_LAB_MEAN, mean.shape), atol=4.0)


def test_macenko_fitted_to_a_reference_tile(tmp_path: Path, cmu_batch: torch.Tensor) -> None:
    from PIL import Image

    ref_rgb = _synthetic(n=1, size=128, seed=3)
    ref = tmp_path / "ref.png"
    Image.fromarray((ref_rgb[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(ref)
    t = build_transform("macenko", reference=ref)
    assert _angles_deg(t.stain_matrix, TRUE_STAINS).max() < 2.0
    out, *_ = estimate_stains(t(cmu_batch))
    for s in out:
        assert _angles_deg(s, TRUE_STAINS).max() < 4.0


@pytest.mark.parametrize("name", ["hed_jitter", "brightness_contrast"])
def test_augmentations_are_seeded(name: str, cmu_batch: torch.Tensor) -> None:
    a, b, c = build_transform(name, seed=1), build_transform(name, seed=1), build_transform(name, seed=2)
    ya, yb, yc = a(cmu_batch), b(cmu_batch), c(cmu_batch)
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)
    assert not torch.equal(a(cmu_batch), ya)  # the generator advances: a new draw per call
    assert 0 <= ya.min() and ya.max() <= 1 and (ya - cmu_batch).abs().mean() > 1e-3
    zero = {"hed_jitter": {"sigma": 0.0, "bias": 0.0}, "brightness_contrast": {"brightness": 0.0, "contrast": 0.0}}[name]
    torch.testing.assert_close(build_transform(name, **zero)(cmu_batch), cmu_batch, atol=2e-5, rtol=0)
    assert a.stats() == {"tiles": 2 * len(cmu_batch)} and a.key != c.key
