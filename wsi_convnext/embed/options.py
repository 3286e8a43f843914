"""What an embedding run is asked to do and what it reports: options, results, feature keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..outcome import Outcome
from ..params import at_least, check_params, non_negative, one_of, param

if TYPE_CHECKING:
    from ..encoders import Encoder
    from ..transforms import TileTransform

__all__ = [
    "DECODE_ON",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DTYPE",
    "OUTPUT_DTYPES",
    "EmbedOptions",
    "EmbedResult",
    "ProgressFn",
    "feature_key",
    "min_tile_size",
]

DEFAULT_BATCH_SIZE = 64
DEFAULT_DTYPE = "float16"

#: Stored embedding dtypes by name.
OUTPUT_DTYPES: dict[str, np.dtype] = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EmbedResult(Outcome):
    """Outcome of embedding one store (``status``, ``error_type``, ``error``, ``seconds``: :class:`~.outcome.Outcome`).

    Attributes:
        slide_id: The slide identifier.
        store_path: The store folder.
        key: Feature key written (``features/<key>``), None if the encoder was never reached.
        n_tiles: Number of tiles (embedding rows).
        skipped: True when ``features/<key>`` already existed and ``overwrite`` was False.
        device: Device the model ran on.
        precision: Compute precision (``float32``, ``bfloat16`` autocast, ``float16`` autocast).
    """

    slide_id: str
    store_path: Path
    key: str | None = None
    n_tiles: int = 0
    skipped: bool = False
    device: str | None = None
    precision: str | None = None


#: Where tiles are decoded: ``host`` (CPU threads, libjpeg-turbo) or ``device`` (CUDA, nvJPEG
#: through torchvision; JPEG stores only).
DECODE_ON = ("host", "device")


@dataclass(frozen=True)
class EmbedOptions:
    """How tiles are embedded, apart from the encoder, the device and the stores.

    Validated on construction (:class:`~wsi_convnext.params.ParameterError`); the run
    config's ``[embed]`` section takes these fields as keys.

    Attributes:
        batch_size: Tiles per forward pass.
        dtype: Stored feature dtype, a key of :data:`OUTPUT_DTYPES`.
        num_workers: Tile-decoding threads; 0 decodes inline; None: measured on a CPU, every
            core but one on CUDA/MPS (:func:`default_num_workers`).
        amp: Autocast on CUDA (None: on; bfloat16 where supported, else float16). Ignored on CPU.
        channels_last: Override the device's default memory layout (channels-last on CUDA).
        compile: Run the model through ``torch.compile`` (batches padded to ``batch_size``).
        decode_on: ``host`` or ``device`` (JPEG decoding on the CUDA device, :data:`DECODE_ON`).
    """

    batch_size: int = param(DEFAULT_BATCH_SIZE, check=at_least(1), doc="tiles per forward pass")
    dtype: str = param(DEFAULT_DTYPE, check=one_of(OUTPUT_DTYPES), doc="feature dtype: float16 or float32")
    num_workers: int | None = param(None, check=non_negative, doc="tile decoding threads per embedding task")
    amp: bool | None = param(None, doc="autocast on CUDA")
    channels_last: bool | None = param(None, doc="channels-last memory layout")
    compile: bool = param(False, doc="torch.compile the encoder")
    decode_on: str = param("host", check=one_of(DECODE_ON), doc="decode JPEG tiles on the host or the CUDA device")

    def __post_init__(self) -> None:
        check_params(self)


def feature_key(encoder: Encoder, transform: TileTransform | None = None) -> str:
    """The ``features/<key>`` an encoder (and tile transform) writes: ``<encoder.key>[-<transform.key>]``."""
    return encoder.key if transform is None else f"{encoder.key}-{transform.key}"


def min_tile_size(encoder: Encoder) -> int:
    """Smallest tile side (px) the encoder can embed: its total stride, unless tiles are resized."""
    if encoder.preprocessing.get("resize", "none") != "none":
        return 1
    info = getattr(encoder.model, "feature_info", None) or []
    reductions = [int(i["reduction"]) for i in info if isinstance(i, dict) and "reduction" in i]
    return max(reductions, default=1)

