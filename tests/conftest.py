"""Shared fixtures: the real test slides folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Tests never reach the network: `--pretrained` finds weights only in the (test-built) HF cache.
os.environ["HF_HUB_OFFLINE"] = "1"


def _slides_dir() -> Path:
    return Path(os.environ.get("WSI_TEST_SLIDES", str(REPO_ROOT.parent / "shared" / "slides")))


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """Folder of the shared real test slides (``WSI_TEST_SLIDES``, default ``../shared/slides``)."""
    path = _slides_dir()
    if not (path / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"shared test slides not found at {path} (set WSI_TEST_SLIDES to the folder holding them)")
    return path


@pytest.fixture(scope="session")
def cmu_slide(slides_dir: Path) -> Path:
    """The real Aperio H&E slide CMU-1-Small-Region.svs (2220×2967 px, 0.499 µm/px)."""
    return slides_dir / "CMU-1-Small-Region.svs"


def write_pyramid_tiff(
    path: Path,
    image,
    *,
    mpp: float | None = 0.25,
    downsamples: tuple[int, ...] = (1, 4),
    compression: str | None = "zlib",
    tile: int = 256,
    aperio: bool = True,
) -> Path:
    """Write a small in-memory RGB image as a tiled pyramidal TIFF (test helper).

    Lower levels are block means of level 0. ``aperio`` writes an Aperio-style description
    (so OpenSlide reads mpp from it); otherwise resolution tags in centimetres are written.
    """
    import numpy as np
    import tifffile

    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    desc = None
    if aperio:
        desc = f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) test|AppMag = 40"
        if mpp is not None:
            desc += f"|MPP = {mpp:.4f}"
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, ds in enumerate(downsamples):
            if ds == 1:
                level = image
            else:
                hh, ww = h // ds, w // ds
                level = image[: hh * ds, : ww * ds].reshape(hh, ds, ww, ds, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            kwargs = {}
            if mpp is not None and not aperio:
                kwargs = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
            tw.write(
                level, tile=(tile, tile), photometric="rgb", compression=compression,
                description=desc if i == 0 else None, metadata=None, subfiletype=0 if (i == 0 or aperio) else 1, **kwargs,
            )  # fmt: skip
            if aperio and i == 0:
                # Aperio files keep a stripped thumbnail as their second page; readers expect it there.
                tw.write(image[::32, ::32].copy(), photometric="rgb", compression=compression, metadata=None)
    return path


#: Area of the small tissue fragment of :func:`fragment_slide`, µm² (below the default min_object_um2).
FRAGMENT_UM2 = 1800.0


@pytest.fixture(scope="session")
def fragment_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Issue 12 item 8: a plain-RGB (stripped, single-page, no resolution) IHC-like TIFF holding
    one ~1,800 µm² DAB fragment at 0.5 µm/px, centred in one 224-px tile of the default grid."""
    import math

    import tifffile

    from wsi_convnext.slide import open_slide
    from wsi_convnext.synthetic import Shape, SyntheticSlideSpec, TissueSpec, write_synthetic_slide

    out = tmp_path_factory.mktemp("fragment")
    r = math.sqrt(FRAGMENT_UM2 / 0.25 / math.pi)  # level-0 px at 0.5 µm/px
    spec = SyntheticSlideSpec(
        width=2240, height=2240, mpp=0.5, flavour="generic", downsamples=(1,), stain="dab", seed=4,
        compression="zlib", tissue=TissueSpec(pieces=(Shape(1232.0, 1232.0, r * 1.2, r / 1.2, 0.4),)),
    )  # fmt: skip
    synth = write_synthetic_slide(out / "source.tiff", spec, workers=1)
    with open_slide(synth.path) as reader:
        pixels = reader.read_region((0, 0), 0, reader.dimensions)
    path = out / "ihc-fragment.tif"
    tifffile.imwrite(path, pixels, photometric="rgb")  # plain strips, no mpp
    return path
