"""No orphans (issue 12, item 7): killing `tile` or `run` with SIGKILL leaves no child process alive.

`tile` cuts large slides (at least ``tiler.PROCESS_MIN_TILES`` tiles) in worker processes;
they die with their parent (``PR_SET_PDEATHSIG`` plus a parent-pid watchdog), and then the
multiprocessing ``resource_tracker`` sees its pipe close and exits too. `run`'s Dask worker
processes exit when the client process that started them dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).parent / "wsi-convnext")


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 6000×6000 px slide at 0.5 µm/px: thousands of 64-px tiles (> PROCESS_MIN_TILES)."""
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = tmp_path_factory.mktemp("orphans") / "big.svs"
    write_synthetic_slide(path, SyntheticSlideSpec(width=6000, height=6000, mpp=0.5, seed=3, downsamples=(1, 4, 16)))
    return path


def _descendants_once(proc: subprocess.Popen[bytes], want: int, timeout: float) -> list[psutil.Process]:
    """Wait until ``proc`` has at least ``want`` descendant processes; return them."""
    parent = psutil.Process(proc.pid)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before its children were seen")
        try:
            kids = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        if len(kids) >= want:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"fewer than {want} child processes within {timeout} s")


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_and_check(proc: subprocess.Popen[bytes], kids: list[psutil.Process], within: float) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: children are not signalled
    proc.wait(10)
    t0 = time.monotonic()
    while _alive(kids) and time.monotonic() - t0 < within:
        time.sleep(0.1)
    left = _alive(kids)
    for p in kids:  # do not leak them into the rest of the suite if the test fails
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"orphans after SIGKILL of the parent: {left}"


def test_sigkill_of_tile_leaves_no_workers(big_slide: Path, tmp_path: Path) -> None:
    from wsi_convnext.tiling.tiler import PROCESS_MIN_TILES

    assert (6000 // 64) ** 2 > 4 * PROCESS_MIN_TILES
    cmd = [EXE, "tile", str(big_slide), "--out", str(tmp_path / "out"), "--tile-size", "64", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kids = _descendants_once(proc, 3, 120)  # 2 tiling workers + the resource_tracker
        cmdlines = [" ".join(k.cmdline()) for k in kids]
        assert sum("spawn_main" in c for c in cmdlines) >= 2, cmdlines  # really worker processes
        _kill_and_check(proc, kids, within=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigkill_of_run_leaves_no_cluster_processes(big_slide: Path, tmp_path: Path) -> None:
    cmd = [EXE, "run", "--slides", str(big_slide), "--out", str(tmp_path / "out"), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kids = _descendants_once(proc, 2, 120)  # the Dask worker processes (and a resource_tracker)
        manifest = tmp_path / "out" / "manifest.csv"
        t0 = time.monotonic()
        while not (manifest.exists() and "running" in manifest.read_text()) and time.monotonic() - t0 < 120:
            time.sleep(0.1)  # tiling has started on a worker
        kids = psutil.Process(proc.pid).children(recursive=True)
        _kill_and_check(proc, kids, within=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigkill_of_embed_on_devices_leaves_no_device_processes(tmp_path: Path) -> None:
    """`embed --devices` runs one spawned process per device; they die with it (``_proc.die_with_parent``)."""
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    for seed in (1, 2):
        write_synthetic_slide(slides / f"s{seed}.svs", SyntheticSlideSpec(width=1500, height=1500, mpp=0.5, seed=seed))
    stores = tmp_path / "stores"
    subprocess.run([EXE, "tile", str(slides), "--out", str(stores), "--tile-size", "64"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    cmd = [EXE, "embed", str(stores), "--model", "convnext_atto", "--stem", "patch", "--devices", "cpu,cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kids = _descendants_once(proc, 2, 120)
        t0 = time.monotonic()
        while sum("spawn_main" in " ".join(k.cmdline()) for k in kids) < 2 and time.monotonic() - t0 < 120:
            time.sleep(0.05)
            kids = psutil.Process(proc.pid).children(recursive=True)
        assert sum("spawn_main" in " ".join(k.cmdline()) for k in kids) >= 2, [k.cmdline() for k in kids]
        _kill_and_check(proc, kids, within=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
