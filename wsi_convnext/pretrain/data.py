"""Unlabelled tiles for pretraining: the shared tile datasets, multi-crop views, per-rank shards.

- :func:`load_unlabelled_tiles`: stores / folders of stores, an image folder or a CSV through
  :mod:`wsi_convnext.data.labelled`; labels are ignored (every tile is class 0), groups (slides,
  the CSV's ``group``, else the file) are kept for balancing.
- :class:`MultiCropDataset`: per tile, ``2`` global and ``n_local`` local crops cut at the
  tile's µm/px (never rescaled), each flipped / rotated by 90°, HED- and brightness/contrast-
  jittered and blurred with a probability. All randomness of an item comes from its own seed
  (:class:`~wsi_convnext.data.labelled.EpochSampler`), so a view never depends on the batch,
  the rank or the number of DataLoader workers.
- :class:`ShardSampler`: each rank's disjoint slice of every global batch.

Tiles are read one at a time from their stores or files (memory does not grow with the data,
beyond one row of bookkeeping per tile).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.labelled import (
    EpochSampler,
    LabelledTileDataset,
    LabelledTiles,
    csv_tiles,
    image_folder_tiles,
    is_store_input,
    store_tiles,
)
from ..errors import ConfigError, InputNotFoundError, listing

__all__ = ["MultiCropDataset", "PretrainBatch", "ShardSampler", "collate_views", "load_unlabelled_tiles", "tile_keys"]

_UNLABELLED = ("unlabelled",)


def load_unlabelled_tiles(data: Sequence[str | os.PathLike[str]], *, strict: bool = False) -> LabelledTiles:
    """The tiles of ``data`` with labels ignored (class 0 for all).

    Raises:
        InputNotFoundError: Missing inputs, no tiles.
        ConfigError: Several CSVs / image folders.
        CorruptTileError: ``strict`` and an unreadable file.
    """
    items = [Path(d) for d in data]
    for it in items:
        if not it.exists():
            raise InputNotFoundError(f"{it}: does not exist; pass tile stores, an image folder or a CSV")
    if items and all(is_store_input(it) for it in items):
        tiles = store_tiles(items, None, classes=_UNLABELLED)
    elif len(items) != 1:
        raise ConfigError(f"pass tile stores, or one image folder or CSV, not {len(items)} inputs ({listing([str(i) for i in items])})")
    elif items[0].is_file():
        with open(items[0], newline="", encoding="utf-8-sig") as fh:
            header = [h.strip().lower() for h in next(csv.reader(fh), [])]
        tiles = csv_tiles(items[0], strict=strict, require_label=False, classes=None if "label" in header else _UNLABELLED)
    else:
        tiles = image_folder_tiles(items[0], strict=strict, loose_label=_UNLABELLED[0])
    return replace(tiles, classes=_UNLABELLED, y=np.zeros(len(tiles), dtype=np.int64))


def tile_keys(tiles: LabelledTiles) -> set[str]:
    """What identifies a tile's source across datasets: the resolved file, or ``slide:<slide id>``."""
    if tiles.kind == "stores":
        return {f"slide:{s}" for s in np.unique(tiles.slide_ids.astype(str))}
    return {str(Path(p).resolve()) for p in tiles.paths.tolist()}


@dataclass
class PretrainBatch:
    """Collated views: ``global_views`` (G, B, S, S, 3) and ``local_views`` (L, B, s, s, 3) uint8
    (L may be 0), ``index`` (B,) tile indices, ``bad`` ``(index, reason)`` of dropped tiles."""

    global_views: Any
    local_views: Any
    index: Any
    bad: list[tuple[int, str]]


def collate_views(items: list[tuple[np.ndarray | None, np.ndarray | None, int, str]]) -> PretrainBatch:
    """Stack the views of the tiles that decoded; list the others in ``bad``."""
    import torch

    good = [it for it in items if it[0] is not None]
    bad = [(int(it[2]), it[3]) for it in items if it[0] is None]

    def stack(k: int) -> Any:
        if not good:
            return torch.empty((0, 0, 0, 0, 3), dtype=torch.uint8)
        return torch.from_numpy(np.stack([it[k] for it in good], axis=1))

    return PretrainBatch(stack(0), stack(1), torch.tensor([it[2] for it in good], dtype=torch.int64), bad)


class MultiCropDataset:
    """Map-style dataset: key ``(tile index, item seed)`` → ``(global (G, S, S, 3), local (L, s, s, 3),
    index, error)`` uint8 views (``None`` views and a reason for a tile that did not decode).

    Args:
        tiles: The tiles (every side must be at least ``global_size``).
        global_size, local_size: Crop sides in px.
        n_global, n_local: Crops per tile.
        hed_sigma: HED jitter strength (0 = off); brightness_contrast: its half-width; blur: probability.

    Raises:
        ConfigError: A tile smaller than the global crop (named).
    """

    def __init__(
        self, tiles: LabelledTiles, *, global_size: int, local_size: int, n_global: int = 2, n_local: int = 0,
        hed_sigma: float = 0.05, brightness_contrast: float = 0.1, blur: float = 0.2,
    ) -> None:  # fmt: skip
        small = np.flatnonzero(tiles.sizes.min(axis=1) < global_size)
        if len(small):
            names = [f"{tiles.refs[i]} ({tiles.sizes[i][0]}x{tiles.sizes[i][1]})" for i in small]
            raise ConfigError(
                f"{tiles.source}: {len(small)} tile(s) are smaller than the {global_size}-px global crop: {listing(names)}; "
                "crops are never upscaled (it would change µm/px): lower --global-size or remove them"
            )
        self.base = LabelledTileDataset(tiles, size=int(tiles.sizes.min()), train=False)
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.hed_sigma, self.bcs, self.blur = float(hed_sigma), float(brightness_contrast), float(blur)

    def __len__(self) -> int:
        return len(self.base)

    def _views(self, img: np.ndarray, n: int, size: int, rng: np.random.Generator, gen: Any) -> np.ndarray:
        import torch

        from ..transforms.augment import BrightnessContrast, HedJitter

        h, w = img.shape[:2]
        crops = []
        for _ in range(n):
            y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            c = img[y0 : y0 + size, x0 : x0 + size]
            if rng.random() < 0.5:
                c = c[:, ::-1]
            crops.append(np.rot90(c, int(rng.integers(0, 4))))
        x = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2).float().div_(255.0)
        if self.hed_sigma > 0:
            x = HedJitter(sigma=self.hed_sigma, bias=self.hed_sigma).apply(x, gen)
        if self.bcs > 0:
            x = BrightnessContrast(self.bcs, self.bcs).apply(x, gen)
        for i in range(n):
            if rng.random() < self.blur:
                x[i : i + 1] = _gaussian_blur(x[i : i + 1], float(rng.uniform(0.1, 1.5)))
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray | None, np.ndarray | None, int, str]:
        import torch

        i, seed = int(key[0]), int(key[1])
        img, _, _, err = self.base[i]
        if img is None:
            return None, None, i, err
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        g = self._views(img, self.n_global, self.global_size, rng, gen)
        if self.n_local:
            loc = self._views(img, self.n_local, self.local_size, rng, gen)
        else:
            loc = np.zeros((0, self.local_size, self.local_size, 3), dtype=np.uint8)
        return g, loc, i, ""


def _gaussian_blur(x: Any, sigma: float) -> Any:
    import torch

    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class ShardSampler(EpochSampler):
    """An :class:`EpochSampler` whose epoch is cut into global batches of ``batch`` draws, of which
    rank ``rank`` of ``world`` takes the contiguous slice ``[rank·b, (rank+1)·b)``, ``b = batch / world``.

    The item seeds are those of the global position, so the union of the ranks' views equals
    the single-process batch.
    """

    def __init__(self, y: np.ndarray, groups: np.ndarray, *, batch: int, rank: int = 0, world: int = 1, **kw: Any) -> None:
        super().__init__(y, groups, **kw)
        self.batch, self.rank, self.world = int(batch), int(rank), int(world)
        self.per_rank = self.batch // self.world

    def __len__(self) -> int:
        return super().__len__() // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, item in enumerate(super().__iter__()):
            if (self.start + k) % self.batch // self.per_rank == self.rank:
                yield item
