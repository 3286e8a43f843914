"""Synthetic slides: real files read back with OpenSlide and tiffslide, checked against ground truth."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from wsi_convnext.errors import ConfigError
from wsi_convnext.synthetic import (
    Shape,
    SyntheticSlide,
    SyntheticSlideSpec,
    TissueSpec,
    make_cohort,
    truncate_copy,
    write_synthetic_slide,
)

BACKENDS = ("openslide", "tiffslide")


def _open(backend: str, path: Path) -> Any:
    return openslide.OpenSlide(str(path)) if backend == "openslide" else tiffslide.TiffSlide(path)


def _mpp(backend: str, slide: Any) -> float | None:
    value = slide.properties.get(f"{backend}.mpp-x")
    return None if value in (None, "") else float(value)


def _read_level(slide: Any, level: int) -> np.ndarray:
    w, h = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def aperio40(out: Path) -> SyntheticSlide:
    """40×-like Aperio JPEG slide with a lesion and a blue pen mark."""
    spec = SyntheticSlideSpec(width=3000, height=2400, mpp=0.25, lesions=1, pen_marks=("blue",), seed=11,
                              tissue=TissueSpec(n_blobs=1, coverage=0.45, n_holes=1), lesion_fraction=0.08)
    return write_synthetic_slide(out / "aperio40.svs", spec)


@pytest.fixture(scope="module")
def generic20(out: Path) -> SyntheticSlide:
    """20× generic TIFF, lossless, with tissue but no pen marks."""
    spec = SyntheticSlideSpec(width=4000, height=3000, mpp=0.5, flavour="generic", compression="zlib",
                              downsamples=(1, 4, 16), seed=5, lesions=2, lesion_fraction=0.12,
                              tissue=TissueSpec(n_blobs=2, coverage=0.35, n_fragments=3, n_holes=2))
    return write_synthetic_slide(out / "generic20.tiff", spec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_levels_mpp_and_associated(aperio40: SyntheticSlide, backend: str) -> None:
    s = _open(backend, aperio40.path)
    assert s.properties[f"{backend}.vendor"] == "aperio"
    assert s.level_count == 3
    assert s.level_dimensions == ((3000, 2400), (750, 600), (188, 150))
    assert s.level_downsamples[:2] == (1.0, 4.0)
    assert s.level_downsamples[2] == pytest.approx(16.0, rel=0.01)
    assert _mpp(backend, s) == pytest.approx(0.25)
    assert float(s.properties[f"{backend}.objective-power"]) == 40
    assert {"thumbnail", "label", "macro"} <= set(s.associated_images)
    assert s.read_region((1000, 1000), 0, (64, 64)).size == (64, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_levels_and_centimetre_mpp(generic20: SyntheticSlide, backend: str) -> None:
    s = _open(backend, generic20.path)
    assert s.level_dimensions == ((4000, 3000), (1000, 750), (250, 188))
    assert _mpp(backend, s) == pytest.approx(0.5, rel=1e-6)
    with tifffile.TiffFile(generic20.path) as tf:
        assert tf.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert not tf.pages[0].description.startswith("Aperio")


@pytest.mark.parametrize("flavour", ["aperio", "generic"])
def test_no_mpp_means_no_resolution_metadata(out: Path, flavour: str) -> None:
    spec = SyntheticSlideSpec(width=1200, height=1000, mpp=None, flavour=flavour, seed=2, downsamples=(1, 4))
    slide = write_synthetic_slide(out / f"nompp_{flavour}.tif", spec)
    with tifffile.TiffFile(slide.path) as tf:
        for page in tf.pages:
            assert not {"XResolution", "YResolution", "ResolutionUnit"} & set(page.tags.keys())
            assert "MPP" not in (page.description or "")
    for backend in BACKENDS:
        s = _open(backend, slide.path)
        assert _mpp(backend, s) is None
        assert s.level_dimensions[1] == (300, 250)
        assert np.asarray(s.read_region((0, 0), 1, (300, 250)))[..., :3].std() > 1  # content is there


def test_jpeg2000_aperio_readable_by_both_backends(out: Path) -> None:
    kw = dict(width=1024, height=768, mpp=0.5, downsamples=(1, 4), seed=3, tissue=TissueSpec(coverage=0.5))
    ref = write_synthetic_slide(out / "ref_raw.tiff", SyntheticSlideSpec(compression="none", flavour="generic", **kw))
    j2k = write_synthetic_slide(out / "j2k.svs", SyntheticSlideSpec(compression="jpeg2000", **kw))
    with tifffile.TiffFile(j2k.path) as tf:
        assert tf.pages[0].compression == 33005
    expected = _read_level(_open("openslide", ref.path), 0).astype(np.int16)
    for backend in BACKENDS:
        got = _read_level(_open(backend, j2k.path), 0).astype(np.int16)
        assert np.abs(got - expected).mean() < 3.0, backend
    # Generic TIFF + 33005: tiffslide reads it; OpenSlide 4.0 only decodes JPEG 2000 in Aperio files.
    generic_spec = SyntheticSlideSpec(compression="jpeg2000", flavour="generic", **kw)
    generic = write_synthetic_slide(out / "j2k.tiff", generic_spec)
    got = _read_level(_open("tiffslide", generic.path), 0).astype(np.int16)
    assert np.abs(got - expected).mean() < 3.0


def _expected_lines(n: int, d: int, step: float, w: int) -> np.ndarray:
    """Black fraction of n level pixels (downsample d) along an axis, from first principles."""
    black = np.zeros(n * d, dtype=bool)
    for k in range(int(n * d / step) + 2):
        start = int(round(k * step))
        black[start:start + w] = True
    return black[: n * d].reshape(n, d).mean(axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mpp", "downsamples"), [(0.25, (1, 4, 16)), (0.3, (1, 2, 8))])
def test_lines_pattern_exact_at_levels_0_and_1(out: Path, backend: str, mpp: float,
                                               downsamples: tuple[int, ...]) -> None:
    spec = SyntheticSlideSpec(width=1700, height=1100, mpp=mpp, pattern="lines", compression="zlib",
                              flavour="generic", downsamples=downsamples, line_spacing_um=100.0, line_width_um=2.0)
    path = out / f"lines_{mpp}.tiff"
    if not path.exists():
        write_synthetic_slide(path, spec)
    s = _open(backend, path)
    step, w = 100.0 / mpp, round(2.0 / mpp)
    for level in (0, 1):
        d = downsamples[level]
        img = _read_level(s, level)
        h, wd = img.shape[:2]
        fx = _expected_lines(wd, d, step, w)[None, :]
        fy = _expected_lines(h, d, step, w)[:, None]
        expected = np.rint(255 * (1 - (fx + fy - fx * fy))).astype(np.uint8)
        np.testing.assert_array_equal(img[..., 0], expected)
        assert (img[..., 0] == img[..., 2]).all()
    if mpp == 0.25:  # spot check: the 2 µm lines are 8 px at level 0 and 2 px at level 1
        assert (_read_level(s, 0)[500, 400:408] == 0).all() and _read_level(s, 0)[500, 408, 0] == 255
        assert (_read_level(s, 1)[125, 100:102] == 0).all()


def test_tissue_truth_matches_thumbnail(generic20: SyntheticSlide) -> None:
    s = _open("openslide", generic20.path)
    img = _read_level(s, 2).astype(np.int16)  # downsample 16 → mask at 16·mpp is pixel-aligned
    truth = generic20.tissue_mask(16 * 0.5)
    assert truth.shape == img.shape[:2]
    nonwhite = img.min(axis=2) < 225
    iou = (nonwhite & truth).sum() / (nonwhite | truth).sum()
    assert iou > 0.9, iou
    assert 0.25 < truth.mean() < 0.45  # coverage target 0.35
    assert 2 <= len(generic20.geometry.holes) and len(generic20.geometry.fragments) == 3


def test_lesions_inside_tissue_and_distinct(generic20: SyntheticSlide) -> None:
    lesion, tissue = generic20.lesion_mask(4.0), generic20.tissue_mask(4.0)
    assert lesion.any() and not (lesion & ~tissue).any()
    frac = lesion.sum() / tissue.sum()
    assert 0.08 < frac < 0.16  # requested 12 % of the tissue
    img = _read_level(_open("tiffslide", generic20.path), 1).astype(np.float32)  # 2 µm/px: mask at 8 µm → 4×4
    small = img[: img.shape[0] // 4 * 4, : img.shape[1] // 4 * 4].reshape(
        img.shape[0] // 4, 4, img.shape[1] // 4, 4, 3).mean(axis=(1, 3))
    les, tis = generic20.lesion_mask(8.0), generic20.tissue_mask(8.0)
    les, tis = les[: small.shape[0], : small.shape[1]], tis[: small.shape[0], : small.shape[1]]
    lesion_rgb, normal_rgb = small[les].mean(axis=0), small[tis & ~les].mean(axis=0)
    assert lesion_rgb.sum() < normal_rgb.sum() - 60  # lesions are clearly darker
    assert lesion_rgb[2] - lesion_rgb[0] > normal_rgb[2] - normal_rgb[0] + 5  # and more purple/blue


def test_pen_marks_are_saturated_ink(aperio40: SyntheticSlide) -> None:
    pen = aperio40.pen_mask(4.0)  # level 2 of a 0.25-µm/px slide is 4 µm/px
    img = _read_level(_open("openslide", aperio40.path), 2).astype(np.int16)
    assert pen.shape == img.shape[:2] and pen.mean() > 0.01
    blue = img[..., 2] - img[..., 0] > 50
    assert blue[pen].mean() > 0.8 and blue[~pen].mean() < 0.05
    assert (pen & ~aperio40.tissue_mask(4.0)).any() and (pen & aperio40.tissue_mask(4.0)).any()


def test_same_seed_same_bytes_and_atomic_write(out: Path) -> None:
    spec = SyntheticSlideSpec(width=1500, height=1000, mpp=0.5, lesions=1, pen_marks=("green",), seed=9,
                              downsamples=(1, 4))
    calls: list[tuple[int, int]] = []
    a = write_synthetic_slide(out / "det_a.svs", spec, progress=lambda done, total: calls.append((done, total)))
    b = write_synthetic_slide(out / "det_b.svs", spec, workers=1)  # thread count must not matter
    assert calls and calls[-1][0] == calls[-1][1] == 6 * 4 + 2 * 1  # 256-px tiles of levels 0 and 1
    assert _sha(a.path) == _sha(b.path)
    c = write_synthetic_slide(out / "det_c.svs", replace(spec, seed=10))
    assert _sha(a.path) != _sha(c.path)
    np.testing.assert_array_equal(a.tissue_mask(8.0), b.tissue_mask(8.0))
    assert not list(out.glob(".*.tmp"))


def test_blank_pale_and_explicit_lesion(out: Path) -> None:
    blank = write_synthetic_slide(out / "blank.svs", SyntheticSlideSpec(width=1200, height=900, blank=True,
                                                                          downsamples=(1, 4)))
    assert not blank.tissue_mask(8.0).any()
    img = _read_level(_open("openslide", blank.path), 1)
    assert img.min() > 220

    base = dict(width=1600, height=1200, mpp=0.5, seed=4, downsamples=(1, 4), tissue=TissueSpec(coverage=0.4))
    normal = write_synthetic_slide(out / "normal.svs", SyntheticSlideSpec(**base))
    pale = write_synthetic_slide(out / "pale.svs", SyntheticSlideSpec(pale=True, **base))
    mask = normal.tissue_mask(2.0)
    np.testing.assert_array_equal(mask, pale.tissue_mask(2.0))
    n_img = _read_level(_open("openslide", normal.path), 1)[mask].astype(float).mean()
    p_img = _read_level(_open("openslide", pale.path), 1)[mask].astype(float).mean()
    assert p_img > n_img + 20

    lesion = Shape(cx=800, cy=600, rx=150, ry=100)
    explicit = write_synthetic_slide(out / "explicit.svs", SyntheticSlideSpec(lesions=[lesion], **base))
    assert explicit.geometry.lesions == (lesion,)
    m = explicit.lesion_mask(0.5)  # level-0 resolution: the ellipse ∩ tissue
    assert m.sum() <= np.pi * 150 * 100 * 1.01


def test_make_cohort_labels_and_truth(tmp_path: Path) -> None:
    slides = make_cohort(tmp_path, 5, positive_fraction=0.4, size=(2048, 1536), seed=1,
                         lesion_fraction=(0.02, 0.05))
    with (tmp_path / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == [s.slide_id for s in slides]
    assert list(rows[0]) == ["slide_id", "label", "patient_id"]
    assert sum(r["label"] == "tumor" for r in rows) == 2
    assert sum(r["label"] == "normal" for r in rows) == 3
    assert len({r["patient_id"] for r in rows}) == 4  # default: ceil(0.8·5) patients, one with 2 slides
    for s in slides:
        assert s.path.is_file() and s.path.suffix == ".svs"
        assert s.lesion_mask(8.0).any() == (s.label == "tumor")
        assert openslide.OpenSlide(str(s.path)).properties["openslide.mpp-x"] == "0.5"


def test_truncate_copy_and_invalid_specs(out: Path, aperio40: SyntheticSlide) -> None:
    dst = truncate_copy(aperio40.path, out / "trunc.svs", 0.5)
    assert dst.stat().st_size == aperio40.path.stat().st_size // 2
    for bad in (dict(downsamples=(2, 4)), dict(tile=100), dict(compression="lzma"), dict(flavour="ndpi"),
                dict(pen_marks=("red",)), dict(mpp=0.0)):
        with pytest.raises(ConfigError):
            write_synthetic_slide(out / "bad.svs", SyntheticSlideSpec(**bad))
    assert not (out / "bad.svs").exists()


# --------------------------------------------------------------------------- IHC-like stains, explicit pieces


@pytest.mark.parametrize("stain", ["hematoxylin", "dab"])
def test_ihc_like_stains_colour_the_tissue(tmp_path: Path, stain: str) -> None:
    spec = SyntheticSlideSpec(width=2000, height=1600, mpp=0.5, stain=stain, seed=3, flavour="generic",
                              downsamples=(1, 4), compression="zlib", tissue=TissueSpec(n_blobs=1, coverage=0.4))
    synth = write_synthetic_slide(tmp_path / f"{stain}.tiff", spec, workers=1)
    with tiffslide.TiffSlide(synth.path) as s:
        level = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
    truth = synth.tissue_mask(2.0)[: level.shape[0], : level.shape[1]]
    r, g, b = level[truth].mean(axis=0)
    if stain == "hematoxylin":  # blue-grey: blue brightest, red and green close, weakly saturated
        assert b > r + 5 and b > g + 5 and abs(r - g) < 15 and (b - min(r, g)) / b < 0.3
    else:  # DAB brown: red > green > blue
        assert r > g + 20 > b + 40
    glass = level[~synth.tissue_mask(2.0)[: level.shape[0], : level.shape[1]]].mean(axis=0)
    assert glass.min() > 230  # the glass stays white


def test_explicit_tissue_pieces_are_the_tissue(tmp_path: Path) -> None:
    piece = Shape(500.0, 400.0, 60.0, 40.0, 0.3)
    spec = SyntheticSlideSpec(width=1000, height=800, tissue=TissueSpec(pieces=(piece,)), flavour="generic",
                              downsamples=(1,), compression="zlib", seed=1)
    synth = write_synthetic_slide(tmp_path / "piece.tiff", spec, workers=1)
    assert synth.geometry.blobs == (piece,) and synth.geometry.fragments == () and synth.geometry.holes == ()
    assert synth.tissue_mask(0.5).sum() == pytest.approx(piece.area, rel=0.01)
    with pytest.raises(ConfigError, match="stain"):
        write_synthetic_slide(tmp_path / "bad.tiff", replace(spec, stain="trichrome"))
