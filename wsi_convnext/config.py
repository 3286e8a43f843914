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

Each cluster kind brings its own table (:class:`ClusterKind`, registered in
:mod:`wsi_convnext.cohort.clusters`); the values are converted and checked once, by
:func:`wsi_convnext.coercion.assign`, as they are read.

Every key is optional except ``slides`` and ``out``; a key that is absent or set to
nothing keeps the library default. Relative paths are relative to the current working
directory (the same as command-line flags), not to the config file. An unknown key or a
bad value raises a one-line :class:`~wsi_convnext.errors.ConfigError` that names it.
The ready configs in ``pipelines/`` are loaded by the test suite, so they stay valid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._registry import Registry
from .coercion import assign, suggest
from .encoders.device import DEVICE_FORMS, check_device
from .errors import ConfigError
from .params import ParameterError, non_negative, one_of, param, positive
from .slide.mpp import check_slide_mpp

__all__ = [
    "CLUSTER_KINDS",
    "ClusterKind",
    "EmbedConfig",
    "FinetuneStageConfig",
    "MilStageConfig",
    "PretrainStageConfig",
    "PredictConfig",
    "RunConfig",
    "TileConfig",
    "config_keys",
    "load_config",
    "parse_shard",
]

# --- value checks (field metadata "check": value -> problem text or None) -----------------

def _address(v: str) -> str | None:
    return None if re.match(r"^[a-z0-9+]+://\S+$", v) else "must be a scheduler address such as 'tcp://host:8786'"


def _open_fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _opt(check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    return param(None, check=check, doc=doc)


# --- sections ------------------------------------------------------------------------------


def _section(name: str, doc: str, sources: Sequence[type], *, exclude: Sequence[str] = (),
             extra: Sequence[tuple[str, Any, Any]] = (), built_on_load: bool = False) -> type:  # fmt: skip
    """A config section whose keys are the fields of library parameter objects, all optional.

    Each key keeps its source field's type, check and help text (``None``: the library
    default); a field that is itself a parameter object (``TileParams.tissue``) becomes a
    sub-table of its keyword arguments. So the sections cannot drift from the library.
    With ``built_on_load`` the parameter objects are built by :func:`load_config` in any case,
    so their own checks run there, once, and the keys carry no copy of them.
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
                meta = {k: v for k, v in f.metadata.items() if not (built_on_load and k == "check")}
                fields.append((f.name, tp | None, field(default=None, metadata=meta)))
    return dataclasses.make_dataclass(name, [*fields, *extra], namespace={"__doc__": doc, "__module__": __name__})


def _library_sections() -> tuple[type, type, type, type, type]:
    from .embed import EmbedOptions
    from .encoders import EncoderConfig
    from .finetune.config import FinetuneConfig
    from .mil.config import TrainConfig
    from .pretrain.config import PretrainConfig
    from .tiling.tiler import TileParams

    tile = _section(
        "TileConfig",
        """``[tile]``: the fields of :class:`wsi_convnext.tiling.tiler.TileParams` (``[tile.tissue]``: of
        :class:`wsi_convnext.tiling.tissue.TissueParams`). ``None`` (absent) keeps the library default;
        ``workers`` defaults to 1 inside a cohort run, where slides are the unit of parallelism.""",
        [TileParams],
        built_on_load=True,
    )
    embed = _section(
        "EmbedConfig",
        """``[embed]``: the fields of :class:`wsi_convnext.encoders.EncoderConfig` (the encoder) and of
        :class:`wsi_convnext.embed.EmbedOptions`, plus ``device``. Embedding runs when ``model`` is set.""",
        [EncoderConfig, EmbedOptions],
        exclude=("timm_kwargs",),
        extra=[("device", str | None, _opt(check_device, DEVICE_FORMS))],
        built_on_load=True,
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
    pretrain = _section(
        "PretrainStageConfig",
        """``[pretrain]``: self-supervised pretraining of the ``[embed]`` encoder on the tiles of every
        slide of the cohort, without labels (the cohort-scope ``pretrain`` stage, before ``finetune``
        and ``embed``, on every GPU of its node); the training fields of
        :class:`wsi_convnext.pretrain.PretrainConfig`. Runs when ``enabled`` is true.""",
        [PretrainConfig],
        exclude=("data", "out", "model", "stem", "init", "overwrite"),
        extra=[("enabled", bool | None, _opt(None, "run the cohort-scope pretrain stage (default false)"))],
    )
    return tile, embed, finetune, mil, pretrain


TileConfig, EmbedConfig, FinetuneStageConfig, MilStageConfig, PretrainStageConfig = _library_sections()


@dataclass
class PredictConfig:
    """``[predict]``: slide-level prediction with a trained MIL model (runs when ``model_dir`` is set)."""

    model_dir: Path | None = _opt(None, "folder of a trained MIL model")
    heatmaps: bool = param(True, doc="write OUT/heatmaps/<slide_id>.png")


@dataclass(frozen=True)
class ClusterKind:
    """A registered cluster kind: where a run's Dask workers come from (see :mod:`wsi_convnext.cohort.clusters`).

    Attributes:
        name: The run config's ``cluster`` value.
        opener: ``opener(config)``, a context manager yielding the open cluster's ``ClusterInfo``.
        section: Its own ``[name]`` table: a dataclass of ``param()`` fields (None: no settings).
            A ``check(self) -> None`` method on it (raising ConfigError) checks settings that
            depend on each other.
    """

    name: str
    opener: Callable[[Any], ContextManager[Any]]
    section: type | None = None


#: The cluster kinds (``cluster = "..."``), each with its own config section. The registry lives
#: here so that the config lists kinds and reads their sections without importing the cohort
#: package; :mod:`wsi_convnext.cohort.clusters` registers the built-in kinds when first looked up.
CLUSTER_KINDS: Registry[ClusterKind] = Registry(
    "cluster kind", loader="wsi_convnext.cohort.clusters", declares=("local", "scheduler", "slurm")
)


@dataclass
class RunConfig:
    """A whole cohort run. See the module docstring for the file layout.

    Attributes:
        slides: Folders (searched recursively), CSV manifests (``path[,slide_id][,slide_mpp]``) or slide files.
        out: Output folder: ``<slide_id>.zarr`` stores, ``qc/``, ``manifest.csv``, ``report.html``.
        slide_mpp: Level-0 µm/px for slides whose metadata lacks it (a manifest's ``slide_mpp`` column wins).
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
    slide_mpp: float | None = _opt(check_slide_mpp, "fallback level-0 µm/px")
    cluster: str = param("local", check=one_of(CLUSTER_KINDS.names), doc="a registered cluster kind")
    scheduler: str | None = _opt(_address, "existing scheduler address")
    shard: tuple[int, int] | None = param(None, parse=lambda v: parse_shard(v), doc="'I/N': 0-based shard I of N")
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
    pretrain: PretrainStageConfig = field(default_factory=PretrainStageConfig)  # type: ignore[valid-type]
    _sections: dict[str, Any] = field(default_factory=dict, repr=False)  # the cluster kinds' tables, by kind

    def section(self, kind: str) -> Any:
        """The ``[kind]`` table of a registered cluster kind (its defaults until set).

        Raises:
            ConfigError: ``kind`` is unknown or has no settings.
        """
        spec = CLUSTER_KINDS.lookup(kind)
        if spec.section is None:
            raise ConfigError(f"cluster kind {kind!r} has no settings")
        if kind not in self._sections:
            self._sections[kind] = spec.section()
        return self._sections[kind]

    def with_section(self, kind: str, **changes: Any) -> RunConfig:
        """A copy with fields of the ``[kind]`` table changed (not checked: for tests and tools)."""
        sections = {**self._sections, kind: dataclasses.replace(self.section(kind), **changes)}
        return dataclasses.replace(self, _sections=sections)

    def extension_section(self, name: str) -> Any:
        """``[name]`` when it is a cluster kind's table, else None (see :func:`~wsi_convnext.coercion.assign`)."""
        spec = CLUSTER_KINDS.get(name)
        return None if spec is None or spec.section is None else self.section(name)

    def extension_names(self) -> tuple[str, ...]:
        """The cluster kinds that have a table."""
        return tuple(k.name for k in CLUSTER_KINDS.values() if k.section is not None)

    def __getattr__(self, name: str) -> Any:
        # ``config.local``, ``config.slurm``: a cluster kind's table, read like a field.
        if name.startswith("_") or name not in CLUSTER_KINDS:
            raise AttributeError(name)
        return self.section(name)

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

    def encoder_config(self, *, check: bool = False) -> Any:
        """:class:`wsi_convnext.encoders.EncoderConfig` from ``[embed]``, or None without ``model``
        (with ``check``: built anyway, with the default model, so that its checks run)."""
        from .encoders import EncoderConfig

        if not self.embed.model and not check:
            return None
        values = _section_values(self.embed, EncoderConfig)
        if not self.embed.model:  # "" unsets the model (no embedding): its other keys are still checked
            values.pop("model", None)
        return EncoderConfig(**values)

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
        """JSON-friendly dict (paths as strings; one table per cluster kind), e.g. to record a run's settings."""
        out = dataclasses.asdict(self)
        del out["_sections"]
        out.update({kind: dataclasses.asdict(self.section(kind)) for kind in self.extension_names()})
        return json.loads(json.dumps(out, default=str))


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


def _check_tissue(cfg: RunConfig, source: str) -> None:
    """Validate ``[tile.tissue]`` keys against TissueParams when the tissue module is available."""
    if not cfg.tile.tissue:
        return
    from .tiling.tissue import TissueParams

    known = [f.name for f in dataclasses.fields(TissueParams)]
    for key in cfg.tile.tissue:
        if key not in known:
            raise ConfigError(f"{source}: unknown key 'tile.tissue.{key}'{suggest(key, known)}")
    try:
        TissueParams.from_kwargs(**cfg.tile.tissue)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [tile.tissue]: {exc}") from exc


def _finish(cfg: RunConfig, source: str) -> RunConfig:
    if cfg.scheduler and cfg.cluster == "local":
        cfg.cluster = "scheduler"
    if cfg.cluster == "scheduler" and not cfg.scheduler:
        raise ConfigError(f"{source}: cluster = 'scheduler' needs 'scheduler' (e.g. 'tcp://host:8786')")
    for section in cfg._sections.values():
        check = getattr(section, "check", None)
        if check is not None:
            try:
                check()
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from exc
    if cfg.predict.model_dir and not cfg.embed.model:
        raise ConfigError(f"{source}: 'predict.model_dir' needs 'embed.model' (prediction reads embeddings)")
    _check_tissue(cfg, source)
    if (cfg.finetune.labels or cfg.mil.labels) and not cfg.embed.model:
        raise ConfigError(f"{source}: 'finetune.labels' / 'mil.labels' need 'embed.model' (the encoder to train and embed with)")
    if cfg.finetune.labels and cfg.shard is not None:
        raise ConfigError(f"{source}: [finetune] trains on the whole cohort; run it without 'shard'")
    if cfg.pretrain.enabled and not cfg.embed.model:
        raise ConfigError(f"{source}: 'pretrain.enabled' needs 'embed.model' (the encoder to pretrain and embed with)")
    if cfg.pretrain.enabled and cfg.shard is not None:
        raise ConfigError(f"{source}: [pretrain] trains on the whole cohort; run it without 'shard'")
    checks = [("tile", cfg.tile_params), ("embed", cfg.embed_options), ("embed", lambda: cfg.encoder_config(check=True))]
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
            assign(cfg, key, value, source)
    if overrides:
        for key, value in overrides.items():
            if value is None:
                continue
            assign(cfg, key, value, "command line")
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
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                keys += walk(tp, f"{prefix}{f.name}.")
            else:
                keys.append(prefix + f.name)
        return keys

    keys = walk(RunConfig, "")
    for kind in CLUSTER_KINDS.values():
        if kind.section is not None:
            keys += walk(kind.section, f"{kind.name}.")
    return keys
