"""Shards of a cohort for sites without a Dask cluster (job arrays): ``shard=(i, n)``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..inputs import SlideSpec

__all__ = ["select_shard", "shard_of"]


def shard_of(slide_id: str, count: int) -> int:
    """The shard (0-based, of ``count``) that ``slide_id`` belongs to.

    A stable hash (BLAKE2b of the UTF-8 slide id, first 8 bytes, big-endian, modulo
    ``count``): it depends on nothing but the slide id, so adding or removing other
    slides never moves a slide to another shard, and it is the same in every process,
    Python version and machine. Shards are disjoint and cover the cohort; their sizes
    are equal up to random fluctuation (about ±√(n/count) slides).
    """
    digest = hashlib.blake2b(slide_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(slides: Sequence[SlideSpec], index: int, count: int) -> list[SlideSpec]:
    """The slides of shard ``index`` (0-based) of ``count``, in input order."""
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    return [s for s in slides if shard_of(s.slide_id, count) == index]
