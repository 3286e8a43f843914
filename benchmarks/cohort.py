"""Cohort-run benchmarks.

(a) Tiling scale-out: a cohort of 8 generated slides tiled by the real tile stage on a
    LocalCluster with 1 worker, then with 2 workers (single-threaded processes), in the
    same process; prints both wall times and their ratio (target >= 1.7x on >= 2 free cores).
(b) Scheduling overhead: a dry run of 10,000 synthetic slides (no files) through the same
    task graph (run_cohort: sliding window, manifest, tile → embed) with no-op stages;
    prints milliseconds per slide (target < 20 ms) and the client's peak RSS (< 1 GB;
    the client process also hosts the LocalCluster scheduler).

    python benchmarks/cohort.py                 # both
    python benchmarks/cohort.py --only overhead --n-dry 10000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


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


def bench_scaleout(work: Path, n_slides: int, size: tuple[int, int]) -> dict[str, float]:
    from wsi_convnext.cohort import open_client, run_cohort
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
        with open_client(cfg) as info:
            # Warm the workers (imports) so that both runs time tiling, not start-up.
            info.client.run(lambda: __import__("wsi_convnext.tiler"))
            t = time.perf_counter()
            summary = run_cohort(cfg, client=info.client)
            times[f"{n_workers}w"] = time.perf_counter() - t
        assert summary.failed == 0, summary.failures
        from wsi_convnext.outputs.manifest import read_manifest

        busy = sum(r.seconds or 0.0 for r in read_manifest(summary.manifest))
        print(
            f"    {n_workers} worker(s): {times[f'{n_workers}w']:.2f} s for {summary.total} slides "
            f"(tasks in parallel on average: {busy / times[f'{n_workers}w']:.2f})"
        )
    ratio = times["1w"] / times["2w"]
    print(f"    speed-up 2 workers vs 1: {ratio:.2f}x (target >= 1.7x; needs 2 idle cores)")
    return {**times, "ratio": ratio}


def bench_overhead(work: Path, n: int, window: int | None) -> dict[str, float]:
    from wsi_convnext.cohort import NOOP_STAGES, open_client, run_cohort
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
        summary = run_cohort(cfg, client=info.client, stages=NOOP_STAGES, slides=slides)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("scaleout", "overhead"))
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
        if args.only in (None, "scaleout"):
            bench_scaleout(work, args.n_slides, tuple(args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
