"""Slide reading layer: real OpenSlide / tiffslide reads of shared and generated slides."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_convnext.slide import base as slide_base
from wsi_convnext.errors import (
    ConfigError,
    InputNotFoundError,
    MppError,
    SlideOpenError,
    SlideReadError,
    WsiConvnextError,
)
from wsi_convnext.slide import (
    SLIDE_EXTENSIONS,
    BaseSlideReader,
    SlideMetadata,
    open_slide,
    register_backend,
    resolve_mpp,
    slide_info,
)

BACKENDS = ["openslide", "tiffslide"]


# --------------------------------------------------------------------------- generators
def lossless_pattern(height: int, width: int) -> np.ndarray:
    """RGB pattern whose pixels differ along x and y, so any offset error shows."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(5 * xx + yy) % 256, (xx + 3 * yy) % 256, (xx ^ yy) % 256], axis=-1).astype(np.uint8)


def smooth_pattern(height: int, width: int) -> np.ndarray:
    """Smooth RGB gradient: survives JPEG with small errors."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 150)], axis=-1
    ).astype(np.uint8)


def write_pyramid_tiff(
    path: Path,
    levels: list[np.ndarray],
    *,
    mpp: tuple[float, float] | None = (0.5, 0.5),
    unit: str = "CENTIMETER",
    compression: str = "zlib",
    tile: int = 128,
) -> Path:
    """Generic tiled pyramidal TIFF: levels as successive reduced-resolution pages (OpenSlide style)."""
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            kw: dict = {}
            if i == 0 and mpp is not None:
                per_um = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit]
                kw = {"resolution": (per_um / mpp[0], per_um / mpp[1]), "resolutionunit": unit}
            tw.write(
                img,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **kw,
            )
    return path


def strided_levels(base: np.ndarray, downsamples: tuple[int, ...] = (1, 2, 4)) -> list[np.ndarray]:
    return [np.ascontiguousarray(base[::d, ::d]) for d in downsamples]


def write_aperio_svs(
    path: Path,
    base: np.ndarray,
    *,
    compression: str | int = "jpeg",
    mpp: float = 0.25,
    appmag: int = 40,
    downsamples: tuple[int, ...] = (4, 16),
) -> Path:
    """Aperio-like SVS: baseline, stripped thumbnail, reduced levels, label and macro pages."""
    h, w = base.shape[:2]
    head = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
    common = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tw:
        desc0 = f"{head}|AppMag = {appmag}|MPP = {mpp}"
        tw.write(base, tile=(256, 256), compression=compression, description=desc0, **common)
        thumb_desc = f"{head} -> {w // 8}x{h // 8}"
        tw.write(base[::8, ::8], compression="jpeg", rowsperstrip=16, description=thumb_desc, **common)
        for d in downsamples:
            lvl = np.ascontiguousarray(base[::d, ::d])
            tile = 256 if min(lvl.shape[:2]) >= 256 else 64
            desc = f"{head} -> {w // d}x{h // d}"
            tw.write(lvl, tile=(tile, tile), compression=compression, description=desc, **common)
        tw.write(np.full((40, 60, 3), 200, np.uint8), compression="lzw", subfiletype=1,
                 description="Aperio Image Library v12.0.0\nlabel 60x40", **common)
        tw.write(np.full((40, 120, 3), 100, np.uint8), compression="jpeg", subfiletype=9,
                 description="Aperio Image Library v12.0.0\nmacro 120x40", **common)
    return path


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """Lossless 3-level pyramid (768x640, 384x320, 192x160) at 0.5 µm/px (cm resolution tags)."""
    levels = strided_levels(lossless_pattern(640, 768))
    return write_pyramid_tiff(tmp_path_factory.mktemp("pyr") / "pyramid.tiff", levels), levels


@pytest.fixture(scope="module")
def svs_jpeg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    base = smooth_pattern(1024, 768)
    return write_aperio_svs(tmp_path_factory.mktemp("svs") / "aperio.svs", base), base


# --------------------------------------------------------------------------- shared slides
@pytest.mark.parametrize("backend", BACKENDS)
def test_cmu_metadata(cmu_slide: Path, backend: str) -> None:
    with open_slide(cmu_slide, backend) as s:
        assert isinstance(s, BaseSlideReader)
        assert s.backend == backend
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1 and s.level_downsamples == (1.0,)
        assert s.level_tile_sizes == ((240, 240),)
        assert s.vendor == "aperio"
        assert s.mpp_x == pytest.approx(0.499) and s.mpp_y == pytest.approx(0.499)
        assert s.mpp_source == f"{backend}.mpp-x"
        assert s.objective_power == 20.0
        assert set(s.associated_images) == {"label", "macro", "thumbnail"}
        assert all(isinstance(v, str) for v in s.properties.values())
        assert resolve_mpp(s) == (pytest.approx(0.499), f"{backend}.mpp-x")
        label = s.read_associated("label")
        assert label.shape == (463, 387, 3) and label.dtype == np.uint8
        with pytest.raises(KeyError, match="no associated image 'nope'"):
            s.read_associated("nope")


def test_cmu_backends_agree(cmu_slide: Path) -> None:
    with open_slide(cmu_slide, "openslide") as a, open_slide(cmu_slide, "tiffslide") as b:
        ra = a.read_region((1000, 1200), 0, (300, 200))
        rb = b.read_region((1000, 1200), 0, (300, 200))
    assert ra.shape == rb.shape == (200, 300, 3) and ra.dtype == rb.dtype == np.uint8
    # Different JPEG decoders may round differently; the content must be the same tissue.
    assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2.0
    assert ra.std() > 10  # real tissue, not a blank region


@pytest.mark.parametrize("backend", BACKENDS)
def test_cmu_thumbnail(cmu_slide: Path, backend: str) -> None:
    with open_slide(cmu_slide, backend) as s:
        thumb = s.thumbnail(256)
        full = s.read_region((0, 0), 0, s.dimensions)
    assert thumb.dtype == np.uint8 and thumb.shape == (256, 192, 3)
    assert np.abs(thumb.reshape(-1, 3).mean(0) - full.reshape(-1, 3).mean(0)).max() < 2.0
    # H&E on glass: bright background, pinkish (red > green) tissue.
    mean = thumb.reshape(-1, 3).mean(0)
    assert 150 < mean.mean() < 250 and mean[0] > mean[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_svs(slides_dir: Path, backend: str) -> None:
    with open_slide(slides_dir / "openslide-small.svs", backend) as s:
        assert s.dimensions == (16, 16) and s.vendor == "aperio"
        assert resolve_mpp(s)[0] == pytest.approx(0.499)
        region = s.read_region((0, 0), 0, (16, 16))
        assert region.shape == (16, 16, 3) and region.std() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_svs_fails_on_read(slides_dir: Path, backend: str) -> None:
    path = slides_dir / "openslide-unreadable.svs"
    with open_slide(path, backend) as s:
        assert s.dimensions == (16, 16)
        with pytest.raises(SlideReadError, match="Bogus marker length") as info:
            s.read_region((0, 0), 0, (16, 16))
        assert path.name in str(info.value) and "\n" not in str(info.value)
        assert info.value.__cause__ is not None
        with pytest.raises(SlideReadError):
            s.thumbnail(8)


def test_unopenable_tiff(slides_dir: Path) -> None:
    path = slides_dir / "openslide-unopenable.tiff"
    with pytest.raises(SlideOpenError) as info:
        open_slide(path)
    msg = str(info.value)
    assert path.name in msg and "\n" not in msg
    assert "openslide:" in msg and "tiffslide:" in msg and "52479" in msg
    assert "unsupported" in msg and "corrupt" in msg
    assert set(info.value.backend_errors) == {"openslide", "tiffslide"}
    assert isinstance(info.value, OSError) and isinstance(info.value, WsiConvnextError)
    # tiffslide alone would open it as a 1x1 image; we refuse at open instead of yielding garbage.
    with pytest.raises(SlideOpenError, match="compression 52479"):
        open_slide(path, "tiffslide")


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_tiff_absurd_mpp(slides_dir: Path, backend: str) -> None:
    with open_slide(slides_dir / "openslide-boxes.tiff", backend) as s:
        assert s.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert s.mpp_x == pytest.approx(352.78, abs=0.01)
        assert s.mpp_source == "tiff.XResolution(cm)"
        absurd = r"352\.7\d* µm/px \(from tiff.XResolution\(cm\)\) is implausible.*--slide-mpp"
        with pytest.raises(MppError, match=absurd):
            resolve_mpp(s)
    with open_slide(slides_dir / "openslide-boxes.tiff", backend, slide_mpp=0.5) as s:
        assert resolve_mpp(s) == (0.5, "override") and s.slide_mpp == 0.5
    with pytest.raises(MppError, match=r"openslide-boxes.tiff: slide_mpp must be the level-0 µm/px, between 0.05 and 100"):
        open_slide(slides_dir / "openslide-boxes.tiff", backend, slide_mpp=352.78)
    with open_slide(slides_dir / "openslide-boxes.tiff", backend) as s:
        # level 2 has downsample 4.016 (odd sizes): only a looser tolerance accepts it for 4
        assert s.get_best_level_for_downsample(4.0) == 1
        assert s.get_best_level_for_downsample(4.0, tolerance=0.01) == 2
        assert s.get_best_level_for_downsample(4.02) == 2
        assert s.get_best_level_for_downsample(100) == 3


def test_dicom_via_openslide(slides_dir: Path) -> None:
    for name in ("openslide-boxes_0.dcm", "openslide-boxes_1.dcm"):
        with open_slide(slides_dir / name) as s:
            assert s.backend == "openslide" and s.vendor == "dicom"
            assert s.dimensions == (16, 16)
            assert resolve_mpp(s)[0] == pytest.approx(0.499)
            assert s.read_region((0, 0), 0, (16, 16)).std() > 0
    with pytest.raises(SlideOpenError, match="tiffslide: not a TIFF"):
        open_slide(slides_dir / "openslide-boxes_0.dcm", "tiffslide")


def test_missing_path_and_bad_backend(tmp_path: Path, cmu_slide: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope.svs"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(FileNotFoundError):
        slide_info(tmp_path / "nope.svs")
    with pytest.raises(ConfigError, match="unknown slide backend 'bioformats'"):
        open_slide(cmu_slide, "bioformats")
    with pytest.raises(SlideOpenError, match="is a folder"):
        open_slide(tmp_path)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 10)
    with pytest.raises(SlideOpenError, match="junk.svs.*corrupt or truncated"):
        open_slide(junk)


# --------------------------------------------------------------------------- generated slides
@pytest.mark.parametrize("backend", BACKENDS)
def test_pyramid_exact_pixels(pyramid: tuple[Path, list[np.ndarray]], backend: str) -> None:
    path, levels = pyramid
    with open_slide(path, backend) as s:
        assert s.level_dimensions == ((768, 640), (384, 320), (192, 160))
        assert s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.level_tile_sizes == ((128, 128),) * 3
        assert s.vendor == "generic-tiff"
        assert (s.mpp_x, s.mpp_y) == (pytest.approx(0.5), pytest.approx(0.5))
        assert resolve_mpp(s) == (pytest.approx(0.5), "tiff.XResolution(cm)")
        for level, ds in enumerate((1, 2, 4)):
            x, y, w, h = 37, 21, 101, 77  # level coordinates, crossing tile borders
            got = s.read_region((x * ds, y * ds), level, (w, h))
            np.testing.assert_array_equal(got, levels[level][y : y + h, x : x + w])
        whole = s.read_region((0, 0), 2, (192, 160))
        np.testing.assert_array_equal(whole, levels[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_bounds_is_white(pyramid: tuple[Path, list[np.ndarray]], backend: str) -> None:
    path, levels = pyramid
    with open_slide(path, backend) as s:
        got = s.read_region((-10, -20), 0, (50, 40))
        expected = np.full((40, 50, 3), 255, np.uint8)
        expected[20:, 10:] = levels[0][:20, :40]
        np.testing.assert_array_equal(got, expected)
        # past the bottom-right corner, at level 1
        got = s.read_region((2 * 370, 2 * 300), 1, (30, 40))
        expected = np.full((40, 30, 3), 255, np.uint8)
        expected[:20, :14] = levels[1][300:, 370:]
        np.testing.assert_array_equal(got, expected)
        assert (s.read_region((5000, 5000), 0, (16, 8)) == 255).all()
        assert s.read_region((5000, 5000), 0, (16, 8)).shape == (8, 16, 3)
        with pytest.raises(ValueError, match="level 3 out of range"):
            s.read_region((0, 0), 3, (4, 4))
        with pytest.raises(ValueError, match="positive"):
            s.read_region((0, 0), 0, (0, 4))
    with pytest.raises(ValueError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_level_for_downsample(pyramid: tuple[Path, list[np.ndarray]], backend: str) -> None:
    with open_slide(pyramid[0], backend) as s:
        got = [s.get_best_level_for_downsample(d) for d in (0.5, 1.0, 1.99, 2.0, 3.5, 4.0, 64.0)]
    assert got == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_uses_coarsest_adequate_level(tmp_path: Path, backend: str) -> None:
    # Each level a different flat colour: the thumbnail's colour tells which level was read.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    levels = [np.full((768 // d, 1024 // d, 3), c, np.uint8) for d, c in zip((1, 2, 4), colours, strict=True)]
    path = write_pyramid_tiff(tmp_path / "colours.tiff", levels)
    with open_slide(path, backend) as s:
        for max_size, colour, shape in [(200, 2, (150, 200, 3)), (256, 2, (192, 256, 3)),
                                        (300, 1, (225, 300, 3)), (5000, 0, (768, 1024, 3))]:
            thumb = s.thumbnail(max_size)
            assert thumb.shape == shape, max_size
            np.testing.assert_allclose(thumb.reshape(-1, 3).mean(0), colours[colour], atol=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_blockwise_single_level(tmp_path: Path, backend: str) -> None:
    """A single-level (stripped, non-pyramidal) slide: block-wise downscaling equals whole-level."""
    base = smooth_pattern(900, 1200)
    base[300:600, 400:800] = (120, 40, 160)  # a sharp-edged block
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, base, photometric="rgb", compression="zlib", rowsperstrip=64, metadata=None)
    try:
        s = open_slide(path, backend)
    except SlideOpenError:
        assert backend == "openslide"  # OpenSlide needs tiled TIFFs; "auto" falls back
        assert open_slide(path).backend == "tiffslide"
        return
    with s:
        whole = s.thumbnail(100)
        strips = s.thumbnail(100, block_pixels=50_000)
        squares = s.thumbnail(100, block_pixels=5_000)
    assert whole.shape == (75, 100, 3)
    np.testing.assert_array_equal(strips, whole)
    np.testing.assert_array_equal(squares, whole)
    expected = np.asarray(Image.fromarray(base).resize((100, 75), Image.Resampling.LANCZOS))
    assert np.abs(whole.astype(int) - expected.astype(int)).mean() < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_blockwise_odd_downsample(slides_dir: Path, backend: str) -> None:
    # openslide-boxes.tiff level 2 has downsample 4.016: block origins are not level-0 integers.
    with open_slide(slides_dir / "openslide-boxes.tiff", backend) as s:
        assert s.level0_location(2, (10, 31)) == (41, 125)
        assert s.level0_location(1, (10, 31)) == (20, 62)
        whole = s.thumbnail(70).astype(int)
        blocks = s.thumbnail(70, block_pixels=300).astype(int)
    assert whole.shape == blocks.shape == (58, 70, 3)
    # tiffslide starts exactly on the level pixel; OpenSlide interpolates a sub-pixel shift.
    assert np.abs(whole - blocks).mean() < (0.01 if backend == "tiffslide" else 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_in_inches(tmp_path: Path, backend: str) -> None:
    levels = strided_levels(lossless_pattern(256, 256), (1, 2))
    path = write_pyramid_tiff(tmp_path / "inch.tiff", levels, mpp=(0.25, 0.25), unit="INCH")
    with open_slide(path, backend) as s:
        assert resolve_mpp(s) == (pytest.approx(0.25), "tiff.XResolution(inch)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mpp(tmp_path: Path, backend: str) -> None:
    levels = strided_levels(lossless_pattern(256, 256), (1, 2))
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", levels, mpp=None)
    with open_slide(path, backend) as s:
        assert s.mpp_x is None and s.mpp_y is None and s.mpp_source is None
        with pytest.raises(MppError, match=r"nompp.tiff: no microns-per-pixel.*--slide-mpp X.*`slide_mpp` column"):
            resolve_mpp(s)
    with open_slide(path, backend, slide_mpp=0.25) as s:
        assert resolve_mpp(s) == (0.25, "override")
    for bad in (0.0, -1.0, 0.01, 1000.0, math.nan, math.inf):
        with pytest.raises(MppError, match=r"nompp.tiff: slide_mpp must be the level-0 µm/px"):
            open_slide(path, backend, slide_mpp=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anisotropic_mpp(tmp_path: Path, backend: str) -> None:
    levels = strided_levels(lossless_pattern(256, 256), (1, 2))
    path = write_pyramid_tiff(tmp_path / "aniso.tiff", levels, mpp=(0.5, 0.6))
    with open_slide(path, backend) as s:
        assert (s.mpp_x, s.mpp_y) == (pytest.approx(0.5), pytest.approx(0.6))
        with pytest.raises(MppError, match="non-square pixels.*--slide-mpp"):
            resolve_mpp(s)
    with open_slide(path, backend, slide_mpp=0.55) as s:
        assert resolve_mpp(s) == (0.55, "override")
    path = write_pyramid_tiff(tmp_path / "nearly.tiff", levels, mpp=(0.5, 0.505))
    with open_slide(path, backend) as s:
        assert resolve_mpp(s)[0] == pytest.approx(0.5025)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_svs_jpeg(svs_jpeg: tuple[Path, np.ndarray], backend: str) -> None:
    path, base = svs_jpeg
    with open_slide(path, backend) as s:
        assert s.vendor == "aperio"
        assert s.level_dimensions == ((768, 1024), (192, 256), (48, 64))
        assert s.level_downsamples == (1.0, 4.0, 16.0)
        assert resolve_mpp(s) == (pytest.approx(0.25), f"{backend}.mpp-x")
        assert s.objective_power == 40.0
        assert {"label", "macro", "thumbnail"} <= set(s.associated_images)
        np.testing.assert_array_equal(s.read_associated("label"), np.full((40, 60, 3), 200, np.uint8))
        for level, d in enumerate((1, 4, 16)):
            lw, lh = s.level_dimensions[level]
            got = s.read_region((0, 0), level, (lw, lh)).astype(int)
            assert np.abs(got - base[::d, ::d]).mean() < 3.0, level


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_svs_jpeg2000(tmp_path: Path, backend: str) -> None:
    base = lossless_pattern(512, 512)
    path = tmp_path / "jp2k.svs"
    try:
        write_aperio_svs(path, base, compression=tifffile.COMPRESSION.APERIO_JP2000_RGB, mpp=0.5, appmag=20)
    except Exception as exc:  # pragma: no cover - depends on the imagecodecs build
        pytest.skip(f"imagecodecs cannot write Aperio JPEG 2000 (33005): {exc}")
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].compression == 33005
    with open_slide(path, backend) as s:
        assert s.vendor == "aperio" and resolve_mpp(s)[0] == pytest.approx(0.5)
        assert s.level_dimensions == ((512, 512), (128, 128), (32, 32))
        # imagecodecs encodes JPEG 2000 losslessly by default: exact pixels through both backends.
        np.testing.assert_array_equal(s.read_region((64, 32), 0, (300, 200)), base[32:232, 64:364])
        np.testing.assert_array_equal(s.read_region((0, 0), 1, (128, 128)), base[::4, ::4])


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_svs_never_silently_succeeds(
    svs_jpeg: tuple[Path, np.ndarray], cmu_slide: Path, tmp_path: Path, backend: str, keep: float
) -> None:
    for src in (svs_jpeg[0], cmu_slide):
        data = src.read_bytes()
        cut = tmp_path / f"cut-{src.name}"
        cut.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises((SlideOpenError, SlideReadError), match=cut.name):
            with open_slide(cut, backend) as s:
                s.thumbnail(4096)  # decodes every level-0 tile
                for name in s.associated_images:
                    s.read_associated(name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_reads_match_sequential(
    pyramid: tuple[Path, list[np.ndarray]], cmu_slide: Path, backend: str
) -> None:
    rng = np.random.default_rng(0)
    for path, size in ((pyramid[0], 96), (cmu_slide, 256)):
        with open_slide(path, backend) as s:
            jobs = []
            for _ in range(48):
                level = int(rng.integers(s.level_count))
                lw, lh = s.level_dimensions[level]
                ds = s.level_downsamples[level]
                x, y = int(rng.integers(-16, lw)), int(rng.integers(-16, lh))
                jobs.append(((round(x * ds), round(y * ds)), level, (size, size)))
            sequential = [s.read_region(*job) for job in jobs]
            with ThreadPoolExecutor(max_workers=8) as pool:
                for _ in range(2):
                    concurrent = list(pool.map(lambda job: s.read_region(*job), jobs))
                    for a, b in zip(sequential, concurrent, strict=True):
                        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- info, registry
def test_slide_info(cmu_slide: Path) -> None:
    info = slide_info(cmu_slide)
    assert json.loads(json.dumps(info)) == info
    assert info["backend"] == "openslide" and info["vendor"] == "aperio"
    assert info["dimensions"] == [2220, 2967]
    assert info["levels"] == [
        {"level": 0, "width": 2220, "height": 2967, "downsample": 1.0, "tile_width": 240, "tile_height": 240}
    ]
    assert info["mpp_x"] == pytest.approx(0.499) and info["mpp_source"] == "openslide.mpp-x"
    assert info["objective_power"] == 20.0
    assert sorted(info["associated_images"]) == ["label", "macro", "thumbnail"]
    assert info["file_size_bytes"] == cmu_slide.stat().st_size
    assert slide_info(cmu_slide, backend="tiffslide")["backend"] == "tiffslide"


def test_slide_extensions() -> None:
    assert {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm", ".bif", ".vms"} <= SLIDE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in SLIDE_EXTENSIONS)


class PillowReader(BaseSlideReader):
    """A real third-party backend: ordinary images (PNG, JPEG) through Pillow."""

    backend = "pillow"

    def _open(self) -> SlideMetadata:
        with Image.open(self.path) as img:
            self._rgba = np.asarray(img.convert("RGBA"))
        h, w = self._rgba.shape[:2]
        return SlideMetadata(level_dimensions=((w, h),), level_downsamples=(1.0,), properties={})

    def _read_raw(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        (x, y), (w, h) = location, size
        out = np.zeros((h, w, 4), np.uint8)  # alpha 0 outside: the base class makes it white
        ih, iw = self._rgba.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgba[y0:y1, x0:x1]
        return out

    def _read_associated_raw(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def _close(self) -> None:
        self._rgba = np.zeros((0, 0, 4), np.uint8)


def test_register_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_base._BACKENDS, "_items", slide_base._BACKENDS.snapshot())
    monkeypatch.setattr(slide_base, "_AUTO_ORDER", list(slide_base._AUTO_ORDER))
    png = tmp_path / "image.png"
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = lossless_pattern(20, 30)
    rgba[..., 3] = 255
    rgba[:, :10, 3] = 0  # transparent left third
    Image.fromarray(rgba).save(png)
    with pytest.raises(SlideOpenError, match="openslide: .*; tiffslide: "):
        open_slide(png)
    register_backend("pillow", PillowReader)
    assert slide_base.available_backends()[:3] == ("openslide", "tiffslide", "pillow")
    with open_slide(png) as s:
        assert s.backend == "pillow" and s.mpp_x is None and s.level_tile_sizes == (None,)
        got = s.read_region((-2, 0), 0, (30, 20))
    assert (got[:, :12] == 255).all()
    np.testing.assert_array_equal(got[:, 12:], rgba[:, 10:28, :3])
    with pytest.raises(ConfigError):
        register_backend("auto", PillowReader)
