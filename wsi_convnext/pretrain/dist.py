"""torch.distributed for pretraining: launcher detection, process group, clear failures.

Launchers: ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) on one
or several nodes, or ``srun`` under SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
the master is the first node of the step, the port derived from the job id unless
``MASTER_PORT`` is set). Without either, the run is one process. The backend is NCCL on CUDA
and gloo on the CPU. Every collective has ``timeout`` seconds: a rank that dies makes the others
fail with :class:`~wsi_convnext.errors.DistributedError` instead of hanging.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from ..errors import DistributedError, WsiConvnextError, one_line

if TYPE_CHECKING:
    import torch

__all__ = ["DistEnv", "detect_env", "process_group"]

logger = logging.getLogger(__name__)

# What gloo/NCCL say when a peer is gone or a collective timed out.
_PEER_FAILURE = re.compile(r"gloo|nccl|connection|timed out|timeout|peer|closed|broken pipe", re.IGNORECASE)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, ``launcher``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError as exc:
        raise DistributedError(f"environment variable {name}={os.environ[name]!r} is not an integer") from exc


def detect_env() -> DistEnv:
    """The launcher's environment (torchrun first, then an ``srun`` step with several tasks).

    Raises:
        DistributedError: Inconsistent variables (rank outside the world size).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        env = DistEnv(_int_env("RANK"), _int_env("WORLD_SIZE"), _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0, "torchrun")
    elif "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env = DistEnv(_int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), _int_env("SLURM_LOCALID"), "srun")
        if "MASTER_ADDR" not in os.environ:
            nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
            try:
                first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                       check=True, timeout=30).stdout.split()[0]  # fmt: skip
            except (OSError, subprocess.SubprocessError, IndexError) as exc:
                raise DistributedError(f"srun: cannot name the master node of {nodes!r} ({one_line(exc)}); set MASTER_ADDR") from exc
            os.environ["MASTER_ADDR"] = first
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        return DistEnv()
    if not 0 <= env.rank < env.world_size:
        raise DistributedError(f"{env.launcher}: rank {env.rank} outside world size {env.world_size}")
    return env


@contextmanager
def process_group(env: DistEnv, device: torch.device, timeout_s: float) -> Iterator[None]:
    """Initialise the default process group for ``env`` (nothing for one process), tear it down after.

    Collective failures inside (a dead or stuck peer) become :class:`DistributedError`.
    """
    if not env.distributed:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"{env.launcher}: cannot join the process group as rank {env.rank}/{env.world_size} ({one_line(exc, 300)})") from exc
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, WsiConvnextError) or not _PEER_FAILURE.search(str(exc)):
            raise
        raise DistributedError(
            f"rank {env.rank}/{env.world_size}: lost contact with the other ranks within {timeout_s:g} s "
            f"(a rank died or hangs; see its log): {one_line(exc, 300)}"
        ) from exc
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after a failure
            logger.debug("destroy_process_group failed", exc_info=True)
