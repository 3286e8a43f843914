"""The one registry type (``wsi_convnext._registry``), the registries on it, and the front ends
that list them: the CLI's choices and help, and the run config's keys kept in step with it."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_convnext._registry import Registry
from wsi_convnext.errors import ConfigError, EncoderError

ROOT = Path(__file__).resolve().parents[1]


def test_one_rule_for_names() -> None:
    reg: Registry[object] = Registry("widget")
    a, b = object(), object()
    assert reg.register("a", a) is a
    reg.register("a", a)  # the same object again: a no-op
    with pytest.raises(ConfigError, match=r"a widget named 'a' is already registered .*replace=True"):
        reg.register("a", b)
    reg.register("a", b, replace=True)
    reg.register("c", a)
    reg.register("b", b, before="c")
    assert reg.names() == ("a", "b", "c") and list(reg) == ["a", "b", "c"] and reg["b"] is b
    with pytest.raises(ConfigError, match="unknown widget 'z'; choose one of: a, b, c"):
        reg.lookup("z")
    with pytest.raises(ConfigError, match="unknown widget 'z'"):
        reg.register("y", a, before="z")
    with pytest.raises(ConfigError, match="non-empty name"):
        reg.register("", a)
    assert reg.get("z") is None and "z" not in reg
    reg.unregister("a")
    assert reg.names() == ("b", "c")


def test_every_registry_is_one_and_follows_the_rule() -> None:
    from wsi_convnext.config import CLUSTER_KINDS
    from wsi_convnext.cohort.stages import _REGISTRY as STAGES
    from wsi_convnext.encoders import FAMILIES, PRESETS, STEMS
    from wsi_convnext.mil.config import AGGREGATORS
    from wsi_convnext.outputs.exports import FORMATS
    from wsi_convnext.pretrain.methods import METHODS
    from wsi_convnext.slide.base import _BACKENDS
    from wsi_convnext.tiling.tissue import _METHODS
    from wsi_convnext.transforms import TRANSFORMS

    registries = [_BACKENDS, FAMILIES, STEMS, PRESETS, AGGREGATORS, METHODS, TRANSFORMS, STAGES, CLUSTER_KINDS, FORMATS, _METHODS]
    assert all(isinstance(r, Registry) for r in registries) and len({r.kind for r in registries}) == 11
    for reg in registries:
        name = reg.names()[0]
        other = object()
        with pytest.raises(ConfigError, match=f"named {name!r} is already registered"):
            reg.register(name, other)  # type: ignore[arg-type]
    assert isinstance(FAMILIES.error, type) and issubclass(FAMILIES.error, EncoderError)


def test_stage_lists_are_asked_when_called() -> None:
    from wsi_convnext.cohort import noop_stages, register_stage, stage_functions, unregister_stage
    from wsi_convnext.cohort.stages import StageSpec

    assert {"tile", "embed", "predict", "finetune", "mil"} <= set(stage_functions())
    register_stage(StageSpec("census-of-now", lambda slide, config, state: {}))
    try:
        assert "census-of-now" in stage_functions() and "census-of-now" in noop_stages()
    finally:
        unregister_stage("census-of-now")
    assert "census-of-now" not in stage_functions()


@pytest.mark.parametrize(
    ("module", "registry", "names"),
    [("wsi_convnext.mil.config", "AGGREGATORS", "mean,maxpool,abmil,dsmil,clam_sb"),
     ("wsi_convnext.pretrain.methods", "METHODS", "dino,simclr")],
)  # fmt: skip
def test_torch_built_ins_are_listed_without_torch(module: str, registry: str, names: str) -> None:
    code = f"import sys; from {module} import {registry} as R; print(','.join(R.names()), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == [names, "False"]


def _option_help(result_output: str) -> str:
    return re.sub(r"[\s│]+", " ", result_output)


def test_user_registered_aggregator_and_transform_are_in_help_and_accepted(tmp_path: Path) -> None:
    import torch

    from wsi_convnext.cli import app
    from wsi_convnext.mil.aggregators import AGGREGATORS, Aggregator, AggregatorOutput, register_aggregator
    from wsi_convnext.mil.config import TrainConfig
    from wsi_convnext.transforms import TRANSFORMS, TileTransform, TransformSpec, register_transform

    @register_aggregator("userpool")
    class UserPool(Aggregator):
        def __init__(self, in_dim: int, n_classes: int) -> None:
            super().__init__(in_dim, n_classes)
            self.fc = torch.nn.Linear(in_dim, self.n_out)

        def forward(self, x: torch.Tensor, target: int | None = None) -> AggregatorOutput:
            return AggregatorOutput(self.to_logits(self.fc(x.mean(0))), torch.ones(x.shape[0]))

    class UserStain(TileTransform):
        name = "userstain"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    register_transform(TransformSpec("userstain", UserStain, "stain", "a user's stain normaliser"))
    runner = CliRunner()
    try:
        train_help = _option_help(runner.invoke(app, ["train", "--help"], terminal_width=200).output)
        embed_help = _option_help(runner.invoke(app, ["embed", "--help"], terminal_width=200).output)
        assert "clam_sb, userpool (default: dsmil)." in train_help and "none, macenko, reinhard, userstain" in embed_help
        assert TrainConfig.create(aggregator="userpool").aggregator == "userpool"  # what `train` builds
        # Accepted by the CLI: the run gets past option parsing to the (missing) stores.
        res = runner.invoke(app, ["embed", str(tmp_path / "none"), "--stain", "userstain"])
        assert "Invalid value" not in res.output and "no such file" in res.output.lower()
        res = runner.invoke(app, ["train", str(tmp_path / "none"), "--labels", "x.csv", "--aggregator", "userpool"])
        assert "aggregator" not in res.output and res.exit_code != 0
        res = runner.invoke(app, ["embed", str(tmp_path / "none"), "--stain", "vahadane"])
        assert res.exit_code == 2 and "unknown stain normalisation 'vahadane'" in _option_help(res.output)
    finally:
        AGGREGATORS.unregister("userpool")
        TRANSFORMS.unregister("userstain")
    assert "userpool" not in _option_help(runner.invoke(app, ["train", "--help"], terminal_width=200).output)


def test_a_user_backend_and_stem_appear_in_help() -> None:
    from wsi_convnext.cli import app
    from wsi_convnext.encoders import STEMS, StemSpec, register_stem
    from wsi_convnext.slide import base as slide_base
    from wsi_convnext.slide import register_backend

    saved = slide_base._BACKENDS.snapshot(), list(slide_base._AUTO_ORDER)
    register_backend("userreader", slide_base.BaseSlideReader, auto=False)
    register_stem(StemSpec("userstem", "patch", "patch", True, "a user's stem"))
    try:
        runner = CliRunner()
        assert "tiffslide, userreader." in _option_help(runner.invoke(app, ["tile", "--help"], terminal_width=200).output)
        assert "overlap_act, userstem" in _option_help(runner.invoke(app, ["embed", "--help"], terminal_width=200).output)
    finally:
        slide_base._BACKENDS.restore(saved[0])
        slide_base._AUTO_ORDER[:] = saved[1]
        STEMS.unregister("userstem")


# --- CLI options and run-config keys in step ---------------------------------------------------

_CLUSTER = "cluster settings belong in the run TOML's table of their kind; `run` takes --workers and --scheduler"
_MIL = "finer MIL training settings: `train` has the common ones, the run TOML's [mil] all of them"
_FINETUNE = "finer fine-tuning settings: the `finetune` flags have the common ones, the run TOML's [finetune] all"
_COHORT_ENCODER = "in a cohort run the encoder is [embed]'s and the data the run's stores: not a [finetune] key"
_PRETRAIN = "finer pretraining settings (schedule, augmentation, method hyperparameters): the `pretrain` flags have the common ones, the run TOML's [pretrain] all"
_COHORT_PRETRAIN = "in a cohort run the encoder and its start are [embed]'s and the data the run's stores: not a [pretrain] key"
_RUN = "cohort-run settings with defaults that fit: set in the run TOML"
_TUNING = "throughput tuning with measured defaults: set in the run TOML or the library"

#: param() fields reachable from one front end only, with the reason (fnmatch patterns).
ONE_SIDED: dict[str, str] = {
    "tile.region_size": _TUNING,
    "embed.amp": _TUNING,
    "embed.channels_last": _TUNING,
    "embed.decode_on": _TUNING,
    "embed.stem_init": "stem conversion of a cohort's [embed] encoder: a run setting (embed --weights keeps the recorded stem)",
    "embed.timm_kwargs": "free-form timm arguments: Python API only",
    "finetune.min_lr_ratio": _FINETUNE,
    "finetune.hed_sigma": _FINETUNE,
    "finetune.drop_path": _FINETUNE,
    "finetune.checkpoint_every": _FINETUNE,
    "finetune.data": _COHORT_ENCODER,
    "finetune.out": _COHORT_ENCODER,
    "finetune.model": _COHORT_ENCODER,
    "finetune.stem": _COHORT_ENCODER,
    "finetune.weights": _COHORT_ENCODER,
    "finetune.pretrained": _COHORT_ENCODER,
    "finetune.stem_init": _COHORT_ENCODER,
    "finetune.overwrite": "a cohort run's top-level 'overwrite' decides",
    "pretrain.checkpoint_every": _PRETRAIN,
    "pretrain.weight_decay": _PRETRAIN,
    "pretrain.warmup": _PRETRAIN,
    "pretrain.min_lr_ratio": _PRETRAIN,
    "pretrain.brightness_contrast": _PRETRAIN,
    "pretrain.blur": _PRETRAIN,
    "pretrain.out_dim": _PRETRAIN,
    "pretrain.teacher_temp": _PRETRAIN,
    "pretrain.student_temp": _PRETRAIN,
    "pretrain.center_momentum": _PRETRAIN,
    "pretrain.ema": _PRETRAIN,
    "pretrain.temperature": _PRETRAIN,
    "pretrain.data": _COHORT_PRETRAIN,
    "pretrain.out": _COHORT_PRETRAIN,
    "pretrain.model": _COHORT_PRETRAIN,
    "pretrain.stem": _COHORT_PRETRAIN,
    "pretrain.init": _COHORT_PRETRAIN,
    "pretrain.overwrite": "a cohort run's top-level 'overwrite' decides",
    "mil.*": _MIL,
    "cluster": "--scheduler selects the 'scheduler' kind; other kinds are chosen in the run TOML",
    "predict.heatmaps": _RUN,
    "max_in_flight": _RUN,
    "retries": _RUN,
    "report": _RUN,
    "report_images": _RUN,
    "local.*": _CLUSTER,
    "slurm.*": _CLUSTER,
}
#: CLI flags named otherwise than their field.
FLAG_FOR = {"tile.encoding": "lossless", "local.n_workers": "workers", "predict.model_dir": "predict"}
_MIL_ON_CLI = {"mil.aggregator", "mil.folds", "mil.seed", "mil.epochs", "mil.lr"}


def _cli_options(command: str) -> set[str]:
    import typer

    from wsi_convnext.cli import app

    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {o.lstrip("-").replace("-", "_") for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_cli_options_and_run_config_keys_are_in_step() -> None:
    from wsi_convnext.config import CLUSTER_KINDS, PredictConfig, RunConfig, config_keys
    from wsi_convnext.embed import EmbedOptions
    from wsi_convnext.encoders import EncoderConfig
    from wsi_convnext.finetune.config import FinetuneConfig
    from wsi_convnext.mil.config import TrainConfig
    from wsi_convnext.pretrain.config import PretrainConfig
    from wsi_convnext.tiling.tiler import TileParams
    from wsi_convnext.tiling.tissue import TissueParams

    keys = set(config_keys())
    groups = [
        (TileParams, "tile", "tile"), (TissueParams, "tile.tissue", "tile"), (EmbedOptions, "embed", "embed"),
        (EncoderConfig, "embed", "embed"), (FinetuneConfig, "finetune", "finetune"), (TrainConfig, "mil", "train"),
        (PretrainConfig, "pretrain", "pretrain"),
        (PredictConfig, "predict", "run"), (RunConfig, "", "run"),
        *[(k.section, k.name, "run") for k in CLUSTER_KINDS.values() if k.section is not None],
    ]  # fmt: skip
    unlisted, stale = [], set(ONE_SIDED)
    for cls, prefix, command in groups:
        flags = _cli_options(command)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            if f.name.startswith("_") or key in ("tile", "embed", "predict", "finetune", "mil", "pretrain"):
                continue  # private, or a section (its keys are checked one by one)
            in_config = key in keys or (cls is TissueParams and "tile.tissue" in keys)  # the [tile.tissue] table
            in_cli = FLAG_FOR.get(key, f.name) in flags or (cls is TissueParams and "tissue" in flags)
            if cls is TrainConfig:
                in_cli = key in _MIL_ON_CLI
            reason = next((r for pattern, r in ONE_SIDED.items() if fnmatch.fnmatch(key, pattern)), None)
            if in_config and in_cli:
                continue
            if reason is None:
                unlisted.append(f"{key} (config: {in_config}, CLI `{command}`: {in_cli})")
            stale.discard(next(p for p in ONE_SIDED if fnmatch.fnmatch(key, p)) if reason else "")
    assert not unlisted, "param() fields missing from the CLI or the run config, without a reason: " + "; ".join(unlisted)
    assert not stale, f"ONE_SIDED lists keys that are reachable from both now: {sorted(stale)}"
