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

Writes are checked: with ``complete`` the writer records every chunk file it wrote (size
and sha256, attr ``integrity``) and seals each ``zarr.json`` with a digest of its defining
metadata (attr ``metadata_sha256``). :func:`open_store` checks the group's metadata digest
and that the recorded files are there with their sizes; every chunk zarr reads afterwards
passes through a zarr store wrapper (``CheckedStore``) that compares its bytes with the record before zarr
decodes them; :func:`verify_store` re-hashes everything. Damage is a one-line
:class:`~wsi_convnext.errors.StoreDamagedError`; a store swapped under a reader by another
run is a :class:`~wsi_convnext.errors.StoreReplacedError`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from ._io import TMP_MARK, ensure_dir, file_sha256, json_sha256, path_lock, remove_dead_partials, replace_dir, temp_sibling
from .errors import InputNotFoundError, StoreDamagedError, StoreError, StoreExistsError, StoreReplacedError, one_line

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: Schema versions this version reads: 1 (no metadata digests; opens with a warning) and 2.
READABLE_SCHEMAS = (1, 2)
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
    """Delete leftovers of killed writes of ``final`` whose writer is dead. Returns how many.

    A partial of a live process (another run writing right now) is left alone; see
    :func:`wsi_convnext._io.remove_dead_partials`.
    """
    return remove_dead_partials(final)


def is_store_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a wsi-convnext store's group metadata (finished or not)."""
    meta_file = Path(path) / "zarr.json"
    if Path(path).is_symlink() or not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "group" and meta.get("attributes", {}).get("kind") == STORE_KIND


# --- integrity records ------------------------------------------------------------------

INTEGRITY_ALGORITHM = "sha256"
#: Group arrays that can never legitimately hold an all-fill chunk; in stores without an
#: integrity record (older schema-1 stores) their chunk files are checked by name.
_NEVER_EMPTY = ("tiles", "coords")
_warned_unverified: set[str] = set()


#: Attr sealing a ``zarr.json``: the sha256 of the document's canonical JSON without this attr.
META_DIGEST = "metadata_sha256"
#: Set to False only to measure what the read-path checks cost (``benchmarks/integrity.py``).
_CHECK_READS = True


def _chunk_files(array_dir: Path, with_meta: bool = False) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every chunk file (and ``zarr.json`` if asked) under ``array_dir``."""
    files: dict[str, list[Any]] = {}
    for root, _dirs, names in os.walk(array_dir):
        for name in names:
            f = Path(root) / name
            rel = f.relative_to(array_dir).as_posix()
            if rel == "zarr.json" and not with_meta:
                continue
            files[rel] = [f.stat().st_size, file_sha256(f)]
    return dict(sorted(files.items()))


def _array_record(array_dir: Path, with_meta: bool = False) -> dict[str, Any]:
    meta = json.loads((array_dir / "zarr.json").read_text())
    files = _chunk_files(array_dir, with_meta)
    return {"chunk_grid": int(np.prod(_grid_shape(meta))), "n_files": len(files), "files": files}


def _meta_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of a ``zarr.json`` document as canonical JSON (sorted keys), without its :data:`META_DIGEST`."""
    attrs = {k: v for k, v in (doc.get("attributes") or {}).items() if k != META_DIGEST}
    return json_sha256({**doc, "attributes": attrs})


def _seal(node: Any, meta_file: Path) -> None:
    """Record the metadata digest of the ``zarr.json`` of zarr ``node`` (group or array) as written."""
    node.attrs[META_DIGEST] = _meta_digest(json.loads(meta_file.read_text()))


def _doc_problem(doc: Any) -> str | None:
    """What is wrong with a sealed ``zarr.json`` document (None: its digest matches or it has none)."""
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        return "zarr.json is not a zarr document"
    if META_DIGEST in attrs and attrs[META_DIGEST] != _meta_digest(doc):
        return "zarr.json fails its metadata checksum (edited or damaged)"
    return None


def _doc_bytes_problem(data: np.ndarray) -> str | None:
    """:func:`_doc_problem` of a ``zarr.json`` as the bytes zarr read."""
    try:
        return _doc_problem(json.loads(data.tobytes()))
    except ValueError:
        return "zarr.json is not valid JSON"


def _split_key(key: str) -> tuple[str, str]:
    """A zarr key of the store (``features/k/c/0/0``) as (array name, key inside the array)."""
    parts = key.split("/")
    n = 2 if parts[0] in ("features", "scores") else 1
    return "/".join(parts[:n]), "/".join(parts[n:])


@functools.cache
def _checked_store_class() -> type:
    from zarr.storage import WrapperStore

    class CheckedStore(WrapperStore):  # type: ignore[type-arg]
        """Read-only zarr store that hands every key's bytes to ``check(key, data)`` before zarr decodes them.

        ``data`` is a uint8 array, or None for a missing key; ``check`` raises on a mismatch.
        """

        def __init__(self, store: Any, check: Callable[[str, Any], None]) -> None:
            super().__init__(store)
            self._check = check

        def _with_store(self, store: Any) -> Any:
            return type(self)(store, self._check)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if byte_range is not None and _CHECK_READS:
                await self.get(key, prototype)  # check the whole chunk, then serve the range
            buf = await self._store.get(key, prototype, byte_range)
            if byte_range is None and _CHECK_READS:
                self._check(key, None if buf is None else buf.as_numpy_array())
            return buf

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            return [await self.get(k, prototype, r) for k, r in key_ranges]

    return CheckedStore


def _checked_store(path: Path, check: Callable[[str, Any], None]) -> Any:
    """A read-only zarr store over folder ``path`` whose reads go through ``check`` (see :class:`TileStore`)."""
    from zarr.storage import LocalStore

    return _checked_store_class()(LocalStore(str(path), read_only=True), check)


def _grid_shape(meta: Mapping[str, Any]) -> list[int]:
    shape = list(meta.get("shape", []))
    chunks = list(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", shape))
    return [-(-int(n) // max(1, int(c))) for n, c in zip(shape, chunks)]


def _chunk_key(meta: Mapping[str, Any], index: Sequence[int]) -> str:
    enc = meta.get("chunk_key_encoding", {})
    sep = enc.get("configuration", {}).get("separator", "/" if enc.get("name", "default") == "default" else ".")
    key = sep.join(str(i) for i in index) if index else "0"
    return key if enc.get("name", "default") == "v2" else f"c{sep}{key}" if index else "c"


def _file_label(rel: str) -> str:
    return "zarr.json" if rel == "zarr.json" else f"chunk {rel}"


def _ident(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when it is gone: a folder renamed into place gets a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _ArrayGuard:
    """Checks one array's chunk files: presence and size before a read, bytes as zarr reads them."""

    def __init__(self, owner: TileStore, name: str, array_dir: Path, record: Mapping[str, Any] | None, strict: bool) -> None:
        self.owner, self.name, self.dir = owner, name, array_dir
        self.ident = _ident(array_dir)
        self.meta = json.loads((array_dir / "zarr.json").read_text())
        self.files: Mapping[str, Any] | None = record.get("files") if record else None
        self.strict = strict  # without a record: is a missing chunk damage (never-empty arrays)?
        self.grid = _grid_shape(self.meta)
        shape = self.meta.get("shape", [])
        self.rows_per_chunk = int(self.meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", shape or [1])[0] or 1) if shape else 1

    def damaged(self, what: str) -> StoreError:
        return self.owner._damaged(f"{self.name}: {what}", self)

    def check_all(self) -> None:
        if self.files is not None:
            for rel, (size, _sha) in self.files.items():
                self._check_file(rel, size)
        elif self.strict:
            for index in np.ndindex(*self.grid):
                self._check_file(_chunk_key(self.meta, index), None)

    def check_rows(self, rows: slice | np.ndarray | None) -> None:
        """Check the chunks that a read of ``rows`` (along axis 0; None: all) touches."""
        if rows is None or not self.grid:
            return self.check_all()
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(int(self.meta["shape"][0]))
            first, last = start // self.rows_per_chunk, (max(start, stop - 1)) // self.rows_per_chunk
            ids: Any = range(first, last + 1) if stop > start else ()
        else:
            ids = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1) // self.rows_per_chunk)
        if self.files is None and not self.strict:
            return
        for i in ids:
            for rest in np.ndindex(*self.grid[1:]):
                key = _chunk_key(self.meta, (int(i), *rest))
                rec = self.files.get(key) if self.files is not None else None
                if self.files is not None and rec is None:
                    continue  # never written (all fill), as recorded
                self._check_file(key, rec[0] if rec else None)

    def check_bytes(self, rel: str, data: np.ndarray | None) -> None:
        """Check what zarr read for key ``rel`` of this array (None: missing) against the record."""
        if rel == "zarr.json" and data is not None and self.name.startswith(("features/", "scores/")):
            if problem := _doc_bytes_problem(data):
                raise self.damaged(problem)
            return
        rec = self.files.get(rel) if self.files is not None else None
        if rec is None:
            return  # no record (an older store), or recorded as never written
        if data is None:
            raise self.damaged(f"{_file_label(rel)} is missing")
        if data.size != rec[0]:
            raise self.damaged(f"{_file_label(rel)} has {data.size} bytes, {rec[0]} were written")
        if hashlib.sha256(data).hexdigest() != rec[1]:
            raise self.damaged(f"{_file_label(rel)} fails its sha256 checksum")

    def _check_file(self, rel: str, size: int | None) -> None:
        f = self.dir / rel
        try:
            st = f.stat()
        except FileNotFoundError:
            raise self.damaged(f"{_file_label(rel)} is missing") from None
        if size is not None and st.st_size != size:
            raise self.damaged(f"{_file_label(rel)} has {st.st_size} bytes, {size} were written (truncated?)")


def damaged_error(store_path: Path, what: str) -> StoreDamagedError:
    """The one-line error for a damaged store: what is wrong and what to redo."""
    redo = (
        "re-embed it (`wsi-convnext embed --overwrite`)" if what.startswith("features/")
        else "re-run `wsi-convnext predict`" if what.startswith("scores/")
        else "re-tile the slide (`wsi-convnext tile --overwrite`)"
    )  # fmt: skip
    return StoreDamagedError(f"{store_path}: store damaged: {what}; {redo}")


def commit_dir(partial: Path, final: Path, *, overwrite: bool) -> None:
    """Atomically move a finished ``partial`` directory to ``final`` (see :func:`._io.replace_dir`)."""
    try:
        replace_dir(partial, final, overwrite=overwrite)
    except FileExistsError as exc:
        raise StoreExistsError(str(exc)) from exc


# --- writing ----------------------------------------------------------------------------

#: Write every chunk, even all-fill ones, so that a missing chunk file always means damage.
_FULL_CHUNKS = {"write_empty_chunks": True}


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
            config=_FULL_CHUNKS,
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
        if overwrite and (self.final_path.exists() or self.final_path.is_symlink()) and not is_store_dir(self.final_path):
            raise StoreExistsError(
                f"{self.final_path}: exists and is not a wsi-convnext store; --overwrite only replaces stores"
            )
        g = self._group
        chunk_rows = max(1, min(self.n_tiles, 65536))
        g.create_array("coords", data=coords, chunks=(chunk_rows, 2), config=_FULL_CHUNKS)
        g.create_array(
            "tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32).reshape(-1), chunks=(chunk_rows,),
            config=_FULL_CHUNKS,
        )
        g.create_array("thumbnail", data=np.ascontiguousarray(thumbnail, dtype=np.uint8), config=_FULL_CHUNKS)
        g.create_array("tissue_mask", data=np.ascontiguousarray(tissue_mask, dtype=bool), config=_FULL_CHUNKS)
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
        meta["integrity"] = {
            "algorithm": INTEGRITY_ALGORITHM,
            "arrays": {name: _array_record(self.path / name, with_meta=True) for name in _REQUIRED_ARRAYS},
        }
        meta["complete"] = True  # a store without it is never valid
        g.attrs.update(meta)
        _seal(g, self.path / "zarr.json")
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

    def __init__(self, path: Path, attrs: Mapping[str, Any]) -> None:
        self.path = path
        self.attrs: dict[str, Any] = dict(attrs)
        self._ident = _ident(path)
        self._guards: dict[str, _ArrayGuard] = {}
        self._coords: np.ndarray | None = None
        # Every key zarr reads passes through _check_key before zarr decodes it.
        self._zstore = _checked_store(path, self._check_key)
        self._group = _zarr().open_group(store=self._zstore, mode="r", zarr_format=3)
        self._tiles = self._group["tiles"]
        self._decode = TILE_CODECS[self.attrs["tile_encoding"]][1]

    def _check_key(self, key: str, data: np.ndarray | None) -> None:
        """Check the bytes zarr read for ``key`` (None: missing) against the integrity record."""
        if key == "zarr.json":
            problem = "zarr.json is missing" if data is None else _doc_bytes_problem(data) if META_DIGEST in self.attrs else None
            if problem:
                raise self._damaged(problem)
            return
        name, rel = _split_key(key)
        if rel and (name in _REQUIRED_ARRAYS or (name.startswith(("features/", "scores/")) and (self.path / name).is_dir())):
            self._guard(name).check_bytes(rel, data)

    def _replaced(self, guard: _ArrayGuard | None = None) -> bool:
        """Whether the store (or the array of ``guard``) is no longer the folder this reader opened."""
        return _ident(self.path) != self._ident or (guard is not None and _ident(guard.dir) != guard.ident)

    def _damaged(self, what: str, guard: _ArrayGuard | None = None) -> StoreError:
        """The error for a failed check: damage, or the store replaced by another run meanwhile."""
        if self._replaced(guard):
            return StoreReplacedError(
                f"{self.path}: store replaced by another run while this one read it ({what}); "
                "not damaged: re-run this command on the new store"
            )
        return damaged_error(self.path, what)

    @property
    def verifiable(self) -> bool:
        """Whether the store holds an integrity record (stores written before it existed do not)."""
        return isinstance(self.attrs.get("integrity"), dict)

    def _guard(self, name: str) -> _ArrayGuard:
        guard = self._guards.get(name)
        if guard is None:
            array_dir = self.path / name
            if name.startswith(("features/", "scores/")):
                try:
                    record = json.loads((array_dir / "zarr.json").read_text()).get("attributes", {}).get("integrity")
                except (OSError, ValueError) as exc:
                    raise self._damaged(f"{name}: unreadable zarr.json ({one_line(exc, 120)})") from exc
                strict = name.startswith("features/")
            else:
                record = (self.attrs.get("integrity") or {}).get("arrays", {}).get(name)
                strict = name in _NEVER_EMPTY
            try:
                guard = _ArrayGuard(self, name, array_dir, record, strict)
            except (OSError, ValueError) as exc:
                raise self._damaged(f"{name}: unreadable zarr.json ({one_line(exc, 120)})") from exc
            if name.startswith(("features/", "scores/")) and (problem := _doc_problem(guard.meta)):
                raise guard.damaged(problem)
            self._guards[name] = guard
        return guard

    def _read(self, name: str, read: Callable[[], Any], rows: slice | np.ndarray | None = None) -> Any:
        """Run ``read`` on array ``name`` after checking the chunks it touches; damage becomes one line."""
        self._guard(name).check_rows(rows)
        try:
            return read()
        except StoreError:
            raise
        except Exception as exc:  # codec errors (a truncated zstd frame, a short vlen chunk) and the like
            raise self._damaged(f"{name}: cannot read ({one_line(exc, 200)})") from exc

    def check_presence(self, names: Sequence[str] = _REQUIRED_ARRAYS) -> None:
        """Check that every recorded chunk file of group arrays ``names`` exists with its size (cheap).

        Raises:
            StoreDamagedError: A chunk file is missing or has another size than was written.
        """
        for name in names:
            self._guard(name).check_all()

    def verify(self, name: str) -> None:
        """Re-hash every recorded chunk file of array ``name`` now, reading it all once.

        For readers that would otherwise meet damage deep inside worker processes.

        Raises:
            StoreDamagedError: The first chunk that is missing, truncated or fails its sha256.
        """
        guard = self._guard(name)
        problems, _ = _verify_record(guard.dir, name, {"files": guard.files or {}})
        if problems:
            raise self._damaged(problems[0], guard)

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
            self._coords = np.asarray(self._read("coords", lambda: self._group["coords"][...]), dtype=np.int64).reshape(-1, 2)
        return self._coords

    @property
    def tissue_fraction(self) -> np.ndarray:
        """(N,) float32 tissue fraction per tile."""
        return np.asarray(self._read("tissue_fraction", lambda: self._group["tissue_fraction"][...]), dtype=np.float32)

    @property
    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 overview; ``attrs['thumbnail_downsample']`` level-0 px per pixel."""
        return np.asarray(self._read("thumbnail", lambda: self._group["thumbnail"][...]))

    @property
    def tissue_mask(self) -> np.ndarray:
        """(h, w) bool tissue mask; ``attrs['mask_downsample']`` level-0 px per pixel."""
        return np.asarray(self._read("tissue_mask", lambda: self._group["tissue_mask"][...]), dtype=bool)

    def tile_bytes(self, index: slice | np.ndarray) -> np.ndarray:
        """Encoded tile bytes (1-D object array of ``bytes``) for a slice or an index array."""
        if isinstance(index, slice):
            return self._read("tiles", lambda: self._tiles[index], index)
        rows = np.asarray(index, dtype=np.int64)
        return self._read("tiles", lambda: self._tiles.get_orthogonal_selection(rows), rows)

    def tile(self, i: int) -> np.ndarray:
        """Tile ``i`` as (T, T, 3) uint8 RGB."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"tile index {i} out of range for {n} tiles")
        i = int(i) % n
        return self._decode_one(bytes(self.tile_bytes(slice(i, i + 1))[0]))

    def _decode_one(self, data: bytes) -> np.ndarray:
        try:
            return self._decode(data)
        except Exception as exc:  # a damaged tile image
            raise self._damaged(f"tiles: cannot decode a tile ({one_line(exc, 120)})") from exc

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
            return self._damaged(f"tiles: tile {index} cannot be decoded ({one_line(exc, 120)})")
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
        self._guard(f"{folder}/{key}")  # checks the array's metadata digest
        try:
            return _zarr().open_array(store=self._zstore, path=f"{folder}/{key}", mode="r", zarr_format=3)
        except StoreError:
            raise
        except Exception as exc:
            raise self._damaged(f"{folder}/{key}: cannot open ({one_line(exc, 200)})") from exc

    def _read_sub(self, folder: str, key: str) -> np.ndarray:
        arr = self._open_sub(folder, key)
        data = np.asarray(self._read(f"{folder}/{key}", lambda: arr[...]))
        if data.shape[:1] != (len(self),):
            raise self._damaged(f"{folder}/{key}: {data.shape[0]} rows for {len(self)} tiles")
        return data

    def features(self, key: str | None = None) -> np.ndarray:
        """(N, D) tile embeddings of encoder configuration ``key`` (may be omitted if only one exists).

        Raises:
            StoreDamagedError: A chunk is missing or truncated, or the row count is not N.
        """
        return self._read_sub("features", self.resolve_feature_key(key))

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
        return self._read_sub("scores", name)

    def score_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of a score array."""
        return dict(self._open_sub("scores", name).attrs)

    def write_scores(self, name: str, scores: np.ndarray, attrs: Mapping[str, Any], *, overwrite: bool = True) -> None:
        """Atomically store per-tile scores ((N,) or (N, C)) under ``scores/<name>``."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape[:1] != (len(self),):
            raise StoreError(f"{self.path}: scores must have N={len(self)} rows, got {scores.shape}")
        self._write_sub("scores", name, scores, attrs, overwrite=overwrite)

    def check_writable(self, folder: str = "features") -> None:
        """Raise :class:`~wsi_convnext.errors.OutputWriteError` now, before any work, if ``folder/`` cannot be written."""
        ensure_dir(self.path / folder, "store", create=False)

    def _write_sub(
        self, folder: str, key: str, data: np.ndarray, attrs: Mapping[str, Any], *, overwrite: bool
    ) -> None:
        _check_key(key)
        zarr = _zarr()
        root = self.path / folder
        root.mkdir(exist_ok=True)
        final = root / key
        # One writer per array at a time; a second one waits, then finds the array written.
        with path_lock(final):
            if final.exists() and not overwrite:
                raise StoreExistsError(f"{final}: already exists (maybe written by another run meanwhile); pass --overwrite to replace it")
            remove_dead_partials(final)
            partial = temp_sibling(final)
            rows = max(1, min(data.shape[0], max(1, (8 << 20) // max(1, data[:1].nbytes))))
            try:
                arr = zarr.create_array(
                    str(partial), shape=data.shape, dtype=data.dtype, chunks=(rows,) + data.shape[1:], zarr_format=3,
                    config=_FULL_CHUNKS,
                )
                arr[...] = data
                meta = dict(_jsonable(dict(attrs)))
                meta.update(dtype=str(data.dtype), package_version=__version__, created=_now())
                meta["integrity"] = {"algorithm": INTEGRITY_ALGORITHM, **_array_record(partial)}
                meta["complete"] = True
                arr.attrs.update(meta)
                _seal(arr, partial / "zarr.json")
                if self._replaced():  # features of the old store must not land in its replacement
                    raise self._damaged(f"{folder}/{key}: not written")
                commit_dir(partial, final, overwrite=overwrite)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        self._guards.pop(f"{folder}/{key}", None)


def _check_key(key: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", key or ""):
        raise StoreError(f"invalid array name {key!r}: use letters, digits, '_', '.', '-'")


def open_store(path: str | os.PathLike[str], *, check: Sequence[str] = _REQUIRED_ARRAYS) -> TileStore:
    """Open and validate a slide's tile store.

    Checks the group's metadata digest (schema 2), and, cheaply, that every chunk file the
    writer recorded for the arrays in ``check`` is there with its size. Whatever is read
    later is checked as it is read (see :class:`TileStore`). A schema-1 store (no metadata
    digest) or one without an integrity record opens with a logged warning that it cannot
    be verified; its ``tiles`` and ``coords`` chunk files are still checked by name.

    Args:
        path: The store folder.
        check: Group arrays whose chunk files are checked for presence now (default: all);
            a reader that needs fewer arrays (e.g. ``export --format h5``) passes fewer.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        StoreError: ``path`` is not a complete wsi-convnext store of a supported schema.
        StoreDamagedError: The metadata fails its digest, or a chunk file is missing or truncated.
    """
    from .inputs import is_slide_id

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
    if version not in READABLE_SCHEMAS:
        raise StoreError(
            f"{path}: store schema version {version} is not supported by wsi-convnext {__version__} "
            f"(expects {SCHEMA_VERSION}); re-tile the slide or use a matching wsi-convnext version"
        )
    if version >= 2 and META_DIGEST not in attrs:
        raise damaged_error(path, "zarr.json has no metadata checksum")
    if problem := _doc_problem(meta):
        raise damaged_error(path, problem)
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    missing += [a + "/" for a in _REQUIRED_ARRAYS if not (path / a / "zarr.json").is_file()]
    if missing:
        raise StoreError(f"{path}: store is missing {', '.join(missing)}; re-tile the slide")
    if attrs["tile_encoding"] not in TILE_CODECS:
        raise StoreError(f"{path}: unknown tile encoding {attrs['tile_encoding']!r}")
    try:
        store = TileStore(path, attrs)
    except StoreError:
        raise
    except Exception as exc:  # zarr raises a variety of errors on damaged metadata
        raise StoreError(f"{path}: cannot open as zarr ({exc}); re-tile the slide") from exc
    n = len(store)
    if store._group["tiles"].shape != (n,) or store._group["coords"].shape != (n, 2):
        raise StoreError(f"{path}: array shapes disagree with n_tiles={n}; re-tile the slide")
    sid = attrs.get("slide_id")
    if sid is not None and not is_slide_id(str(sid)):
        raise StoreError(f"{path}: store holds an unsafe slide_id {sid!r}; re-tile the slide with a safe id")
    if version < 2 or not store.verifiable:
        if str(path.resolve()) not in _warned_unverified:
            _warned_unverified.add(str(path.resolve()))
            logger.warning(
                "%s: store was written by an older wsi-convnext (schema %s, %s); it cannot be verified; "
                "re-tile it to add checksums", path, version, "no chunk checksums" if not store.verifiable else "no metadata checksum",
            )  # fmt: skip
    store.check_presence(check)
    return store


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_store`.

    Attributes:
        path: The store folder.
        status: ``ok`` (every recorded chunk re-hashed and matched), ``damaged``,
            ``unverifiable`` (no integrity record: an older store) or ``invalid`` (not a store).
        problems: One line per problem found.
        files: Number of chunk files hashed.
    """

    path: Path
    status: str
    problems: list[str] = field(default_factory=list)
    files: int = 0


def _verify_record(array_dir: Path, name: str, record: Mapping[str, Any]) -> tuple[list[str], int]:
    problems: list[str] = []
    files = record.get("files") or {}
    for rel, (size, sha) in files.items():
        f = array_dir / rel
        if not f.is_file():
            problems.append(f"{name}: {_file_label(rel)} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name}: {_file_label(rel)} has {f.stat().st_size} bytes, {size} were written")
        elif file_sha256(f) != sha:
            problems.append(f"{name}: {_file_label(rel)} fails its sha256 checksum")
    return problems, len(files)


def verify_store(path: str | os.PathLike[str]) -> VerifyResult:
    """Re-hash every chunk file of a store (group arrays, features, scores) against its record.

    Unlike :func:`open_store`, which only checks presence and sizes, this reads every byte.
    """
    p = Path(path)
    try:
        store = open_store(p)
    except StoreDamagedError as exc:
        return VerifyResult(p, "damaged", [one_line(exc)])
    except (StoreError, InputNotFoundError) as exc:
        return VerifyResult(p, "invalid", [one_line(exc)])
    problems: list[str] = []
    n = 0
    record = store.attrs.get("integrity")
    unverified = [] if isinstance(record, dict) else ["group arrays"]
    if META_DIGEST not in store.attrs:
        unverified.append("group metadata (schema 1)")
    for name, rec in (record or {}).get("arrays", {}).items() if isinstance(record, dict) else ():
        found, k = _verify_record(p / name, name, rec)
        problems += found
        n += k
    for folder, keys in (("features", store.feature_keys), ("scores", store.score_keys)):
        for key in keys:
            name = f"{folder}/{key}"
            try:
                doc = json.loads((p / name / "zarr.json").read_text())
                attrs = doc.get("attributes", {})
            except (OSError, ValueError, AttributeError) as exc:
                problems.append(f"{name}: unreadable zarr.json ({one_line(exc, 120)})")
                continue
            if problem := _doc_problem(doc):
                problems.append(f"{name}: {problem}")
            if isinstance(attrs.get("integrity"), dict):
                found, k = _verify_record(p / name, name, attrs["integrity"])
                problems += found
                n += k
            else:
                unverified.append(name)
            if META_DIGEST not in attrs:
                unverified.append(f"{name} metadata")
    if problems:
        return VerifyResult(p, "damaged", [f"{p}: store damaged: {x}" for x in problems], n)
    if unverified:
        return VerifyResult(p, "unverifiable", [f"{p}: no integrity record for {', '.join(unverified)} (older store)"], n)
    return VerifyResult(p, "ok", [], n)


def verify_stores(
    inputs: Sequence[str | os.PathLike[str]], *, on_result: Callable[[VerifyResult], None] | None = None
) -> list[VerifyResult]:
    """:func:`verify_store` on every store of ``inputs`` (stores or folders of stores, see :func:`find_stores`)."""
    results = []
    for path in find_stores(inputs):
        r = verify_store(path)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


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
