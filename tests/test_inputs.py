"""Discovering slides from files, folders and CSV manifests."""

from __future__ import annotations

import pytest

from wsi_convnext.errors import ConfigError, InputNotFoundError
from wsi_convnext.inputs import discover_slides, slide_stem
from wsi_convnext.outputs.manifest import recorded_slide_ids


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


# --- ids never move (issue 20) ---------------------------------------------------------------


def _record(out, rows):
    """A run manifest in ``out`` recording ``slide_id -> path`` like a finished ``tile``."""
    from wsi_convnext.outputs.manifest import RunManifest

    with RunManifest(out / "manifest.csv") as m:
        for sid, path in rows.items():
            m.record({"slide_id": sid, "path": str(path), "stage": "tile", "status": "done"})


@pytest.mark.parametrize(
    ("first", "newcomer", "new_id"),
    [("a_b.svs", "a b.svs", r"a_b-[0-9a-f]{8}"), ("ü.svs", "é.svs", r"slide-[0-9a-f]{8}"), ("x/s.svs", "y/s.svs", "y-s")],
    ids=["cleaned-equal", "non-latin", "same-stem"],
)
def test_a_recorded_id_stays_with_its_file_when_a_colliding_newcomer_arrives(tmp_path, first, newcomer, new_id):
    import re

    out = tmp_path / "out"
    out.mkdir()
    old = _touch(tmp_path / "in" / first)
    (before,) = discover_slides([tmp_path / "in"], recorded=recorded_slide_ids(out))
    _record(out, {before.slide_id: old})
    new = _touch(tmp_path / "in" / newcomer)
    after = {s.path: s.slide_id for s in discover_slides([tmp_path / "in"], recorded=recorded_slide_ids(out))}
    assert after[old] == before.slide_id
    assert re.fullmatch(new_id, after[new]), after


def test_a_recorded_id_stays_taken_when_its_file_is_gone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _record(out, {"s": tmp_path / "elsewhere" / "s.svs"})
    new = _touch(tmp_path / "in" / "s.svs")
    (spec,) = discover_slides([tmp_path / "in"], recorded=recorded_slide_ids(out))
    assert spec.path == new and spec.slide_id.startswith("s-") and len(spec.slide_id) == 10


def test_a_file_listed_twice_under_two_ids_names_both_rows(tmp_path):
    _touch(tmp_path / "a.svs")
    (tmp_path / "m.csv").write_text("path,slide_id\na.svs,one\nb.svs,two\n./a.svs,three\n")
    _touch(tmp_path / "b.svs")
    with pytest.raises(ConfigError) as info:
        discover_slides([tmp_path / "m.csv"])
    msg = str(info.value)
    assert f"{tmp_path / 'm.csv'}:2" in msg and f"{tmp_path / 'm.csv'}:4" in msg and "'one'" in msg and "'three'" in msg
    # Listed twice under one id (or in a folder and a manifest), it is one slide, not an error.
    (tmp_path / "m.csv").write_text("path,slide_id\na.svs,one\na.svs,one\n")
    assert [s.slide_id for s in discover_slides([tmp_path / "m.csv"], slide_mpp=1.0)] == ["one"]


def test_relative_inputs_give_absolute_slide_paths(tmp_path, monkeypatch):
    """The run manifest then names each file whatever the working folder of a later run (ids never move)."""
    _touch(tmp_path / "in" / "a.svs")
    monkeypatch.chdir(tmp_path)
    (spec,) = discover_slides(["in"])
    assert spec.path == tmp_path / "in" / "a.svs" and spec.path.is_absolute()
