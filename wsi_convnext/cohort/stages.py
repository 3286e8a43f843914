"""The cohort stage registry: what a run does, as registered :class:`StageSpec` objects.

A stage is a function plus how to schedule it:

* ``resources``: ``"cpu"`` (any worker) or ``"gpu"`` (the task asks for one ``GPU`` worker
  resource when the cluster has GPU workers, so one GPU runs one such task at a time);
* ``scope``: ``"slide"`` (one task per slide, chained in registry order) or ``"cohort"``
  (one task after every slide's earlier per-slide stages, given all the slides that
  succeeded; its outputs join the state of every slide's later stages);
* ``outputs``: the paths the stage writes, and ``resume``: how a rerun knows it is done:
  ``"stage"`` (the function compares its outputs' parameters itself and reports
  ``skipped``) or ``"outputs"`` (the task is skipped when every listed output exists);
* ``enabled``: whether a given :class:`~wsi_convnext.config.RunConfig` runs the stage.

The built-in stages are ``tile`` → (``finetune``) → ``embed`` → ``predict`` → (``mil``); the
cohort-scope ``finetune`` and ``mil`` live in :mod:`.training`. Adding a stage = one module
that calls :func:`register_stage`. Stage
functions run on Dask workers: they must be importable there (module-level functions)
and import heavy libraries inside.

A per-slide stage is ``fn(slide, config, state) -> outputs``; ``state`` holds the outputs
of the slide's earlier stages (e.g. ``store``) and of the cohort stages before it. A cohort stage is ``fn(slides, config,
states) -> outputs`` with ``states[slide_id]`` the final state of each slide. The returned
mapping may hold ``tiles`` (int), ``slide_mpp`` (float, the slide's level-0 µm/px),
``skipped`` (bool: the output already existed) and any other picklable values that
later stages (and the report) read. Failure = raising.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._registry import Registry
from ..config import RunConfig
from ..errors import ConfigError, StoreError

if TYPE_CHECKING:
    from ..inputs import SlideSpec

__all__ = [
    "StageFn",
    "StageSpec",
    "embed_stage",
    "get_stage",
    "noop_stages",
    "predict_stage",
    "register_stage",
    "registered_stages",
    "stage_functions",
    "stage_plan",
    "tile_stage",
    "unregister_stage",
]

#: ``fn(slide, config, state) -> outputs`` (per slide) or ``fn(slides, config, states)`` (cohort).
StageFn = Callable[[Any, RunConfig, Mapping[str, Any]], Mapping[str, Any]]
Resources = Literal["cpu", "gpu"]
Scope = Literal["slide", "cohort"]
OutputsFn = Callable[[RunConfig, "SlideSpec | None"], Sequence[Path]]


def _always(config: RunConfig) -> bool:
    return True


def _no_outputs(config: RunConfig, slide: SlideSpec | None) -> Sequence[Path]:
    return ()


@dataclass(frozen=True)
class StageSpec:
    """A registered cohort stage (see the module docstring).

    Attributes:
        name: Unique name; the manifest's ``stage`` column.
        fn: The stage function (importable on the workers).
        resources: ``"cpu"`` or ``"gpu"``; a callable ``config -> "cpu" | "gpu"`` decides per run.
        scope: ``"slide"`` or ``"cohort"``.
        enabled: ``config -> bool``: whether the run includes this stage.
        outputs: ``(config, slide) -> paths`` the stage writes (``slide`` is None for a
            cohort stage).
        resume: ``"stage"``: ``fn`` checks its own outputs and returns ``skipped``;
            ``"outputs"``: skipped (without calling ``fn``) when every output exists and
            ``config.overwrite`` is false.
    """

    name: str
    fn: StageFn
    resources: Resources | Callable[[RunConfig], Resources] = "cpu"
    scope: Scope = "slide"
    enabled: Callable[[RunConfig], bool] = _always
    outputs: OutputsFn = _no_outputs
    resume: Literal["stage", "outputs"] = "stage"
    doc: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.scope not in ("slide", "cohort"):
            raise ConfigError(f"stage {self.name!r}: scope must be 'slide' or 'cohort', got {self.scope!r}")
        if self.resume not in ("stage", "outputs"):
            raise ConfigError(f"stage {self.name!r}: resume must be 'stage' or 'outputs', got {self.resume!r}")
        if not callable(self.resources) and self.resources not in ("cpu", "gpu"):
            raise ConfigError(f"stage {self.name!r}: resources must be 'cpu' or 'gpu', got {self.resources!r}")

    def resources_for(self, config: RunConfig) -> Resources:
        """``"cpu"`` or ``"gpu"`` for this run."""
        return self.resources(config) if callable(self.resources) else self.resources

    def finished(self, config: RunConfig, slide: SlideSpec | None) -> bool:
        """Whether a ``resume="outputs"`` stage can be skipped (every output exists)."""
        if self.resume != "outputs" or config.overwrite:
            return False
        paths = list(self.outputs(config, slide))
        return bool(paths) and all(Path(p).exists() for p in paths)


_REGISTRY: Registry[StageSpec] = Registry("cohort stage")


def register_stage(spec: StageSpec, *, replace: bool = False, before: str | None = None) -> StageSpec:
    """Add ``spec`` to the registry: after the stages registered before it, or just before ``before``
    (the :class:`~wsi_convnext._registry.Registry` rule for names).

    Raises:
        ConfigError: Another stage of that name exists and ``replace`` is false, or ``before`` is unknown.
    """
    return _REGISTRY.register(spec.name, spec, replace=replace, before=before)


def unregister_stage(name: str) -> None:
    """Remove a registered stage (no error if absent)."""
    _REGISTRY.unregister(name)


def get_stage(name: str) -> StageSpec:
    """The registered stage ``name``.

    Raises:
        ConfigError: No such stage.
    """
    return _REGISTRY.lookup(name)


def registered_stages() -> tuple[StageSpec, ...]:
    """Every registered stage, in registration order."""
    return tuple(_REGISTRY.values())


def stage_plan(config: RunConfig, overrides: Mapping[str, StageFn | StageSpec] | None = None) -> list[StageSpec]:
    """The stages ``config`` runs, in registry order.

    Per-slide stages that follow a cohort stage run after it, with its outputs in their
    state (e.g. ``tile`` → cohort ``finetune`` → ``embed`` with the fine-tuned encoder).

    Args:
        config: The run.
        overrides: By name, a replacement function for a registered stage, or a whole
            spec that replaces (or, if new, adds) a stage for this run only.
    """
    specs = dict(_REGISTRY)
    for name, value in (overrides or {}).items():
        if isinstance(value, StageSpec):
            specs[name] = value
        else:
            specs[name] = replace(get_stage(name), fn=value)
    return [s for s in specs.values() if s.enabled(config)]


# --- the built-in stages -------------------------------------------------------------------


def _out(config: RunConfig) -> Path:
    if config.out is None:
        raise ConfigError("run config: no output folder ('out')")
    return Path(config.out)


def tile_stage(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Tile one slide into ``OUT/<slide_id>.zarr`` (skips a finished store unless ``overwrite``)."""
    from ..tiling.tiler import tile_slide

    r = tile_slide(
        slide.path,
        _out(config),
        config.tile_params(),
        slide_id=slide.slide_id,
        slide_mpp=slide.slide_mpp,
        overwrite=config.overwrite,
    )
    return {
        "tiles": int(r.n_tiles),
        "slide_mpp": r.slide_mpp,
        "skipped": bool(r.skipped),
        "store": str(r.store_path),
        "qc": str(r.qc_path) if getattr(r, "qc_path", None) else None,
    }


def _store_outputs(config: RunConfig, slide: SlideSpec | None) -> Sequence[Path]:
    if slide is None:
        return ()
    from ..store import STORE_SUFFIX

    return (_out(config) / f"{slide.slide_id}{STORE_SUFFIX}",)


def _tile_outputs(config: RunConfig, slide: SlideSpec | None) -> Sequence[Path]:
    if slide is None:
        return ()
    return (*_store_outputs(config, slide), _out(config) / "qc" / f"{slide.slide_id}.png")


@functools.lru_cache(maxsize=2)
def _encoder(spec: Any) -> Any:
    # One encoder per worker process and configuration: built (weights read) once, not per slide.
    return spec.build()


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
    """Embed the tiles of the slide's store with ``config.embed`` (skips existing features).

    The encoder is ``config.encoder_config()``, with the weights ``state["encoder_weights"]``
    when an earlier cohort stage (``finetune``) trained them.
    """
    from ..embed import embed_store

    spec = config.encoder_config()
    if spec is None:
        raise ConfigError("run config: the embed stage needs [embed] model")
    if state.get("encoder_weights"):  # a cohort stage before this one trained the encoder
        spec = replace(spec, weights=str(state["encoder_weights"]), pretrained=False)
    encoder = _encoder(spec)
    kwargs = dataclasses.asdict(config.embed_options())
    with _gpu_slot(config.embed.device) as device:
        if device is not None:
            kwargs["device"] = device
        r = embed_store(state["store"], encoder, overwrite=config.overwrite, **kwargs)
    return {"tiles": int(r.n_tiles), "skipped": bool(r.skipped), "feature_key": r.key}


def _embeds(config: RunConfig) -> bool:
    return bool(config.embed.model)


def _embed_resources(config: RunConfig) -> Resources:
    return "cpu" if (config.embed.device or "auto") == "cpu" else "gpu"


def predict_stage(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Predict the slide with the MIL model in ``config.predict.model_dir``.

    Writes the model's tile scores into the store and, with ``heatmaps``, draws them as
    ``OUT/heatmaps/<slide_id>.heatmap.png`` (and the top tiles as ``.topk.png``).
    """
    from ..mil.api import predict

    p = config.predict
    if p.model_dir is None:
        raise ConfigError("run config: the predict stage needs [predict] model_dir")
    (result,) = predict(p.model_dir, [state["store"]], write_scores=True)
    out: dict[str, Any] = {
        "prediction": {"label": result.predicted, "probabilities": dict(result.probabilities)},
        "tiles": result.n_tiles,
    }
    if p.heatmaps:
        out["heatmap"] = str(_draw_heatmap(Path(state["store"]), Path(p.model_dir), result.predicted, _out(config)))
    return out


def _predicts(config: RunConfig) -> bool:
    return bool(config.embed.model and config.predict.model_dir)


def _draw_heatmap(store_path: Path, model_dir: Path, predicted: str, out_dir: Path) -> Path:
    """Draw the tile scores that :func:`~wsi_convnext.mil.api.predict` wrote for ``model_dir``."""
    import numpy as np

    from ..outputs.heatmap import heatmap_title, render_heatmap
    from ..store import open_store

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


register_stage(StageSpec("tile", tile_stage, outputs=_tile_outputs, doc="slide → OUT/<slide_id>.zarr + qc/"))
register_stage(
    StageSpec(
        "embed", embed_stage, resources=_embed_resources, enabled=_embeds, outputs=_store_outputs,
        doc="store tiles → features (one GPU task at a time per GPU)",
    )  # fmt: skip
)
register_stage(
    StageSpec(
        "predict", predict_stage, enabled=_predicts, outputs=_store_outputs, doc="MIL prediction + heatmap",
    )  # fmt: skip
)


def _noop_stage(slide: Any, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    return {"tiles": 0, "skipped": False}


def stage_functions() -> dict[str, StageFn]:
    """The registered stage functions by name, as registered now (lazy imports happen on the workers)."""
    return {s.name: s.fn for s in registered_stages()}


def noop_stages() -> dict[str, StageFn]:
    """A function that does nothing for every registered stage: measures the task graph's own
    overhead (dry runs, benchmarks)."""
    return {name: _noop_stage for name in _REGISTRY.names()}
