"""Cohort run configuration: a TOML file and/or command-line overrides → :class:`RunConfig`.

A run config has top-level keys for the cohort and the cluster, and one table per
pipeline stage and cluster kind::

    slides = ["/data/cohort"]     # folders (searched recursively), CSV manifests, slide files
    out = "/data/out"             # stores, manifest.csv, report.html
    cluster = "local"             # a registered kind: "local" | "slurm" | "scheduler" (an existing Dask scheduler)

    [tile]                        # the fields of wsi_convnext.tiling.tiler.TileParams; absent keys keep its defaults
    mpp = 0.5

    [embed]                       # EncoderConfig + EmbedOptions fields; embedding runs when `model` is set
    model = "convnext_tiny"

    [predict]                     # prediction runs when `model_dir` is set
    model_dir = "/models/mil"

    [local]                       # embedded LocalCluster sizing (cluster = "local")
    [slurm]                       # dask-jobqueue SLURMCluster (cluster = "slurm")

Every key is optional except ``slides`` and ``out``; a key that is absent or set to
nothing keeps the library default. Relative paths are relative to the current working
directory (the same as command-line flags), not to the config file. An unknown key or a
bad value raises a one-line :class:`~wsi_convnext.errors.ConfigError` that names it.
The ready configs in ``pipelines/`` are loaded by the test suite, so they stay valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError
from .params import ParameterError, non_empty, non_negative, one_of, param, positive

__all__ = [
    "EmbedConfig",
    "FinetuneStageConfig",
    "MilStageConfig",
    "LocalConfig",
    "PredictConfig",
    "RunConfig",
    "SlurmConfig",
    "TileConfig",
    "config_keys",
    "load_config",
    "parse_shard",
]

# --- value checks (field metadata "check": value -> problem text or None) -----------------

_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


def _walltime(v: str) -> str | None:
    return None if _WALLTIME.match(v) else "must be a SLURM time such as '04:00:00' or '1-00:00:00'"


_BYTES = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgtpe]i?)?b?\s*$", re.IGNORECASE)


def _memory(v: str) -> str | None:
    return None if v.strip().lower() == "auto" or _BYTES.match(v) else "must be a size such as '8GiB', '500MB' or 'auto'"


def _dashboard(v: str) -> str | None:
    ok = v == "" or re.match(r"^([\w.-]+|\[[0-9a-fA-F:]+\])?:\d{1,5}$", v)
    return None if ok else "must be 'HOST:PORT' (e.g. '127.0.0.1:8787'; ':8787' = all interfaces) or '' (none)"


def _address(v: str) -> str | None:
    return None if re.match(r"^[a-z0-9+]+://\S+$", v) else "must be a scheduler address such as 'tcp://host:8786'"


def _open_fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _cluster_kinds() -> tuple[str, ...]:
    from .cohort.clusters import cluster_kinds

    return cluster_kinds()


def _opt(check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    return param(None, check=check, doc=doc)


# --- sections ------------------------------------------------------------------------------


def _section(name: str, doc: str, sources: Sequence[type], *, exclude: Sequence[str] = (),
             extra: Sequence[tuple[str, Any, Any]] = ()) -> type:  # fmt: skip
    """A config section whose keys are the fields of library parameter objects, all optional.

    Each key keeps its source field's type, check and help text (``None``: the library
    default); a field that is itself a parameter object (``TileParams.tissue``) becomes a
    sub-table of its keyword arguments. So the sections cannot drift from the library.
    """
    fields: list[tuple[str, Any, Any]] = []
    for cls in sources:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                meta = {"doc": f.metadata.get("doc", ""), "params": tp}
                fields.append((f.name, dict[str, Any], field(default_factory=dict, metadata=meta)))
            else:
                fields.append((f.name, tp | None, field(default=None, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass(name, [*fields, *extra], namespace={"__doc__": doc, "__module__": __name__})


def _library_sections() -> tuple[type, type, type, type]:
    from .embed import EmbedOptions
    from .encoders import EncoderConfig
    from .finetune.config import FinetuneConfig
    from .mil.config import TrainConfig
    from .tiling.tiler import TileParams

    tile = _section(
        "TileConfig",
        """``[tile]``: the fields of :class:`wsi_convnext.tiling.tiler.TileParams` (``[tile.tissue]``: of
        :class:`wsi_convnext.tiling.tissue.TissueParams`). ``None`` (absent) keeps the library default;
        ``workers`` defaults to 1 inside a cohort run, where slides are the unit of parallelism.""",
        [TileParams],
    )
    embed = _section(
        "EmbedConfig",
        """``[embed]``: the fields of :class:`wsi_convnext.encoders.EncoderConfig` (the encoder) and of
        :class:`wsi_convnext.embed.EmbedOptions`, plus ``device``. Embedding runs when ``model`` is set.""",
        [EncoderConfig, EmbedOptions],
        exclude=("timm_kwargs",),
        extra=[("device", str | None, _opt(None, "auto, cpu, cuda or cuda:N"))],
    )
    finetune = _section(
        "FinetuneStageConfig",
        """``[finetune]``: weak-label fine-tuning of the ``[embed]`` encoder on the training slides'
        tiles before embedding (the cohort-scope ``finetune`` stage); the training fields of
        :class:`wsi_convnext.finetune.FinetuneConfig`. Runs when ``labels`` is set. ``held_out``
        of the patients (stratified) are kept away from the encoder; MIL is trained on those.""",
        [FinetuneConfig],
        exclude=("data", "out", "model", "stem", "weights", "pretrained", "stem_init", "overwrite"),
        extra=[("held_out", float | None, _opt(_open_fraction, "share of patients kept from the encoder, for MIL (default 0.5)"))],
    )
    mil = _section(
        "MilStageConfig",
        """``[mil]``: train a MIL model on the cohort's embeddings (the cohort-scope ``mil`` stage): the
        fields of :class:`wsi_convnext.mil.TrainConfig`. Runs when ``labels`` (or ``finetune.labels``) is
        set; with ``[finetune]`` it trains on the slides the encoder never saw.""",
        [TrainConfig],
        extra=[("labels", Path | None, _opt(None, "labels CSV slide_id,label[,patient_id] (default: finetune.labels)"))],
    )
    return tile, embed, finetune, mil


TileConfig, EmbedConfig, FinetuneStageConfig, MilStageConfig = _library_sections()


@dataclass
class PredictConfig:
    """``[predict]``: slide-level prediction with a trained MIL model (runs when ``model_dir`` is set)."""

    model_dir: Path | None = _opt(None, "folder of a trained MIL model")
    heatmaps: bool = param(True, doc="write OUT/heatmaps/<slide_id>.png")


@dataclass
class LocalConfig:
    """``[local]``: the embedded :class:`distributed.LocalCluster` (``cluster = "local"``).

    ``None`` sizes it to the machine: one single-threaded worker process per core (at
    most one per 2 GiB of memory), plus one worker per GPU that owns that GPU.
    """

    n_workers: int | None = _opt(positive, "CPU worker processes")
    threads_per_worker: int | None = _opt(positive, "threads per worker process")
    memory_limit: str | None = _opt(_memory, "per worker, e.g. '8GiB', or 'auto'")
    gpus: int | None = _opt(non_negative, "GPU workers (default: all visible GPUs when embedding)")
    dashboard_address: str | None = _opt(
        _dashboard, "default '127.0.0.1:8787' (this machine only); ':8787' opens it to all; '' disables it"
    )


@dataclass
class SlurmConfig:
    """``[slurm]``: a dask-jobqueue ``SLURMCluster`` (``cluster = "slurm"``, needs ``wsi-convnext[slurm]``).

    Each SLURM job runs ``processes`` Dask worker processes sharing ``cores`` and
    ``memory``; with ``gpus`` > 0 the job asks for ``--gres=gpu:<gpus>`` and its workers
    advertise the ``GPU`` resource that embedding tasks need.
    """

    queue: str | None = _opt(non_empty, "partition (-p)")
    account: str | None = _opt(non_empty, "account (-A)")
    cores: int = param(8, check=positive, doc="cores per job")
    memory: str = param("32GiB", check=_memory, doc="memory per job")
    processes: int = param(1, check=positive, doc="worker processes per job")
    gpus: int = param(0, check=non_negative, doc="GPUs per job")
    walltime: str = param("04:00:00", check=_walltime, doc="job time limit")
    job_extra_directives: list[str] = param(default_factory=list, doc="extra #SBATCH lines")
    job_script_prologue: list[str] = param(default_factory=list, doc="shell lines run first")
    local_directory: str | None = _opt(non_empty, "worker scratch space, e.g. '$TMPDIR'")
    log_directory: str | None = _opt(non_empty, "folder for the jobs' stdout/stderr")
    interface: str | None = _opt(non_empty, "network interface, e.g. 'ib0'")
    python: str | None = _opt(non_empty, "python on the compute nodes")
    minimum_jobs: int = param(0, check=non_negative, doc="adaptive lower bound")
    maximum_jobs: int = param(4, check=positive, doc="adaptive upper bound")
    dashboard_address: str | None = _opt(
        _dashboard, "scheduler dashboard; default '127.0.0.1:8787' (this machine only); '' disables it"
    )


@dataclass
class RunConfig:
    """A whole cohort run. See the module docstring for the file layout.

    Attributes:
        slides: Folders (searched recursively), CSV manifests (``path[,slide_id][,slide_mpp]``) or slide files.
        out: Output folder: ``<slide_id>.zarr`` stores, ``qc/``, ``manifest.csv``, ``report.html``.
        slide_mpp: Level-0 µm/px for slides whose metadata lacks it (manifest ``mpp`` wins).
        cluster: ``local`` (embedded LocalCluster), ``slurm`` or ``scheduler`` (``scheduler`` address).
        scheduler: Address of an existing Dask scheduler; setting it implies ``cluster = "scheduler"``.
        shard: ``(index, count)``: process only slides whose stable hash falls in shard ``index``
            (0-based) of ``count``; see :func:`wsi_convnext.cohort.shard_of`.
        overwrite: Redo finished stores and features instead of skipping them.
        max_in_flight: Slides submitted to the cluster at once (``None``: 4 per worker thread, at least 32).
        retries: Times a slide's stage is retried after the worker running it died (crash, OOM kill).
        report: Write ``OUT/report.html`` at the end.
        report_images: At most this many QC/heatmap thumbnails in the report (failed slides first).
    """

    slides: list[Path] = param(default_factory=list, doc="folders, CSV manifests or slides")
    out: Path | None = _opt(None, "output folder")
    slide_mpp: float | None = _opt(positive, "fallback level-0 µm/px")
    cluster: str = param("local", check=one_of(_cluster_kinds), doc="a registered cluster kind")
    scheduler: str | None = _opt(_address, "existing scheduler address")
    shard: tuple[int, int] | None = _opt(None, "'I/N': 0-based shard I of N")
    overwrite: bool = param(False, doc="redo finished work")
    max_in_flight: int | None = _opt(positive, "slides in flight")
    retries: int = param(2, check=non_negative, doc="retries after a worker died")
    report: bool = param(True, doc="write report.html")
    report_images: int = param(500, check=non_negative, doc="thumbnails in the report")
    tile: TileConfig = field(default_factory=TileConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)  # type: ignore[valid-type]
    mil: MilStageConfig = field(default_factory=MilStageConfig)  # type: ignore[valid-type]
    local: LocalConfig = field(default_factory=LocalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def stages(self) -> tuple[str, ...]:
        """The registered cohort stages this config runs, in order (per-slide ones first)."""
        from .cohort.stages import stage_plan

        return tuple(s.name for s in stage_plan(self))

    def tile_params(self) -> Any:
        """:class:`wsi_convnext.tiling.tiler.TileParams` from ``[tile]`` (unset keys keep its defaults).

        Raises:
            ParameterError: A value TileParams rejects (``name`` is the ``[tile]`` key).
            ConfigError: A value TissueParams rejects.
        """
        from .tiling.tiler import TileParams

        kwargs = _section_values(self.tile)
        kwargs.setdefault("workers", 1)  # slides are the unit of parallelism
        return TileParams(**kwargs)

    def embed_options(self) -> Any:
        """:class:`wsi_convnext.embed.EmbedOptions` from ``[embed]`` (unset keys keep its defaults)."""
        from .embed import EmbedOptions

        return EmbedOptions(**_section_values(self.embed, EmbedOptions))

    def encoder_config(self) -> Any:
        """:class:`wsi_convnext.encoders.EncoderConfig` from ``[embed]``, or None without ``model``."""
        from .encoders import EncoderConfig

        if not self.embed.model:
            return None
        return EncoderConfig(**_section_values(self.embed, EncoderConfig))

    def mil_config(self) -> Any:
        """:class:`wsi_convnext.mil.TrainConfig` from ``[mil]`` (unset keys keep its defaults)."""
        from .mil.config import TrainConfig

        return TrainConfig(**_section_values(self.mil, TrainConfig))

    @property
    def labels(self) -> Path | None:
        """The slide labels of the training stages: ``mil.labels``, else ``finetune.labels``."""
        if self.mil.labels is not None:
            return self.mil.labels
        return None if self.finetune.labels is None else Path(self.finetune.labels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (paths as strings), e.g. to record a run's settings."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _section_values(section: Any, target: type | None = None) -> dict[str, Any]:
    """The keys of a generated section that are set, as keyword arguments of ``target``
    (default: every field); a sub-table becomes its parameter object."""
    names = {f.name for f in dataclasses.fields(target)} if target is not None else None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is None or value == {} or (names is not None and f.name not in names):
            continue
        nested = f.metadata.get("params")
        out[f.name] = nested.from_kwargs(**value) if nested is not None else value
    return out


# --- loading -------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_shard(value: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parse ``"I/N"`` (0-based shard ``I`` of ``N``) into ``(I, N)``.

    Raises:
        ValueError: Not of the form ``I/N`` with ``0 <= I < N`` (message starts with "must be").
    """
    if isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = str(value).strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError("must be 'I/N' with 0 <= I < N (0-based shard index)") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(
            f"must be 'I/N' with 0 <= I < N (0-based, e.g. SLURM_ARRAY_TASK_ID with --array=0-{max(n, 1) - 1})"
        )
    return i, n


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {str: "strings", Path: "paths", int: "integers", float: "numbers"}
        return f"a list of {plural.get(item, _describe(item))}"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
    }.get(tp, getattr(tp, "__name__", str(tp)))


class _Bad(Exception):
    """Internal: a value does not fit a type (message: what was expected)."""


def _coerce(tp: Any, value: Any) -> Any:
    """Convert a TOML/override value to ``tp`` or raise ``_Bad``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _coerce(args[0], value)
        for a in args:
            try:
                return _coerce(a, value)
            except _Bad:
                continue
        raise _Bad(_describe(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Bad(_describe(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        try:
            return [_coerce(item, v) for v in items]
        except _Bad:
            raise _Bad(_describe(tp)) from None
    if origin in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
        raise _Bad("a table")
    if origin is tuple:  # only the shard
        try:
            return parse_shard(value)
        except ValueError as exc:
            raise _Bad(str(exc).removeprefix("must be ")) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _Bad(_describe(tp))
    if tp is int:
        if isinstance(value, bool):
            raise _Bad(_describe(tp))
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _Bad(_describe(tp))
    if tp is float:
        if isinstance(value, bool):
            raise _Bad(_describe(tp))
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Bad(_describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad(_describe(tp))
    if tp is Path:
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(os.path.expanduser(str(value)))
        raise _Bad(_describe(tp))
    raise _Bad(_describe(tp))  # pragma: no cover - a type this loader does not know


def _suggest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else f" (known keys: {', '.join(sorted(known))})"


def _set(obj: Any, dotted: str, value: Any, source: str) -> None:
    """Set ``dotted`` (e.g. ``tile.mpp``) on the config tree ``obj`` from a raw value."""
    parts = dotted.split(".")
    target = obj
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            break
        hints = _hints(type(target))
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest(part, list(fields))}")
        f = fields[part]
        tp = hints[part]
        rest = parts[depth + 1 :]
        if dataclasses.is_dataclass(tp):
            if not rest:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{source}: '{dotted}' must be a table ([{dotted}]), got {value!r}")
                for k, v in value.items():
                    _set(obj, f"{dotted}.{k}", v, source)
                return
            target = getattr(target, part)
            continue
        if typing.get_origin(tp) is dict:
            current = dict(getattr(target, part))
            if rest:
                current[".".join(rest)] = value
            elif isinstance(value, Mapping):
                current.update(value)
            else:
                raise ConfigError(f"{source}: '{dotted}' must be a table, got {value!r}")
            setattr(target, part, {k: v for k, v in current.items() if v is not None})
            return
        if rest:
            raise ConfigError(f"{source}: '{'.'.join(parts[: depth + 1])}' is not a table; unknown key '{dotted}'")
        if value is None:  # absent/None keeps the default
            return
        try:
            coerced = _coerce(tp, value)
        except _Bad as exc:
            raise ConfigError(f"{source}: '{dotted}' must be {exc}, got {value!r}") from None
        check = f.metadata.get("check")
        if check is not None and coerced is not None:
            items = coerced if isinstance(coerced, list) else [coerced]
            for item in items:
                problem = check(item)
                if problem:
                    raise ConfigError(f"{source}: '{dotted}' {problem}, got {value!r}")
        setattr(target, part, coerced)
        return


def _check_tissue(cfg: RunConfig, source: str) -> None:
    """Validate ``[tile.tissue]`` keys against TissueParams when the tissue module is available."""
    if not cfg.tile.tissue:
        return
    from .tiling.tissue import TissueParams

    known = [f.name for f in dataclasses.fields(TissueParams)]
    for key in cfg.tile.tissue:
        if key not in known:
            raise ConfigError(f"{source}: unknown key 'tile.tissue.{key}'{_suggest(key, known)}")
    try:
        TissueParams.from_kwargs(**cfg.tile.tissue)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [tile.tissue]: {exc}") from exc


def _finish(cfg: RunConfig, source: str) -> RunConfig:
    if cfg.scheduler and cfg.cluster == "local":
        cfg.cluster = "scheduler"
    if cfg.cluster == "scheduler" and not cfg.scheduler:
        raise ConfigError(f"{source}: cluster = 'scheduler' needs 'scheduler' (e.g. 'tcp://host:8786')")
    if cfg.slurm.minimum_jobs > cfg.slurm.maximum_jobs:
        raise ConfigError(
            f"{source}: 'slurm.minimum_jobs' ({cfg.slurm.minimum_jobs}) exceeds "
            f"'slurm.maximum_jobs' ({cfg.slurm.maximum_jobs})"
        )
    if cfg.slurm.processes > cfg.slurm.cores:
        raise ConfigError(
            f"{source}: 'slurm.processes' ({cfg.slurm.processes}) exceeds 'slurm.cores' ({cfg.slurm.cores})"
        )
    if cfg.predict.model_dir and not cfg.embed.model:
        raise ConfigError(f"{source}: 'predict.model_dir' needs 'embed.model' (prediction reads embeddings)")
    _check_tissue(cfg, source)
    if (cfg.finetune.labels or cfg.mil.labels) and not cfg.embed.model:
        raise ConfigError(f"{source}: 'finetune.labels' / 'mil.labels' need 'embed.model' (the encoder to train and embed with)")
    if cfg.finetune.labels and cfg.shard is not None:
        raise ConfigError(f"{source}: [finetune] trains on the whole cohort; run it without 'shard'")
    checks = [("tile", cfg.tile_params), ("embed", cfg.embed_options), ("embed", cfg.encoder_config)]
    if cfg.labels is not None:  # TrainConfig checks its aggregator with torch: only when it trains
        checks.append(("mil", cfg.mil_config))
    for section, build in checks:
        try:
            build()
        except ParameterError as exc:
            raise ConfigError(f"{source}: {exc.render(repr(f'{section}.{exc.name}'))}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{source}: [{section}]: {exc}") from exc
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_io: bool = True,
) -> RunConfig:
    """Read a TOML run config and apply overrides (e.g. from command-line flags).

    Args:
        path: A ``.toml`` file, or None for defaults plus ``overrides`` only.
        overrides: Dotted keys → values, e.g. ``{"slides": ["/data"], "tile.mpp": 0.5,
            "embed.model": "convnext_tiny", "predict.model_dir": "m/", "shard": "0/4"}``.
            ``None`` values are ignored, so unset flags keep the file's values.
        require_io: Require ``slides`` and ``out`` to be set (after overrides).

    Returns:
        The validated config.

    Raises:
        ConfigError: Unreadable TOML, an unknown key (with a did-you-mean hint), a bad value,
            or a missing ``slides``/``out``. The message is one line and names the key.
        InputNotFoundError: ``path`` does not exist.
    """
    import tomllib

    from .errors import InputNotFoundError

    cfg = RunConfig()
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise InputNotFoundError(f"{p}: config file not found")
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not a UTF-8 text file") from exc
        for key, value in data.items():
            _set(cfg, key, value, source)
    if overrides:
        for key, value in overrides.items():
            if value is None:
                continue
            _set(cfg, key, value, "command line")
        source = source if path is not None else "command line"
    cfg = _finish(cfg, source)
    if require_io:
        if not cfg.slides:
            raise ConfigError(f"{source}: no slides given (set 'slides' or pass --slides)")
        if cfg.out is None:
            raise ConfigError(f"{source}: no output folder given (set 'out' or pass --out)")
    return cfg


def config_keys() -> list[str]:
    """Every valid dotted key (for documentation and shell completion)."""

    def walk(cls: type, prefix: str) -> list[str]:
        keys: list[str] = []
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                keys += walk(tp, f"{prefix}{f.name}.")
            else:
                keys.append(prefix + f.name)
        return keys

    return walk(RunConfig, "")
