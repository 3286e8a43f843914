"""Cohort runs on Dask: tile → embed (→ predict) for every slide of a cohort.

Each slide is a chain of tasks, one per stage (:attr:`RunConfig.stages`). The client
keeps a sliding window of at most ``max_in_flight`` slides on the cluster
(:class:`distributed.as_completed` + :meth:`Client.submit`): when a stage finishes, the
slide's next stage is submitted; when a slide finishes, the next slide starts. A cohort of
30,000 slides therefore never puts more than a few hundred tasks on the scheduler.

* Tiling tasks run on any worker. Embedding tasks ask for one ``GPU`` worker resource
  when the cluster has GPUs (``resources={"GPU": 1}``), so one GPU runs one embedding
  task at a time; later stages get a higher priority so started slides drain first.
* Failure isolation: a stage that raises is recorded as failed (exception class and
  one-line message) and the slide's later stages are not run; other slides go on. A task
  whose worker died while running it (crash, OOM kill) is retried up to ``config.retries``
  times, then recorded as ``KilledWorker``. Only the task that was executing is blamed:
  tasks waiting in the dead worker's queue are resubmitted without using up their
  retries (each task reports its start on the scheduler's event log). Clusters this run
  starts fail tasks on the first worker death (``allowed-failures = 0``) and leave the
  counting to the client; an existing scheduler applies its own ``allowed-failures``
  first.
* Never lose work: stages write atomically and skip finished outputs, so rerunning the
  same command after any interruption (even SIGKILL) skips what is finished and redoes
  the rest; the result equals that of an uninterrupted run.
* Progress: ``OUT/manifest.csv`` (see :mod:`wsi_convnext.outputs.manifest`) is updated as the run
  goes, a ``progress`` callback receives :class:`CohortProgress` events, and the Dask
  dashboard address is logged and reported at start. ``OUT/report.html`` is written at
  the end (:mod:`wsi_convnext.outputs.report`).
* Sites without a Dask cluster run job arrays: ``shard=(i, n)`` processes the slides
  whose stable hash falls into shard ``i`` (:func:`shard_of`).

Stage functions are parameters (:data:`STAGES` holds the real ones, imported lazily on
the workers), so the same task graph runs with injected stages, e.g. :data:`NOOP_STAGES`
to measure scheduling overhead.

From the command line: ``wsi-convnext run CONFIG.toml [--shard I/N]``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_write_text, cpu_count
from .config import RunConfig
from .errors import ConfigError, StoreError
from .errors import one_line
from .outputs.manifest import MAX_ERROR, ManifestRow, RunManifest, manifest_name

if TYPE_CHECKING:
    from distributed import Client

    from .inputs import SlideSpec

logger = logging.getLogger(__name__)

__all__ = [
    "FAULT_ENV",
    "NOOP_STAGES",
    "STAGES",
    "STARTED_TOPIC",
    "CohortProgress",
    "RunSummary",
    "StageFn",
    "StageOutcome",
    "local_cluster_kwargs",
    "embed_stage",
    "open_client",
    "predict_stage",
    "run_cohort",
    "run_stage",
    "select_shard",
    "shard_of",
    "slurm_cluster_kwargs",
    "tile_stage",
    "write_predictions",
]

#: A stage: ``fn(slide, config, state) -> outputs``. ``state`` holds the outputs of the
#: slide's earlier stages (e.g. ``store``); the returned mapping may hold ``tiles`` (int),
#: ``mpp`` (float, level-0 µm/px), ``skipped`` (bool: the output already existed) and any
#: other JSON-able values that later stages (and the report) read. Failure = raising.
StageFn = Callable[["SlideSpec", RunConfig, Mapping[str, Any]], Mapping[str, Any]]

#: Test hook: ``STAGE:SLIDE_ID:MODE[;...]`` makes that stage misbehave on a worker before
#: running. MODE ``exit`` kills the worker process (``os._exit``, after 0.25 s, like a
#: crash partway) every time, ``exit-after=SECONDS`` likewise after SECONDS,
#: ``exit-once=MARKER`` only if the file MARKER does not exist yet (and creates it),
#: ``sleep=SECONDS`` stalls, ``raise`` raises RuntimeError. For tests only.
FAULT_ENV = "WSI_CONVNEXT_FAULT"

#: Scheduler event topic on which each stage task reports that it started executing, so
#: that only the task a dead worker was running is blamed (not the ones queued behind it).
STARTED_TOPIC = "wsi-convnext-started"


# --- stages --------------------------------------------------------------------------------


def _given(obj: Any, *names: str) -> dict[str, Any]:
    """Attributes of ``obj`` that are set (not None): None never overrides a library default."""
    return {n: getattr(obj, n) for n in names if getattr(obj, n) is not None}


def tile_stage(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Tile one slide into ``OUT/<slide_id>.zarr`` (skips a finished store unless ``overwrite``)."""
    from .tiler import tile_slide

    assert config.out is not None
    r = tile_slide(
        slide.path,
        config.out,
        config.tile_params(),
        slide_id=slide.slide_id,
        slide_mpp=slide.mpp,
        overwrite=config.overwrite,
    )
    return {
        "tiles": int(r.n_tiles),
        "mpp": r.slide_mpp,
        "skipped": bool(r.skipped),
        "store": str(r.store_path),
        "qc": str(r.qc_path) if getattr(r, "qc_path", None) else None,
    }


def _encoder_kwargs(config: RunConfig) -> tuple[tuple[str, Any], ...]:
    e = config.embed
    kwargs = _given(e, "stem", "stem_init", "resize", "pretrained")
    if e.weights is not None:
        kwargs["weights"] = str(e.weights)
    return tuple(sorted(kwargs.items()))


@functools.lru_cache(maxsize=2)
def _encoder(model: str, kwargs: tuple[tuple[str, Any], ...]) -> Any:
    # One encoder per worker process and configuration: built (weights read) once, not per slide.
    from .encoders import build_encoder

    return build_encoder(model, **dict(kwargs))


_gpu_lock = threading.Lock()
_gpu_free: queue.Queue[int] | None = None


@contextlib.contextmanager
def _gpu_slot(device: str | None) -> Iterator[str | None]:
    """Pick a free GPU of this worker process for one embedding task.

    A worker that advertises ``GPU=n`` runs up to n embedding tasks at once; each takes
    its own visible device. An explicit device (``cpu``, ``cuda:1``) is used as given.
    """
    global _gpu_free
    if device not in (None, "auto", "cuda") or _worker_gpus() == 0:
        yield device
        return
    import torch

    if not torch.cuda.is_available():
        yield device
        return
    with _gpu_lock:
        if _gpu_free is None:
            _gpu_free = queue.Queue()
            for i in range(torch.cuda.device_count()):
                _gpu_free.put(i)
    index = _gpu_free.get()
    try:
        yield f"cuda:{index}"
    finally:
        _gpu_free.put(index)


def _worker_gpus() -> float:
    try:
        from distributed import get_worker

        return float(get_worker().state.total_resources.get("GPU", 0))
    except (ImportError, ValueError, AttributeError):
        return 0.0


def embed_stage(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Embed the tiles of the slide's store with ``config.embed`` (skips existing features)."""
    from .embed import embed_store

    e = config.embed
    assert e.model is not None
    encoder = _encoder(e.model, _encoder_kwargs(config))
    kwargs = _given(e, "batch_size", "dtype", "num_workers", "amp", "channels_last", "compile")
    with _gpu_slot(e.device) as device:
        if device is not None:
            kwargs["device"] = device
        r = embed_store(state["store"], encoder, overwrite=config.overwrite, **kwargs)
    return {"tiles": int(r.n_tiles), "skipped": bool(r.skipped), "feature_key": r.key}


def predict_stage(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Predict the slide with the MIL model in ``config.predict.model_dir``.

    Writes the model's tile scores into the store and, with ``heatmaps``, draws them as
    ``OUT/heatmaps/<slide_id>.heatmap.png`` (and the top tiles as ``.topk.png``).
    """
    from .mil.api import predict

    p = config.predict
    assert p.model_dir is not None and config.out is not None
    (result,) = predict(p.model_dir, [state["store"]], write_scores=True)
    out: dict[str, Any] = {
        "prediction": {"label": result.predicted, "probabilities": dict(result.probabilities)},
        "tiles": result.n_tiles,
    }
    if p.heatmaps:
        out["heatmap"] = str(_draw_heatmap(Path(state["store"]), Path(p.model_dir), result.predicted, config.out))
    return out


def _draw_heatmap(store_path: Path, model_dir: Path, predicted: str, out_dir: Path) -> Path:
    """Draw the tile scores that :func:`~wsi_convnext.mil.api.predict` wrote for ``model_dir``."""
    import numpy as np

    from .outputs.heatmap import heatmap_title, render_heatmap
    from .store import open_store

    store = open_store(store_path)
    wanted = str(model_dir.resolve())
    names = [n for n in store.score_keys if store.score_attrs(n).get("model_dir") == wanted]
    if not names:
        raise StoreError(f"{store_path}: no tile scores of model {model_dir}; was it predicted?")
    attrs = store.score_attrs(names[0])
    scores = np.asarray(store.scores(names[0]), dtype=np.float32)
    if scores.ndim == 2:  # one column per class: draw the predicted class
        columns = list(attrs.get("columns") or [])
        scores = scores[:, columns.index(predicted) if predicted in columns else 0]
    paths = render_heatmap(store, scores, out_dir / "heatmaps", label=str(attrs.get("score", "score")),
                           title=heatmap_title(store.slide_id, attrs))  # fmt: skip
    return paths.heatmap


def _noop_stage(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    return {"tiles": 0, "skipped": False}


#: The real stages (lazy imports happen on the workers).
STAGES: dict[str, StageFn] = {"tile": tile_stage, "embed": embed_stage, "predict": predict_stage}
#: Stages that do nothing: measures the task graph's own overhead (dry runs, benchmarks).
NOOP_STAGES: dict[str, StageFn] = {"tile": _noop_stage, "embed": _noop_stage, "predict": _noop_stage}


# --- the task run on a worker --------------------------------------------------------------


@dataclass(frozen=True)
class StageOutcome:
    """What a stage task returns to the client (picklable, small).

    Attributes:
        status: ``done``, ``skipped`` or ``failed``.
        data: The stage's outputs, merged into the state that later stages receive.
    """

    slide_id: str
    stage: str
    status: str
    error_type: str = ""
    error: str = ""
    tiles: int | None = None
    mpp: float | None = None
    seconds: float = 0.0
    worker: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, slide_id: str, stage: str, exc: BaseException, seconds: float, worker: str) -> StageOutcome:
        """The outcome of a stage that raised ``exc`` or never returned."""
        return cls(
            slide_id, stage, "failed", error_type=type(exc).__name__,
            error=one_line(str(exc) or repr(exc), MAX_ERROR), seconds=seconds, worker=worker,
        )  # fmt: skip


def _worker_name() -> str:
    host = socket.gethostname().split(".")[0]
    try:
        from distributed import get_worker

        return f"{host}/{get_worker().name}"
    except (ImportError, ValueError):
        return f"{host}/pid{os.getpid()}"


def _fault(stage: str, slide_id: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(";"):
        parts = item.split(":", 2)
        if len(parts) != 3 or parts[0] != stage or parts[1] != slide_id:
            continue
        mode = parts[2]
        if mode == "exit" or mode.startswith("exit-after="):
            time.sleep(float(mode.split("=", 1)[1]) if "=" in mode else 0.25)
            os._exit(17)
        elif mode.startswith("exit-once="):
            marker = Path(mode.split("=", 1)[1])
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            time.sleep(0.25)
            os._exit(17)
        elif mode.startswith("sleep="):
            time.sleep(float(mode.split("=", 1)[1]))
        elif mode == "raise":
            raise RuntimeError(f"{FAULT_ENV}: injected failure in {stage} of {slide_id}")


def run_stage(
    stage: str,
    fn: StageFn,
    slide: SlideSpec,
    config: RunConfig,
    state: Mapping[str, Any],
    token: str | None = None,
) -> StageOutcome:
    """Run one stage of one slide and turn any exception into a failed :class:`StageOutcome`.

    This is the Dask task; it never raises (a dying worker surfaces as ``KilledWorker``).
    ``token`` is reported on :data:`STARTED_TOPIC` when the task starts executing.
    """
    t0 = time.perf_counter()
    worker = _worker_name()
    if token is not None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            get_worker().log_event(STARTED_TOPIC, token)
    try:
        _fault(stage, slide.slide_id)
        out = dict(fn(slide, config, state) or {})
    except Exception as exc:  # noqa: BLE001 - failure isolation: record and go on
        from .errors import WsiConvnextError

        if not isinstance(exc, WsiConvnextError):
            logger.warning("%s of %s failed unexpectedly", stage, slide.slide_id, exc_info=True)
        return StageOutcome.failure(slide.slide_id, stage, exc, time.perf_counter() - t0, worker)
    tiles = out.pop("tiles", None)
    mpp = out.pop("mpp", None)
    skipped = bool(out.pop("skipped", False))
    return StageOutcome(
        slide.slide_id,
        stage,
        "skipped" if skipped else "done",
        tiles=None if tiles is None else int(tiles),
        mpp=None if mpp is None else float(mpp),
        seconds=time.perf_counter() - t0,
        worker=worker,
        data=out,
    )


# --- shards --------------------------------------------------------------------------------


def shard_of(slide_id: str, count: int) -> int:
    """The shard (0-based, of ``count``) that ``slide_id`` belongs to.

    A stable hash (BLAKE2b of the UTF-8 slide id, first 8 bytes, big-endian, modulo
    ``count``): it depends on nothing but the slide id, so adding or removing other
    slides never moves a slide to another shard, and it is the same in every process,
    Python version and machine. Shards are disjoint and cover the cohort; their sizes
    are equal up to random fluctuation (about ±√(n/count) slides).
    """
    digest = hashlib.blake2b(slide_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(slides: Sequence[SlideSpec], index: int, count: int) -> list[SlideSpec]:
    """The slides of shard ``index`` (0-based) of ``count``, in input order."""
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    return [s for s in slides if shard_of(s.slide_id, count) == index]


# --- clusters ------------------------------------------------------------------------------


def _memory_bytes() -> int:
    # Respects cgroup limits (SLURM jobs, containers), unlike the machine's total.
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


def _visible_gpus() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_cluster_kwargs(
    config: RunConfig, *, cpus: int | None = None, memory: int | None = None, gpus: int | None = None
) -> tuple[dict[str, Any], int]:
    """Keyword arguments of the embedded :class:`distributed.LocalCluster`, and its GPU worker count.

    Defaults size the cluster to the machine: single-threaded worker processes (tiling
    holds the GIL in places; processes isolate crashes), one per core, at most one per
    2 GiB of memory, minus one per GPU; each GPU gets its own extra worker. Memory is
    split evenly between all workers.

    Args:
        config: The run config (``config.local`` overrides any default).
        cpus, memory, gpus: The machine (default: detected; GPUs only when embedding).
    """
    loc = config.local
    cpus = cpus if cpus is not None else cpu_count()
    memory = memory if memory is not None else _memory_bytes()
    if loc.gpus is not None:
        n_gpus = loc.gpus
    elif gpus is not None:
        n_gpus = gpus
    else:
        wants_gpu = "embed" in config.stages and (config.embed.device or "auto") not in ("cpu",)
        n_gpus = _visible_gpus() if wants_gpu else 0
    tpw = loc.threads_per_worker or 1
    if loc.n_workers is not None:
        n = loc.n_workers
    else:
        n = max(1, min(cpus // tpw - n_gpus, memory // (2 * 1024**3) - n_gpus))
    kwargs: dict[str, Any] = {
        "n_workers": n,
        "threads_per_worker": tpw,
        "processes": True,
        "memory_limit": loc.memory_limit or int(memory // max(1, n + n_gpus)),
        "dashboard_address": ":8787" if loc.dashboard_address is None else (loc.dashboard_address or None),
    }
    return kwargs, n_gpus


def slurm_cluster_kwargs(config: RunConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`dask_jobqueue.SLURMCluster` from ``config.slurm``.

    GPUs become ``--gres=gpu:N`` and the worker resource ``GPU=N / processes`` (rounded
    up to at least 1 per process), which embedding tasks request.
    """
    s = config.slurm
    directives = list(s.job_extra_directives)
    worker_args: list[str] = []
    if s.gpus:
        if not any(d.strip().startswith(("--gres", "--gpus")) for d in directives):
            directives.append(f"--gres=gpu:{s.gpus}")
        per_process = max(1, s.gpus // s.processes)
        worker_args += ["--resources", f"GPU={per_process}"]
    kwargs: dict[str, Any] = {
        "cores": s.cores,
        "memory": s.memory,
        "processes": s.processes,
        "walltime": s.walltime,
        "job_extra_directives": directives,
        "job_script_prologue": list(s.job_script_prologue),
        "worker_extra_args": worker_args,
        "scheduler_options": {"dashboard_address": ":8787"},
        "job_name": "wsi-convnext",
    }
    for key in ("queue", "account", "local_directory", "log_directory", "interface", "python"):
        value = getattr(s, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


@dataclass
class _ClusterInfo:
    client: Client
    gpu: bool  # embedding tasks ask for resources={"GPU": 1}
    threads: int  # worker threads now or at full scale (sizes the window)
    dashboard: str | None


def _dashboard(client: Client) -> str | None:
    try:
        info = client.scheduler_info()
        if "dashboard" not in info.get("services", {}):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - the dashboard is optional
        return None


def _threads(client: Client) -> int:
    workers = client.scheduler_info().get("workers", {})
    return sum(int(w.get("nthreads", 1)) for w in workers.values())


def _has_gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any(float(w.get("resources", {}).get("GPU", 0)) > 0 for w in workers.values())


@contextlib.contextmanager
def open_client(config: RunConfig) -> Iterator[_ClusterInfo]:
    """Connect to, or start, the cluster that ``config.cluster`` names; close what was started.

    ``local``: an embedded LocalCluster (:func:`local_cluster_kwargs`). ``scheduler``: the
    existing scheduler at ``config.scheduler``. ``slurm``: a dask-jobqueue SLURMCluster
    (:func:`slurm_cluster_kwargs`) scaled adaptively between ``minimum_jobs`` and
    ``maximum_jobs`` jobs.

    Raises:
        ConfigError: ``cluster = "slurm"`` without dask-jobqueue installed.
    """
    import dask
    from distributed import Client

    settings = {
        # Clusters this run starts: a worker death fails its tasks at once and the client
        # retries them, blaming only the task that was running (see _retry_killed).
        "distributed.scheduler.allowed-failures": 0,
        # At most one task per worker thread, so a crash takes down few queued tasks.
        "distributed.scheduler.worker-saturation": 1.0,
    }
    if config.cluster == "local":
        # The nannies restart dead workers. Without this, LocalCluster closes a nanny for
        # good when its worker dies twice within 15 s (the check of the first death runs
        # while the worker restarts after the second), e.g. on repeated OOM kills.
        settings["distributed.deploy.lost-worker-timeout"] = "30 days"
        # Fail, rather than wait forever, tasks that no worker can run (e.g. the GPU
        # workers died and could not be restarted).
        settings["distributed.scheduler.no-workers-timeout"] = "10 minutes"
    with dask.config.set(settings), contextlib.ExitStack() as stack:
        if config.cluster == "scheduler":
            client = stack.enter_context(Client(config.scheduler, set_as_default=False))
            threads = max(1, _threads(client))
            gpu = _has_gpu_workers(client)
        elif config.cluster == "slurm":
            try:
                from dask_jobqueue import SLURMCluster
            except ImportError as exc:
                raise ConfigError(
                    "cluster = 'slurm' needs dask-jobqueue: pip install 'wsi-convnext[slurm]'"
                ) from exc
            cluster = stack.enter_context(SLURMCluster(**slurm_cluster_kwargs(config)))
            s = config.slurm
            cluster.adapt(minimum_jobs=s.minimum_jobs, maximum_jobs=s.maximum_jobs)
            logger.info("SLURM job script:\n%s", cluster.job_script())
            client = stack.enter_context(Client(cluster, set_as_default=False))
            threads = s.maximum_jobs * s.cores
            gpu = s.gpus > 0
        else:
            from distributed import LocalCluster

            kwargs, n_gpus = local_cluster_kwargs(config)
            cluster = stack.enter_context(LocalCluster(**kwargs))
            if n_gpus:
                _add_gpu_workers(cluster, n_gpus)
            client = stack.enter_context(Client(cluster, set_as_default=False))
            if n_gpus:
                client.wait_for_workers(kwargs["n_workers"] + n_gpus, timeout=300)
            threads = max(1, _threads(client))
            gpu = n_gpus > 0
        yield _ClusterInfo(client, gpu, threads, _dashboard(client))


def _add_gpu_workers(cluster: Any, n_gpus: int) -> None:
    """Add one worker per GPU to a LocalCluster; each sees only its GPU and offers ``GPU=1``."""
    import copy

    for i in range(n_gpus):
        spec = copy.deepcopy(cluster.new_spec)
        options = spec.setdefault("options", {})
        options["resources"] = {"GPU": 1}
        options["env"] = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": str(i)}
        options["name"] = f"gpu-{i}"
        cluster.worker_spec[f"gpu-{i}"] = spec
    cluster.scale(len(cluster.worker_spec))


# --- the driver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortProgress:
    """A cohort-level progress event.

    Attributes:
        event: ``start`` (cluster ready; ``dashboard`` set), ``slide`` (a slide finished)
            or ``end``.
        total: Slides in this run (after sharding).
        done: Slides finished without failure (including ``skipped``).
        failed: Slides with a failed stage.
        skipped: Slides whose every stage was already finished.
        running: Slides submitted and not finished.
        slide_id, status: The slide that just finished and ``done``/``skipped``/``failed``.
    """

    event: str
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    running: int = 0
    slide_id: str | None = None
    status: str | None = None
    dashboard: str | None = None

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass
class RunSummary:
    """Outcome of :func:`run_cohort`.

    Attributes:
        total, done, failed, skipped: Slide counts (``done`` includes ``skipped``).
        failures: The failed stage rows (slide, stage, error type and message).
        predictions: ``slide_id -> {"label", "probabilities"}`` when predicting.
        retried: Tasks retried because their worker died while running them.
        requeued: Tasks resubmitted because their worker died while they waited in its queue.
    """

    total: int
    done: int
    failed: int
    skipped: int
    seconds: float
    out: Path
    manifest: Path
    report: Path | None = None
    dashboard: str | None = None
    stages: tuple[str, ...] = ()
    failures: list[ManifestRow] = field(default_factory=list)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    retried: int = 0
    requeued: int = 0

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def exit_code(self) -> int:
        """0 when every slide succeeded, 1 otherwise (for CLIs)."""
        return 0 if self.ok else 1


@dataclass
class _Slot:
    slide: SlideSpec
    index: int  # into the stage plan
    state: dict[str, Any]
    skipped: bool = True
    token: str = ""
    blamed: int = 0  # retries of this stage after its worker died while running it
    innocent: int = 0  # resubmissions after a worker died while the task waited in its queue


def _row(slide: SlideSpec, o: StageOutcome) -> ManifestRow:
    return ManifestRow(
        slide_id=o.slide_id,
        stage=o.stage,
        status=o.status,
        path=str(slide.path),
        error_type=o.error_type,
        error=o.error,
        tiles=o.tiles,
        mpp=o.mpp,
        seconds=round(o.seconds, 3),
        worker=o.worker,
    )


def _lost(slide: SlideSpec, stage: str, exc: BaseException, seconds: float) -> StageOutcome:
    """A task that never returned (worker died ``allowed-failures + 1`` times, cancelled...)."""
    worker = ""
    last = getattr(exc, "last_worker", None)
    if last is not None:
        worker = str(getattr(last, "name", "") or getattr(last, "address", ""))
    return StageOutcome.failure(slide.slide_id, stage, exc, seconds, worker)


@dataclass
class _Tally:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    requeued: int = 0
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _retry_killed(client: Client, slot: _Slot, retries: int, tally: _Tally) -> bool:
    """Whether to resubmit a stage whose worker died; counts the attempt.

    A task that had started executing on the dead worker is retried ``retries`` times.
    A task that was only waiting in that worker's queue is innocent and resubmitted
    without using up its retries (at most ``retries + 3`` times: a bound in case its
    start report was lost).
    """
    try:
        started = any(msg == slot.token for _, msg in client.get_events(STARTED_TOPIC))
    except Exception:  # noqa: BLE001 - no event log: blame it
        started = True
    if started:
        slot.blamed += 1
        ok = slot.blamed <= retries
        tally.retried += ok
    else:
        slot.innocent += 1
        ok = slot.innocent <= retries + 3
        tally.requeued += ok
    if ok:
        logger.warning(
            "%s: a worker died %s; resubmitting",
            slot.slide.slide_id,
            f"while running its task (retry {slot.blamed} of {retries})" if started else "with its task queued",
        )
    return ok


def _drive(
    client: Client,
    slides: Sequence[SlideSpec],
    config: RunConfig,
    stages: Mapping[str, StageFn],
    manifest: RunManifest,
    *,
    window: int,
    gpu: bool,
    progress: Callable[[CohortProgress], None] | None,
    dashboard: str | None,
) -> _Tally:
    """Push every slide through ``config.stages`` with at most ``window`` slides in flight."""
    from distributed import KilledWorker, as_completed

    plan = config.stages
    total = len(slides)
    tally = _Tally()
    predictions = tally.predictions
    pending: dict[Any, tuple[_Slot, float]] = {}
    running = 0
    ac = as_completed(loop=client.loop, with_results=True, raise_errors=False)
    todo = iter(slides)

    def submit(slot: _Slot) -> None:
        stage = plan[slot.index]
        slot.token = os.urandom(16).hex()
        fut = client.submit(
            run_stage,
            stage,
            stages[stage],
            slot.slide,
            config,
            slot.state,
            slot.token,
            key=f"{stage}-{slot.token}",
            resources={"GPU": 1} if (gpu and stage == "embed") else None,
            priority=slot.index,  # later stages first: started slides drain before new ones start
            pure=False,
        )
        pending[fut.key] = (slot, time.perf_counter())
        manifest.record(ManifestRow(slot.slide.slide_id, stage, "running", path=str(slot.slide.path)))
        ac.add(fut)

    def start_next() -> bool:
        nonlocal running
        slide = next(todo, None)
        if slide is None:
            return False
        running += 1
        submit(_Slot(slide, 0, {}))
        return True

    for _ in range(window):
        if not start_next():
            break

    for fut, result in ac:
        slot, t0 = pending.pop(fut.key)
        stage = plan[slot.index]
        fut.release()
        if isinstance(result, StageOutcome):
            outcome = result
        else:  # the task never returned: KilledWorker (after allowed-failures), cancelled, ...
            exc = result[1] if isinstance(result, tuple) and len(result) == 3 else result
            if isinstance(exc, KilledWorker) and _retry_killed(client, slot, config.retries, tally):
                submit(slot)
                continue
            outcome = _lost(slot.slide, stage, exc, time.perf_counter() - t0)
        manifest.record(_row(slot.slide, outcome))
        slot.state.update(outcome.data)
        slot.skipped &= outcome.status == "skipped"
        if outcome.status == "failed":
            logger.warning(
                "%s: %s failed: %s: %s", slot.slide.slide_id, stage, outcome.error_type, outcome.error
            )
        if "prediction" in outcome.data:
            predictions[slot.slide.slide_id] = dict(outcome.data["prediction"])
            if outcome.data.get("heatmap"):
                predictions[slot.slide.slide_id]["heatmap"] = outcome.data["heatmap"]
        if outcome.status != "failed" and slot.index + 1 < len(plan):
            submit(replace(slot, index=slot.index + 1, blamed=0, innocent=0))
            continue
        running -= 1
        if outcome.status == "failed":
            tally.failed += 1
            status = "failed"
        else:
            tally.done += 1
            tally.skipped += slot.skipped
            status = "skipped" if slot.skipped else "done"
        if progress is not None:
            progress(
                CohortProgress(
                    "slide", total, tally.done, tally.failed, tally.skipped, running, slot.slide.slide_id,
                    status, dashboard,
                )  # fmt: skip
            )
        start_next()
    return tally


def write_predictions(path: Path, predictions: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``predictions`` into the CSV ``path`` in the one predictions dialect, atomically."""
    from .outputs.predictions import prediction_rows, write_predictions as write

    write(path, prediction_rows(predictions), merge=True)


def run_cohort(
    config: RunConfig,
    *,
    progress: Callable[[CohortProgress], None] | None = None,
    stages: Mapping[str, StageFn] | None = None,
    slides: Sequence[SlideSpec] | None = None,
    client: Client | None = None,
) -> RunSummary:
    """Run tile → embed (→ predict) over the cohort of ``config`` on Dask.

    Rerunning the same config skips finished slides and stages and redoes the others.
    Writes ``OUT/manifest.csv`` (``manifest-shard-I-of-N.csv`` for a shard) as it goes,
    ``OUT/run-config.json``, ``OUT/predictions.csv`` when predicting (one file per
    shard, like the manifest), and ``OUT/report.html`` at the end.

    Args:
        config: The run (see :func:`wsi_convnext.config.load_config`).
        progress: Called with :class:`CohortProgress` at start, after each slide, and at end.
        stages: Replacement stage functions by name (default :data:`STAGES`); must be
            importable (or cloudpickle-able) on the workers.
        slides: The slides to run instead of discovering ``config.slides``.
        client: An existing Dask client to use instead of ``config.cluster`` (not closed).

    Returns:
        Counts, failures and paths. ``summary.failed > 0`` when any slide failed.

    Raises:
        ConfigError, InputNotFoundError: Bad config or cohort inputs (before anything runs).
    """
    if config.out is None:
        raise ConfigError("run config: no output folder ('out')")
    t_start = time.perf_counter()
    out = Path(config.out)
    stage_fns = {**STAGES, **(stages or {})}
    if slides is None:
        from .inputs import discover_slides

        slides = discover_slides(config.slides, slide_mpp=config.slide_mpp)
    slides = list(slides)
    if config.shard is not None:
        slides = select_shard(slides, *config.shard)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if config.shard is None else f"-shard-{config.shard[0]}-of-{config.shard[1]}"
    atomic_write_text(out / f"run-config{suffix}.json", json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    manifest = RunManifest(out / manifest_name(config.shard))
    logger.info("%d slides, stages: %s, output: %s", len(slides), " → ".join(config.stages), out)

    with contextlib.ExitStack() as stack:
        if client is not None:
            info = _ClusterInfo(client, _has_gpu_workers(client), max(1, _threads(client)), _dashboard(client))
        else:
            info = stack.enter_context(open_client(config))
        if info.dashboard:
            logger.info("Dask dashboard: %s", info.dashboard)
        window = config.max_in_flight or max(32, 4 * info.threads)
        if progress is not None:
            progress(CohortProgress("start", len(slides), dashboard=info.dashboard))
        try:
            tally = _drive(
                info.client,
                slides,
                config,
                stage_fns,
                manifest,
                window=window,
                gpu=info.gpu,
                progress=progress,
                dashboard=info.dashboard,
            )
        finally:
            manifest.close()

    if tally.predictions:
        write_predictions(out / f"predictions{suffix}.csv", tally.predictions)
    ids = {s.slide_id for s in slides}
    failures = [r for r in manifest.rows() if r.status == "failed" and r.slide_id in ids]
    summary = RunSummary(
        total=len(slides),
        done=tally.done,
        failed=tally.failed,
        skipped=tally.skipped,
        seconds=time.perf_counter() - t_start,
        out=out,
        manifest=manifest.path,
        dashboard=info.dashboard,
        stages=config.stages,
        failures=failures,
        predictions=tally.predictions,
        retried=tally.retried,
        requeued=tally.requeued,
    )
    if config.report:
        from .outputs.report import write_report

        summary.report = write_report(out, title=f"wsi-convnext run: {out.name}", report_images=config.report_images)
    summary.seconds = time.perf_counter() - t_start
    logger.info(
        "%d slides: %d done (%d already finished), %d failed in %.1f s",
        summary.total,
        summary.done,
        summary.skipped,
        summary.failed,
        summary.seconds,
    )
    if progress is not None:
        progress(
            CohortProgress("end", len(slides), tally.done, tally.failed, tally.skipped, 0, dashboard=info.dashboard)
        )
    return summary
