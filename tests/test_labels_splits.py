"""Patient-grouped stratified splits: no leakage (property test), stratification, fixed splits."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_convnext.errors import ConfigError, LabelsError
from wsi_convnext.labels import LabelTable
from wsi_convnext.labels.splits import assert_no_leak, inner_validation_split, make_folds


def _random_cohort(seed: int) -> LabelTable:
    """Random patients with 1–4 slides each; labels per slide, 2–3 classes, some imbalance."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 4))
    n_patients = int(rng.integers(25, 60))
    ids, labs, pats = [], [], []
    for p in range(n_patients):
        patient_class = int(rng.choice(n_classes, p=np.linspace(1.5, 0.5, n_classes) / np.linspace(1.5, 0.5, n_classes).sum()))
        for s in range(int(rng.integers(1, 5))):
            ids.append(f"p{p}_s{s}")
            # Mostly the patient's class, sometimes another one (mixed-label patients exist).
            labs.append(f"c{patient_class if rng.random() < 0.85 else int(rng.integers(n_classes))}")
            pats.append(f"p{p}")
    return LabelTable._validated(ids, labs, pats, None, None, None)


@pytest.mark.parametrize("seed", range(25))
def test_grouped_folds_never_leak_patients(seed: int) -> None:
    table = _random_cohort(seed)
    groups = np.asarray(table.patient_ids, dtype=object)
    try:
        folds = make_folds(table, folds=4, seed=seed)
    except LabelsError as e:  # a rare class with < 4 patients is reported, never silently split
        assert "fewer patients than folds" in str(e) or "without class" in str(e)
        return
    assert_no_leak(folds, groups)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests.tolist()) == list(range(len(table)))  # test folds partition the cohort
    y = table.y
    for f in folds:
        assert set(y[f.test].tolist()) == set(range(len(table.classes)))  # every class in every test fold
        sides = [set(groups[f.train]), set(groups[f.val]), set(groups[f.test])]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert len(f.train) + len(f.val) + len(f.test) == len(table)
        assert len(f.val) > 0


def test_stratification_with_single_slide_patients() -> None:
    ids = [f"s{i}" for i in range(100)]
    labs = ["pos" if i < 30 else "neg" for i in range(100)]
    table = LabelTable._validated(ids, labs, ids, None, None, None)
    folds = make_folds(table, folds=5, seed=0)
    y = table.y
    for f in folds:
        assert len(f.test) == 20
        assert abs(int((y[f.test] == 1).sum()) - 6) <= 1  # 30 positives / 5 folds
        # Inner validation part is stratified too.
        assert (y[f.val] == 1).sum() >= 1 and (y[f.val] == 0).sum() >= 1


def test_folds_depend_on_seed_only() -> None:
    table = _random_cohort(3)
    a = make_folds(table, folds=3, seed=1)
    b = make_folds(table, folds=3, seed=1)
    c = make_folds(table, folds=3, seed=2)
    assert all(np.array_equal(x.test, z.test) and np.array_equal(x.val, z.val) for x, z in zip(a, b))
    assert any(not np.array_equal(x.test, z.test) for x, z in zip(a, c))


def test_too_few_patients_per_class() -> None:
    ids = [f"s{i}" for i in range(12)]
    labs = ["pos"] * 3 + ["neg"] * 9
    table = LabelTable._validated(ids, labs, ids, None, None, None)
    with pytest.raises(LabelsError, match="fewer patients than folds=5.*'pos': 3"):
        make_folds(table, folds=5)
    assert len(make_folds(table, folds=3)) == 3
    with pytest.raises(ConfigError, match="folds must be >= 2"):
        make_folds(table, folds=1)


def test_fixed_split_column() -> None:
    ids = [f"s{i}" for i in range(12)]
    labs = ["a", "b"] * 6
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    table = LabelTable._validated(ids, labs, ids, split, None, None)
    (fold,) = make_folds(table)
    assert fold.train.tolist() == list(range(6)) and fold.val.tolist() == [6, 7]
    assert fold.test.tolist() == [8, 9, 10, 11]
    # Without a val split, one is carved out of train (grouped, stratified).
    split = ["train"] * 8 + ["test"] * 4
    (fold,) = make_folds(LabelTable._validated(ids, labs, ids, split, None, None))
    assert len(fold.val) > 0 and set(fold.val) | set(fold.train) == set(range(8))


def test_fixed_fold_column() -> None:
    ids = [f"s{i}" for i in range(15)]
    labs = ["a" if i < 8 else "b" for i in range(15)]
    fold = [i % 3 for i in range(15)]
    table = LabelTable._validated(ids, labs, ids, None, fold, None)
    folds = make_folds(table, folds=99)  # the column wins over the fold count
    assert len(folds) == 3
    for k, f in enumerate(folds):
        assert f.test.tolist() == [i for i in range(15) if i % 3 == k]


def test_inner_split_without_enough_patients_is_empty() -> None:
    y = np.array([0, 0, 0, 0, 1])
    groups = np.array(["a", "b", "c", "d", "e"], dtype=object)
    fit, val = inner_validation_split(y, groups, np.arange(5))
    assert len(val) == 0 and fit.tolist() == [0, 1, 2, 3, 4]
