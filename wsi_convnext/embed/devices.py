"""Several devices: the stores split among them, one spawned process per device (built on :mod:`~wsi_convnext._proc`)."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._io import cpu_count
from .._proc import die_with_parent
from ..errors import ConfigError, WsiConvnextError, one_line
from .api import embed_stores
from .loop import failed_result
from .options import EmbedResult, ProgressFn

__all__ = ["embed_on_devices", "split_stores"]


def split_stores(n_tiles: Sequence[int], n_devices: int) -> list[list[int]]:
    """Split stores among devices with balanced tile counts.

    Greedy: the largest store goes to the device with the fewest tiles so far. Each device's
    positions stay in input order.

    Args:
        n_tiles: Tiles per store, in input order.
        n_devices: Number of devices (>= 1).

    Returns:
        For each device, the input positions of its stores (possibly empty).
    """
    loads = [0] * max(1, n_devices)
    shards: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(n_tiles)), key=lambda i: (-int(n_tiles[i]), i)):
        k = min(range(len(loads)), key=lambda k: (loads[k], k))
        shards[k].append(i)
        loads[k] += int(n_tiles[i])
    return [sorted(s) for s in shards]


def _n_tiles_hint(path: Path) -> int:
    """A store's tile count from its metadata, for balancing only (0 when unreadable)."""
    import json

    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["n_tiles"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return WsiConvnextError(f"{type(exc).__name__}: {one_line(exc)}")


def _device_worker(
    rank: int, paths: list[Path], device: str, options: dict[str, Any], threads: int | None, messages: Any,
    parent_pid: int,
) -> None:
    """Body of one device process: embed its share of the stores, reporting through ``messages``."""
    die_with_parent(parent_pid)  # no orphaned device processes
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        embed_stores(
            paths, device=device, **options,
            progress=lambda done, total: messages.put(("progress", rank, done, total)),
            on_result=lambda r: messages.put(("result", rank, r)),
        )  # fmt: skip
        messages.put(("end", rank, None))
    except BaseException as exc:  # reported to the parent, which raises it
        messages.put(("end", rank, _picklable(exc)))


def embed_on_devices(
    paths: list[Path],
    devices: list[str],
    options: dict[str, Any],
    *,
    progress: ProgressFn | None,
    on_result: Callable[[EmbedResult], None] | None,
) -> list[EmbedResult]:
    """Split ``paths`` among ``devices`` and embed each share in its own (spawned) process."""
    import multiprocessing as mp

    from ..encoders import resolve_device

    resolved = [resolve_device(d) for d in devices]  # DeviceError before anything starts
    shards = split_stores([_n_tiles_hint(p) for p in paths], len(devices))
    n_cpu = sum(1 for d in resolved if d.type == "cpu")
    cpu_threads = max(1, cpu_count() // n_cpu) if n_cpu else None
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    messages = ctx.Queue()
    procs: dict[int, Any] = {}
    results: dict[int, EmbedResult] = {}
    reported = {rank: 0 for rank in range(len(devices))}
    error: BaseException | None = None
    completed = False

    def record(rank: int, result: EmbedResult) -> None:
        results[shards[rank][reported[rank]]] = result
        reported[rank] += 1
        if on_result is not None:
            on_result(result)

    try:
        for rank, (dev, shard) in enumerate(zip(resolved, shards)):
            if not shard:
                continue
            proc = ctx.Process(
                target=_device_worker, name=f"wsi-convnext-embed-{rank}-{dev}", daemon=True,
                args=(rank, [paths[i] for i in shard], str(dev), options, cpu_threads if dev.type == "cpu" else None,
                      messages, os.getpid()),
            )  # fmt: skip
            try:
                proc.start()
            except Exception as exc:  # e.g. an unpicklable transform
                raise ConfigError(f"cannot start the embedding process for {dev} ({one_line(exc)})") from exc
            procs[rank] = proc
        running = set(procs)
        while running:
            try:
                msg = messages.get(timeout=0.5)
            except queue.Empty:
                gone = [r for r in running if not procs[r].is_alive()]
                if not gone:
                    continue
                try:
                    msg = messages.get(timeout=0.5)  # anything it sent before exiting
                except queue.Empty:
                    for rank in gone:
                        running.discard(rank)
                        exc = WsiConvnextError(
                            f"the embedding process for {resolved[rank]} died (exit code {procs[rank].exitcode})"
                        )
                        for i in shards[rank][reported[rank] :]:
                            record(rank, failed_result(paths[i], None, time.perf_counter(), exc, resolved[rank]))
                    continue
            kind, rank = msg[0], msg[1]
            if kind == "progress":
                if progress is not None:
                    progress(msg[2], msg[3])
            elif kind == "result":
                record(rank, msg[2])
            else:  # "end"
                running.discard(rank)
                if msg[2] is not None and error is None:
                    error = msg[2]
                    break
        completed = error is None
    finally:
        for proc in procs.values():
            if proc.is_alive() and not completed:
                proc.terminate()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if error is not None:
        raise error
    return [results[i] for i in range(len(paths))]
