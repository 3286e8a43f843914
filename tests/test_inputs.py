"""Discovering slides from files, folders and CSV manifests."""

from __future__ import annotations

import pytest

from wsi_convnext.errors import ConfigError, InputNotFoundError
from wsi_convnext.inputs import discover_slides, slide_stem


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_folder_recursive_and_collisions_are_deterministic(tmp_path):
    _touch(tmp_path / "a" / "s1.svs")
    _touch(tmp_path / "b" / "s1.ndpi")
    _touch(tmp_path / "b" / "notes.txt")
    _touch(tmp_path / "c" / "x.ome.tiff")
    _touch(tmp_path / "d" / "level0.dcm")
    _touch(tmp_path / "d" / "level1.dcm")  # same DICOM series: one slide
    specs = discover_slides([tmp_path])
    assert [s.slide_id for s in specs] == ["a-s1", "b-s1", "x", "level0"]  # colliding stems: by relative path
    assert discover_slides([tmp_path]) == specs


def test_manifest_with_ids_and_mpp(tmp_path):
    a = _touch(tmp_path / "slides" / "a.svs")
    _touch(tmp_path / "slides" / "b.tif")
    (tmp_path / "m.csv").write_text("path,slide_id,slide_mpp\nslides/a.svs,case-A,0.25\nslides/b.tif,,\n")
    specs = discover_slides([tmp_path / "m.csv"], slide_mpp=0.5)
    assert specs[0].path == a and specs[0].slide_id == "case-A" and specs[0].slide_mpp == 0.25
    assert specs[1].slide_id == "b" and specs[1].slide_mpp == 0.5  # --slide-mpp fills the gap


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("file,mpp\na.svs,1\n", "needs a 'path' column"),
        ("path,mpp\na.svs,abc\n", "not a number"),
        ("path,slide_id\na.svs,x\nb.svs,x\n", "duplicate slide_id"),
    ],
)
def test_bad_manifests(tmp_path, content, match):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ConfigError, match=match):
        discover_slides([tmp_path / "m.csv"])


def test_missing_and_empty(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        discover_slides([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no slides found"):
        discover_slides([tmp_path / "empty"])


def test_slide_stem():
    from pathlib import Path

    assert slide_stem(Path("/x/TCGA-01 A.svs")) == "TCGA-01_A"
    assert slide_stem(Path("a.ome.tiff")) == "a"


def test_legacy_mpp_column_is_read_as_slide_mpp(tmp_path):
    """Manifests written before the rename (column ``mpp``) keep working."""
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "m.csv").write_text("path,mpp\na.svs,0.25\n")
    (spec,) = discover_slides([tmp_path / "m.csv"])
    assert spec.slide_mpp == 0.25
