"""Run configs: TOML + overrides → RunConfig, with one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest

from wsi_convnext.cohort import stage_plan
from wsi_convnext.config import EmbedConfig, RunConfig, TileConfig, config_keys, load_config, parse_shard
from wsi_convnext.errors import ConfigError, InputNotFoundError


def _stages(cfg: RunConfig) -> tuple[str, ...]:
    return tuple(s.name for s in stage_plan(cfg))

REPO = Path(__file__).resolve().parent.parent
PIPELINES = sorted((REPO / "pipelines").glob("*.toml"))


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_pipelines_exist() -> None:
    names = {p.name for p in PIPELINES}
    assert {"local.toml", "slurm-gpu.toml", "existing-scheduler.toml"} <= names
    assert (REPO / "pipelines" / "slurm-array.sbatch").is_file()


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.slides and cfg.out is not None
    assert path.read_text().startswith("#"), "each ready config explains itself in a comment at its top"
    expected = {"local.toml": "local", "slurm-gpu.toml": "slurm", "existing-scheduler.toml": "scheduler"}
    if path.name in expected:
        assert cfg.cluster == expected[path.name]
    if cfg.cluster == "slurm":
        assert cfg.slurm.gpus >= 1
    if cfg.embed.stem is not None:
        from wsi_convnext.encoders import STEMS

        assert cfg.embed.stem in STEMS


def test_sbatch_script_shards_by_array_index() -> None:
    text = (REPO / "pipelines" / "slurm-array.sbatch").read_text()
    assert text.startswith("#!/bin/bash\n#")
    assert "#SBATCH --array=0-" in text
    assert '--shard "${SLURM_ARRAY_TASK_ID}/${N_SHARDS}"' in text


def test_defaults_and_file_values(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        """
slides = ["a/", "b.csv"]
out = "o"
slide_mpp = 0.25
[tile]
mpp = 1
tile_size = 256
[tile.tissue]
min_saturation = 0.1
[embed]
model = "convnext_atto"
[local]
n_workers = 3
""",
    )
    cfg = load_config(p)
    assert cfg.slides == [Path("a/"), Path("b.csv")]
    assert cfg.out == Path("o") and cfg.slide_mpp == 0.25
    assert cfg.tile.mpp == 1.0 and isinstance(cfg.tile.mpp, float)
    assert cfg.tile.tile_size == 256 and cfg.tile.overlap is None  # absent keeps the library default
    assert cfg.tile.tissue == {"min_saturation": 0.1}
    assert _stages(cfg) == ("tile", "embed")
    assert cfg.local.n_workers == 3 and cfg.cluster == "local"
    params = cfg.tile_params()
    assert params.mpp == 1.0 and params.tile_size == 256 and params.workers == 1
    assert params.tissue.min_saturation == 0.1
    from wsi_convnext.tiling.tiler import TileParams

    assert params.overlap == TileParams().overlap  # None never overrides a library default


def test_overrides_win_and_none_keeps_file_value(tmp_path: Path) -> None:
    p = _write(tmp_path, 'slides = ["a"]\nout = "o"\n[tile]\nmpp = 0.5\n[embed]\nmodel = "convnext_atto"\n')
    cfg = load_config(p, {"tile.mpp": "0.25", "embed.model": None, "out": "o2", "predict.model_dir": "m"})
    assert cfg.tile.mpp == 0.25
    assert cfg.embed.model == "convnext_atto"
    assert cfg.out == Path("o2")
    assert _stages(cfg) == ("tile", "embed", "predict")


def test_flags_only_and_scheduler_implies_cluster() -> None:
    cfg = load_config(None, {"slides": "x", "out": "y", "scheduler": "tcp://h:8786", "shard": "2/5"})
    assert cfg.slides == [Path("x")]
    assert cfg.cluster == "scheduler" and cfg.shard == (2, 5)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[tile]\nmsp = 0.5', "unknown key 'tile.msp' (did you mean 'mpp'?)"),
        ("clustr = 'local'", "unknown key 'clustr' (did you mean 'cluster'?)"),
        ("[tiles]\nmpp = 0.5", "unknown key 'tiles' (did you mean 'tile'?)"),
        ("[tile.tissue]\nmin_saturaton = 0.1", "unknown key 'tile.tissue.min_saturaton' (did you mean 'min_saturation'?)"),
        ("[tile]\nmpp = 'fine'", "'tile.mpp' must be a number, got 'fine'"),
        ("[tile]\nmpp = -1", "'tile.mpp' must be positive and finite, got -1"),
        ("[tile]\ntile_size = 2.5", "'tile.tile_size' must be an integer"),
        ("[tile]\nmin_tissue = 2", "'tile.min_tissue' must be between 0 and 1"),
        ("[tile]\noverlap = 500", "'tile.overlap' must be in [0, tile size 224), got 500"),
        ("[tile]\nbackend = 'bioformats'", "'tile.backend' must be one of 'auto', 'openslide', 'tiffslide'"),
        ("[embed]\nmodel = 'convnext_atto'\nbatch_size = 0", "'embed.batch_size' must be at least 1, got 0"),
        ("[embed]\nmodel = 'convnext_atto'\ndtype = 'int8'", "'embed.dtype' must be one of 'float16', 'float32'"),
        ("cluster = 'kubernetes'", "'cluster' must be one of 'local', 'scheduler', 'slurm', got 'kubernetes'"),
        ("cluster = 'scheduler'", "cluster = 'scheduler' needs 'scheduler'"),
        ("scheduler = 'head:8786'", "'scheduler' must be a scheduler address"),
        ("shard = '4/4'", "'shard' must be 'I/N' with 0 <= I < N"),
        ("overwrite = 'maybe'", "'overwrite' must be true or false"),
        ("tile = 3", "'tile' must be a table"),
        ("[slurm]\nwalltime = 'two hours'", "'slurm.walltime' must be a SLURM time"),
        ("[slurm]\nminimum_jobs = 5\nmaximum_jobs = 2", "'slurm.minimum_jobs' (5) exceeds 'slurm.maximum_jobs' (2)"),
        ("[predict]\nmodel_dir = 'm'", "'predict.model_dir' needs 'embed.model'"),
        ("[embed]\nstem = 'bogus'", "'embed.stem' must be one of 'patch', 'overlap', 'overlap_tiered', 'overlap_act' (the stems of 'convnext_tiny'), got 'bogus'"),
        ("[embed]\nmodel = 'convnext_atto'\nstem = 'bogus'", "(the stems of 'convnext_atto'), got 'bogus'"),
        ("[embed]\nmodel = 'resnet50'\nstem = 'overlap'", "'embed.stem' is not a choice: 'resnet50' has no stem choices"),
        ("[embed]\ndevice = 'quantum'", "'embed.device' must be auto, cpu, cuda, cuda:N or mps, got 'quantum'"),
        ("[embed]\nstem_init = 'warm'", "'embed.stem_init' must be one of 'checkpoint', 'random', got 'warm'"),
        ("[finetune]\ndevice = 'gpu'", "'finetune.device' must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("[mil]\ndevice = 'gpu'", "'mil.device' must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("slide_mpp = 0", "'slide_mpp' must be the level-0 µm/px, between 0.05 and 100"),
        ("slide_mpp = -0.5", "'slide_mpp' must be the level-0 µm/px, between 0.05 and 100"),
        ("[slurm]\nprocesses = 16", "'slurm.processes' (16) exceeds 'slurm.cores' (8)"),
        ("slides = [", "invalid TOML"),
    ],
)
def test_bad_config_is_one_line_error_naming_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    p = _write(tmp_path, 'slides = ["a"]\nout = "o"\n' + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(p)), msg
    assert fragment in msg, msg


def test_override_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'tile.msp' \(did you mean 'mpp'\?\)$"):
        load_config(None, {"slides": "a", "out": "o", "tile.msp": 1})


def test_missing_slides_out_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no slides given"):
        load_config(None, {"out": "o"})
    with pytest.raises(ConfigError, match="no output folder"):
        load_config(None, {"slides": "a"})
    assert load_config(None, {}, require_io=False).out is None
    with pytest.raises(InputNotFoundError):
        load_config(tmp_path / "nope.toml")


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 3/8 ") == (3, 8)
    for bad in ("1/0", "-1/4", "4/4", "a/b", "3", "1/2/3"):
        with pytest.raises(ValueError, match="0-based"):
            parse_shard(bad)


def test_sections_match_the_library_signatures() -> None:
    """Every [tile]/[embed] key is a real parameter, so configs cannot silently drift."""
    from wsi_convnext.embed import embed_store
    from wsi_convnext.encoders import build_encoder
    from wsi_convnext.tiling.tiler import TileParams

    tile_keys = {f.name for f in dataclasses.fields(TileConfig)}
    assert tile_keys <= {f.name for f in dataclasses.fields(TileParams)}
    embed_keys = {f.name for f in dataclasses.fields(EmbedConfig)} - {"model"}
    accepted = set(inspect.signature(build_encoder).parameters) | set(inspect.signature(embed_store).parameters)
    assert embed_keys <= accepted


def test_config_keys_and_to_dict() -> None:
    keys = config_keys()
    assert "tile.mpp" in keys and "slurm.gpus" in keys and "local.n_workers" in keys
    d = load_config(None, {"slides": "a", "out": "o"}).to_dict()
    assert d["out"] == "o" and d["tile"]["mpp"] is None
    assert isinstance(RunConfig().tile, TileConfig)


def test_sections_are_the_library_parameter_objects() -> None:
    """[tile] and [embed] are generated from the library's parameter objects: same keys, same checks."""
    from wsi_convnext.embed import EmbedOptions
    from wsi_convnext.encoders import EncoderConfig
    from wsi_convnext.tiling.tiler import TileParams

    assert {f.name for f in dataclasses.fields(TileConfig)} == {f.name for f in dataclasses.fields(TileParams)}
    embed_sources = {f.name for f in dataclasses.fields(EncoderConfig)} | {f.name for f in dataclasses.fields(EmbedOptions)}
    assert {f.name for f in dataclasses.fields(EmbedConfig)} == (embed_sources - {"timm_kwargs"}) | {"device"}
    cfg = load_config(None, {"slides": "a", "out": "o", "embed.model": "convnext_atto", "embed.batch_size": 8,
                             "embed.stem": "overlap", "tile.quality": 80})  # fmt: skip
    assert cfg.embed_options() == EmbedOptions(batch_size=8)
    assert cfg.encoder_config() == EncoderConfig(model="convnext_atto", stem="overlap")
    assert cfg.tile_params() == TileParams(quality=80, workers=1)
    assert load_config(None, {"slides": "a", "out": "o"}).encoder_config() is None


def test_a_registered_cluster_kind_is_a_valid_cluster(tmp_path: Path) -> None:
    import contextlib

    from wsi_convnext.cohort import clusters

    from wsi_convnext.config import CLUSTER_KINDS
    from wsi_convnext.params import param, positive

    @dataclass
    class KubeConfig:
        pods: int = param(2, check=positive, doc="worker pods")

    with pytest.raises(ConfigError, match="'cluster' must be one of"):
        load_config(None, {"slides": "a", "out": "o", "cluster": "kube"})
    with pytest.raises(ConfigError, match="unknown key 'kube.pods'"):
        load_config(None, {"slides": "a", "out": "o", "kube.pods": 3})
    clusters.register_cluster("kube", section=KubeConfig)(contextlib.nullcontext)
    try:
        cfg = load_config(None, {"slides": "a", "out": "o", "cluster": "kube", "kube.pods": 3})
        assert cfg.cluster == "kube" and cfg.kube.pods == 3 and "kube.pods" in config_keys()
        assert cfg.to_dict()["kube"] == {"pods": 3}
        with pytest.raises(ConfigError, match="'kube.pods' must be positive, got 0"):
            load_config(None, {"slides": "a", "out": "o", "cluster": "kube", "kube.pods": 0})
    finally:
        CLUSTER_KINDS.unregister("kube")
