"""Cohort-run benchmarks.

(a) Tiling scale-out: a cohort of 8 generated slides tiled by the real tile stage on a
    LocalCluster with 1 worker, then with 2 workers (single-threaded processes), in the
    same process; prints both wall times and their ratio (target >= 1.9x on >= 2 free cores),
    and where the wall time of each run goes: start-up (run start → first task start),
    the tasks themselves, workers idle between tasks (scheduling), the straggler (one worker
    idle while the last task of another finishes) and the tail (last task end → return).
(b) Scheduling overhead: a dry run of 10,000 synthetic slides (no files) through the same
    task graph (run_cohort: sliding window, manifest, tile → embed) with no-op stages;
    prints milliseconds per slide (target < 20 ms) and the client's peak RSS (< 1 GB;
    the client process also hosts the LocalCluster scheduler).

(c) Background CPU of an idle 2-worker LocalCluster for 5 s: the client process
    (scheduler, nannies, client) and the workers, with Dask's default settings and with
    the settings run_cohort's clusters use (open_client); on 2 cores with 2 busy workers
    every CPU-second of it is taken from the slides.

(d) Worker memory: the resident memory (RSS now, and peak) of a single local worker idle,
    after a tile-only run of the slides of (a) (and whether it imported torch: it must not),
    after importing torch + timm there, and of a fresh worker after a tile → embed run
    (convnext_atto); the ratios are against the idle worker.

    python benchmarks/cohort.py                 # all
    python benchmarks/cohort.py --only overhead --n-dry 10000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_slides(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"bench{i}.svs"
        if not p.exists():
            spec = SyntheticSlideSpec(width=size[0], height=size[1], mpp=0.5, seed=100 + i, downsamples=(1, 4, 16))
            write_synthetic_slide(p, spec)
        paths.append(p)
    return paths


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class TimedStage:
    """Wraps a stage function; records each task's wall-clock start/end and process in a file."""

    def __init__(self, fn: Any, folder: Path) -> None:
        self.fn, self.folder = fn, folder

    def __call__(self, slide: Any, config: Any, state: Any) -> Any:
        t0, c0 = time.time(), _cpu_seconds()
        try:
            return self.fn(slide, config, state)
        finally:
            cpu = _cpu_seconds() - c0  # of the whole worker process: all threads of the task
            line = json.dumps({"slide": slide.slide_id, "t0": t0, "t1": time.time(), "cpu": cpu, "pid": os.getpid()})
            with (self.folder / f"{os.getpid()}.jsonl").open("a") as fh:
                fh.write(line + "\n")


def _warm_tiling() -> None:
    import importlib

    for name in ("wsi_convnext.tiling.tiler", "wsi_convnext.tiling.jpeg_scaled", "wsi_convnext.outputs.qc", "wsi_convnext._proc",
                 "wsi_convnext.slide.openslide", "wsi_convnext.slide.tiffslide", "openslide", "tiffslide", "tifffile",
                 "zarr", "numcodecs", "imagecodecs", "PIL.Image"):  # fmt: skip
        importlib.import_module(name)


def breakdown(folder: Path, t_start: float, t_end: float) -> dict[str, float]:
    """Where a run's wall time went, from the TimedStage records (seconds)."""
    tasks = [json.loads(line) for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()]
    by_worker: dict[int, list[dict[str, float]]] = {}
    for t in tasks:
        by_worker.setdefault(int(t["pid"]), []).append(t)
    first = min(t["t0"] for t in tasks)
    last = max(t["t1"] for t in tasks)
    ends = sorted(max(t["t1"] for t in ts) for ts in by_worker.values())
    gaps = 0.0
    for ts in by_worker.values():
        ts.sort(key=lambda t: t["t0"])
        gaps += sum(max(0.0, b["t0"] - a["t1"]) for a, b in zip(ts, ts[1:]))
    first_tasks = [min(ts, key=lambda t: t["t0"]) for ts in by_worker.values()]
    others = [t for ts in by_worker.values() for t in ts if t not in first_tasks]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "startup": first - t_start,
        "tail": t_end - last,
        "gaps": gaps / len(by_worker),
        "straggler": last - ends[0] if len(ends) > 1 else 0.0,
        "first_task": mean([t["t1"] - t["t0"] for t in first_tasks]),
        "other_task": mean([t["t1"] - t["t0"] for t in others]),
        "workers": float(len(by_worker)),
        "task_cpu": sum(t["cpu"] for t in tasks),
        "task_wall": sum(t["t1"] - t["t0"] for t in tasks),
    }


def bench_scaleout(work: Path, n_slides: int, size: tuple[int, int]) -> dict[str, float]:
    from wsi_convnext.cohort import get_stage, open_client, run_cohort
    from wsi_convnext.config import load_config

    t0 = time.perf_counter()
    slides = make_slides(work / "slides", n_slides, size)
    print(f"(a) {n_slides} generated slides of {size[0]}x{size[1]} px at 0.5 µm/px ready in {time.perf_counter() - t0:.1f} s")
    times: dict[str, float] = {}
    for n_workers in (1, 2):
        cfg = load_config(
            None,
            {
                "slides": [str(p) for p in slides],
                "out": str(work / f"out-{n_workers}w"),
                "overwrite": True,
                "report": False,
                "local.n_workers": n_workers,
                "local.threads_per_worker": 1,
                "local.gpus": 0,
                "local.dashboard_address": "",
            },
        )
        timeline = work / f"timeline-{n_workers}w"
        timeline.mkdir(parents=True, exist_ok=True)
        for f in timeline.glob("*.jsonl"):
            f.unlink()
        stages = {"tile": TimedStage(get_stage("tile").fn, timeline)}
        with open_client(cfg) as info:
            # Warm the workers (everything the tile stage imports on its first call) so that both
            # runs time tiling, not each worker's one-off start-up.
            info.client.run(_warm_tiling)
            t, wall0, cpu0 = time.perf_counter(), time.time(), _cpu_seconds()
            summary = run_cohort(cfg, client=info.client, stages=stages)
            times[f"{n_workers}w"] = time.perf_counter() - t
            wall1, client_cpu = time.time(), _cpu_seconds() - cpu0
        assert summary.failed == 0, summary.failures
        b = breakdown(timeline, wall0, wall1)
        print(
            f"    {n_workers} worker(s): start-up {b['startup']:.2f} s, tail {b['tail']:.2f} s, idle between "
            f"tasks {b['gaps']:.2f} s per worker, straggler {b['straggler']:.2f} s; first task per worker "
            f"{b['first_task']:.2f} s vs {b['other_task']:.2f} s for the others"
        )
        print(
            f"    {n_workers} worker(s): CPU per slide {b['task_cpu'] / summary.total:.2f} s in the worker "
            f"(cores per running task {b['task_cpu'] / b['task_wall']:.2f}), "
            f"{client_cpu / summary.total * 1e3:.0f} ms in the client process (driver + scheduler + nannies)"
        )
        from wsi_convnext.outputs.manifest import read_manifest

        busy = sum(r.seconds or 0.0 for r in read_manifest(summary.manifest))
        print(
            f"    {n_workers} worker(s): {times[f'{n_workers}w']:.2f} s for {summary.total} slides "
            f"(tasks in parallel on average: {busy / times[f'{n_workers}w']:.2f})"
        )
    ratio = times["1w"] / times["2w"]
    print(f"    speed-up 2 workers vs 1: {ratio:.2f}x (target >= 1.9x; needs 2 idle cores)")
    return {**times, "ratio": ratio}


def bench_overhead(work: Path, n: int, window: int | None) -> dict[str, float]:
    from wsi_convnext.cohort import noop_stages, open_client, run_cohort
    from wsi_convnext.config import load_config
    from wsi_convnext.inputs import SlideSpec

    slides = [SlideSpec(Path(f"/synthetic/slide-{i:06d}.svs"), f"slide-{i:06d}", 0.5) for i in range(n)]
    overrides = {
        "slides": "/synthetic",
        "out": str(work / "dry"),
        "report": False,
        "embed.model": "convnext_tiny",  # tile → embed: two tasks per slide
        "local.n_workers": 2,
        "local.threads_per_worker": 1,
        "local.gpus": 0,
        "local.dashboard_address": "",
        "max_in_flight": window,
    }
    cfg = load_config(None, overrides)
    rss0 = _peak_rss_mb()
    with open_client(cfg) as info:
        t = time.perf_counter()
        summary = run_cohort(cfg, client=info.client, stages=noop_stages(), slides=slides)
        dt = time.perf_counter() - t
    assert summary.done == n, (summary.done, summary.failed)
    ms = dt / n * 1e3
    peak = _peak_rss_mb()
    print(
        f"(b) dry run of {n} slides × {len(cfg.stages)} no-op stages, window "
        f"{cfg.max_in_flight or 'auto'}: {dt:.1f} s, {ms:.2f} ms per slide (target < 20 ms); "
        f"client peak RSS {peak:.0f} MB (before the run {rss0:.0f} MB; target < 1024 MB)"
    )
    return {"ms_per_slide": ms, "peak_rss_mb": peak}


def _tree_cpu() -> tuple[float, float]:
    import psutil

    me = psutil.Process()

    def cpu(p: Any) -> float:
        t = p.cpu_times()
        return t.user + t.system

    return cpu(me), sum(cpu(k) for k in me.children(recursive=True))


def bench_background(work: Path, seconds: float = 5.0) -> dict[str, float]:
    from distributed import Client, LocalCluster

    from wsi_convnext.cohort import open_client
    from wsi_convnext.config import load_config

    cfg = load_config(None, {"slides": str(work), "out": str(work / "bg"), "local.n_workers": 2,
                             "local.gpus": 0, "local.dashboard_address": ""})  # fmt: skip
    out: dict[str, float] = {}
    for name in ("dask defaults", "run settings"):
        with contextlib.ExitStack() as stack:
            if name == "dask defaults":
                cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None))
                client = stack.enter_context(Client(cluster, set_as_default=False))
            else:
                client = stack.enter_context(open_client(cfg)).client
            client.run(lambda: None)
            time.sleep(1.0)
            c0, w0 = _tree_cpu()
            time.sleep(seconds)
            c1, w1 = _tree_cpu()
        share = (c1 - c0 + w1 - w0) / seconds
        out[name] = share
        print(f"(c) idle 2-worker cluster, {name}: client {c1 - c0:.2f} s + workers {w1 - w0:.2f} s of CPU "
              f"in {seconds:g} s = {100 * share:.1f}% of one core")  # fmt: skip
    return out


def _worker_memory() -> dict[str, Any]:
    # Runs on the worker.
    import resource
    import sys

    import psutil

    return {
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": "torch" in sys.modules,
    }


def _import_torch() -> None:
    import timm  # noqa: F401
    import torch  # noqa: F401


def bench_memory(work: Path, n_slides: int, size: tuple[int, int]) -> dict[str, float]:
    from wsi_convnext.cohort import open_client, run_cohort
    from wsi_convnext.config import load_config

    slides = make_slides(work / "slides", n_slides, size)
    out: dict[str, float] = {}

    def config(name: str, model: str) -> Any:
        return load_config(None, {
            "slides": [str(p) for p in slides], "out": str(work / f"mem-{name}"), "overwrite": True, "report": False,
            "embed.model": model, "embed.device": "cpu", "local.n_workers": 1, "local.gpus": 0,
            "local.dashboard_address": "",
        })  # fmt: skip

    def show(label: str, m: dict[str, Any]) -> None:
        out[label] = m["rss_mb"]
        ratio = m["rss_mb"] / out["idle"] if "idle" in out else 1.0
        print(f"(d) worker {label}: RSS {m['rss_mb']:.0f} MB (peak {m['peak_mb']:.0f} MB, {ratio:.2f}x idle), "
              f"torch imported: {m['torch']}")  # fmt: skip

    cfg = config("tile", "")
    with open_client(cfg) as info:
        (idle,) = info.client.run(_worker_memory).values()
        show("idle", idle)
        summary = run_cohort(cfg, client=info.client)
        assert summary.failed == 0, summary.failures
        (tiled,) = info.client.run(_worker_memory).values()
        show(f"after tiling {summary.total} slides (tile only)", tiled)
        info.client.run(_import_torch)
        (torched,) = info.client.run(_worker_memory).values()
        show("after also importing torch + timm", torched)
    cfg = config("embed", "convnext_atto")
    with open_client(cfg) as info:
        summary = run_cohort(cfg, client=info.client)
        assert summary.failed == 0, summary.failures
        (embedded,) = info.client.run(_worker_memory).values()
        show(f"after tile → embed of {summary.total} slides (convnext_atto, fresh worker)", embedded)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("scaleout", "overhead", "background", "memory"))
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--n-slides", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    parser.add_argument("--n-dry", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=None, help="max_in_flight for the dry run (default: auto)")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="wsi-cohort-bench-") as tmp:
        work = args.work or Path(tmp)
        if args.only in (None, "overhead"):
            bench_overhead(work, args.n_dry, args.window)
        if args.only in (None, "background"):
            bench_background(work)
        if args.only in (None, "scaleout"):
            bench_scaleout(work, args.n_slides, tuple(args.size))
        if args.only in (None, "memory"):
            bench_memory(work, min(args.n_slides, 2), tuple(args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
