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

from .._lazy import lazy_getattr

_EXPORTS = {
    "INITS": "config",
    "PretrainConfig": "config",
    "METHODS": "methods",
    "DEFAULT_METHOD": "methods",
    "PretrainProgress": "train",
    "pretrain_encoder": "train",
    "run_probe": "probe",
    "ProbeResult": "probe",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
