"""Shared fixtures: the real test slides folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


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
