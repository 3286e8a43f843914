"""The cluster registry: dashboard binding (real LocalCluster), one-line errors for bad cluster options.

Issue 12, items 5 and 6: the dashboard listens on 127.0.0.1 unless the config opens it,
the address printed is the one bound; an unreachable scheduler, a bad memory limit and a
bad worker count are one-line usage errors of ``wsi-convnext run``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from wsi_convnext.cli import app
from wsi_convnext.cohort import DEFAULT_DASHBOARD, cluster_kinds, open_client, slurm_cluster_kwargs
from wsi_convnext.config import load_config

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _listening(port: int) -> set[str]:
    """IP addresses this process listens on at TCP ``port``."""
    import psutil

    conns = psutil.Process().net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def _local(tmp_path: Path, **overrides: Any) -> Any:
    return load_config(None, {"slides": str(tmp_path), "out": str(tmp_path / "out"), "local.n_workers": 1,
                              "local.gpus": 0, **overrides})  # fmt: skip


def test_registered_kinds() -> None:
    assert set(cluster_kinds()) >= {"local", "scheduler", "slurm"}


def test_dashboard_listens_on_localhost_by_default(tmp_path: Path) -> None:
    with open_client(_local(tmp_path)) as info:
        url = urlparse(info.dashboard or "")
        assert url.scheme == "http" and url.hostname == "127.0.0.1"  # what is printed ...
        assert _listening(int(url.port or 0)) == {"127.0.0.1"}  # ... is what is bound
        assert DEFAULT_DASHBOARD.startswith("127.0.0.1:")
        # The run's workers skip Dask's 10-ms stack sampling (see benchmarks/cohort.py (c)).
        assert set(info.client.run(_worker_profiling).values()) == {False}


def _worker_profiling() -> bool:
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled"))


def test_explicit_dashboard_address_opens_it_and_reports_the_host(tmp_path: Path) -> None:
    with open_client(_local(tmp_path, **{"local.dashboard_address": "0.0.0.0:0"})) as info:
        url = urlparse(info.dashboard or "")
        assert _listening(int(url.port or 0)) == {"0.0.0.0"}
        assert url.hostname == socket.gethostname()  # reachable name, not a misleading 127.0.0.1


def test_an_empty_dashboard_address_serves_no_dashboard(tmp_path: Path) -> None:
    # In a fresh process, as `wsi-convnext run` is: Dask keeps the dashboard's routes once any
    # scheduler of the process has served them (the tests above did).
    code = f"""
import urllib.error, urllib.request
from wsi_convnext.config import load_config
from wsi_convnext.cohort.clusters import open_client
cfg = load_config(None, {{"slides": {str(tmp_path)!r}, "out": {str(tmp_path / "out")!r}, "local.n_workers": 1,
                          "local.gpus": 0, "local.dashboard_address": ""}})
with open_client(cfg) as info:
    port = info.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.services["dashboard"].port)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{{port}}/status", timeout=5)
        status = 200
    except urllib.error.HTTPError as exc:
        status = exc.code
    print(info.dashboard, port, status)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    dashboard, port, status = r.stdout.split()[-3:]
    assert dashboard == "None" and int(port) != 8787 and status == "404"  # health/metrics only, on a free port


def test_slurm_scheduler_dashboard_is_local_unless_configured() -> None:
    cfg = load_config(REPO / "pipelines" / "slurm-gpu.toml")
    assert slurm_cluster_kwargs(cfg)["scheduler_options"] == {"dashboard_address": "127.0.0.1:8787"}
    cfg = cfg.with_section("slurm", dashboard_address=":8787")
    assert slurm_cluster_kwargs(cfg)["scheduler_options"] == {"dashboard_address": ":8787"}
    cfg = cfg.with_section("slurm", dashboard_address="")
    assert slurm_cluster_kwargs(cfg)["scheduler_options"] == {"dashboard_address": "127.0.0.1:0", "dashboard": False}


def test_pipelines_do_not_open_the_dashboard() -> None:
    for toml in (REPO / "pipelines").glob("*.toml"):
        cfg = load_config(toml)
        assert cfg.local.dashboard_address in (None, "", "127.0.0.1:8787"), toml.name


# --- one-line errors through `wsi-convnext run` --------------------------------------------


def _one_line_usage_error(result: Any) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert "Traceback" not in result.output
    return err


@pytest.fixture
def slide_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.svs").write_bytes(b"")  # discovered, never opened in these tests
    return folder


def test_unreachable_scheduler_is_one_line_and_quick(tmp_path: Path, slide_folder: Path) -> None:
    exe = Path(sys.executable).parent / "wsi-convnext"
    t0 = time.monotonic()
    res = subprocess.run(
        [str(exe), "run", "--slides", str(slide_folder), "--out", str(tmp_path / "out"),
         "--scheduler", "tcp://127.0.0.1:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err, err
    assert seconds < 20  # was a 91-line traceback after 30 s
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_bad_memory_limit_is_one_config_line(tmp_path: Path, slide_folder: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(f'slides = ["{slide_folder}"]\nout = "{tmp_path / "out"}"\n[local]\nmemory_limit = "lots"\n')
    err = _one_line_usage_error(runner.invoke(app, ["run", str(toml)]))
    assert "memory_limit" in err and "lots" in err and str(toml) in err


@pytest.mark.parametrize("workers", ["-3", "0"])
def test_bad_worker_count_is_a_usage_error(tmp_path: Path, slide_folder: Path, workers: str) -> None:
    run = runner.invoke(app, ["run", "--slides", str(slide_folder), "--out", str(tmp_path / "o"), "--workers", workers])
    assert "n_workers" in _one_line_usage_error(run)
    tile = runner.invoke(app, ["tile", str(slide_folder), "--out", str(tmp_path / "t"), "--workers", workers])
    assert "--workers must be at least 1" in _one_line_usage_error(tile)
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists()


# --- no hangs on a misconfigured cluster (issue 20) -------------------------------------------


@pytest.fixture
def http_server() -> Any:
    """A real HTTP server on 127.0.0.1 (like a Dask dashboard's port): it listens but is no scheduler."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_scheduler_address_that_is_no_scheduler_fails_in_one_line(tmp_path: Path, slide_folder: Path, http_server: str) -> None:
    exe = Path(sys.executable).parent / "wsi-convnext"
    t0 = time.monotonic()
    res = subprocess.run(
        [str(exe), "run", "--slides", str(slide_folder), "--out", str(tmp_path / "out"), "--scheduler", http_server],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    err = res.stderr.strip()
    assert res.returncode == 2 and err.count("\n") == 0, res.stderr
    assert f"{http_server} does not answer as a Dask scheduler" in err and "Traceback" not in res.stderr
    assert seconds < 25  # the client's own 30 s timeout was never reached: it hung
    assert not (tmp_path / "out").exists()


def test_a_real_scheduler_passes_the_check(tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        cfg = load_config(None, {"slides": str(tmp_path), "out": str(tmp_path / "out"), "scheduler": cluster.scheduler_address})
        with open_client(cfg) as info:
            assert info.client.submit(sum, [1, 2]).result() == 3 and info.threads == 1


def test_slurm_without_its_commands_fails_in_one_line(tmp_path: Path, slide_folder: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    toml = tmp_path / "run.toml"
    toml.write_text(f'slides = ["{slide_folder}"]\nout = "{tmp_path / "out"}"\ncluster = "slurm"\n')
    empty = tmp_path / "bin"
    empty.mkdir()  # a PATH without sbatch/squeue
    exe = Path(sys.executable).parent / "wsi-convnext"
    res = subprocess.run([str(exe), "run", str(toml)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": str(empty)})  # fmt: skip
    err = res.stderr.strip()
    assert res.returncode == 2 and err.count("\n") == 0, res.stderr
    assert "sbatch" in err and "squeue" in err and "not on PATH" in err and "Traceback" not in res.stderr


def test_a_kind_unregistered_after_the_config_was_checked_is_one_line(tmp_path: Path) -> None:
    """open_client looks the kind up in the registry: an unknown one is a ConfigError naming the choices."""
    from wsi_convnext.errors import ConfigError

    cfg = _local(tmp_path)
    cfg.cluster = "gone"  # as if its module had unregistered it since load_config
    with pytest.raises(ConfigError, match=r"'gone'.*local") as info:
        with open_client(cfg):
            pass
    assert "\n" not in str(info.value)
