"""Self-supervised pretraining of the tile encoder on unlabelled tiles, and encoder probes.

- :mod:`.config`: :class:`PretrainConfig` (validated on construction).
- :mod:`.methods`: the registry of self-supervised methods (``dino`` default, ``simclr``).
- :mod:`.data`: unlabelled tiles through the shared datasets, multi-crop views, per-rank shards.
- :mod:`.dist`: torchrun / srun detection and the process group (gloo on CPU, NCCL on CUDA).
- :mod:`.train`: :func:`pretrain_encoder` (resumable, DDP).
- :mod:`.outputs`: the files of ENC_DIR (``finetune``'s layout).
- :mod:`.probe`: :func:`run_probe` (linear + kNN probes, group-bootstrap CIs, pixel-statistics baseline).

torch is imported by the submodules that need it, not here.
"""

from __future__ import annotations

from .._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "config": ("INITS", "PretrainConfig"),
        "methods": ("DEFAULT_METHOD", "METHODS"),
        "train": ("PretrainProgress", "pretrain_encoder", "pretrain_on_node"),
        "probe": ("ProbeResult", "run_probe"),
    },
)
