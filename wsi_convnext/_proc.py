"""Child processes that never outlive their parent.

:func:`die_with_parent` runs in a worker process (e.g. a ``ProcessPoolExecutor``
initializer): on Linux the kernel kills the worker when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread polling the parent pid covers other
systems and the cases the kernel signal misses (it fires when the parent *thread* that
started the worker ends, and is not inherited across a double fork).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

__all__ = ["child_initializer", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll: float) -> None:
    while True:
        time.sleep(poll)
        if os.getppid() != parent:  # reparented: the parent is gone
            os._exit(1)


def die_with_parent(parent_pid: int | None = None, *, poll: float = 0.5) -> None:
    """Make the calling process exit as soon as its parent process dies.

    Args:
        parent_pid: The parent's pid as the parent saw it (default: ``os.getppid()`` now).
            Passing it closes the race where the parent dies before this call.
        poll: Seconds between the watchdog's checks of the parent pid.
    """
    parent = parent_pid if parent_pid is not None else os.getppid()
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, poll), name="parent-watchdog", daemon=True).start()


def child_initializer(parent_pid: int, target: str, args: tuple[object, ...] = ()) -> None:
    """A pool initializer: :func:`die_with_parent` first, then ``target(*args)``.

    ``target`` is named as ``"module:function"`` rather than passed as a function, so the
    child arms its parent-death signal before importing the (heavy) module that holds it:
    a parent killed while its children still start up takes them along at once.
    """
    die_with_parent(parent_pid)
    import importlib

    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)(*args)
