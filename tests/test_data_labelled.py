"""Labelled tile datasets: image folders, CSVs, weak labels over real stores, splits, sampling."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wsi_convnext.data import (  # noqa: E402
    CorruptTileError,
    EpochSampler,
    LabelledTileDataset,
    collate_tiles,
    csv_tiles,
    grouped_split,
    image_folder_tiles,
    load_labelled_tiles,
    store_tiles,
)
from wsi_convnext.errors import ConfigError, InputNotFoundError, LabelsError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def lc25000_dir() -> Path:
    base = Path(os.environ.get("WSI_TEST_TILES", str(REPO.parent / "shared" / "tiles"))) / "lc25000-lung"
    if not (base / "labels.csv").is_file():
        pytest.skip(f"lc25000-lung tiles not found at {base} (set WSI_TEST_TILES)")
    return base


def lc25000_sample(out: Path, groups_per_class: int, *, offset: int = 0, split: dict[str, str] | None = None) -> Path:
    """A CSV of the tiles of the first ``groups_per_class`` groups (after ``offset``) of each class."""
    base = lc25000_dir()
    with open(base / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_class: dict[str, list[str]] = {}
    for r in rows:
        gs = by_class.setdefault(r["label"], [])
        if r["group"] not in gs:
            gs.append(r["group"])
    keep = {g for gs in by_class.values() for g in sorted(gs)[offset : offset + groups_per_class]}
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"] + (["split"] if split else []))
        for r in rows:
            if r["group"] in keep:
                w.writerow([str(base / r["path"]), r["label"], r["group"]] + ([split[r["group"]]] if split else []))
    return out


def colour_folder(root: Path, n: int = 12, size: int = 64, classes: tuple[str, ...] = ("blue", "red")) -> Path:
    """An image folder with one sub-folder per class: noisy red-ish vs blue-ish PNG tiles."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            img[..., 0 if k else 2] += 120
            Image.fromarray(img).save(root / c / f"{c}{i:02d}.png")
    return root


# ------------------------------------------------------------------------------------ sources


def test_image_folder_lists_classes_sizes_and_refs(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "tiles", n=3)
    (root / "red" / "notes.txt").write_text("not an image, ignored by suffix")
    t = image_folder_tiles(root)
    assert t.classes == ("blue", "red")
    assert t.counts() == {"blue": 3, "red": 3}
    assert t.refs[0] == "blue/blue00.png"
    assert t.sizes.tolist() == [[64, 64]] * 6
    assert len(set(t.groups.tolist())) == 6  # each file is its own group


def test_csv_paths_relative_to_csv_groups_and_split(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "tiles", n=2)
    csv_path = tmp_path / "tiles" / "list.csv"
    csv_path.write_text(
        "path,label,group,split\nblue/blue00.png,blue,g1,train\nblue/blue01.png,blue,g1,train\n"
        "red/red00.png,red,g2,val\nred/red01.png,red,g3,train\n"
    )
    t = load_labelled_tiles(csv_path)
    assert t.kind == "csv" and t.refs.tolist()[0] == "blue/blue00.png"
    assert Path(t.paths[0]) == root / "blue" / "blue00.png"
    tr, va, te = grouped_split(t)
    assert t.groups[va].tolist() == ["g2"] and len(tr) == 3 and len(te) == 0


def test_empty_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputNotFoundError, match="no image files") as e:
        load_labelled_tiles(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value) and "\n" not in str(e.value)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "tiles", n=2, classes=("only",))
    t = image_folder_tiles(root)
    with pytest.raises(LabelsError, match="only 1 class"):
        t.require_classes(2)


def test_unknown_label_names_file_and_row(tmp_path: Path) -> None:
    colour_folder(tmp_path / "tiles", n=1)
    p = tmp_path / "tiles" / "l.csv"
    p.write_text("path,label\nblue/blue00.png,blue\nred/red00.png,purple\n")
    with pytest.raises(LabelsError, match=r"unknown label.*'purple' \(row 3\)") as e:
        csv_tiles(p, classes=["blue", "red"])
    assert str(p) in str(e.value)
    with pytest.raises(LabelsError, match="unknown label"):
        image_folder_tiles(tmp_path / "tiles", classes=["blue"])


@pytest.mark.parametrize(("label", "match"), [("NaN", "label 'NaN', which marks a missing value"), ("nan", "'nan'"), ("", "empty label")])
def test_nan_or_empty_tile_label_is_refused_in_one_line(tmp_path: Path, label: str, match: str) -> None:
    colour_folder(tmp_path / "tiles", n=1)
    p = tmp_path / "tiles" / "l.csv"
    p.write_text(f"path,label\nblue/blue00.png,blue\nred/red00.png,{label}\n")
    with pytest.raises(LabelsError, match=match) as e:
        csv_tiles(p)
    assert f"{p}: row 3" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_corrupt_files_are_skipped_and_listed_or_fail_under_strict(tmp_path: Path, kind: str) -> None:
    root = colour_folder(tmp_path / "tiles", n=3)
    bad = root / "red" / "broken.png"
    if kind == "text":
        bad.write_text("this is not a PNG")
    else:
        data = (root / "red" / "red00.png").read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    t = image_folder_tiles(root)
    if kind == "text":  # caught from the header when listing
        assert [r for r, _ in t.skipped] == ["red/broken.png"] and len(t) == 6
        with pytest.raises(CorruptTileError, match="broken.png"):
            image_folder_tiles(root, strict=True)
    else:  # the header is fine; decoding fails in the worker and the tile leaves its batch
        if t.skipped:
            assert [r for r, _ in t.skipped] == ["red/broken.png"]
        else:
            ds = LabelledTileDataset(t, size=64)
            batch = collate_tiles([ds[i] for i in range(len(t))])
            assert [str(t.refs[i]) for i, _ in batch.bad] == ["red/broken.png"]
            assert len(batch.y) == 6


def test_mixed_sizes_crop_or_refuse(tmp_path: Path) -> None:
    from PIL import Image

    root = colour_folder(tmp_path / "tiles", n=2, size=64)
    Image.fromarray(np.zeros((80, 96, 3), np.uint8)).save(root / "red" / "big.png")
    t = image_folder_tiles(root)
    ds = LabelledTileDataset(t, size=None, train=True)  # default: the smallest side
    img, *_ = ds[(int(np.flatnonzero(t.refs == "red/big.png")[0]), 123)]
    assert img.shape == (64, 64, 3)
    with pytest.raises(ConfigError, match="different sizes"):
        LabelledTileDataset(t, on_size="refuse")
    with pytest.raises(ConfigError, match="smaller than the 72-px") as e:
        LabelledTileDataset(t, size=72)
    assert "never upscaled" in str(e.value)


# ------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_never_leaks_and_is_stratified(seed: int) -> None:
    t = csv_tiles(lc25000_dir() / "labels.csv")
    tr, va, te = grouped_split(t, val_frac=0.2, seed=seed)
    assert len(te) == 0 and len(tr) + len(va) == len(t)
    assert not set(t.groups[tr].tolist()) & set(t.groups[va].tolist())
    frac = {c: np.isin(t.groups[va], t.groups[t.y == i]).sum() / (t.y == i).sum() for i, c in enumerate(t.classes)}
    assert all(0.1 < f < 0.3 for f in frac.values()), frac


def test_split_column_with_a_group_on_both_sides_is_an_error(tmp_path: Path) -> None:
    colour_folder(tmp_path / "tiles", n=2)
    p = tmp_path / "tiles" / "l.csv"
    p.write_text("path,label,group,split\nblue/blue00.png,blue,g,train\nblue/blue01.png,blue,g,val\nred/red00.png,red,h,train\n")
    with pytest.raises(LabelsError, match="several splits"):
        grouped_split(csv_tiles(p))


def test_class_only_in_validation_is_an_error(tmp_path: Path) -> None:
    colour_folder(tmp_path / "tiles", n=2)
    p = tmp_path / "tiles" / "l.csv"
    p.write_text("path,label,group,split\nblue/blue00.png,blue,a,train\nred/red00.png,red,b,val\n")
    with pytest.raises(LabelsError, match="no training tiles"):
        grouped_split(csv_tiles(p))


# -------------------------------------------------------------------------- weak labels, sampling


def _lc25000_stores(tmp_path: Path, groups_per_class: int = 2, tiles_per_store: int | None = None) -> tuple[list[Path], Path]:
    """Real H&E tiles written into real stores, one store per lc25000 group (= slide)."""
    from PIL import Image

    from wsi_convnext.store import TileStoreWriter, encode_tile

    def write_store(path: Path, tiles: np.ndarray, coords: np.ndarray) -> Path:
        w = TileStoreWriter(path, len(tiles), 224, "jpeg")
        w.write_tiles([encode_tile(x, "jpeg", quality=95) for x in tiles])
        extent = 224 * len(tiles)
        return w.commit(
            coords=coords, tissue_fraction=np.ones(len(tiles)), thumbnail=np.full((8, 8 * len(tiles), 3), 230, np.uint8),
            tissue_mask=np.ones((8, 8 * len(tiles)), bool),
            attrs={"slide_id": path.name.removesuffix(".zarr"), "slide_mpp": 0.5, "target_mpp": 0.5, "extent0": 224.0,
                   "overlap": 0, "thumbnail_downsample": extent / (8 * len(tiles)), "mask_downsample": extent / (8 * len(tiles))},
        )  # fmt: skip

    sample = csv_tiles(lc25000_sample(tmp_path / "s.csv", groups_per_class))
    stores, rows = [], []
    for g in sorted(set(sample.groups.tolist())):
        idx = np.flatnonzero(sample.groups == g)[:tiles_per_store]
        tiles = np.stack([np.asarray(Image.open(sample.paths[i]).convert("RGB")) for i in idx])
        coords = np.stack([np.arange(len(idx)) * 224, np.zeros(len(idx))], 1).astype(np.int64)
        stores.append(write_store(tmp_path / "stores" / f"{g}.zarr", tiles, coords))
        rows.append(f"{g},{sample.classes[sample.y[idx[0]]]},patient-{g}")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\nno-such-slide,lung_n,p\n")
    return stores, labels


def test_weak_labels_every_tile_takes_its_slides_label(tmp_path: Path) -> None:
    stores, labels = _lc25000_stores(tmp_path, groups_per_class=1, tiles_per_store=5)
    t = load_labelled_tiles([tmp_path / "stores"], labels=labels)
    assert t.kind == "stores" and len(t) == 15 and t.classes == ("lung_aca", "lung_n", "lung_scc")
    for sid, y in zip(t.slide_ids.tolist(), t.y.tolist()):
        assert sid.startswith(t.classes[y])
    assert t.groups[0] == f"patient-{t.slide_ids[0]}"
    img, label, i, err = LabelledTileDataset(t, size=224)[3]
    assert img.shape == (224, 224, 3) and err == "" and label == t.y[3]
    with pytest.raises(LabelsError, match="need --labels"):
        load_labelled_tiles(stores)
    with pytest.raises(LabelsError, match="unknown label"):
        store_tiles(stores, labels, classes=["lung_aca", "lung_n"])


def test_sampler_balances_slides_and_classes_and_replays_from_a_position() -> None:
    # one big slide (100 tiles) and two small ones (5 each) in class 0; one slide of 10 in class 1
    y = np.array([0] * 100 + [0] * 10 + [1] * 10)
    groups = np.array(["big"] * 100 + ["a"] * 5 + ["b"] * 5 + ["c"] * 10)
    s = EpochSampler(y, groups, balance="class_group", seed=3, num_samples=6000)
    s.set_epoch(1)
    draws = [i for i, _ in s]
    share = {g: np.isin(draws, np.flatnonzero(groups == g)).mean() for g in ("big", "a", "b", "c")}
    assert abs(share["c"] - 0.5) < 0.03  # classes equal
    assert all(abs(share[g] - 1 / 6) < 0.03 for g in ("big", "a", "b"))  # slides equal within a class
    again = EpochSampler(y, groups, balance="class_group", seed=3, num_samples=6000)
    again.set_epoch(1, start=100)
    assert list(again) == list(s)[100:]  # resuming at a position replays the same (index, seed) pairs
    s.set_epoch(2)
    assert [i for i, _ in s] != draws
    with pytest.raises(ConfigError, match="unknown balance"):
        EpochSampler(y, groups, balance="nope")
