"""The cohort-scope ``pretrain`` stage: self-supervised pretraining of the ``[embed]`` encoder.

With ``[pretrain] enabled = true`` a run does tile → ``pretrain`` → (``finetune``) → embed
(→ ``mil``). The stage pretrains the ``[embed]`` encoder (its model, stem and weights are the
starting point: ``--init`` weights or ``pretrained``, else random) on the tiles of every slide
of the cohort, without labels, into ``OUT/training/pretrain/``
(:func:`~wsi_convnext.pretrain.train.pretrain_on_node`: one rank per GPU of its node; a rerun
resumes or finds it finished). Its ``encoder_weights`` output is what the later stages start
from: ``finetune`` continues it, ``embed`` embeds with it (or with the fine-tuned encoder).
No labels are read, so MIL's held-out slides are seen by the encoder only as unlabelled tiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ..config import RunConfig
from ..errors import ConfigError
from .stages import StageSpec, register_stage
from .training import training_dir, training_resources

if TYPE_CHECKING:
    from ..inputs import SlideSpec

__all__ = ["pretrain_stage"]


def pretrain_stage(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Pretrain the ``[embed]`` encoder on the cohort's stores (``[pretrain]`` settings).

    Returns:
        ``encoder_weights`` (the pretrained ``encoder.safetensors``, used by ``finetune`` and
        ``embed``), ``encoder_stem``, ``pretrain_dir`` and the number of slides.
    """
    from ..pretrain import PretrainConfig, pretrain_on_node

    spec = config.encoder_config()
    if spec is None:
        raise ConfigError("run config: [pretrain] needs [embed] model")
    stores = tuple(str(states[s.slide_id]["store"]) for s in slides)
    options = {f: v for f, v in vars(config.pretrain).items() if v is not None and f != "enabled"}
    options.setdefault("device", config.embed.device or "auto")
    init = spec.weights if spec.weights else ("pretrained" if spec.pretrained else "random")
    cfg = PretrainConfig(
        data=stores, out=str(training_dir(config) / "pretrain"), model=spec.model, stem=spec.stem, init=str(init),
        overwrite=config.overwrite, **options,
    )  # fmt: skip
    enc_dir = pretrain_on_node(cfg)
    return {
        "encoder_weights": str(enc_dir / "encoder.safetensors"),
        "encoder_stem": cfg.stem,
        "pretrain_dir": str(enc_dir),
        "pretrain_slides": len(stores),
    }


def _pretrains(config: RunConfig) -> bool:
    return bool(config.pretrain.enabled and config.embed.model)


_DOC = "self-supervised pretraining of the encoder on every slide's tiles, no labels (before finetune and embed)"
register_stage(
    StageSpec("pretrain", pretrain_stage, resources=partial(training_resources, "pretrain"), scope="cohort",
              enabled=_pretrains, doc=_DOC),
    before="finetune",
)  # fmt: skip
