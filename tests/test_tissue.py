"""Tissue detection on synthetic slides with known truth, tile tissue fractions, and the real slide."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_convnext.errors import ConfigError, MppError, WsiConvnextError
from wsi_convnext.tiling.tissue import (
    TissueParams,
    detect_tissue,
    explain_tissue,
    register_tissue_method,
    tile_tissue_fraction,
    tissue_methods,
)

MPP = 8.0  # µm/px of the synthetic thumbnails (the default mask_mpp)
GLASS = 243.0
PINK = (232.0, 150.0, 200.0)  # eosin-stained stroma
PURPLE = (95.0, 50.0, 135.0)  # hematoxylin (nuclei)
PALE = (229.0, 214.0, 226.0)  # faintly stained tissue: saturation ~0.07
BLUE_INK = (35.0, 70.0, 175.0)
GREEN_INK = (40.0, 140.0, 75.0)
BLACK_INK = (40.0, 40.0, 45.0)


# --------------------------------------------------------------------------- synthetic slides


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _blob(h: int, w: int, cy: float, cx: float, r: float, rng: np.random.Generator, rough: float = 0.25) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(float)
    ang = np.arctan2(yy - cy, xx - cx)
    k = rng.uniform(0, 2 * np.pi, 3)
    wobble = 0.5 * np.sin(3 * ang + k[0]) + 0.3 * np.sin(5 * ang + k[1]) + 0.2 * np.sin(2 * ang + k[2])
    return np.hypot(yy - cy, xx - cx) <= r * (1 + rough * wobble)


def _paint(img: np.ndarray, region: np.ndarray, colour, rng, nuclei: float = 0.15, noise: float = 6.0) -> None:
    n = int(region.sum())
    col = np.asarray(colour, float) + rng.normal(0, noise, (n, 3))
    if nuclei:
        nuc = rng.random(n) < nuclei
        col[nuc] = np.asarray(PURPLE) + rng.normal(0, noise, (int(nuc.sum()), 3))
    img[region] = col


def _stroke(h: int, w: int, p0, p1, width: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a straight pen stroke from p0 to p1 ((x, y) px)."""
    yy, xx = np.mgrid[:h, :w].astype(float)
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    d = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
    return np.clip(width / 2 + 0.5 - d, 0, 1)


def _glass(h: int, w: int, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    return GLASS + rng.normal(0, noise, (h, w, 3))


def _ink(img: np.ndarray, cov: np.ndarray, colour, rng) -> np.ndarray:
    h, w = cov.shape
    ink = np.asarray(colour) + rng.normal(0, 4, (h, w, 3))
    return img * (1 - cov[..., None]) + ink * cov[..., None]


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _scene(seed: int = 0, h: int = 400, w: int = 400) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """3.2 mm × 3.2 mm at 8 µm/px: tissue, a nuclei-rich blob, a pale blob, holes, fragments, pen strokes.

    Returns the RGB image, the true tissue mask and the named parts.
    """
    rng = np.random.default_rng(seed)
    img = _glass(h, w, rng)
    a = _blob(h, w, 130, 120, 70, rng)
    big_hole = _disk(h, w, 110, 110, 13)  # 531 px ≈ 34 000 µm² > fill_holes_um2
    small_hole = _disk(h, w, 160, 150, 3)  # 29 px ≈ 1 900 µm² < fill_holes_um2
    _paint(img, a & ~big_hole & ~small_hole, PINK, rng)
    b = _blob(h, w, 310, 100, 35, rng)
    _paint(img, b, PINK, rng, nuclei=0.7)
    c = _blob(h, w, 300, 290, 40, rng, rough=0.1)
    _paint(img, c, PALE, rng, nuclei=0.0, noise=3.0)
    fragment = _disk(h, w, 240, 228, 5)  # 81 px ≈ 5 200 µm² > min_object_um2
    _paint(img, fragment, PINK, rng)
    speck = _disk(h, w, 30, 220, 1)  # 5 px ≈ 320 µm²: dust-sized
    _paint(img, speck, PURPLE, rng, nuclei=0.0)
    parts: dict[str, np.ndarray] = {}
    for name, colour, p0, p1 in (
        ("blue", BLUE_INK, (230, 20), (390, 80)),
        ("green", GREEN_INK, (230, 130), (390, 190)),
        ("black", BLACK_INK, (200, 380), (390, 380)),
    ):
        cov = _stroke(h, w, p0, p1, 9)
        img = _ink(img, cov, colour, rng)
        parts[name] = cov > 0.5
    truth = (a & ~big_hole) | b | c | fragment
    parts.update(a=a & ~big_hole, big_hole=big_hole, small_hole=small_hole, nuclei_rich=b, pale=c)
    parts.update(fragment=fragment, speck=speck)
    return _u8(img), truth, parts


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    return _scene()


@pytest.fixture(scope="module")
def scene_mask(scene) -> np.ndarray:
    return detect_tissue(scene[0], MPP)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --------------------------------------------------------------------------- detect_tissue


def test_mask_shape_and_dtype(scene, scene_mask) -> None:
    assert scene_mask.shape == scene[0].shape[:2]
    assert scene_mask.dtype == np.bool_


def test_normal_tissue_iou(scene, scene_mask) -> None:
    _, truth, parts = scene
    assert _iou(scene_mask, truth) >= 0.9
    assert _iou(scene_mask & parts["a"], parts["a"]) >= 0.9


def test_nuclei_rich_tissue_is_not_taken_for_ink(scene, scene_mask) -> None:
    _, _, parts = scene
    assert scene_mask[parts["nuclei_rich"]].mean() >= 0.95


@pytest.mark.parametrize(
    "colour",
    [PURPLE, (80.0, 60.0, 140.0), (60.0, 45.0, 110.0), (45.0, 42.0, 80.0), (110.0, 100.0, 170.0)],
    ids=["purple", "violet", "dark-violet", "blue-black", "lymphoid-blue"],
)
def test_hematoxylin_shades_are_tissue(colour) -> None:
    rng = np.random.default_rng(3)
    img = _glass(200, 200, rng)
    region = _blob(200, 200, 100, 100, 50, rng)
    _paint(img, region, colour, rng, nuclei=0.0, noise=5.0)
    mask = detect_tissue(_u8(img), MPP)
    assert mask[region].mean() >= 0.95
    assert mask[~ndi.binary_dilation(region, iterations=3)].mean() <= 0.01


def test_pale_tissue_recovered(scene, scene_mask) -> None:
    _, _, parts = scene
    assert scene_mask[parts["pale"]].mean() >= 0.9


def test_holes(scene, scene_mask) -> None:
    _, _, parts = scene
    assert scene_mask[parts["big_hole"]].mean() <= 0.05  # larger than fill_holes_um2: stays background
    assert scene_mask[parts["small_hole"]].mean() >= 0.9  # smaller: filled


def test_large_holes_filled_when_allowed(scene) -> None:
    mask = detect_tissue(scene[0], MPP, TissueParams(fill_holes_um2=100_000.0))
    assert mask[scene[2]["big_hole"]].mean() >= 0.9


def test_fragments_and_specks(scene, scene_mask) -> None:
    _, _, parts = scene
    assert scene_mask[parts["fragment"]].mean() >= 0.9  # ≈5 200 µm² > min_object_um2: kept
    assert not scene_mask[ndi.binary_dilation(parts["speck"], iterations=2)].any()  # dust: dropped
    stricter = detect_tissue(scene[0], MPP, TissueParams(min_object_um2=10_000.0))
    assert not stricter[parts["fragment"]].any()
    assert stricter[parts["a"]].mean() >= 0.9


@pytest.mark.parametrize("ink", ["blue", "green", "black"])
def test_pen_ink_over_glass_rejected(scene, scene_mask, ink) -> None:
    _, _, parts = scene
    assert (~scene_mask[parts[ink]]).mean() >= 0.9


@pytest.mark.parametrize("ink", ["blue", "green", "black"])
def test_ink_rules_can_be_switched_off(scene, ink) -> None:
    # Proves that the rejection above is the ink rule's doing: without it the stroke is "tissue".
    mask = detect_tissue(scene[0], MPP, TissueParams.from_kwargs(**{f"remove_{ink}_ink": False}))
    assert mask[scene[2][ink]].mean() >= 0.5


@pytest.mark.parametrize("colour", [BLUE_INK, GREEN_INK, BLACK_INK], ids=["blue", "green", "black"])
def test_ink_over_tissue_removed_tissue_beside_kept(colour) -> None:
    rng = np.random.default_rng(5)
    h = w = 240
    img = _glass(h, w, rng)
    region = _blob(h, w, 120, 120, 90, rng, rough=0.1)
    _paint(img, region, PINK, rng)
    cov = _stroke(h, w, (20, 60), (220, 180), 12)
    img = _ink(img, cov, colour, rng)
    mask = detect_tissue(_u8(img), MPP)
    on_ink = region & (cov > 0.5)
    assert (~mask[on_ink]).mean() >= 0.9
    away = region & ~ndi.binary_dilation(cov > 0, iterations=4)
    assert mask[away].mean() >= 0.95


def test_blank_slide_gives_empty_mask() -> None:
    rng = np.random.default_rng(7)
    assert not detect_tissue(_u8(_glass(300, 400, rng)), MPP).any()
    # Uneven illumination (darker corners) and a perfectly flat image are blank too.
    yy, xx = np.mgrid[:300, :400]
    vignette = 12.0 * (np.hypot(yy - 150, xx - 200) / 250.0) ** 2
    assert not detect_tissue(_u8(_glass(300, 400, rng) - vignette[..., None]), MPP).any()
    assert not detect_tissue(np.full((64, 64, 3), 240, np.uint8), MPP).any()
    assert detect_tissue(np.zeros((0, 5, 3), np.uint8), MPP).shape == (0, 5)


def test_transparent_pixels_are_background() -> None:
    # OpenSlide returns (0, 0, 0, 0) outside the scanned area: not black ink, not tissue.
    rng = np.random.default_rng(11)
    img = _glass(200, 200, rng)
    region = _disk(200, 200, 100, 70, 40)
    _paint(img, region, PINK, rng)
    rgba = np.dstack([_u8(img), np.full((200, 200), 255, np.uint8)])
    rgba[:, 150:] = 0
    mask = detect_tissue(rgba, MPP)
    assert not mask[:, 150:].any()
    assert mask[region].mean() >= 0.95


def test_dark_label_area_removed() -> None:
    rng = np.random.default_rng(13)
    img = _glass(200, 300, rng)
    img[:, 230:] = 25 + rng.normal(0, 3, (200, 70, 3))  # black slide label / scanner border
    region = _blob(200, 300, 100, 110, 50, rng)
    _paint(img, region, PINK, rng)
    mask = detect_tissue(_u8(img), MPP)
    assert not mask[:, 235:].any()
    assert mask[region].mean() >= 0.95


def test_finer_input_matches_mask_resolution(scene, scene_mask) -> None:
    img, truth, _ = scene
    fine = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)  # same slide at 2 µm/px
    mask = detect_tissue(fine, MPP / 4)
    assert mask.shape == fine.shape[:2]
    assert _iou(mask[::4, ::4], scene_mask) >= 0.95
    assert _iou(mask[::4, ::4], truth) >= 0.9


def test_float_input_equals_uint8(scene, scene_mask) -> None:
    assert np.array_equal(detect_tissue(scene[0].astype(np.float32) / 255.0, MPP), scene_mask)


@pytest.mark.parametrize("method", tissue_methods())
def test_every_method_finds_tissue_and_no_blank(scene, method) -> None:
    img, _, parts = scene
    params = TissueParams(method=method)
    mask = detect_tissue(img, MPP, params)
    assert _iou(mask & parts["a"], parts["a"]) >= 0.9
    assert mask[parts["nuclei_rich"]].mean() >= 0.9
    assert not detect_tissue(_u8(_glass(200, 200, np.random.default_rng(1))), MPP, params).any()


def test_register_custom_method(scene) -> None:
    @register_tissue_method("test-left-half")
    def _left(features, params):
        out = np.zeros(features.saturation.shape, bool)
        out[:, : out.shape[1] // 2] = True
        return out

    assert "test-left-half" in tissue_methods()
    mask = detect_tissue(np.full((100, 100, 3), 128, np.uint8), MPP, TissueParams(method="test-left-half"))
    assert mask[:, :50].all() and not mask[:, 50:].any()


def test_detect_tissue_speed() -> None:
    img, _, _ = _scene()
    big = np.tile(img, (10, 10, 1))  # 4000 × 4000 px = 32 mm × 32 mm at 8 µm/px
    detect_tissue(big[:800, :800], MPP)  # warm-up
    best = _cpu_seconds(detect_tissue, big, MPP)
    if best >= 3.0:  # one retry: a neighbour process may have thrashed the caches
        best = min(best, _cpu_seconds(detect_tissue, big, MPP))
    assert best < 3.0, f"detect_tissue took {best:.2f} CPU s on 4000×4000 px"


def _cpu_seconds(fn, *args) -> float:
    # CPU time, not wall time: the test machines are shared, and the code is single-threaded.
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "abc", None])
def test_bad_mpp(bad) -> None:
    with pytest.raises(MppError):
        detect_tissue(np.zeros((8, 8, 3), np.uint8), bad)


@pytest.mark.parametrize("shape", [(8, 8, 5), (8,), (2, 8, 8, 3)])
def test_bad_image_shape(shape) -> None:
    with pytest.raises(ConfigError):
        detect_tissue(np.zeros(shape, np.uint8), MPP)


# --------------------------------------------------------------------------- TissueParams


def test_params_json_round_trip() -> None:
    p = TissueParams(mask_mpp=4.0, min_object_um2=1234.5, blue_ink_hue=(200, 230), remove_black_ink=False)
    data = json.loads(json.dumps(p.to_dict()))
    assert TissueParams.from_dict(data) == p
    assert TissueParams.from_dict({}) == TissueParams()


def test_from_kwargs_ignores_none() -> None:
    p = TissueParams.from_kwargs(mask_mpp=None, method=None, closing_um=0.0, green_ink_hue=[80, 170])
    assert p.mask_mpp == TissueParams().mask_mpp
    assert p.method == "otsu-saturation"
    assert p.closing_um == 0.0
    assert p.green_ink_hue == (80.0, 170.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_mpp": 0},
        {"mask_mpp": float("nan")},
        {"min_saturation": 1.5},
        {"max_brightness": 300},
        {"min_object_um2": -1},
        {"blue_ink_hue": (250, 200)},
        {"blue_ink_hue": 5},
        {"no_such_option": 1},
    ],
)
def test_params_invalid(kwargs) -> None:
    with pytest.raises(ConfigError) as info:
        TissueParams.from_kwargs(**kwargs)
    assert isinstance(info.value, (ValueError, WsiConvnextError))
    assert "\n" not in str(info.value)


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="method must be one of .*, got 'no-such-method'"):
        TissueParams(method="no-such-method")


# --------------------------------------------------------------------------- tile_tissue_fraction


def _reference_fraction(mask: np.ndarray, ds: float, coords: np.ndarray, extent: float) -> np.ndarray:
    """Exact covered area by explicit per-pixel overlap lengths (independent of the SAT method)."""
    h, w = mask.shape
    m = mask.astype(float)
    out = []
    for x, y in coords:
        x0, x1, y0, y1 = x / ds, (x + extent) / ds, y / ds, (y + extent) / ds
        i, j = np.arange(w), np.arange(h)
        ox = np.clip(np.minimum(x1, i + 1) - np.maximum(x0, i), 0, None)
        oy = np.clip(np.minimum(y1, j + 1) - np.maximum(y0, j), 0, None)
        out.append(oy @ m @ ox / (extent / ds) ** 2)
    return np.asarray(out)


@pytest.mark.parametrize("seed", range(6))
def test_tile_fraction_matches_brute_force(seed) -> None:
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 50, 2))
    mask = rng.random((h, w)) < rng.random()
    ds = float(rng.choice([1.0, 2.0, 16.0, rng.uniform(0.3, 40.0)]))
    extent = float(rng.choice([ds * 4, rng.uniform(0.2, 12.0) * ds]))  # aligned and fractional
    n = 300
    coords = np.stack(
        [
            rng.integers(-int(extent) - 3, int(w * ds) + 3, n),  # includes tiles across and beyond the border
            rng.integers(-int(extent) - 3, int(h * ds) + 3, n),
        ],
        axis=1,
    ).astype(np.int64)
    got = tile_tissue_fraction(mask, ds, coords, extent)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, _reference_fraction(mask, ds, coords, extent), atol=1e-5)


def test_tile_fraction_exact_cases() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half, mask px = 2 level-0 px
    coords = np.array([[0, 0], [2, 0], [4, 0], [-4, 0], [6, 6], [100, 100], [0, 4]], np.int64)
    got = tile_tissue_fraction(mask, 2.0, coords, 4.0)
    np.testing.assert_array_equal(got, np.array([1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32))
    # Partly outside the mask: the outside part counts as background.
    got = tile_tissue_fraction(mask, 2.0, np.array([[-4, 0], [-4, -4], [4, 6]], np.int64), 8.0)
    np.testing.assert_array_equal(got, np.array([0.5, 0.25, 0.0], np.float32))

    one = np.zeros((3, 3), bool)
    one[0, 0] = True
    coords = np.array([[0, 0]], np.int64)
    assert tile_tissue_fraction(one, 1.0, coords, 2.0)[0] == pytest.approx(0.25)
    assert tile_tissue_fraction(one, 1.0, coords, 0.5)[0] == pytest.approx(1.0)
    assert tile_tissue_fraction(one, 1.0, coords, 1.5)[0] == pytest.approx(1 / 2.25)
    assert tile_tissue_fraction(one, 4.0, np.array([[1, 1]], np.int64), 2.0)[0] == pytest.approx(1.0)
    assert tile_tissue_fraction(one, 4.0, np.array([[3, 3]], np.int64), 2.0)[0] == pytest.approx(0.25)


def test_tile_fraction_edge_inputs() -> None:
    mask = np.ones((5, 5), bool)
    empty = tile_tissue_fraction(mask, 1.0, np.zeros((0, 2), np.int64), 2.0)
    assert empty.shape == (0,) and empty.dtype == np.float32
    assert tile_tissue_fraction(mask.astype(np.uint8), 1.0, np.array([[1, 1]]), 2.0)[0] == 1.0
    for kwargs in ({"mask_downsample": 0.0}, {"extent": -1.0}, {"extent": float("nan")}):
        args = {"mask": mask, "mask_downsample": 1.0, "coords": np.array([[0, 0]]), "extent": 2.0} | kwargs
        with pytest.raises(ConfigError):
            tile_tissue_fraction(**args)
    with pytest.raises(ConfigError):
        tile_tissue_fraction(mask, 1.0, np.array([1, 2, 3]), 2.0)
    with pytest.raises(ConfigError):
        tile_tissue_fraction(np.ones(5, bool), 1.0, np.array([[0, 0]]), 2.0)


def test_tile_fraction_large_n_is_vectorised() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((1000, 1000)) < 0.3
    coords = rng.integers(0, 64_000, (500_000, 2)).astype(np.int64)
    t = _cpu_seconds(tile_tissue_fraction, mask, 64.0, coords, 448.0)
    assert t < 2.0, f"{t:.2f} CPU s for 500k tiles"


# --------------------------------------------------------------------------- real slide


def _thumbnail(path: Path, div: int) -> tuple[np.ndarray, float]:
    """Thumbnail of about ``0.499 * div`` µm/px and its level-0 downsample."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
        thumb = np.asarray(slide.get_thumbnail((w // div, h // div)).convert("RGB"))
    return thumb, w / thumb.shape[1]


def test_real_slide_tissue(cmu_slide: Path) -> None:
    thumb, ds = _thumbnail(cmu_slide, 16)  # ≈ 8 µm/px, what the pipeline reads
    mask = detect_tissue(thumb, 0.499 * ds)
    assert mask.shape == thumb.shape[:2]
    assert 0.15 <= mask.mean() <= 0.55
    h, w = mask.shape
    # The thin strip reaching out to the left and the loose fragments right of the main tissue.
    assert mask[int(0.34 * h) : int(0.40 * h), int(0.04 * w) : int(0.36 * w)].mean() >= 0.15
    assert mask[int(0.32 * h) : int(0.47 * h), int(0.78 * w) : int(0.90 * w)].mean() >= 0.2
    # Glass at the left edge below the strip is not tissue.
    assert mask[int(0.5 * h) :, : int(0.15 * w)].mean() <= 0.02


def test_real_slide_small_fragments(cmu_slide: Path) -> None:
    thumb, ds = _thumbnail(cmu_slide, 4)  # ≈ 2 µm/px
    mpp = 0.499 * ds
    fine = TissueParams(mask_mpp=2.0, min_object_um2=200.0)
    labels, n = ndi.label(detect_tissue(thumb, mpp, fine), structure=np.ones((3, 3)))
    assert n >= 3  # the main section plus loose fragments
    # A ~700 µm² loose fragment at level-0 (2090, 611), far from the main tissue.
    y, x = int(611 / ds), int(2090 / ds)
    assert labels[y - 6 : y + 7, x - 6 : x + 7].any()
    default = detect_tissue(thumb, mpp, TissueParams(mask_mpp=2.0))
    assert not default[y - 6 : y + 7, x - 6 : x + 7].any()  # below the default min_object_um2


# --------------------------------------------------------------------------- why "no tissue"


def test_explain_tissue_mask_equals_detect_tissue(scene, scene_mask) -> None:
    report = explain_tissue(scene[0], MPP)
    np.testing.assert_array_equal(report.mask, scene_mask)
    assert report.removed.shape == scene_mask.shape and not (report.removed & report.mask).any()
    assert report.kept_um2 and report.kept_um2 == tuple(sorted(report.kept_um2, reverse=True))
    assert sum(report.kept_um2) == pytest.approx(scene_mask.sum() * MPP**2)
    assert report.suggestion() == {}  # tissue was kept: nothing to change
    assert "kept" in report.describe()


def test_small_fragment_report_names_min_object_um2() -> None:
    rng = np.random.default_rng(3)
    img = _glass(120, 120, rng)
    piece = _disk(120, 120, 60, 60, 3.0)  # ≈ 29 px ≈ 1 850 µm² at 8 µm/px, below 2 500
    _paint(img, piece, PINK, rng)
    report = explain_tissue(_u8(img), MPP)
    assert not report.mask.any()
    assert len(report.small_um2) == 1 and 1000 < report.small_um2[0] < TissueParams().min_object_um2
    assert report.removed[piece].mean() > 0.9  # the removed piece is what the QC picture shows
    assert "smaller than min_object_um2=2500" in report.describe()
    (key, value), = report.suggestion().items()
    assert key == "min_object_um2" and value < report.small_um2[0]
    assert detect_tissue(_u8(img), MPP, TissueParams(min_object_um2=value))[piece].mean() > 0.9


def test_ink_and_blank_reports() -> None:
    rng = np.random.default_rng(4)
    img = _glass(200, 200, rng)
    img = _ink(img, _stroke(200, 200, (20, 20), (180, 180), 8.0), BLUE_INK, rng)
    report = explain_tissue(_u8(img), MPP)
    assert not report.mask.any() and report.ink_um2 > 0 and "pen ink" in report.describe()
    assert report.suggestion().get("remove_blue_ink") is False
    blank = explain_tissue(_u8(_glass(100, 100, rng)), MPP)
    assert blank.candidate_um2 == 0 and "no candidate pixel" in blank.describe() and "min_saturation" in blank.describe()


def test_params_from_assignments() -> None:
    p = TissueParams.from_assignments(
        ["min_object_um2=1000", "remove_black_ink=no", "blue_ink_hue=180,230", "method=otsu-od", "min_object_um2=900"]
    )
    assert p.min_object_um2 == 900.0 and p.remove_black_ink is False and p.blue_ink_hue == (180.0, 230.0)
    assert p.method == "otsu-od" and p.min_saturation == TissueParams().min_saturation
    assert TissueParams.from_assignments(["closing_um=4"], base={"closing_um": 8, "smooth_um": 2}).smooth_um == 2.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("bogus=1", "unknown tissue parameter 'bogus'.*valid names: .*min_object_um2"),
        ("min_object_um2=lots", "'min_object_um2=lots': min_object_um2 must be a number"),
        ("remove_blue_ink=maybe", "must be true or false"),
        ("blue_ink_hue=red", "low,high"),
        ("method=magic", "'method=magic': method must be one of 'otsu-saturation'"),
        ("min_saturation=2", r"'min_saturation=2': min_saturation must be a saturation in \[0, 1\], got 2.0"),
        ("min_object_um2", "must look like key=value"),
    ],
)
def test_params_from_assignments_errors_are_one_line(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        TissueParams.from_assignments([item])
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["hematoxylin", "dab"])
def test_ihc_like_slides_tissue_recall(tmp_path: Path, stain: str) -> None:
    """Default settings find IHC-like tissue (blue-grey counterstain, DAB brown): recall >= 0.95
    on the true pieces larger than min_object_um2."""
    from wsi_convnext.slide import open_slide
    from wsi_convnext.synthetic import SyntheticSlideSpec, TissueSpec, write_synthetic_slide

    params = TissueParams()
    recalls = []
    for seed in (1, 2):
        spec = SyntheticSlideSpec(
            width=4000, height=3200, mpp=0.5, stain=stain, seed=seed, flavour="generic", lesions=seed - 1,
            tissue=TissueSpec(n_blobs=2, coverage=0.3, n_fragments=3),
        )  # fmt: skip
        synth = write_synthetic_slide(tmp_path / f"{stain}-{seed}.tiff", spec, workers=2)
        with open_slide(synth.path) as reader:
            thumb = reader.thumbnail(500)  # 8 µm/px, the default mask_mpp
        mpp = 0.5 * 4000 / thumb.shape[1]
        found = detect_tissue(thumb, mpp, params)
        truth = synth.tissue_mask(mpp)[: thumb.shape[0], : thumb.shape[1]]
        labels, n = ndi.label(truth, structure=np.ones((3, 3), bool))
        areas = np.bincount(labels.ravel(), minlength=n + 1) * mpp**2
        big = (areas >= params.min_object_um2)[labels] & truth
        recalls.append((found & big).sum() / big.sum())
        assert (found & ~truth).sum() / found.sum() < 0.1  # and not the glass
    assert min(recalls) >= 0.95, f"{stain}: tissue recall {recalls}"
