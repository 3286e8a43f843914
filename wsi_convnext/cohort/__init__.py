"""Cohort runs on Dask: the registered stages (tile → embed → predict, ...) for every slide of a cohort.

* :mod:`.stages` — the stage registry (:class:`StageSpec`, :func:`register_stage`) and the
  built-in per-slide stages;
* :mod:`.training` — the cohort-scope ``finetune`` (before ``embed``) and ``mil`` stages;
* :mod:`.clusters` — the cluster registry (``local``, ``scheduler``, ``slurm``) and :func:`open_client`;
* :mod:`.driver` — the driving loop (:func:`run_cohort`), which knows no stage by name;
* :mod:`.shards` — stable shards for job arrays (:func:`shard_of`, :func:`select_shard`).

Only this package imports Dask, and only inside functions (importing it is cheap).
From the command line: ``wsi-convnext run CONFIG.toml [--shard I/N]``.
"""

from __future__ import annotations

from .clusters import (
    DEFAULT_DASHBOARD,
    ClusterInfo,
    cluster_kinds,
    dashboard_address,
    local_cluster_kwargs,
    open_client,
    register_cluster,
    slurm_cluster_kwargs,
)
from .driver import (
    STARTED_TOPIC,
    CohortProgress,
    RunSummary,
    StageOutcome,
    run_cohort,
    run_stage,
    write_predictions,
)
from .shards import select_shard, shard_of
from .training import finetune_stage, mil_stage, training_dir  # registers the cohort-scope stages
from .pretraining import pretrain_stage  # registers `pretrain` before `finetune` (after .training)
from .stages import (
    StageFn,
    StageSpec,
    embed_stage,
    get_stage,
    noop_stages,
    predict_stage,
    register_stage,
    registered_stages,
    stage_functions,
    stage_plan,
    tile_stage,
    unregister_stage,
)

__all__ = [
    "DEFAULT_DASHBOARD",
    "STARTED_TOPIC",
    "ClusterInfo",
    "CohortProgress",
    "RunSummary",
    "StageFn",
    "StageOutcome",
    "StageSpec",
    "cluster_kinds",
    "dashboard_address",
    "embed_stage",
    "finetune_stage",
    "get_stage",
    "mil_stage",
    "noop_stages",
    "pretrain_stage",
    "local_cluster_kwargs",
    "open_client",
    "predict_stage",
    "register_cluster",
    "register_stage",
    "registered_stages",
    "run_cohort",
    "run_stage",
    "select_shard",
    "shard_of",
    "slurm_cluster_kwargs",
    "stage_functions",
    "stage_plan",
    "tile_stage",
    "training_dir",
    "unregister_stage",
    "write_predictions",
]
