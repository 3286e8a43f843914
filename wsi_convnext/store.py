"""The on-disk tile store: one zarr v3 group per slide (a public contract, see docs/store.md).

This module is the one place where stores are created, opened and validated.

Layout of ``<slide_id>.zarr``::

    zarr.json            group; attrs hold the schema (see STORE_KIND, SCHEMA_VERSION)
    tiles/               (N,) variable-length bytes, one encoded image per tile, 256 tiles per chunk file
    coords/              (N, 2) int64, level-0 pixel (x, y) of each tile's top-left corner
    tissue_fraction/     (N,) float32, tissue fraction of each tile in [0, 1]
    thumbnail/           (h, w, 3) uint8 RGB overview
    tissue_mask/         (h', w') bool tissue mask
    features/<key>/      (N, D) float16|float32 tile embeddings of one encoder configuration
    scores/<name>/       (N,) or (N, C) float32 per-tile scores (e.g. MIL attention)

Writes are atomic: a store is built under a hidden ``.<slide_id>.zarr.partial-*`` name
and renamed when complete; feature and score arrays are built under a hidden name inside
their folder and renamed. A store or array without ``complete: true`` is never valid.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from ._io import TMP_MARK, replace_dir, temp_sibling
from .errors import InputNotFoundError, StoreError, StoreExistsError, one_line

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STORE_KIND = "wsi-convnext.tiles"
STORE_SUFFIX = ".zarr"
TILES_PER_CHUNK = 256
_PARTIAL = TMP_MARK


# --- tile image codecs ------------------------------------------------------------------


def _jpeg_encode(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg_encode(tile, level=quality, colorspace="rgb", outcolorspace="ycbcr"))


def _jpeg_decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    import imagecodecs

    # libjpeg-turbo (imagecodecs' jpeg8 codec), decoding straight into ``out`` when given.
    return imagecodecs.jpeg8_decode(data, out=out)


def _png_encode(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.png_encode(tile, level=6))


def _png_decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    import imagecodecs

    return imagecodecs.png_decode(data, out=out)


#: Tile encodings by name: (encode(tile, quality) -> bytes, decode(bytes, out=None) -> (T, T, 3) uint8);
#: ``decode`` writes into ``out`` (a C-contiguous (T, T, 3) uint8 array) when given and raises
#: on a shape mismatch.
TILE_CODECS: dict[str, tuple[Callable[[np.ndarray, int], bytes], Callable[..., np.ndarray]]] = {
    "jpeg": (_jpeg_encode, _jpeg_decode),
    "png": (_png_encode, _png_decode),
}


def encode_tile(tile: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> bytes:
    """Encode one (T, T, 3) uint8 RGB tile with a codec of :data:`TILE_CODECS`."""
    return TILE_CODECS[encoding][0](np.ascontiguousarray(tile), quality)


# --- zarr helpers -----------------------------------------------------------------------


def _zarr():
    import zarr

    # zarr-python flags variable-length bytes as lacking a finished v3 spec; our layout is
    # documented in docs/store.md and pinned by SCHEMA_VERSION, so the warning is noise.
    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
    return zarr


def _vlen_bytes_dtype():
    from zarr.core.dtype import VariableLengthBytes

    return VariableLengthBytes()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def remove_partials(final: Path) -> int:
    """Delete leftovers of killed writes of ``final`` (hidden ``.partial-*`` siblings). Returns how many."""
    parent = final.parent
    if not parent.is_dir():
        return 0
    prefix = f".{final.name}{_PARTIAL}"
    n = 0
    for entry in parent.iterdir():
        if entry.name.startswith(prefix):
            shutil.rmtree(entry, ignore_errors=True)
            n += 1
    return n


def commit_dir(partial: Path, final: Path, *, overwrite: bool) -> None:
    """Atomically move a finished ``partial`` directory to ``final`` (see :func:`._io.replace_dir`)."""
    try:
        replace_dir(partial, final, overwrite=overwrite)
    except FileExistsError as exc:
        raise StoreExistsError(str(exc)) from exc


# --- writing ----------------------------------------------------------------------------


class TileStoreWriter:
    """Builds one slide's store under a hidden partial name; :meth:`commit` publishes it.

    Tiles must be written in store order, in whole chunks (:data:`TILES_PER_CHUNK`) except
    for the last one, so every chunk file is written exactly once.

    Args:
        final_path: Where the finished store will live (``OUT/<slide_id>.zarr``).
        n_tiles: Number of tiles N.
        tile_size: Tile side T in pixels.
        encoding: A key of :data:`TILE_CODECS`.
    """

    def __init__(self, final_path: Path, n_tiles: int, tile_size: int, encoding: str = "jpeg") -> None:
        if encoding not in TILE_CODECS:
            raise StoreError(f"unknown tile encoding {encoding!r}; choose one of {sorted(TILE_CODECS)}")
        zarr = _zarr()
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = temp_sibling(self.final_path)
        self.n_tiles = int(n_tiles)
        self.tile_size = int(tile_size)
        self.encoding = encoding
        self._written = 0
        self._group = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        self._tiles = self._group.create_array(
            "tiles",
            shape=(self.n_tiles,),
            chunks=(TILES_PER_CHUNK,),
            dtype=_vlen_bytes_dtype(),
            compressors=None,  # JPEG/PNG bytes do not compress further
            attributes={"encoding": encoding, "tile_size": self.tile_size, "channels": 3},
        )
        self._group.create_group("features")
        self._group.create_group("scores")

    @property
    def written(self) -> int:
        """Number of tiles written so far."""
        return self._written

    def write_tiles(self, encoded: Sequence[bytes]) -> None:
        """Append encoded tiles at the current position (store order)."""
        if not encoded:
            return
        start, stop = self._written, self._written + len(encoded)
        if stop > self.n_tiles:
            raise StoreError(f"{self.final_path}: more tiles written than planned ({stop} > {self.n_tiles})")
        arr = np.empty(len(encoded), dtype=object)
        arr[:] = list(encoded)
        self._tiles[start:stop] = arr
        self._written = stop

    def commit(
        self,
        *,
        coords: np.ndarray,
        tissue_fraction: np.ndarray,
        thumbnail: np.ndarray,
        tissue_mask: np.ndarray,
        attrs: Mapping[str, Any],
        overwrite: bool = False,
    ) -> Path:
        """Write the remaining arrays and attrs, then atomically rename into place.

        Args:
            coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
            tissue_fraction: (N,) tissue fraction per tile.
            thumbnail: (h, w, 3) uint8 RGB overview; ``attrs`` should give ``thumbnail_downsample``.
            tissue_mask: (h', w') bool mask; ``attrs`` should give ``mask_downsample``.
            attrs: Slide and tiling metadata (see docs/store.md).
            overwrite: Replace an existing store at the final path.
        """
        if self._written != self.n_tiles:
            raise StoreError(f"{self.final_path}: only {self._written} of {self.n_tiles} tiles were written")
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if coords.shape[0] != self.n_tiles:
            raise StoreError(f"{self.final_path}: {coords.shape[0]} coords for {self.n_tiles} tiles")
        g = self._group
        chunk_rows = max(1, min(self.n_tiles, 65536))
        g.create_array("coords", data=coords, chunks=(chunk_rows, 2))
        g.create_array(
            "tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32).reshape(-1), chunks=(chunk_rows,)
        )
        g.create_array("thumbnail", data=np.ascontiguousarray(thumbnail, dtype=np.uint8))
        g.create_array("tissue_mask", data=np.ascontiguousarray(tissue_mask, dtype=bool))
        meta = dict(_jsonable(dict(attrs)))
        meta.update(
            kind=STORE_KIND,
            schema_version=SCHEMA_VERSION,
            n_tiles=self.n_tiles,
            tile_size=self.tile_size,
            tile_encoding=self.encoding,
            package_version=__version__,
            created=_now(),
        )
        meta["complete"] = True  # last: a store without it is never valid
        g.attrs.update(meta)
        commit_dir(self.path, self.final_path, overwrite=overwrite)
        return self.final_path

    def abort(self) -> None:
        """Delete the partial store."""
        shutil.rmtree(self.path, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------

_REQUIRED_ATTRS = ("schema_version", "n_tiles", "tile_size", "target_mpp", "slide_mpp", "tile_encoding")
_REQUIRED_ARRAYS = ("tiles", "coords", "tissue_fraction", "thumbnail", "tissue_mask")


class TileStore:
    """Read access to one slide's store. Create it with :func:`open_store`.

    Attributes:
        path: The store folder.
        attrs: The group attributes (see docs/store.md).
    """

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._coords: np.ndarray | None = None
        self._tiles = group["tiles"]
        self._decode = TILE_CODECS[self.attrs["tile_encoding"]][1]

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, n_tiles={len(self)}, mpp={self.mpp}, tile_size={self.tile_size})"

    def __len__(self) -> int:
        return int(self.attrs["n_tiles"])

    @property
    def slide_id(self) -> str:
        """Slide identifier (the store name without ``.zarr``)."""
        return str(self.attrs.get("slide_id") or self.path.name.removesuffix(STORE_SUFFIX))

    @property
    def mpp(self) -> float:
        """Resolution of the tiles, µm/px."""
        return float(self.attrs["target_mpp"])

    @property
    def slide_mpp(self) -> float:
        """Level-0 resolution of the source slide, µm/px."""
        return float(self.attrs["slide_mpp"])

    @property
    def tile_size(self) -> int:
        """Tile side in pixels."""
        return int(self.attrs["tile_size"])

    @property
    def extent0(self) -> float:
        """Tile side in level-0 pixels of the source slide."""
        return float(self.attrs["extent0"])

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 (x, y) of each tile's top-left corner."""
        if self._coords is None:
            self._coords = np.asarray(self._group["coords"][...], dtype=np.int64).reshape(-1, 2)
        return self._coords

    @property
    def tissue_fraction(self) -> np.ndarray:
        """(N,) float32 tissue fraction per tile."""
        return np.asarray(self._group["tissue_fraction"][...], dtype=np.float32)

    @property
    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 overview; ``attrs['thumbnail_downsample']`` level-0 px per pixel."""
        return np.asarray(self._group["thumbnail"][...])

    @property
    def tissue_mask(self) -> np.ndarray:
        """(h, w) bool tissue mask; ``attrs['mask_downsample']`` level-0 px per pixel."""
        return np.asarray(self._group["tissue_mask"][...], dtype=bool)

    def tile_bytes(self, index: slice | np.ndarray) -> np.ndarray:
        """Encoded tile bytes (1-D object array of ``bytes``) for a slice or an index array."""
        if isinstance(index, slice):
            return self._tiles[index]
        return self._tiles.get_orthogonal_selection(np.asarray(index, dtype=np.int64))

    def tile(self, i: int) -> np.ndarray:
        """Tile ``i`` as (T, T, 3) uint8 RGB."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"tile index {i} out of range for {n} tiles")
        i = int(i) % n
        return self._decode(bytes(self.tile_bytes(slice(i, i + 1))[0]))

    def decode_into(self, raw: Sequence[bytes], out: np.ndarray, *, first: int = 0) -> None:
        """Decode encoded tiles ``raw`` into ``out[: len(raw)]``, checking each one.

        Args:
            raw: Encoded tiles (from :meth:`tile_bytes`).
            out: C-contiguous (>= len(raw), T, T, 3) uint8 array (e.g. a pinned batch's numpy view).
            first: Store index of ``raw[0]``, for error messages (assumes consecutive tiles).

        Raises:
            StoreError: A tile cannot be decoded or does not decode to (T, T, 3).
        """
        decode = self._decode
        for i in range(len(raw)):
            data = bytes(raw[i])
            try:
                decode(data, out=out[i])
            except Exception as exc:  # codec errors have no common base class
                raise self._tile_error(first + i, data, exc) from exc

    def _tile_error(self, index: int, data: bytes, exc: Exception) -> StoreError:
        t = self.tile_size
        try:
            shape = tuple(self._decode(data).shape)
        except Exception:  # not decodable at all
            return StoreError(f"{self.path}: tile {index} cannot be decoded ({one_line(exc)}); re-tile the slide")
        return StoreError(
            f"{self.path}: tile {index} decodes to shape {shape}, expected {(t, t, 3)}; re-tile the slide"
        )

    def read_tiles(
        self, index: slice | Sequence[int] | np.ndarray, *, executor: ThreadPoolExecutor | None = None
    ) -> np.ndarray:
        """Decode several tiles at once.

        Args:
            index: A slice or an array of tile indices (any order, repeats allowed).
            executor: Optional thread pool to decode in parallel (the codecs release the GIL).

        Returns:
            (n, T, T, 3) uint8 RGB.

        Raises:
            StoreError: A tile cannot be decoded or has the wrong shape.
        """
        if isinstance(index, slice):
            positions = np.arange(len(self))[index]
            raw = self.tile_bytes(index)
        else:
            positions = np.asarray(index, dtype=np.int64).reshape(-1)
            raw = self.tile_bytes(positions)
        t = self.tile_size
        out = np.empty((len(raw), t, t, 3), dtype=np.uint8)

        def _one(i: int) -> None:
            data = bytes(raw[i])
            try:
                self._decode(data, out=out[i])
            except Exception as exc:  # codec errors have no common base class
                raise self._tile_error(int(positions[i]), data, exc) from exc

        if executor is None:
            for i in range(len(raw)):
                _one(i)
        else:
            list(executor.map(_one, range(len(raw))))
        return out

    # features and scores

    def _sub_keys(self, folder: str) -> list[str]:
        root = self.path / folder
        if not root.is_dir():
            return []
        keys = []
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or not (entry / "zarr.json").is_file():
                continue
            try:
                meta = json.loads((entry / "zarr.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("attributes", {}).get("complete") is True:
                keys.append(entry.name)
        return keys

    @property
    def feature_keys(self) -> list[str]:
        """Names of the complete embedding arrays, one per encoder configuration."""
        return self._sub_keys("features")

    def _open_sub(self, folder: str, key: str) -> Any:
        if key not in self._sub_keys(folder):
            have = self._sub_keys(folder)
            raise StoreError(f"{self.path}: no {folder} {key!r} (available: {', '.join(have) or 'none'})")
        return _zarr().open_array(str(self.path / folder / key), mode="r")

    def features(self, key: str | None = None) -> np.ndarray:
        """(N, D) tile embeddings of encoder configuration ``key`` (may be omitted if only one exists)."""
        return np.asarray(self._open_sub("features", self.resolve_feature_key(key))[...])

    def feature_attrs(self, key: str | None = None) -> dict[str, Any]:
        """Attributes of a feature array (model, stem, weights_sha256, preprocessing, dtype, ...)."""
        return dict(self._open_sub("features", self.resolve_feature_key(key)).attrs)

    def resolve_feature_key(self, key: str | None) -> str:
        """Return ``key``, or the only feature key when ``key`` is None."""
        if key is not None:
            return key
        keys = self.feature_keys
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise StoreError(f"{self.path}: holds no embeddings; run `wsi-convnext embed` first")
        raise StoreError(f"{self.path}: holds several embeddings ({', '.join(keys)}); choose one with --features KEY")

    def write_features(
        self, key: str, features: np.ndarray, attrs: Mapping[str, Any], *, overwrite: bool = False
    ) -> None:
        """Atomically store an (N, D) embedding array under ``features/<key>``."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != len(self):
            raise StoreError(f"{self.path}: features must be (N={len(self)}, D), got {features.shape}")
        self._write_sub("features", key, features, attrs, overwrite=overwrite)

    @property
    def score_keys(self) -> list[str]:
        """Names of the complete per-tile score arrays."""
        return self._sub_keys("scores")

    def scores(self, name: str) -> np.ndarray:
        """(N,) or (N, C) float32 per-tile scores written under ``scores/<name>``."""
        return np.asarray(self._open_sub("scores", name)[...])

    def score_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of a score array."""
        return dict(self._open_sub("scores", name).attrs)

    def write_scores(self, name: str, scores: np.ndarray, attrs: Mapping[str, Any], *, overwrite: bool = True) -> None:
        """Atomically store per-tile scores ((N,) or (N, C)) under ``scores/<name>``."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape[:1] != (len(self),):
            raise StoreError(f"{self.path}: scores must have N={len(self)} rows, got {scores.shape}")
        self._write_sub("scores", name, scores, attrs, overwrite=overwrite)

    def _write_sub(
        self, folder: str, key: str, data: np.ndarray, attrs: Mapping[str, Any], *, overwrite: bool
    ) -> None:
        _check_key(key)
        zarr = _zarr()
        root = self.path / folder
        root.mkdir(exist_ok=True)
        final = root / key
        if final.exists() and not overwrite:
            raise StoreExistsError(f"{final}: already exists; pass --overwrite to replace it")
        remove_partials(final)
        partial = temp_sibling(final)
        rows = max(1, min(data.shape[0], max(1, (8 << 20) // max(1, data[:1].nbytes))))
        try:
            arr = zarr.create_array(
                str(partial), shape=data.shape, dtype=data.dtype, chunks=(rows,) + data.shape[1:], zarr_format=3
            )
            arr[...] = data
            meta = dict(_jsonable(dict(attrs)))
            meta.update(dtype=str(data.dtype), package_version=__version__, created=_now())
            meta["complete"] = True
            arr.attrs.update(meta)
            commit_dir(partial, final, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def _check_key(key: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", key or ""):
        raise StoreError(f"invalid array name {key!r}: use letters, digits, '_', '.', '-'")


def open_store(path: str | os.PathLike[str]) -> TileStore:
    """Open and validate a slide's tile store.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        StoreError: ``path`` is not a complete wsi-convnext store of a supported schema.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such store")
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        raise StoreError(f"{path}: not a zarr v3 store (no zarr.json); tile the slide with `wsi-convnext tile`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable zarr.json ({exc}); re-tile the slide") from exc
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if meta.get("node_type") != "group" or attrs.get("kind") != STORE_KIND:
        raise StoreError(f"{path}: not a wsi-convnext tile store (foreign zarr group); tile the slide with `wsi-convnext tile`")
    if attrs.get("complete") is not True:
        raise StoreError(f"{path}: incomplete store (interrupted write); re-run `wsi-convnext tile` to rebuild it")
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version} is not supported by wsi-convnext {__version__} "
            f"(expects {SCHEMA_VERSION}); re-tile the slide or use a matching wsi-convnext version"
        )
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    missing += [a + "/" for a in _REQUIRED_ARRAYS if not (path / a / "zarr.json").is_file()]
    if missing:
        raise StoreError(f"{path}: store is missing {', '.join(missing)}; re-tile the slide")
    if attrs["tile_encoding"] not in TILE_CODECS:
        raise StoreError(f"{path}: unknown tile encoding {attrs['tile_encoding']!r}")
    try:
        group = _zarr().open_group(str(path), mode="r", zarr_format=3)
    except Exception as exc:  # zarr raises a variety of errors on damaged metadata
        raise StoreError(f"{path}: cannot open as zarr ({exc}); re-tile the slide") from exc
    store = TileStore(path, group)
    n = len(store)
    if group["tiles"].shape != (n,) or group["coords"].shape != (n, 2):
        raise StoreError(f"{path}: array shapes disagree with n_tiles={n}; re-tile the slide")
    return store


def find_stores(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand store paths and folders of stores into a sorted list of store folders.

    A folder that is itself a store is taken as one; otherwise its direct children named
    ``*.zarr`` are taken. Hidden partial stores are ignored.

    Raises:
        InputNotFoundError: A path does not exist, or a folder holds no stores.
    """
    found: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputNotFoundError(f"{p}: no such file or folder")
        if (p / "zarr.json").is_file():
            found.append(p)
            continue
        if p.is_dir():
            kids = sorted(c for c in p.iterdir() if c.name.endswith(STORE_SUFFIX) and not c.name.startswith("."))
            if not kids:
                raise InputNotFoundError(f"{p}: folder holds no *.zarr stores; run `wsi-convnext tile` first")
            found.extend(kids)
        else:
            raise StoreError(f"{p}: not a zarr store folder")
    seen: set[Path] = set()
    return [x for x in found if not (x.resolve() in seen or seen.add(x.resolve()))]
