"""The Dask driving loop of a cohort run: every slide through the run's stage plan.

The driver knows stages only as :class:`~wsi_convnext.cohort.stages.StageSpec` objects
(the plan of :func:`~wsi_convnext.cohort.stages.stage_plan`); it contains no stage names.

* Each slide is a chain of tasks, one per per-slide stage. The client keeps a sliding
  window of at most ``max_in_flight`` slides on the cluster (:class:`distributed.as_completed`
  + :meth:`Client.submit`): when a stage finishes, the slide's next stage is submitted;
  when a slide finishes, the next slide starts. A cohort of 30,000 slides therefore never
  puts more than a few hundred tasks on the scheduler.
* Cohort-scope stages run once, in plan order, after every slide's earlier per-slide
  stages, with the slides that succeeded and their states. Per-slide stages after a cohort
  stage (``embed`` after ``finetune``) then run for those slides, with the cohort stage's
  outputs in their state. A failed cohort stage ends the run: the slides still waiting for
  later stages count as failed.
* GPU stages ask for one ``GPU`` worker resource when the cluster has GPU workers
  (``resources={"GPU": 1}``); later stages get a higher priority so started slides drain
  first.
* Failure isolation: a stage that raises is recorded as failed (exception class and
  one-line message, :mod:`wsi_convnext.outcome`) and the slide's later stages are not run;
  other slides go on. A task whose worker died while running it (crash, OOM kill) is
  retried up to ``config.retries`` times, then recorded as ``KilledWorker``. Only the task
  that was executing is blamed: tasks waiting in the dead worker's queue are resubmitted
  without using up their retries (each task reports its start on the scheduler's event
  log). Clusters this run starts fail tasks on the first worker death
  (``allowed-failures = 0``) and leave the counting to the client; an existing scheduler
  applies its own ``allowed-failures`` first.
* Never lose work: stages write atomically and skip finished outputs, so rerunning the
  same command after any interruption (even SIGKILL) skips what is finished and redoes
  the rest; the result equals that of an uninterrupted run.
* Progress: ``OUT/manifest.csv`` (see :mod:`wsi_convnext.outputs.manifest`) is updated as
  the run goes, a ``progress`` callback receives :class:`CohortProgress` events, and the
  Dask dashboard address (as bound) is logged and reported at start. ``OUT/report.html``
  is written at the end (:mod:`wsi_convnext.outputs.report`).

From the command line: ``wsi-convnext run CONFIG.toml [--shard I/N]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text, ensure_dir
from ..config import RunConfig
from ..errors import ConfigError
from ..outcome import Outcome, failure_fields
from ..outputs.manifest import ManifestRow, RunManifest, manifest_name, recorded_slide_ids
from .clusters import ClusterInfo, info_of, open_client
from .shards import select_shard
from .stages import StageFn, StageSpec, stage_plan

if TYPE_CHECKING:
    from distributed import Client

    from ..inputs import SlideSpec

logger = logging.getLogger(__name__)

__all__ = [
    "STARTED_TOPIC",
    "CohortProgress",
    "RunSummary",
    "StageOutcome",
    "run_cohort",
    "run_stage",
    "write_predictions",
]

#: Scheduler event topic on which each stage task reports that it started executing, so
#: that only the task a dead worker was running is blamed (not the ones queued behind it).
STARTED_TOPIC = "wsi-convnext-started"


# --- the task run on a worker --------------------------------------------------------------


@dataclass(frozen=True)
class StageOutcome(Outcome):
    """What a stage task returns to the client (picklable, small).

    Attributes:
        slide_id: The slide (``""`` for a cohort-scope stage).
        stage: The stage name.
        tiles, slide_mpp: What the stage reported (``slide_mpp``: the slide's level-0 µm/px).
        worker: ``host/worker-name`` that ran it.
        started: Wall-clock start (``time.time()``, seconds since the epoch).
        data: The stage's other outputs, merged into the state that later stages receive.
    """

    slide_id: str
    stage: str
    tiles: int | None = None
    slide_mpp: float | None = None
    worker: str = ""
    started: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def row(self, path: str = "") -> ManifestRow:
        """The manifest row of this outcome."""
        return ManifestRow(
            slide_id=self.slide_id, stage=self.stage, status=self.status, path=path, error_type=self.error_type,
            error=self.error, tiles=self.tiles, slide_mpp=self.slide_mpp, seconds=round(self.seconds, 3), worker=self.worker,
        )  # fmt: skip


def _worker_name() -> str:
    host = socket.gethostname().split(".")[0]
    try:
        from distributed import get_worker

        return f"{host}/{get_worker().name}"
    except (ImportError, ValueError):
        return f"{host}/pid{os.getpid()}"


def run_stage(
    spec: StageSpec,
    subject: SlideSpec | Sequence[SlideSpec],
    config: RunConfig,
    state: Mapping[str, Any],
    token: str | None = None,
) -> StageOutcome:
    """Run one stage (of one slide, or of the cohort) and turn any exception into a failed outcome.

    This is the Dask task; it never raises (a dying worker surfaces as ``KilledWorker``).
    ``token`` is reported on :data:`STARTED_TOPIC` when the task starts executing.
    """
    from ..outcome import attempt

    started = time.time()
    worker = _worker_name()
    if token is not None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            get_worker().log_event(STARTED_TOPIC, token)
    cohort = spec.scope == "cohort"
    slide_id = "" if cohort else subject.slide_id  # type: ignore[union-attr]
    base = {"slide_id": slide_id, "stage": spec.name, "worker": worker, "started": started}
    if spec.finished(config, None if cohort else subject):  # type: ignore[arg-type]
        return StageOutcome(status="skipped", **base)
    what = f"{spec.name} of {'the cohort' if cohort else slide_id}"
    a = attempt(spec.fn, subject, config, state, what=what)
    if a.failure is not None:
        return StageOutcome(**a.failure, **base)
    out = dict(a.value or {})
    tiles = out.pop("tiles", None)
    slide_mpp = out.pop("slide_mpp", None)
    skipped = bool(out.pop("skipped", False))
    return StageOutcome(
        status="skipped" if skipped else "done",
        tiles=None if tiles is None else int(tiles),
        slide_mpp=None if slide_mpp is None else float(slide_mpp),
        seconds=a.seconds,
        data=out,
        **base,
    )


# --- progress and summary ------------------------------------------------------------------


@dataclass(frozen=True)
class CohortProgress:
    """A cohort-level progress event.

    Attributes:
        event: ``start`` (cluster ready; ``dashboard`` set), ``slide`` (a slide finished),
            ``cohort`` (a cohort-scope stage finished; ``stage`` and ``status`` set) or ``end``.
        total: Slides in this run (after sharding).
        done: Slides finished without failure (including ``skipped``).
        failed: Slides with a failed stage.
        skipped: Slides whose every stage was already finished.
        running: Slides submitted and not finished.
        slide_id, status: The slide that just finished and ``done``/``skipped``/``failed``.
        stage: The cohort-scope stage of a ``cohort`` event.
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
    stage: str | None = None

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass
class RunSummary:
    """Outcome of :func:`run_cohort`.

    Attributes:
        total, done, failed, skipped: Slide counts (``done`` includes ``skipped``; see :attr:`ran`).
        stages: The names of the stages run, per-slide ones first.
        failures: The failed stage rows (slide, stage, error type and message); a failed
            cohort-scope stage has ``slide_id == ""``.
        cohort: The outcomes of the cohort-scope stages, by stage name.
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
    cohort: dict[str, StageOutcome] = field(default_factory=dict)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    retried: int = 0
    requeued: int = 0

    @property
    def ran(self) -> int:
        """Slides that did work in this run: ``ran + skipped + failed == total``."""
        return self.done - self.skipped

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not any(o.failed for o in self.cohort.values())

    @property
    def exit_code(self) -> int:
        """0 when every slide and cohort stage succeeded, 1 otherwise (for CLIs)."""
        return 0 if self.ok else 1


# --- the loop ------------------------------------------------------------------------------


@dataclass
class _Slot:
    slide: SlideSpec | None  # None: a cohort-scope stage
    index: int  # into the plan
    state: dict[str, Any]
    skipped: bool = True
    token: str = ""
    blamed: int = 0  # retries of this stage after its worker died while running it
    innocent: int = 0  # resubmissions after a worker died while the task waited in its queue

    @property
    def name(self) -> str:
        return "the cohort" if self.slide is None else self.slide.slide_id


def _segments(plan: Sequence[StageSpec]) -> list[tuple[int, int]]:
    """``plan`` cut into ``(start, stop)`` segments: runs of per-slide stages, and each cohort stage alone."""
    out: list[tuple[int, int]] = []
    for i, spec in enumerate(plan):
        if spec.scope == "slide" and out and plan[out[-1][0]].scope == "slide":
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class _Driver:
    """Runs the plan segment by segment: each slide through a run of per-slide stages (a
    sliding window of slides), then a cohort stage over the slides that are still alive."""

    def __init__(
        self,
        client: Client,
        slides: Sequence[SlideSpec],
        config: RunConfig,
        plan: Sequence[StageSpec],
        manifest: RunManifest,
        *,
        window: int,
        gpu: bool,
        progress: Callable[[CohortProgress], None] | None,
        dashboard: str | None,
    ) -> None:
        from distributed import as_completed

        self.client, self.config, self.manifest = client, config, manifest
        self.plan = list(plan)
        self.segments = _segments(self.plan)
        self.seg = -1  # the segment running now
        # A slide is finished (counted, reported) after the last per-slide stage of the plan.
        self.last_slide_stage = max((i for i, s in enumerate(self.plan) if s.scope == "slide"), default=-1)
        self.window, self.gpu, self.progress, self.dashboard = window, gpu, progress, dashboard
        self.total = len(slides)
        self.order = list(slides)  # input order, for cohort stages
        self.todo: Iterator[_Slot] = iter(())
        self.pending: dict[Any, tuple[_Slot, float]] = {}
        self.ac = as_completed(loop=client.loop, with_results=True, raise_errors=False)
        self.running = 0
        self.done = self.failed = self.skipped = self.retried = self.requeued = 0
        self.predictions: dict[str, dict[str, Any]] = {}
        self.alive: dict[str, _Slot] = {}  # slides with no failed stage, between segments / at the end
        self.shared: dict[str, Any] = {}  # outputs of the cohort stages so far (join later slide states)
        self.cohort: dict[str, StageOutcome] = {}

    # --- submitting ------------------------------------------------------------------------

    def submit(self, slot: _Slot) -> None:
        spec = self.plan[slot.index]
        slot.token = os.urandom(16).hex()
        if slot.slide is None:
            subject: Any = [s for s in self.order if s.slide_id in self.alive]
            # with the outputs of the cohort stages before it (``pretrain`` → ``finetune``)
            state: Any = {s.slide_id: {**self.alive[s.slide_id].state, **self.shared} for s in subject}
        else:
            subject, state = slot.slide, slot.state
            self.manifest.record(ManifestRow(slot.slide.slide_id, spec.name, "running", path=str(slot.slide.path)))
        fut = self.client.submit(
            run_stage,
            spec,
            subject,
            self.config,
            state,
            slot.token,
            key=f"{spec.name}-{slot.token}",
            resources={"GPU": 1} if (self.gpu and spec.resources_for(self.config) == "gpu") else None,
            priority=slot.index,  # later stages first: started slides drain before new ones start
            pure=False,
        )
        self.pending[fut.key] = (slot, time.perf_counter())
        self.ac.add(fut)

    def enter(self, k: int) -> None:
        """Start segment ``k`` of the plan: a cohort stage, or a run of per-slide stages."""
        self.seg = k
        if k >= len(self.segments):
            return
        start, _ = self.segments[k]
        if self.plan[start].scope == "cohort":
            self.submit(_Slot(None, start, {}))
            return
        if start == 0:
            slots = [_Slot(s, 0, {}) for s in self.order]
        else:  # after a cohort stage: the slides still alive, with its outputs in their state
            slots = [self.alive.pop(s.slide_id) for s in self.order if s.slide_id in self.alive]
            for slot in slots:
                slot.index, slot.blamed, slot.innocent = start, 0, 0
                slot.state.update(self.shared)
        self.todo = iter(slots)
        for _ in range(self.window):
            if not self.start_next():
                break

    def start_next(self) -> bool:
        """Start the next slide of this segment; when none is left and nothing runs, the next segment."""
        slot = next(self.todo, None)
        if slot is None:
            if self.running == 0 and not self.pending:
                self.enter(self.seg + 1)
            return False
        self.running += 1
        self.submit(slot)
        return True

    # --- results ---------------------------------------------------------------------------

    def retry_killed(self, slot: _Slot) -> bool:
        """Whether to resubmit a stage whose worker died; counts the attempt.

        A task that had started executing on the dead worker is retried ``retries`` times.
        A task that was only waiting in that worker's queue is innocent and resubmitted
        without using up its retries (at most ``retries + 3`` times: a bound in case its
        start report was lost).
        """
        retries = self.config.retries
        try:
            started = any(msg == slot.token for _, msg in self.client.get_events(STARTED_TOPIC))
        except Exception:  # noqa: BLE001 - no event log: blame it
            started = True
        if started:
            slot.blamed += 1
            ok = slot.blamed <= retries
            self.retried += ok
        else:
            slot.innocent += 1
            ok = slot.innocent <= retries + 3
            self.requeued += ok
        if ok:
            logger.warning(
                "%s: a worker died %s; resubmitting",
                slot.name,
                f"while running its task (retry {slot.blamed} of {retries})" if started else "with its task queued",
            )
        return ok

    def handle(self, fut: Any, result: Any) -> None:
        from distributed import KilledWorker

        slot, t0 = self.pending.pop(fut.key)
        spec = self.plan[slot.index]
        fut.release()
        if isinstance(result, StageOutcome):
            outcome = result
        else:  # the task never returned: KilledWorker (after allowed-failures), cancelled, ...
            exc = result[1] if isinstance(result, tuple) and len(result) == 3 else result
            if isinstance(exc, KilledWorker) and self.retry_killed(slot):
                self.submit(slot)
                return
            last = getattr(exc, "last_worker", None)
            worker = str(getattr(last, "name", "") or getattr(last, "address", "")) if last is not None else ""
            outcome = StageOutcome(
                slide_id="" if slot.slide is None else slot.slide.slide_id, stage=spec.name, worker=worker,
                **failure_fields(exc, time.perf_counter() - t0),
            )  # fmt: skip
        if outcome.failed:
            logger.warning("%s: %s failed: %s: %s", slot.name, spec.name, outcome.error_type, outcome.error)
        if slot.slide is None:
            self.finish_cohort_stage(slot, outcome)
            return
        self.manifest.record(outcome.row(str(slot.slide.path)))
        slot.state.update(outcome.data)
        slot.skipped &= outcome.status == "skipped"
        if "prediction" in outcome.data:
            pred = self.predictions[slot.slide.slide_id] = dict(outcome.data["prediction"])
            if outcome.data.get("heatmap"):
                pred["heatmap"] = outcome.data["heatmap"]
        if not outcome.failed and slot.index + 1 < self.segments[self.seg][1]:
            self.submit(replace(slot, index=slot.index + 1, blamed=0, innocent=0))
            return
        if outcome.failed or slot.index == self.last_slide_stage:
            self.finish_slide(slot, failed=outcome.failed)
            return
        self.running -= 1  # waits for the cohort stage that follows
        self.alive[slot.slide.slide_id] = slot
        self.start_next()

    def finish_slide(self, slot: _Slot, *, failed: bool, start: bool = True) -> None:
        assert slot.slide is not None
        self.running -= 1
        if failed:
            self.failed += 1
            status = "failed"
        else:
            self.done += 1
            self.skipped += slot.skipped
            status = "skipped" if slot.skipped else "done"
            self.alive[slot.slide.slide_id] = slot
        if self.progress is not None:
            self.progress(
                CohortProgress(
                    "slide", self.total, self.done, self.failed, self.skipped, self.running, slot.slide.slide_id,
                    status, self.dashboard,
                )  # fmt: skip
            )
        if start:
            self.start_next()

    def finish_cohort_stage(self, slot: _Slot, outcome: StageOutcome) -> None:
        spec = self.plan[slot.index]
        self.cohort[spec.name] = outcome
        if self.progress is not None:
            self.progress(
                CohortProgress(
                    "cohort", self.total, self.done, self.failed, self.skipped, 0, status=outcome.status,
                    dashboard=self.dashboard, stage=spec.name,
                )  # fmt: skip
            )
        if not outcome.failed:
            self.shared.update(outcome.data)
            self.enter(self.seg + 1)
            return
        if slot.index < self.last_slide_stage:  # slides waiting for later stages cannot finish
            for slide_id in [s.slide_id for s in self.order if s.slide_id in self.alive]:
                self.running += 1
                self.finish_slide(self.alive.pop(slide_id), failed=True, start=False)

    def run(self) -> None:
        if self.last_slide_stage < 0:  # only cohort stages: every slide is trivially finished
            for slide in self.order:
                self.running += 1
                self.finish_slide(_Slot(slide, 0, {}), failed=False, start=False)
        self.enter(0)
        for fut, result in self.ac:
            self.handle(fut, result)


# --- the run -------------------------------------------------------------------------------


def write_predictions(path: Path, predictions: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``predictions`` into the CSV ``path`` in the one predictions dialect, atomically."""
    from ..outputs.predictions import prediction_rows, write_predictions as write

    write(path, prediction_rows(predictions), merge=True)


def run_cohort(
    config: RunConfig,
    *,
    progress: Callable[[CohortProgress], None] | None = None,
    stages: Mapping[str, StageFn | StageSpec] | None = None,
    slides: Sequence[SlideSpec] | None = None,
    client: Client | None = None,
) -> RunSummary:
    """Run the registered stages that ``config`` enables over its cohort on Dask.

    Rerunning the same config skips finished slides and stages and redoes the others.
    Writes ``OUT/manifest.csv`` (``manifest-shard-I-of-N.csv`` for a shard) as it goes,
    ``OUT/run-config.json``, ``OUT/predictions.csv`` when predicting (one file per
    shard, like the manifest), and ``OUT/report.html`` at the end.

    Args:
        config: The run (see :func:`wsi_convnext.config.load_config`).
        progress: Called with :class:`CohortProgress` at start, after each slide and
            cohort stage, and at end.
        stages: For this run only, by name: a replacement function for a registered
            stage, or a whole :class:`~wsi_convnext.cohort.stages.StageSpec` (replacing or
            adding one). Functions must be importable (or cloudpickle-able) on the workers.
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
    plan = stage_plan(config, stages)
    if slides is None:
        from ..inputs import discover_slides

        slides = discover_slides(config.slides, slide_mpp=config.slide_mpp, recorded=recorded_slide_ids(out))
    slides = list(slides)
    if config.shard is not None:
        slides = select_shard(slides, *config.shard)
    ensure_dir(out, create=False)  # before the cluster starts
    names = tuple(s.name for s in plan)
    suffix = "" if config.shard is None else f"-shard-{config.shard[0]}-of-{config.shard[1]}"

    with contextlib.ExitStack() as stack:
        # The cluster first: a bad scheduler address or cluster option leaves no output behind.
        info: ClusterInfo = info_of(client) if client is not None else stack.enter_context(open_client(config))
        ensure_dir(out)
        atomic_write_text(
            out / f"run-config{suffix}.json", json.dumps(config.to_dict(), indent=2, default=str) + "\n"
        )
        manifest = RunManifest(out / manifest_name(config.shard))
        logger.info("%d slides, stages: %s, output: %s", len(slides), " → ".join(names), out)
        if info.dashboard:
            logger.info("Dask dashboard: %s", info.dashboard)
        window = config.max_in_flight or max(32, 4 * info.threads)
        if progress is not None:
            progress(CohortProgress("start", len(slides), dashboard=info.dashboard))
        driver = _Driver(
            info.client, slides, config, plan, manifest, window=window, gpu=info.gpu, progress=progress,
            dashboard=info.dashboard,
        )  # fmt: skip
        try:
            driver.run()
        finally:
            manifest.close()

    if driver.predictions:
        write_predictions(out / f"predictions{suffix}.csv", driver.predictions)
    ids = {s.slide_id for s in slides}
    failures = [r for r in manifest.rows() if r.status == "failed" and r.slide_id in ids]
    failures += [o.row() for o in driver.cohort.values() if o.failed]
    summary = RunSummary(
        total=len(slides),
        done=driver.done,
        failed=driver.failed,
        skipped=driver.skipped,
        seconds=time.perf_counter() - t_start,
        out=out,
        manifest=manifest.path,
        dashboard=info.dashboard,
        stages=names,
        failures=failures,
        cohort=dict(driver.cohort),
        predictions=driver.predictions,
        retried=driver.retried,
        requeued=driver.requeued,
    )
    if config.report:
        from ..outputs.report import write_report

        summary.report = write_report(out, title=f"wsi-convnext run: {out.name}", report_images=config.report_images)
    summary.seconds = time.perf_counter() - t_start
    logger.info(
        "%d slides: %d done, %d skipped (already finished), %d failed in %.1f s",
        summary.total,
        summary.ran,
        summary.skipped,
        summary.failed,
        summary.seconds,
    )
    if progress is not None:
        progress(
            CohortProgress(
                "end", len(slides), driver.done, driver.failed, driver.skipped, 0, dashboard=info.dashboard
            )
        )
    return summary
