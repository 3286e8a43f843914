"""Small I/O helpers shared by the whole package: atomic writes, CPU count, hashing.

There is one way to write a file or a directory so that a reader never sees it half
written: build it under a hidden temporary sibling, then rename it into place. The
temporary name carries the pid and a random suffix, so two runs writing the same target
never share a temporary file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".partial-"
"""Marker in the names of temporary siblings (``.<name>.partial-<pid>-<hex>``)."""

_HASH_CHUNK = 1 << 22


def temp_sibling(final: str | os.PathLike[str]) -> Path:
    """A hidden, unique temporary path next to ``final``: ``.<name>.partial-<pid>-<hex>``."""
    p = Path(final)
    return p.with_name(f".{p.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def partial_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid recorded in a temporary sibling's name, or None if it is not one."""
    name = Path(path).name
    if TMP_MARK not in name:
        return None
    try:
        return int(name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
    except ValueError:
        return None


@contextmanager
def atomic_path(final: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write a *file* to; on success it replaces ``final`` atomically.

    The caller writes the temporary file however it likes (``save_file``, ``h5py``, PIL...).
    On error the temporary file is removed and ``final`` is untouched.
    """
    dest = Path(final)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        yield tmp
        if fsync and tmp.is_file():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically; returns ``final`` as a Path.

    The file is created with mode 0o666 so that the umask decides its permissions.
    """
    dest = Path(final)
    with atomic_path(dest, fsync=False) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return dest


def atomic_write_text(final: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` atomically; returns ``final`` as a Path."""
    return atomic_write_bytes(final, text.encode(encoding))


def replace_dir(partial: str | os.PathLike[str], final: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Move a finished directory ``partial`` to ``final``.

    With ``overwrite`` an existing ``final`` is first renamed aside and deleted after the
    rename, so readers see either the old or the new complete directory.

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is false.
    """
    src, dest = Path(partial), Path(final)
    trash = None
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest}: already exists; pass --overwrite to replace it")
        trash = dest.with_name(f".{dest.name}.trash-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(dest, trash)
    os.rename(src, dest)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``final`` atomically.

    On error the temporary directory is removed and ``final`` is untouched.

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is false (checked again at the end).
    """
    dest = Path(final)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
