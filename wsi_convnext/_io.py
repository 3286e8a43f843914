"""Small I/O helpers shared by the whole package: atomic writes, CPU count, hashing.

There is one way to write a file or a directory so that a reader never sees it half
written: build it under a hidden temporary sibling, then rename it into place. The
temporary name carries the pid and a random suffix, so two runs writing the same target
never share a temporary file.

Two runs that write the *same* output serialise on :func:`path_lock`, an OS file lock
(``fcntl.flock``) on a hidden ``.<name>.lock`` sibling held for the life of the write. The
kernel drops the lock when its holder dies, so a lock left by a killed process is never
"stale" in the sense of blocking anyone; :func:`path_lock` recognises such leftovers (the
pid written in them is dead), logs that it breaks them, and takes them over.

Every output path a user-controlled name flows into is checked with :func:`inside` to
resolve inside its output folder.

Every CSV the project writes goes through :func:`csv_text` / :func:`write_csv`, which keep
a spreadsheet from running a text cell as a formula (:func:`csv_escape`); the project's
readers undo that with :func:`csv_unescape`.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BusyError, ConfigError, OutputWriteError, UnsafePathError

logger = logging.getLogger(__name__)

TMP_MARK = ".partial-"
LOCK_SUFFIX = ".lock"
"""Suffix of lock files (``.<name>.lock`` next to the locked path)."""
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


def physical_memory() -> int:
    """Bytes of physical memory of this machine (1 TiB when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 1 << 40


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_sha256(obj: Any, n: int = 64, *, round_floats: int | None = None) -> str:
    """The first ``n`` hex digits of the sha256 of ``obj`` as canonical JSON: the one hash of a value.

    Canonical: keys sorted, default separators, anything JSON cannot hold written with ``str``;
    with ``round_floats``, floats are first rounded to that many decimals (so float noise in
    parameters does not change a key).
    """

    def canon(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, round_floats)  # type: ignore[arg-type]
        if isinstance(v, dict):
            return {str(k): canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return v

    text = json.dumps(obj if round_floats is None else canon(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


# --- CSV files ------------------------------------------------------------------------------

#: First characters that make a spreadsheet read a cell as a formula (OWASP's CSV injection list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _needs_escape(text: str) -> bool:
    if text.startswith(_FORMULA_START):
        return _NUMBER.fullmatch(text) is None  # "-0.25" stays a number
    return text.startswith("'") and _needs_escape(text[1:])  # so that csv_unescape undoes exactly this


def csv_escape(cell: Any) -> str:
    """A CSV cell as text: ``None`` → ``""``; a text starting with ``= + - @`` (or tab, CR) gets a leading ``'``.

    A spreadsheet then shows the text instead of running it as a formula. Numbers (``-0.25``,
    ``+1e-3``) are left as they are, so numeric columns stay numeric.
    """
    text = "" if cell is None else str(cell)
    return "'" + text if _needs_escape(text) else text


def csv_unescape(cell: str) -> str:
    """Undo :func:`csv_escape` on a cell read back (``"'=x"`` → ``"=x"``; anything else as it is)."""
    return cell[1:] if cell.startswith("'") and _needs_escape(cell[1:]) else cell


def csv_text(header: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    """CSV text (comma-separated, ``\\n`` line ends) of a header (None: none) and rows, every cell :func:`csv_escape`-d."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow([csv_escape(c) for c in header])
    writer.writerows([csv_escape(c) for c in row] for row in rows)
    return buf.getvalue()


def write_csv(final: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file atomically through :func:`csv_text`; returns ``final`` as a Path."""
    return atomic_write_text(final, csv_text(header, rows))


# --- output paths ---------------------------------------------------------------------------


def inside(folder: str | os.PathLike[str], *parts: str) -> Path:
    """``folder / parts...``, checked to resolve (symlinks and ``..`` followed) inside ``folder``.

    Every output path built from a name that a user, a manifest or a store supplied goes
    through here, so a crafted name can never write (or, with ``--overwrite``, delete)
    anything outside the output folder.

    Raises:
        UnsafePathError: The path would leave ``folder`` (or is ``folder`` itself).
    """
    base = Path(folder)
    child = base.joinpath(*parts)
    root = base.resolve()
    try:
        resolved = child.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UnsafePathError(f"{child}: cannot resolve the output path ({exc})") from exc
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafePathError(f"{child}: output path resolves to {resolved}, outside the output folder {root}; refusing to write")
    return child


def _check_writable(folder: Path, option: str) -> None:
    # os.access also says no, even to root, on a read-only file system (EROFS).
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputWriteError(
            f"{folder}: cannot write into this folder (read-only, or no permission); choose another {option} "
            "or make it writable"
        )


def ensure_dir(path: str | os.PathLike[str], option: str = "--out", *, create: bool = True) -> Path:
    """Create the output folder ``path`` (and parents) and check it is writable; returns it.

    The one check of an output folder, before any work: every command that writes a folder
    calls it where the folder enters. ``create=False`` only checks (the folder, or the
    nearest existing folder above it, must be a writable folder), for a caller that
    validates more before it writes anything.

    Raises:
        ConfigError: ``path`` (or a parent) exists and is not a folder.
        OutputWriteError: The folder cannot be created or written (read-only, permissions, full disk).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p}: {option} must be a folder but is a file; choose another {option}")
    if not create:
        parent = next((q for q in (p, *p.parents) if q.exists()), p)
        if not parent.is_dir():
            raise ConfigError(f"{p}: {option} lies under a file, not a folder; choose another {option}")
        _check_writable(parent, option)
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"{p}: {option} lies under a file, not a folder; choose another {option}") from exc
    except OSError as exc:
        raise write_error(p, exc) from exc
    _check_writable(p, option)
    return p


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check, before any work, that a file can be written at ``path``; returns it as a Path.

    The one check of an output file: not a folder, no parent is a file, and the nearest
    existing parent folder is writable (missing folders are created when the file is written).

    Raises:
        ConfigError: ``path`` is a folder, or a parent of it is a file.
        OutputWriteError: The folder it goes into is read-only or not writable.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: {option} is a folder; give a file name such as {p / 'predictions.csv'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{p}: {option} lies under {parent}, which is a file; choose another {option}")
            _check_writable(parent, option)
            break
    return p


def write_error(path: str | os.PathLike[str], exc: OSError) -> OutputWriteError:
    """A one-line :class:`OutputWriteError` for an OS error while writing ``path`` (the path is named)."""
    what = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = "free some space and re-run" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder and re-run"
    err = OutputWriteError(f"{path}: cannot write ({what}); {hint}")
    err.errno = exc.errno
    return err


# --- processes and locks --------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_partials(final: str | os.PathLike[str]) -> int:
    """Delete the temporary siblings of ``final`` whose writer process is dead. Returns how many.

    A partial whose pid is alive (another run writing right now, or this process) is left
    alone. Call it while holding :func:`path_lock` on ``final``.
    """
    p = Path(final)
    if not p.parent.is_dir():
        return 0
    prefix = f".{p.name}{TMP_MARK}"
    n = 0
    for entry in p.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = partial_pid(entry)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        logger.info("%s: removing a partial write left by dead process %d", entry, pid)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        n += 1
    return n


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` in the same folder."""
    p = Path(target)
    return p.with_name(f".{p.name}{LOCK_SUFFIX}")


def _lock_holder(path: Path) -> tuple[str, int] | None:
    try:
        host, _, pid = path.read_text(encoding="utf-8").strip().rpartition(" ")
        return host, int(pid)
    except (OSError, ValueError):
        return None


@contextmanager
def path_lock(
    target: str | os.PathLike[str], *, wait: bool = True, timeout: float | None = None, poll: float = 0.2
) -> Iterator[Path]:
    """Hold an exclusive OS lock on ``target`` (a file or folder that need not exist yet).

    The lock is ``fcntl.flock`` on ``.<name>.lock`` next to ``target``; it is released when
    the block ends or the process dies. Inside one process the lock is not re-entrant.

    Args:
        target: The path to be written.
        wait: Wait for another holder; False raises :class:`BusyError` at once.
        timeout: Most seconds to wait (None: no limit).
        poll: Seconds between attempts while waiting.

    Yields:
        The lock file.

    Raises:
        BusyError: Another live process holds the lock and ``wait`` is false or ``timeout`` passed.
    """
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(lock)
            who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise BusyError(f"{target}: {who} is writing it; wait for it to finish or use another output folder") from None
            if not told:
                logger.warning("%s: %s is writing it; waiting", target, who)
                told = True
            time.sleep(poll)
            continue
        # The file may have been unlinked by its previous holder between open and flock:
        # only a lock on the file the path names now counts.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    holder = _lock_holder(lock)
    if holder is not None and holder[0] == socket.gethostname() and not pid_alive(holder[1]):
        logger.info("%s: breaking a stale lock of dead process %d", target, holder[1])
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield lock
    finally:
        try:
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing drops the flock
