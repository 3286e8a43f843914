"""Tests for wsi_convnext.slide.fingerprint: the content hash a store records of its slide file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsi_convnext.errors import ConfigError, InputNotFoundError
from wsi_convnext.slide import FINGERPRINT_MODES, slide_fingerprint


def test_quick_fingerprint(tmp_path: Path, slides_dir: Path) -> None:
    f = tmp_path / "a.svs"
    data = bytes(range(256)) * 4
    f.write_bytes(data)
    fp = slide_fingerprint(f, chunk_bytes=64)
    assert len(fp) == 64 and fp == slide_fingerprint(f, chunk_bytes=64)
    middle = bytearray(data)
    middle[500] ^= 1
    f.write_bytes(middle)
    assert slide_fingerprint(f, chunk_bytes=64) == fp  # documented: the middle is not hashed
    tail = bytearray(data)
    tail[-1] ^= 1
    f.write_bytes(tail)
    assert slide_fingerprint(f, chunk_bytes=64) != fp
    f.write_bytes(data + b"\0")
    assert slide_fingerprint(f, chunk_bytes=64) != fp
    with pytest.raises(InputNotFoundError):
        slide_fingerprint(tmp_path / "missing.svs")
    # DICOM series: a change in a sibling file changes the fingerprint of the opened file.
    for name in ("openslide-boxes_0.dcm", "openslide-boxes_1.dcm"):
        shutil.copy(slides_dir / name, tmp_path / name)
    fp0 = slide_fingerprint(tmp_path / "openslide-boxes_0.dcm")
    with (tmp_path / "openslide-boxes_1.dcm").open("ab") as fh:
        fh.write(b"\0")
    assert slide_fingerprint(tmp_path / "openslide-boxes_0.dcm") != fp0
    # MIRAX: the data folder's files count.
    mrxs = tmp_path / "s.mrxs"
    mrxs.write_bytes(b"[GENERAL]\n")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "Data0000.dat").write_bytes(b"x")
    fp_m = slide_fingerprint(mrxs)
    (tmp_path / "s" / "Data0000.dat").write_bytes(b"xy")
    assert slide_fingerprint(mrxs) != fp_m


def test_full_fingerprint_notices_a_same_size_edit_in_the_middle(tmp_path: Path) -> None:
    f = tmp_path / "a.svs"
    data = bytes(range(256)) * 4
    f.write_bytes(data)
    full = slide_fingerprint(f, "full", chunk_bytes=64)
    assert FINGERPRINT_MODES == ("quick", "full")
    assert full != slide_fingerprint(f, chunk_bytes=64) and len(full) == 64
    middle = bytearray(data)
    middle[500] ^= 1
    f.write_bytes(middle)
    assert slide_fingerprint(f, "full", chunk_bytes=64) != full
    with pytest.raises(ConfigError, match="unknown fingerprint mode 'fast'; choose one of quick, full"):
        slide_fingerprint(f, "fast")
