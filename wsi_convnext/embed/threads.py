"""The CPU thread budget: decoding threads and torch's intra-op threads share the cores."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._io import cpu_count

if TYPE_CHECKING:
    from ..data import StoreTileStream

__all__ = ["ThreadBudget", "default_num_workers"]

logger = logging.getLogger(__name__)


def default_num_workers(device_type: str = "cpu") -> int:
    """Decoding threads before any measurement, by device type.

    On CUDA and MPS the model runs on the device, so every core but the consumer's decodes.
    On a CPU the model and decoding share the cores: decoding starts inline (0 threads) and
    :func:`embed_store` then picks the split from measured costs
    (:func:`~wsi_convnext.data.plan_decode_threads`).
    """
    if device_type == "cpu":
        return 0
    return max(1, cpu_count() - 1)


#: Measured CPU thread splits, by (feature key, batch size, thread budget): a cohort that
#: embeds slide after slide measures once.
_THREAD_PLANS: dict[tuple[str, int, int], tuple[int, int]] = {}

#: Full batches timed before choosing a CPU thread split (after one warm-up batch).
_CALIBRATION_BATCHES = 2


class ThreadBudget:
    """Measures the first full batches on a CPU and then splits the cores (auto ``num_workers``).

    Until decided, tiles are decoded inline and torch keeps its threads (the budget). The
    decision sets torch's intra-op threads and the stream's decoding threads so that their
    sum never exceeds the budget; torch's setting is restored by :meth:`restore`.
    """

    def __init__(self, stream: StoreTileStream, key: tuple[str, int, int] | None) -> None:
        import torch

        self.stream = stream
        self.key = key
        self.saved_threads = torch.get_num_threads()
        self.forward_seconds = 0.0
        self.forward_tiles = 0
        self.batches = 0
        self.decided = key is None
        if key is not None and key in _THREAD_PLANS:
            self._apply(_THREAD_PLANS[key])

    def _apply(self, plan: tuple[int, int]) -> None:
        import torch

        workers, threads = plan
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.stream.set_num_workers(workers)
        self.decided = True

    def observe(self, n: int, full: bool, seconds: float) -> None:
        """Record one computed batch of ``n`` tiles that took ``seconds`` of wall time."""
        if self.decided or not full:
            return
        self.batches += 1
        if self.batches == 1:
            return  # warm-up: allocator, oneDNN primitive creation
        self.forward_seconds += seconds
        self.forward_tiles += n
        if self.batches <= _CALIBRATION_BATCHES:
            return
        from ..data import plan_decode_threads

        decode = self.stream.decode_seconds_per_tile or 0.0
        forward = self.forward_seconds / max(1, self.forward_tiles)
        plan = plan_decode_threads(decode, forward, self.saved_threads)
        logger.info(
            "thread budget %d: decoding %.2f ms/tile, model %.2f ms/tile -> %d decode thread(s), %d torch thread(s)",
            self.saved_threads, decode * 1e3, forward * 1e3, *plan,
        )  # fmt: skip
        assert self.key is not None
        _THREAD_PLANS[self.key] = plan
        self._apply(plan)

    def restore(self) -> None:
        import torch

        if torch.get_num_threads() != self.saved_threads:
            torch.set_num_threads(self.saved_threads)

