"""Cohort runs on a real Dask LocalCluster: failure isolation, dead workers, resume after SIGKILL.

One module-wide cluster (2 single-threaded worker processes, one advertising a ``GPU``
resource like the GPU workers the CLI starts) runs every in-process test; the SIGKILL test
runs ``wsi-convnext run`` in its own process group with the default cluster.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cohort_faults import faulty_stages, install_on_workers
from wsi_convnext.cohort import (
    CohortProgress,
    local_cluster_kwargs,
    noop_stages,
    open_client,
    run_cohort,
    select_shard,
    shard_of,
    slurm_cluster_kwargs,
    stage_plan,
)
from wsi_convnext.config import RunConfig, load_config
from wsi_convnext.inputs import SlideSpec
from wsi_convnext.outputs.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent
CRASH_ONCE, CRASH_ALWAYS, CRASH_EMBED = "crash-once", "crash-always", "crash-embed"


# --- slides --------------------------------------------------------------------------------


def write_tiff(path: Path, *, w: int = 1000, h: int = 800, mpp: float | None = 0.5, seed: int = 0,
               blank: bool = False) -> Path:  # fmt: skip
    """A small pyramidal JPEG TIFF (levels 1, 1/4) with an H&E-pink blob; mpp in CENTIMETER tags."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w, 3), 242, np.uint8)
    if not blank:
        cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
        inside = ((xx - cx) / (0.36 * w)) ** 2 + ((yy - cy) / (0.36 * h)) ** 2 < 1
        tissue = np.clip(np.array([215, 130, 185], np.float32) + rng.normal(0, 18, (h, w, 1)), 0, 255)
        img[inside] = tissue.astype(np.uint8)[inside]
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate((1, 4)):
            res = {"resolution": (1e4 / mpp / ds,) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tw.write(img[::ds, ::ds], tile=(128, 128), compression="jpeg", photometric="rgb",
                     subfiletype=1 if i else 0, **res)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> dict[str, Any]:
    """Slides: 3 good generated + the real CMU slide; broken: no mpp, blank, truncated, 2 real broken."""
    root = tmp_path_factory.mktemp("cohort")
    good = root / "good"
    good.mkdir()
    for i in range(3):
        write_tiff(good / f"gen{i}.tiff", seed=i, w=1000 + 200 * i)
    broken = root / "broken"
    broken.mkdir()
    write_tiff(broken / "nompp.tiff", mpp=None, seed=5)
    write_tiff(broken / "blank.tiff", blank=True, seed=6)
    data = (good / "gen0.tiff").read_bytes()
    (broken / "trunc.tiff").write_bytes(data[: len(data) // 2])
    crash = root / "crash"
    crash.mkdir()
    for i, name in enumerate((CRASH_ONCE, CRASH_ALWAYS)):
        write_tiff(crash / f"{name}.tiff", seed=10 + i, w=600, h=500)
    (root / "crash-embed").mkdir()
    write_tiff(root / "crash-embed" / f"{CRASH_EMBED}.tiff", seed=12, w=600, h=500)
    weights = root / "atto.safetensors"
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("convnext_atto", num_classes=0).state_dict(), str(weights))
    real = [slides_dir / "CMU-1-Small-Region.svs", slides_dir / "openslide-unreadable.svs",
            slides_dir / "openslide-unopenable.tiff"]  # fmt: skip
    return {"root": root, "good": good, "broken": broken, "crash": crash, "weights": weights, "real": real}


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("markers") / "crash-once.marker"


@pytest.fixture(scope="module")
def faults(crash_marker: Path) -> dict[str, Any]:
    """Stage overrides that crash the workers running the crash-* slides (test-only plugin)."""
    spec = f"tile:{CRASH_ONCE}:exit-once={crash_marker};tile:{CRASH_ALWAYS}:exit;embed:{CRASH_EMBED}:exit-after=8"
    return faulty_stages(spec)


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    """2 worker processes × 1 thread: "0" (CPU) and "gpu-0" (advertises GPU=1, as the CLI's GPU workers)."""
    import dask
    from distributed import Client, LocalCluster

    from wsi_convnext.cohort.clusters import _add_gpu_workers

    # As open_client sets them for the clusters it starts.
    settings = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.scheduler.worker-saturation": 1.0,
        "distributed.scheduler.no-workers-timeout": "120s",
        "distributed.deploy.lost-worker-timeout": "30 days",
    }
    with dask.config.set(settings):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
        _add_gpu_workers(cluster, 1)
        c = Client(cluster, set_as_default=False)
        c.wait_for_workers(2, timeout=120)
        install_on_workers(c)  # the fault wrappers unpickle on the workers (also after restarts)
        yield c
        c.close()
        cluster.close()


@pytest.fixture
def client(cluster_client: Any) -> Any:
    """The module's client, once both workers are up again (earlier tests kill workers)."""
    cluster_client.wait_for_workers(2, timeout=180)
    return cluster_client


def _config(cohort: dict[str, Any], out: Path, slides: list[Any], **overrides: Any) -> RunConfig:
    base = {
        "slides": [str(s) for s in slides],
        "out": str(out),
        "tile.mpp": 1.0,
        "tile.tile_size": 96,
        "embed.model": "convnext_atto",
        "embed.weights": str(cohort["weights"]),
        "embed.batch_size": 16,
        "embed.num_workers": 0,
        "max_in_flight": 4,
    }
    base.update(overrides)
    return load_config(None, base)


def _statuses(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r.slide_id, r.stage): (r.status, r.error_type) for r in read_manifest(path)}


# --- a mixed cohort through the real stages ------------------------------------------------


@pytest.fixture(scope="module")
def reference(cohort: dict[str, Any], cluster_client: Any) -> dict[str, Any]:
    client = cluster_client
    out = cohort["root"] / "ref-out"
    cfg = _config(cohort, out, [cohort["good"], cohort["broken"], *cohort["real"]])
    events: list[CohortProgress] = []
    summary = run_cohort(cfg, client=client, progress=events.append)
    return {"out": out, "config": cfg, "summary": summary, "events": events}


@pytest.mark.slow
def test_mixed_cohort_counts_and_errors(reference: dict[str, Any]) -> None:
    s, out = reference["summary"], reference["out"]
    assert (s.total, s.done, s.failed, s.skipped) == (9, 4, 5, 0)
    assert s.exit_code == 1 and not s.ok
    st = _statuses(out / "manifest.csv")
    for sid in ("gen0", "gen1", "gen2", "CMU-1-Small-Region"):
        assert st[(sid, "tile")] == ("done", "") and st[(sid, "embed")] == ("done", "")
    expected = {
        "nompp": "MppError",
        "blank": "NoTissueError",
        "trunc": "SlideOpenError",
        "openslide-unreadable": "SlideReadError",  # opens, fails decoding: never "no tissue"
        "openslide-unopenable": "SlideOpenError",
    }
    for sid, err in expected.items():
        assert st[(sid, "tile")] == ("failed", err)
        assert (sid, "embed") not in st  # a failed slide's later stages never run
    assert {(f.slide_id, f.error_type) for f in s.failures} == set(expected.items())
    rows = {(r.slide_id, r.stage): r for r in read_manifest(out / "manifest.csv")}
    cmu = rows[("CMU-1-Small-Region", "tile")]
    assert cmu.tiles and cmu.tiles > 10 and cmu.slide_mpp == pytest.approx(0.499, abs=1e-3)
    assert all("\n" not in r.error for r in rows.values())
    # Embedding asked for the GPU resource: it ran on the GPU worker only.
    assert {r.worker.split("/")[-1] for (sid, stage), r in rows.items() if stage == "embed"} == {"gpu-0"}
    from wsi_convnext.store import open_store

    store = open_store(out / "CMU-1-Small-Region.zarr")
    assert store.features().shape == (cmu.tiles, 320)


@pytest.mark.slow
def test_progress_events_and_report(reference: dict[str, Any]) -> None:
    events = reference["events"]
    assert events[0].event == "start" and events[-1].event == "end"
    slide_events = [e for e in events if e.event == "slide"]
    assert len(slide_events) == 9
    assert [e.finished for e in slide_events] == list(range(1, 10))
    assert slide_events[-1].done == 4 and slide_events[-1].failed == 5 and slide_events[-1].running == 0
    assert all(0 <= e.running <= 4 for e in slide_events)  # the sliding window bounds slides in flight
    assert Counter(e.status for e in slide_events) == {"done": 4, "failed": 5}

    from html.parser import HTMLParser

    report = reference["summary"].report
    assert report == reference["out"] / "report.html"
    imgs: list[str] = []

    class P(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                imgs.append(str(dict(attrs)["src"]))

    text = report.read_text()
    P().feed(text)
    assert len(imgs) >= 4  # one QC thumbnail per tiled slide
    assert all(i.startswith("data:image/png;base64,") for i in imgs)
    for sid in ("gen0", "CMU-1-Small-Region", "nompp", "openslide-unreadable"):
        assert sid in text


@pytest.mark.slow
def test_rerun_skips_finished_work(reference: dict[str, Any], client: Any) -> None:
    out = reference["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.zarr")}
    summary = run_cohort(reference["config"], client=client)
    assert (summary.done, summary.failed, summary.skipped) == (4, 5, 4)
    st = _statuses(out / "manifest.csv")
    assert st[("gen1", "tile")][0] == "skipped" and st[("gen1", "embed")][0] == "skipped"
    assert st[("nompp", "tile")] == ("failed", "MppError")  # unfinished work is redone (and fails again)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.zarr")} == before


# --- dead workers --------------------------------------------------------------------------


@pytest.mark.slow
def test_dead_worker_is_retried_then_recorded(cohort: dict[str, Any], client: Any, crash_marker: Path,
                                              faults: dict[str, Any]) -> None:  # fmt: skip
    """A worker that dies once: retried, succeeds. One that always dies: KilledWorker after
    1 + retries (1) attempts; the other slides complete, whatever was queued on the dead workers."""
    out = cohort["root"] / "crash-out"
    slides = [cohort["crash"], *sorted(cohort["good"].glob("*.tiff"))]
    cfg = _config(cohort, out, slides, **{"embed.model": None, "max_in_flight": 5, "retries": 1})
    summary = run_cohort(cfg, client=client, stages=faults)
    st = _statuses(out / "manifest.csv")
    assert st[(CRASH_ONCE, "tile")] == ("done", "")
    assert crash_marker.exists()  # it did die once
    assert st[(CRASH_ALWAYS, "tile")] == ("failed", "KilledWorker")
    for sid in ("gen0", "gen1", "gen2"):
        assert st[(sid, "tile")] == ("done", "")
    assert (summary.done, summary.failed) == (4, 1)
    assert summary.retried == 2  # crash-once once, crash-always once (then it failed)
    assert (out / f"{CRASH_ONCE}.zarr").is_dir() and not (out / f"{CRASH_ALWAYS}.zarr").exists()


@pytest.mark.slow
def test_only_the_running_task_is_blamed(cohort: dict[str, Any], client: Any, faults: dict[str, Any]) -> None:
    """Embedding tasks queue on the GPU worker; when it dies running one of them (retries = 0:
    that slide fails at once), the embeddings queued behind it are resubmitted and succeed."""
    out = cohort["root"] / "blame-out"
    slides = [cohort["root"] / "crash-embed", *sorted(cohort["good"].glob("*.tiff"))]
    cfg = _config(cohort, out, slides, **{"retries": 0, "max_in_flight": 4})
    summary = run_cohort(cfg, client=client, stages=faults)
    st = _statuses(out / "manifest.csv")
    assert st[(CRASH_EMBED, "tile")] == ("done", "") and st[(CRASH_EMBED, "embed")] == ("failed", "KilledWorker")
    for sid in ("gen0", "gen1", "gen2"):
        assert st[(sid, "embed")] == ("done", "")
    assert (summary.done, summary.failed) == (3, 1)
    assert summary.retried == 0 and summary.requeued >= 1  # the queued embeddings were resubmitted, not blamed


# --- injected stages: prediction, shards ---------------------------------------------------


def _mil_model(model_dir: Path, store: Path) -> Path:
    """An untrained (randomly initialised) ABMIL model for the stores' feature set."""
    from wsi_convnext.mil.checkpoint import save_model
    from wsi_convnext.mil.model import FeatureStats, TrainedModel, new_model
    from wsi_convnext.store import open_store

    (key,) = open_store(store).feature_keys
    dim = open_store(store).features(key).shape[1]
    stats = FeatureStats(np.zeros(dim, np.float32), np.ones(dim, np.float32))
    module, kwargs = new_model("abmil", dim, 2, stats, {})
    model = TrainedModel(module, ("normal", "tumor"), "abmil", kwargs, feature_key=key, positive_class="tumor")
    return save_model(model_dir, model, name="mil-test")


@pytest.mark.slow
def test_predict_stage_feeds_predictions_and_report(reference: dict[str, Any], client: Any) -> None:
    model_dir = _mil_model(reference["out"].parent / "mil-model", reference["out"] / "gen0.zarr")
    ref = reference["config"]
    cfg = replace(ref, slides=[ref.slides[0]], predict=replace(ref.predict, model_dir=model_dir))  # good slides
    summary = run_cohort(cfg, client=client)
    assert summary.ok and summary.stages == ("tile", "embed", "predict")
    assert set(summary.predictions) == {"gen0", "gen1", "gen2"}
    pred = summary.predictions["gen1"]
    assert pred["label"] in ("normal", "tumor") and sum(pred["probabilities"].values()) == pytest.approx(1.0)
    with (reference["out"] / "predictions.csv").open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"gen0", "gen1", "gen2"}
    assert float(rows["gen1"]["prob_tumor"]) == pytest.approx(pred["probabilities"]["tumor"], abs=1e-6)
    assert rows["gen1"]["predicted"] == pred["label"] and "label" not in rows["gen1"]  # one dialect (issue 8)
    assert (reference["out"] / "heatmaps" / "gen1.heatmap.png").is_file()
    from wsi_convnext.store import open_store

    assert "mil-test" in open_store(reference["out"] / "gen1.zarr").score_keys  # tile scores written
    text = summary.report.read_text()
    assert 'alt="heatmap gen1"' in text and f"predicted <b>{pred['label']}</b>" in text


def test_shards_partition_the_cohort() -> None:
    ids = [f"TCGA-{i:05d}-{'x' * (i % 7)}" for i in range(5000)]
    for n in (1, 2, 3, 16):
        shards = [set(s.slide_id for s in select_shard([SlideSpec(Path(i), i) for i in ids], k, n)) for k in range(n)]
        assert sum(len(s) for s in shards) == len(ids)  # disjoint ...
        assert set().union(*shards) == set(ids)  # ... and covering
        assert min(len(s) for s in shards) > len(ids) / n * 0.85  # roughly balanced
    # Stable across processes (no PYTHONHASHSEED dependence), machines and releases.
    out = subprocess.run(
        [sys.executable, "-c", "from wsi_convnext.cohort import shard_of; print([shard_of(s, 7) for s in ('a', 'slide-1', 'TCGA-AB-1234')])"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"},
    )  # fmt: skip
    assert out.stdout.strip() == str([shard_of(s, 7) for s in ("a", "slide-1", "TCGA-AB-1234")])
    assert shard_of("TCGA-AB-1234", 1_000_003) == 165_283  # pinned: never changes between releases


def test_sharded_run_writes_its_own_manifest(tmp_path: Path, client: Any) -> None:
    slides = [SlideSpec(Path(f"/nowhere/s{i}.svs"), f"s{i}") for i in range(40)]
    seen: set[str] = set()
    for k in range(3):
        cfg = load_config(None, {"slides": "/nowhere", "out": str(tmp_path), "shard": f"{k}/3", "report": False})
        summary = run_cohort(cfg, client=client, stages=noop_stages(), slides=slides)
        rows = read_manifest(tmp_path / f"manifest-shard-{k}-of-3.csv")
        ids = {r.slide_id for r in rows}
        assert summary.total == len(ids) and summary.done == len(ids)
        assert not ids & seen
        seen |= ids
    assert seen == {s.slide_id for s in slides}
    assert not (tmp_path / "manifest.csv").exists()
    # A shard that draws no slide still leaves the manifest it names (header only).
    cfg = load_config(None, {"slides": "/nowhere", "out": str(tmp_path / "empty"), "shard": "0/3", "report": False})
    summary = run_cohort(cfg, client=client, stages=noop_stages(), slides=[])
    assert summary.total == 0 and summary.manifest.is_file() and read_manifest(summary.manifest) == []
    from wsi_convnext.outputs.report import write_report

    assert write_report(tmp_path).read_text().count('<tr id="slide-') == 40  # the report merges the shards


# --- cluster configuration -----------------------------------------------------------------


def test_local_cluster_sizing() -> None:
    cfg = load_config(None, {"slides": "a", "out": "o"})
    kwargs, gpus = local_cluster_kwargs(cfg, cpus=16, memory=64 * 2**30, gpus=2)
    assert gpus == 2 and kwargs["n_workers"] == 14 and kwargs["threads_per_worker"] == 1
    assert kwargs["processes"] is True and kwargs["memory_limit"] == 4 * 2**30
    kwargs, gpus = local_cluster_kwargs(cfg, cpus=64, memory=16 * 2**30, gpus=0)
    assert kwargs["n_workers"] == 8  # at most one worker per 2 GiB
    cfg = load_config(None, {"slides": "a", "out": "o", "local.n_workers": 3, "local.gpus": 0,
                             "local.memory_limit": "5GiB", "local.dashboard_address": ""})  # fmt: skip
    kwargs, gpus = local_cluster_kwargs(cfg, cpus=16, memory=64 * 2**30, gpus=4)
    assert (kwargs["n_workers"], gpus, kwargs["memory_limit"], kwargs["dashboard_address"]) == (3, 0, "5GiB", "127.0.0.1:0")
    assert kwargs["scheduler_kwargs"] == {"dashboard": False}  # '' = no dashboard, health/metrics on a free local port


def test_slurm_job_script(tmp_path: Path) -> None:
    cfg = load_config(REPO / "pipelines" / "slurm-gpu.toml")
    cfg = cfg.with_section("slurm", log_directory=str(tmp_path / "logs"), job_extra_directives=["--constraint=a100"])
    kwargs = slurm_cluster_kwargs(cfg)
    assert "--gres=gpu:1" in kwargs["job_extra_directives"]
    assert kwargs["worker_extra_args"] == ["--resources", "GPU=1"]
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    kwargs["scheduler_options"] = {"dashboard_address": ":0"}
    with SLURMCluster(**kwargs) as cluster:  # builds the job script; submits nothing
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A mylab", "#SBATCH --cpus-per-task=8", "#SBATCH -t 08:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --constraint=a100", "#SBATCH -J wsi-convnext", "module load cuda",
                 "--resources GPU=1"):  # fmt: skip
        assert line in script, line
    assert "--nthreads 8" in script


def test_missing_dask_jobqueue_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_convnext.cohort import open_client
    from wsi_convnext.errors import ConfigError

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    cfg = load_config(None, {"slides": "a", "out": "o", "cluster": "slurm"})
    with pytest.raises(ConfigError, match=r"wsi-convnext\[slurm\]"):
        with open_client(cfg):
            pass


# --- resume after SIGKILL ------------------------------------------------------------------


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run to get going")


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(reference: dict[str, Any], cohort: dict[str, Any], client: Any,
                                                   tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "out"
    good = [cohort["good"], cohort["real"][0]]
    config = tmp_path / "run.toml"
    config.write_text(
        f"slides = {[str(s) for s in good]!r}\nout = {str(out)!r}\nmax_in_flight = 4\n"
        "[tile]\nmpp = 1.0\ntile_size = 96\n"
        f"[embed]\nmodel = 'convnext_atto'\nweights = {str(cohort['weights'])!r}\nbatch_size = 16\nnum_workers = 0\n"
        "[local]\nn_workers = 2\n".replace("'", '"')
    )
    log = tmp_path / "run.log"
    with log.open("wb") as fh:
        # `wsi-convnext run` with a test-only stage override: gen2's embedding never finishes.
        script = str(Path(__file__).with_name("cohort_faults.py"))
        proc = subprocess.Popen([sys.executable, script, "embed:gen2:sleep=600", "run", str(config)], cwd=tmp_path,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            manifest = out / "manifest.csv"

            def progressed() -> bool:
                st = _statuses(manifest) if manifest.exists() else {}
                finished = sum(1 for (sid, stage), (s, _) in st.items() if stage == "embed" and s == "done")
                return finished >= 1 and st.get(("gen2", "tile"), ("",))[0] == "done"

            _wait_for(progressed, 240, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the client, scheduler, nannies and workers
            proc.wait(30)
    text = log.read_text()
    assert "Dask dashboard: http" in text  # reported at start
    st = _statuses(out / "manifest.csv")
    assert st[("gen2", "embed")][0] == "running"  # interrupted work is visible
    unfinished = [k for k, (s, _) in st.items() if s == "running"]
    assert unfinished

    cfg = load_config(config, {"out": str(out), "slides": [str(s) for s in good]})
    summary = run_cohort(cfg, client=client)
    assert summary.ok and summary.done == 4
    st = _statuses(out / "manifest.csv")
    assert all(s in ("done", "skipped") for s, _ in st.values())
    assert st[("gen2", "embed")][0] == "done"

    from wsi_convnext.store import open_store

    ref_out = reference["out"]
    for sid in ("gen0", "gen1", "gen2", "CMU-1-Small-Region"):
        a, b = open_store(out / f"{sid}.zarr"), open_store(ref_out / f"{sid}.zarr")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.features(), b.features())
    assert not list(out.glob(".*partial*"))  # no leftovers of the killed run


def test_a_tile_only_worker_never_imports_torch(tmp_path: Path, cmu_slide: Path) -> None:
    """Issue 20: tiling needs no torch; a worker that only tiles stays small (see benchmarks/cohort.py --only memory)."""
    cfg = load_config(None, {"slides": str(cmu_slide), "out": str(tmp_path / "out"), "embed.model": "", "report": False,
                             "local.n_workers": 1, "local.gpus": 0, "local.dashboard_address": ""})  # fmt: skip
    assert [s.name for s in stage_plan(cfg)] == ["tile"]

    def heavy() -> list[str]:
        import sys

        return sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)

    with open_client(cfg) as info:
        summary = run_cohort(cfg, client=info.client)
        assert (summary.total, summary.ran, summary.failed) == (1, 1, 0)
        assert list(info.client.run(heavy).values()) == [[]]
