"""Tile embeddings: tile stores → encoder → ``features/<key>`` in the same stores.

:func:`embed_store` embeds one slide's store with a prebuilt :class:`~wsi_convnext.encoders.Encoder`;
:func:`embed_stores` builds the encoder once and embeds many stores (on one device, or split
over several devices with one process each), recording a failing store and going on with
the rest.

The pipeline keeps the device busy: one :class:`~wsi_convnext.data.StoreTileStream` reads the
encoded tiles of all stores and decodes them (libjpeg-turbo), batch after batch across store
boundaries, so there is no drain between slides; the main thread runs the model; each slide's
(N, D) embeddings are written by a writer thread, atomically
(:meth:`~wsi_convnext.store.TileStore.write_features`): an interrupted run leaves nothing
half-written. The decoding threads and torch's intra-op threads share one CPU budget: on a
CPU the split is measured on the first batches (:class:`~.threads.ThreadBudget`).

The model runs under the one precision policy (:mod:`wsi_convnext.encoders.precision`). The
stored dtype (``dtype``, :data:`OUTPUT_DTYPES`) is float16 by default.

Modules:

- :mod:`.options`: :class:`EmbedOptions`, :class:`EmbedResult`, :func:`feature_key`, :func:`min_tile_size`.
- :mod:`.api`: :func:`embed_store`, :func:`embed_stores`.
- :mod:`.forward`: :func:`prepare_forward` (precision policy applied, ``torch.compile`` cache).
- :mod:`.threads`: the CPU thread budget, :func:`default_num_workers`.
- :mod:`.loop`: the streaming loop and its writer thread.
- :mod:`.devices`: several devices, one process each (:func:`split_stores`).
"""

from __future__ import annotations

from ..encoders.precision import PRECISIONS, Precision
from .api import embed_store, embed_stores
from .devices import split_stores
from .forward import prepare_forward
from .options import (
    DECODE_ON,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DTYPE,
    OUTPUT_DTYPES,
    EmbedOptions,
    EmbedResult,
    feature_key,
    min_tile_size,
)
from .threads import default_num_workers

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DTYPE",
    "OUTPUT_DTYPES",
    "PRECISIONS",
    "EmbedOptions",
    "EmbedResult",
    "DECODE_ON",
    "Precision",
    "default_num_workers",
    "embed_store",
    "embed_stores",
    "feature_key",
    "min_tile_size",
    "prepare_forward",
    "split_stores",
]
