"""Tests for wsi_convnext.labels.table: labels CSV parsing, label/store matching and label errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from wsi_convnext.errors import InputNotFoundError, LabelsError, WsiConvnextError
from wsi_convnext.labels import match_labels, read_labels


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_read_labels_strings_patients_and_sorted_classes(tmp_path: Path) -> None:
    p = _csv(tmp_path, "\ufeffSlide_ID, Label ,patient_id\ns1,tumor,p1\ns2,normal,p1\ns3,tumor,p2\n# comment\n\ns4,normal,\n")
    t = read_labels(p)
    assert t.classes == ("normal", "tumor")
    assert t.slide_ids == ("s1", "s2", "s3", "s4")
    assert t.patient_ids == ("p1", "p1", "p2", "s4")  # empty patient -> the slide itself
    assert t.y.tolist() == [1, 0, 1, 0]
    assert t.split is None and t.fold is None


def test_integer_labels_sort_numerically_and_tab_separated(tmp_path: Path) -> None:
    p = _csv(tmp_path, "slide_id\tlabel\na\t10\nb\t2\nc\t2\nd\t10\ne\t1\n")
    t = read_labels(p)
    assert t.classes == ("1", "2", "10")


def test_split_and_fold_columns(tmp_path: Path) -> None:
    rows = "".join(f"s{i},{'ab'[i % 2]},{['train', 'Validation', 'test'][i % 3]}\n" for i in range(12))
    t = read_labels(_csv(tmp_path, "slide_id,label,split\n" + rows))
    assert set(t.split) == {"train", "val", "test"}
    rows = "".join(f"s{i},{'ab'[i % 2]},{i % 3}\n" for i in range(12))
    t = read_labels(_csv(tmp_path, "slide_id,label,fold\n" + rows, "f.csv"))
    assert t.fold == tuple(i % 3 for i in range(12))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("slide,label\na,x\nb,y\n", "missing column"),
        ("slide_id,diagnosis\na,x\n", "missing column.*label"),
        ("slide_id,label\na,x\nb,y\na,y\n", "duplicate slide_id"),
        ("slide_id,label\na,x\nb,x\nc,x\n", "only 1 class"),
        ("slide_id,label\na,x\nb,\n", "row 3 has an empty label"),
        ("slide_id,label\na,x\nb,y\nc,NaN\n", "row 4 has label 'NaN', which marks a missing value"),
        ("slide_id,label\na,x\nb,nan\nc,y\n", "row 3 has label 'nan', which marks a missing value"),
        ("slide_id,label\na,x\nb,  \nc,y\n", "row 3 has an empty label"),
        ("slide_id,label,split\na,x,train\nb,y,tst\n", "split 'tst'"),
        ("slide_id,label,fold\na,x,one\nb,y,2\n", "fold 'one'"),
        ("slide_id,label,split,fold\na,x,train,1\n", "both 'split' and 'fold'"),
        # A fold without positives cannot be evaluated.
        ("slide_id,label,fold\na,neg,0\nb,pos,0\nc,neg,1\nd,neg,1\n", "fold 1 has no slide of class.*pos"),
        ("slide_id,label,split\na,neg,train\nb,pos,train\nc,neg,test\n", "test split has no slide of class.*pos"),
        ("slide_id,label,patient_id,fold\na,neg,p1,0\nb,pos,p1,1\nc,neg,p2,1\nd,pos,p3,0\n", "patient.*p1.*several folds"),
        ("", "empty file"),
        ("slide_id,label\n", "no data rows"),
    ],
)
def test_label_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(LabelsError, match=match) as exc:
        read_labels(_csv(tmp_path, text))
    msg = str(exc.value)
    assert "\n" not in msg and "labels.csv" in msg
    assert isinstance(exc.value, (WsiConvnextError, ValueError))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="not found"):
        read_labels(tmp_path / "nope.csv")


def test_match_labels_unknown_and_unlabeled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = read_labels(_csv(tmp_path, "slide_id,label\na,x\nb,y\nc,x\n"))
    # A labelled slide without a store is an error when training...
    with pytest.raises(LabelsError, match="labelled slide.*have no store: c"):
        match_labels(["a", "b", "z"], t)
    # ...and a store without a label is ignored with a warning and listed.
    with caplog.at_level(logging.WARNING, logger="wsi_convnext.labels.table"):
        idx, unlabeled = match_labels(["z", "b", "a", "c", "w"], t)
    assert [["z", "b", "a", "c", "w"][i] for i in idx] == ["a", "b", "c"]
    assert unlabeled == ["z", "w"]
    assert "no label" in caplog.text and "z" in caplog.text
    # Evaluation of a subset may skip missing stores.
    idx, _ = match_labels(["a", "b"], t, require_all=False)
    assert len(idx) == 2
    with pytest.raises(LabelsError, match="no slide id matches"):
        match_labels(["q"], t, require_all=False)
