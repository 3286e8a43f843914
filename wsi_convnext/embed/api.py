"""The public embedding API: :func:`embed_store` (one store, prebuilt encoder) and :func:`embed_stores`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..encoders import DEFAULT_MODEL
from ..errors import ConfigError
from ..store import TileStore, find_stores
from .loop import embed_many
from .options import DEFAULT_BATCH_SIZE, DEFAULT_DTYPE, EmbedOptions, EmbedResult, ProgressFn

if TYPE_CHECKING:
    import torch

    from ..encoders import Encoder
    from ..transforms import TileTransform

__all__ = ["embed_store", "embed_stores"]


def embed_store(
    store_path: str | os.PathLike[str] | TileStore,
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = "auto",
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    num_workers: int | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    transform: TileTransform | None = None,
    decode_on: str = "host",
    progress: ProgressFn | None = None,
) -> EmbedResult:
    """Embed every tile of one store and write ``features/<key>`` into it.

    The key is ``<encoder.key>`` or, with a tile transform, ``<encoder.key>-<transform.key>``
    (:func:`feature_key`). The encoder is moved to ``device`` (and switched to channels-last
    on CUDA) in place, so a cohort runner can build it once and call this per slide.

    Args:
        store_path: The store folder (or an open :class:`~wsi_convnext.store.TileStore`).
        encoder: From :func:`~wsi_convnext.encoders.build_encoder`.
        batch_size: Tiles per forward pass.
        device: A device string (``wsi_convnext.encoders.device.DEVICE_FORMS``) or a ``torch.device``.
        dtype: Stored dtype, a key of :data:`OUTPUT_DTYPES`.
        overwrite: Recompute when ``features/<key>`` exists (else the slide is skipped).
        num_workers: Tile-decoding threads; 0 decodes inline. Default: on a CPU, measured
            (decoding plus torch threads never exceed torch's thread count); on CUDA/MPS every
            core but one (:func:`default_num_workers`).
        amp: Autocast on CUDA (default on; bfloat16 where supported, else float16). Ignored on CPU.
        channels_last: Override the device's default memory layout (channels-last on CUDA).
        compile: Run the model through ``torch.compile`` (compiled once per model and device;
            batches are padded to ``batch_size`` so only one shape is compiled).
        transform: A tile transform on float RGB in [0, 1] applied before normalisation
            (recorded in the feature attrs under ``transform``).
        decode_on: ``host`` or ``device`` (JPEG decoding on the CUDA device, :data:`DECODE_ON`).
        progress: Called as ``progress(tiles_done, tiles_total)`` after each batch.

    Returns:
        The result; ``skipped`` is True when the embeddings already existed.

    Raises:
        InputNotFoundError: The store does not exist.
        StoreError: The store is foreign, incomplete, its tiles are too small for the model,
            or a tile cannot be decoded.
        DeviceError: The device is not available.
        ConfigError: Bad ``batch_size``, ``dtype``, ``num_workers`` or ``decode_on`` (see :class:`EmbedOptions`).
        EncoderError: Non-finite embeddings, or ``torch.compile`` failed.
        Exception: Whatever ``progress`` raises. Nothing is written to the store in any error case.
    """
    from ..encoders import resolve_device

    options = EmbedOptions(batch_size=batch_size, dtype=dtype, num_workers=num_workers, amp=amp,
                           channels_last=channels_last, compile=compile, decode_on=decode_on)  # fmt: skip
    dev = resolve_device(device)
    out = embed_many(
        [store_path], encoder, dev, options, overwrite=overwrite, progress=progress, transform=transform, on_result=None
    )
    if 0 in out.errors:
        raise out.errors[0]
    result = out.results[0]
    assert result is not None
    return result


def embed_stores(
    stores: Sequence[str | os.PathLike[str]],
    *,
    model: str = DEFAULT_MODEL,
    stem: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    resize: str | None = None,
    encoder: Encoder | None = None,
    device: str | torch.device | None = "auto",
    devices: Sequence[str] | None = None,
    overwrite: bool = False,
    transform: TileTransform | None = None,
    progress: ProgressFn | None = None,
    on_result: Callable[[EmbedResult], None] | None = None,
    **options: Any,
) -> list[EmbedResult]:
    """Embed several stores with one encoder; a failing store is recorded and the rest continue.

    The stores stream through one loader: the next slide's tiles are decoded while the current
    slide's last batch computes, and each slide's features are written (atomically) by a
    background thread. Input, option and device problems are raised before any slide is
    processed; problems of one store (foreign or half-written store, tiles too small,
    undecodable tile, ...) become a ``"failed"`` result with a one-line ``error``.

    Args:
        stores: Store folders and/or folders of stores (see :func:`~wsi_convnext.store.find_stores`).
        model, stem, weights, pretrained, resize: See :func:`~wsi_convnext.encoders.build_encoder`.
        encoder: A prebuilt encoder to use instead (then ``model`` ... ``pretrained`` are
            ignored), e.g. to reuse a compiled model; one device only.
        device: One device for everything (ignored when ``devices`` is given).
        devices: Several devices (e.g. ``["cuda:0", "cuda:1"]``): the stores are split among
            them, one process per device, each building its own encoder. CPU devices share
            the cores evenly.
        overwrite, transform: See :func:`embed_store`.
        progress: Per-slide tile progress, ``progress(tiles_done, tiles_total)``.
        on_result: Called with each slide's result as soon as it is known (in store order
            with one device; in completion order with several).
        **options: :class:`EmbedOptions` fields (``batch_size``, ``dtype``, ``num_workers``,
            ``amp``, ``channels_last``, ``compile``, ``decode_on``; see :func:`embed_store`).

    Returns:
        One result per store, in store order.

    Raises:
        InputNotFoundError: A path does not exist or a folder holds no stores.
        DeviceError: A device is not available.
        ConfigError, EncoderError, WeightsError: Bad options, model or weights.
    """
    from ..encoders import build_encoder, resolve_device

    opts = EmbedOptions(**options)
    paths = find_stores(stores)
    if devices is not None and len(devices) > 1:
        if encoder is not None:
            raise ConfigError("a prebuilt encoder runs on one device; pass model/stem/weights to use several devices")
        kwargs = dict(model=model, stem=stem, weights=weights, pretrained=pretrained, resize=resize, overwrite=overwrite,
                      transform=transform, **dataclasses.asdict(opts))  # fmt: skip
        from .devices import embed_on_devices

        return embed_on_devices(paths, list(devices), kwargs, progress=progress, on_result=on_result)
    if devices:
        device = devices[0]
    dev = resolve_device(device)
    if encoder is None:
        encoder = build_encoder(model, stem=stem, weights=weights, pretrained=pretrained, resize=resize)
    out = embed_many(
        paths, encoder, dev, opts, overwrite=overwrite, progress=progress, transform=transform, on_result=on_result
    )
    return [r for r in out.results if r is not None]
