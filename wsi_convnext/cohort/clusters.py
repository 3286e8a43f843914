"""The cluster registry: where a cohort run's Dask workers come from.

``config.cluster`` names a registered kind; :func:`open_client` opens it for the run and
closes what it started. Built in:

* ``local``: an embedded :class:`distributed.LocalCluster` sized to the machine
  (:func:`local_cluster_kwargs`), plus one worker per GPU;
* ``scheduler``: an existing scheduler at ``config.scheduler`` (checked to answer Dask's
  ``identity`` call within :data:`CONNECT_TIMEOUT` first, so a wrong address, or one where
  something else listens, is a one-line error, not a silent wait);
* ``slurm``: a dask-jobqueue ``SLURMCluster`` (:func:`slurm_cluster_kwargs`) scaled
  adaptively between ``minimum_jobs`` and ``maximum_jobs`` jobs (``sbatch``, ``squeue``
  and ``scancel`` must be on PATH: checked first, a one-line error otherwise).

The dashboard of a cluster this run starts listens on ``127.0.0.1`` unless
``dashboard_address`` (``[local]`` / ``[slurm]``) says otherwise; the address reported
is the one the scheduler actually bound.

Adding a kind = one module: a context manager ``opener(config) -> ClusterInfo`` decorated
with ``@register_cluster("name", section=Settings)``, where ``Settings`` is a dataclass of
``param()`` fields: ``cluster = "name"`` in a run config then selects it and ``[name]``
holds its settings. (The module must be imported before the config is read.)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

from .._io import cpu_count
from ..config import CLUSTER_KINDS, ClusterKind, RunConfig
from ..errors import ConfigError, one_line
from ..params import non_empty, non_negative, param, positive

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DASHBOARD",
    "ClusterInfo",
    "LocalConfig",
    "SlurmConfig",
    "cluster_kinds",
    "dashboard_address",
    "local_cluster_kwargs",
    "open_client",
    "register_cluster",
    "slurm_cluster_kwargs",
]

#: Where a dashboard listens unless the config says otherwise: this machine only.
DEFAULT_DASHBOARD = "127.0.0.1:8787"
#: Seconds to wait for an existing scheduler to accept a connection and answer.
CONNECT_TIMEOUT = 5.0


@dataclass
class ClusterInfo:
    """An open cluster, as the driver needs it.

    Attributes:
        client: The Dask client.
        gpu: Whether GPU stages ask for the ``GPU`` worker resource.
        threads: Worker threads now or at full scale (sizes the driver's window).
        dashboard: The dashboard URL the scheduler actually serves, or None.
    """

    client: Client
    gpu: bool
    threads: int
    dashboard: str | None


Opener = Callable[[RunConfig], ContextManager[ClusterInfo]]


def register_cluster(name: str, *, section: type | None = None, replace: bool = False) -> Callable[[Opener], Opener]:
    """Decorator registering ``opener(config)`` (a context manager yielding :class:`ClusterInfo`) as
    the cluster kind ``name`` in :data:`~wsi_convnext.config.CLUSTER_KINDS`, with its own ``[name]``
    config table ``section`` (a dataclass of ``param()`` fields; read as ``config.<name>``)."""

    def deco(opener: Opener) -> Opener:
        CLUSTER_KINDS.register(name, ClusterKind(name, opener, section), replace=replace)
        return opener

    return deco


def cluster_kinds() -> tuple[str, ...]:
    """The registered cluster kinds."""
    return CLUSTER_KINDS.names()


# --- the built-in kinds' settings ----------------------------------------------------------


_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


def _walltime(v: str) -> str | None:
    return None if _WALLTIME.match(v) else "must be a SLURM time such as '04:00:00' or '1-00:00:00'"


_BYTES = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgtpe]i?)?b?\s*$", re.IGNORECASE)


def _memory(v: str) -> str | None:
    return None if v.strip().lower() == "auto" or _BYTES.match(v) else "must be a size such as '8GiB', '500MB' or 'auto'"


def _dashboard(v: str) -> str | None:
    ok = v == "" or re.match(r"^([\w.-]+|\[[0-9a-fA-F:]+\])?:\d{1,5}$", v)
    return None if ok else "must be 'HOST:PORT' (e.g. '127.0.0.1:8787'; ':8787' = all interfaces) or '' (none)"


@dataclass
class LocalConfig:
    """``[local]``: the embedded :class:`distributed.LocalCluster` (``cluster = "local"``).

    ``None`` sizes it to the machine: one single-threaded worker process per core (at
    most one per 2 GiB of memory), plus one worker per GPU that owns that GPU.
    """

    n_workers: int | None = param(None, check=positive, doc="CPU worker processes")
    threads_per_worker: int | None = param(None, check=positive, doc="threads per worker process")
    memory_limit: str | None = param(None, check=_memory, doc="per worker, e.g. '8GiB', or 'auto'")
    gpus: int | None = param(None, check=non_negative, doc="GPU workers (default: all visible GPUs when embedding)")
    dashboard_address: str | None = param(
        None, check=_dashboard, doc="default '127.0.0.1:8787' (this machine only); ':8787' opens it to all; '' disables it"
    )


@dataclass
class SlurmConfig:
    """``[slurm]``: a dask-jobqueue ``SLURMCluster`` (``cluster = "slurm"``, needs ``wsi-convnext[slurm]``).

    Each SLURM job runs ``processes`` Dask worker processes sharing ``cores`` and
    ``memory``; with ``gpus`` > 0 the job asks for ``--gres=gpu:<gpus>`` and its workers
    advertise the ``GPU`` resource that embedding tasks need.
    """

    queue: str | None = param(None, check=non_empty, doc="partition (-p)")
    account: str | None = param(None, check=non_empty, doc="account (-A)")
    cores: int = param(8, check=positive, doc="cores per job")
    memory: str = param("32GiB", check=_memory, doc="memory per job")
    processes: int = param(1, check=positive, doc="worker processes per job")
    gpus: int = param(0, check=non_negative, doc="GPUs per job")
    walltime: str = param("04:00:00", check=_walltime, doc="job time limit")
    job_extra_directives: list[str] = param(default_factory=list, doc="extra #SBATCH lines")
    job_script_prologue: list[str] = param(default_factory=list, doc="shell lines run first")
    local_directory: str | None = param(None, check=non_empty, doc="worker scratch space, e.g. '$TMPDIR'")
    log_directory: str | None = param(None, check=non_empty, doc="folder for the jobs' stdout/stderr")
    interface: str | None = param(None, check=non_empty, doc="network interface, e.g. 'ib0'")
    python: str | None = param(None, check=non_empty, doc="python on the compute nodes")
    minimum_jobs: int = param(0, check=non_negative, doc="adaptive lower bound")
    maximum_jobs: int = param(4, check=positive, doc="adaptive upper bound")
    dashboard_address: str | None = param(
        None, check=_dashboard, doc="scheduler dashboard; default '127.0.0.1:8787' (this machine only); '' disables it"
    )

    def check(self) -> None:
        """Settings that depend on each other.

        Raises:
            ConfigError: More minimum than maximum jobs, or more processes than cores per job.
        """
        if self.minimum_jobs > self.maximum_jobs:
            raise ConfigError(
                f"'slurm.minimum_jobs' ({self.minimum_jobs}) exceeds 'slurm.maximum_jobs' ({self.maximum_jobs})"
            )
        if self.processes > self.cores:
            raise ConfigError(f"'slurm.processes' ({self.processes}) exceeds 'slurm.cores' ({self.cores})")




# --- what the driver asks of any cluster ---------------------------------------------------


def _threads(client: Client) -> int:
    workers = client.scheduler_info().get("workers", {})
    return sum(int(w.get("nthreads", 1)) for w in workers.values())


def _has_gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any(float(w.get("resources", {}).get("GPU", 0)) > 0 for w in workers.values())


def _bound_dashboard(dask_scheduler: Any) -> tuple[str, int] | None:
    # Runs on the scheduler: the address its HTTP server really listens on.
    server = dask_scheduler.services.get("dashboard")
    if server is None:
        return None
    return str(getattr(server, "address", "") or ""), int(server.port)


def dashboard_address(client: Client) -> str | None:
    """The URL of the dashboard as bound by the scheduler (None without one).

    A dashboard bound to all interfaces (``0.0.0.0``/``::``) is reported with the
    scheduler host's name, since that is where others can reach it.
    """
    from distributed.utils import format_dashboard_link

    try:
        bound = client.run_on_scheduler(_bound_dashboard)
    except Exception:  # noqa: BLE001 - the dashboard is optional
        return None
    if not bound:
        return None
    host, port = bound
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return format_dashboard_link(host, port)


def info_of(
    client: Client, *, gpu: bool | None = None, threads: int | None = None, dashboard: bool = True
) -> ClusterInfo:
    """A :class:`ClusterInfo` for ``client`` (GPU workers and threads read from the scheduler).

    ``dashboard=False``: the run disabled the dashboard (the scheduler still serves its
    health and metrics routes, on the scheduler's own host).
    """
    return ClusterInfo(
        client,
        _has_gpu_workers(client) if gpu is None else gpu,
        max(1, _threads(client) if threads is None else threads),
        dashboard_address(client) if dashboard else None,
    )


def _scheduler_dashboard(value: str | None) -> dict[str, Any]:
    """Config ``dashboard_address`` → scheduler options: None → this machine only, '' → none.

    Dask's scheduler always runs its HTTP server (health, metrics); without a dashboard it
    serves only those, on a free port of 127.0.0.1.
    """
    if value is None:
        return {"dashboard_address": DEFAULT_DASHBOARD}
    if value == "":
        return {"dashboard_address": "127.0.0.1:0", "dashboard": False}
    return {"dashboard_address": value}


# --- local ---------------------------------------------------------------------------------


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
    split evenly between all workers. GPU workers are only started when a stage of the
    run asks for a GPU.

    Args:
        config: The run config (``config.local`` overrides any default).
        cpus, memory, gpus: The machine (default: detected; GPUs only when a stage wants one).
    """
    from .stages import stage_plan

    loc = config.local
    cpus = cpus if cpus is not None else cpu_count()
    memory = memory if memory is not None else _memory_bytes()
    if loc.gpus is not None:
        n_gpus = loc.gpus
    elif gpus is not None:
        n_gpus = gpus
    else:
        wants_gpu = any(s.resources_for(config) == "gpu" for s in stage_plan(config))
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
    }
    dash = _scheduler_dashboard(loc.dashboard_address)
    kwargs["dashboard_address"] = dash.pop("dashboard_address")
    if dash:
        kwargs["scheduler_kwargs"] = dash
    return kwargs, n_gpus


def _add_gpu_workers(cluster: Any, n_gpus: int) -> None:
    """Add one worker per GPU to a LocalCluster; each sees only its GPU and offers ``GPU=1``."""
    for i in range(n_gpus):
        spec = copy.deepcopy(cluster.new_spec)
        options = spec.setdefault("options", {})
        options["resources"] = {"GPU": 1}
        options["env"] = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": str(i)}
        options["name"] = f"gpu-{i}"
        cluster.worker_spec[f"gpu-{i}"] = spec
    cluster.scale(len(cluster.worker_spec))


@register_cluster("local", section=LocalConfig)
@contextlib.contextmanager
def _open_local(config: RunConfig) -> Iterator[ClusterInfo]:
    from distributed import Client, LocalCluster

    kwargs, n_gpus = local_cluster_kwargs(config)
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(LocalCluster(**kwargs))
        except (OSError, ValueError, TypeError) as exc:  # e.g. a bad dashboard address or memory limit
            raise ConfigError(f"[local]: cannot start the Dask LocalCluster ({one_line(exc)}); check the [local] keys") from exc
        if n_gpus:
            _add_gpu_workers(cluster, n_gpus)
        client = stack.enter_context(Client(cluster, set_as_default=False))
        if n_gpus:
            client.wait_for_workers(kwargs["n_workers"] + n_gpus, timeout=300)
        yield info_of(client, gpu=n_gpus > 0, dashboard="scheduler_kwargs" not in kwargs)


# --- an existing scheduler ----------------------------------------------------------------


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail in one line, within about ``timeout`` seconds, unless a Dask scheduler answers at ``address``.

    First a TCP connection (nothing listening: refused at once), then Dask's ``identity``
    call: something else on that port (a dashboard, any HTTP server) never completes
    Dask's handshake, and a Dask client would wait on it without a word.
    """
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    scheme, loc = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return  # other transports: leave it to distributed
    host, port = parse_host_port(loc)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address} ({one_line(exc) or type(exc).__name__}); "
            "check --scheduler / 'scheduler' and that the scheduler is running"
        ) from exc
    if scheme == "tcp":
        _check_speaks_dask(address, timeout)


def _check_speaks_dask(address: str, timeout: float) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    def ask() -> Any:  # in its own thread: the caller may be inside a running event loop
        return asyncio.run(asyncio.wait_for(identity(), timeout))

    reason = ""
    try:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(ask).result()
    except (OSError, TimeoutError, asyncio.TimeoutError, ValueError, TypeError) as exc:
        reply, reason = None, f" ({one_line(exc) or type(exc).__name__})"
    if not (isinstance(reply, dict) and reply.get("type") == "Scheduler"):
        raise ConfigError(
            f"{address} does not answer as a Dask scheduler within {timeout:g} s{reason}; "
            "check --scheduler / 'scheduler' (the scheduler's port, e.g. 8786, not its dashboard's)"
        )


@register_cluster("scheduler")
@contextlib.contextmanager
def _open_scheduler(config: RunConfig) -> Iterator[ClusterInfo]:
    from distributed import Client

    if not config.scheduler:
        raise ConfigError("cluster = 'scheduler' needs 'scheduler' (an address such as tcp://host:8786)")
    _check_reachable(config.scheduler)
    try:
        client = Client(config.scheduler, set_as_default=False, timeout=f"{CONNECT_TIMEOUT * 6:g}s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"cannot connect to the Dask scheduler at {config.scheduler} ({one_line(exc)}); "
            "is it a Dask scheduler, and of a compatible version?"
        ) from exc
    with client:
        yield info_of(client)


# --- slurm ---------------------------------------------------------------------------------


def slurm_cluster_kwargs(config: RunConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`dask_jobqueue.SLURMCluster` from ``config.slurm``.

    GPUs become ``--gres=gpu:N`` and the worker resource ``GPU=N / processes`` (rounded
    up to at least 1 per process), which GPU stages request. The scheduler runs where
    ``run`` runs; its dashboard listens on ``127.0.0.1`` unless ``dashboard_address`` is set.
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
        "scheduler_options": _scheduler_dashboard(s.dashboard_address),
        "job_name": "wsi-convnext",
    }
    for key in ("queue", "account", "local_directory", "log_directory", "interface", "python"):
        value = getattr(s, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


@register_cluster("slurm", section=SlurmConfig)
@contextlib.contextmanager
def _open_slurm(config: RunConfig) -> Iterator[ClusterInfo]:
    from distributed import Client

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ConfigError("cluster = 'slurm' needs dask-jobqueue: pip install 'wsi-convnext[slurm]'") from exc
    missing = [cmd for cmd in ("sbatch", "squeue", "scancel") if shutil.which(cmd) is None]
    if missing:
        raise ConfigError(
            f"cluster = 'slurm' needs the SLURM commands, but {', '.join(missing)} is not on PATH; "
            "run on a SLURM login node or use cluster = 'local'"
        )
    s = config.slurm
    with SLURMCluster(**slurm_cluster_kwargs(config)) as cluster:
        cluster.adapt(minimum_jobs=s.minimum_jobs, maximum_jobs=s.maximum_jobs)
        logger.info("SLURM job script:\n%s", cluster.job_script())
        with Client(cluster, set_as_default=False) as client:
            yield info_of(
                client, gpu=s.gpus > 0, threads=s.maximum_jobs * s.cores, dashboard=s.dashboard_address != ""
            )


# --- opening -------------------------------------------------------------------------------


@contextlib.contextmanager
def open_client(config: RunConfig) -> Iterator[ClusterInfo]:
    """Open the cluster that ``config.cluster`` names, with the run's Dask settings; close what was started.

    Raises:
        ConfigError: Unknown kind, unreachable scheduler, ``cluster = "slurm"`` without
            dask-jobqueue, or cluster options Dask rejects.
    """
    import dask
    import distributed  # noqa: F401 - loads its config defaults before dask.config.set below

    opener = CLUSTER_KINDS.lookup(config.cluster).opener  # an unknown kind: a one-line ConfigError
    settings = {
        # Clusters this run starts: a worker death fails its tasks at once and the client
        # retries them, blaming only the task that was running (see the driver).
        "distributed.scheduler.allowed-failures": 0,
        # At most one task per worker thread, so a crash takes down few queued tasks.
        "distributed.scheduler.worker-saturation": 1.0,
        # Background diagnostics cost ~8% of a 2-core machine with 2 workers (measured by
        # benchmarks/cohort.py): each worker samples its task's stack every 10 ms for the
        # dashboard's profile page, and every scheduler, nanny and worker checks its event
        # loop every 20 ms. Slide tasks run for seconds: sample nothing, check every 200 ms.
        "distributed.worker.profile.enabled": False,
        "distributed.admin.tick.interval": "200ms",
    }
    if config.cluster == "local":
        # The nannies restart dead workers. Without this, LocalCluster closes a nanny for
        # good when its worker dies twice within 15 s (the check of the first death runs
        # while the worker restarts after the second), e.g. on repeated OOM kills.
        settings["distributed.deploy.lost-worker-timeout"] = "30 days"
        # Fail, rather than wait forever, tasks that no worker can run (e.g. the GPU
        # workers died and could not be restarted).
        settings["distributed.scheduler.no-workers-timeout"] = "10 minutes"
    with dask.config.set(settings), opener(config) as info:
        yield info
