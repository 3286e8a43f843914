"""Tests for wsi_convnext.mil.data: bags of tile embeddings and their labels."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_convnext.errors import LabelsError
from wsi_convnext.labels import LabelTable
from wsi_convnext.mil.data import Bag, labels_for_bags


def test_labels_for_bags_forms_and_errors() -> None:
    bags = [Bag(f"s{i}", np.zeros((3, 2), np.float16)) for i in range(4)]
    t = labels_for_bags(bags, ["a", "b", "a", "b"])
    assert t.classes == ("a", "b") and t.slide_ids == ("s0", "s1", "s2", "s3")
    t = labels_for_bags(bags, {"s3": 1, "s2": 0, "s1": 1, "s0": 0, "extra": 1})
    assert t.labels == ("0", "1", "0", "1")
    with pytest.raises(LabelsError, match="no label for slide.*s3"):
        labels_for_bags(bags, {"s0": "a", "s1": "b", "s2": "a"})
    with pytest.raises(LabelsError, match="only 1 class"):
        labels_for_bags(bags, ["a"] * 4)
    with pytest.raises(LabelsError, match="duplicate bag"):
        labels_for_bags(bags + [Bag("s0", np.zeros((3, 2), np.float16))], ["a", "b"] * 2 + ["a"])
    table = LabelTable.from_mapping({"s0": "a", "s1": "b", "s2": "a", "s3": "b"}, {"s0": "p", "s1": "p"})
    assert labels_for_bags(bags, table).patient_ids == ("p", "p", "s2", "s3")


def test_bag_validation() -> None:
    from wsi_convnext.errors import StoreError

    with pytest.raises(StoreError, match="NaN"):
        Bag("x", np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(StoreError, match="shape"):
        Bag("x", np.zeros((0, 4), np.float16))
    with pytest.raises(StoreError, match="coords"):
        Bag("x", np.zeros((3, 4), np.float16), np.zeros((2, 2)))
    b = Bag("x", np.zeros((3, 4), np.float64))
    assert b.features.dtype == np.float32 and len(b) == 3
    lazy = Bag("y", loader=lambda: np.ones((5, 4), np.float16), coords=np.zeros((5, 2)))
    assert not lazy.in_memory and lazy.features.shape == (5, 4) and len(lazy) == 5
