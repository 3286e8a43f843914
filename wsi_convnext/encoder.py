"""ConvNeXt tile encoder with a configurable stem.

:func:`build_encoder` creates any timm ConvNeXt (``convnext_atto`` … ``convnext_xlarge``,
``convnextv2_*``; list them with ``timm.list_models("convnext*")``) with pooled features
(``num_classes=0``) and wraps it in an :class:`Encoder` that knows its weights' provenance
(sha256), its preprocessing and a store key naming the configuration.

Stems (:data:`STEMS`) are timm's own ``stem_type`` options, so the model is never forked:

- ``patch``: the stock stem, a 4×4 stride-4 conv followed by the norm layer.
- ``overlap``: Conv3×3 s2 (``dims[0]`` channels) → Conv3×3 s2 → norm, no activation; total stride 4.
- ``overlap_tiered``: as ``overlap`` with ``make_divisible(dims[0] // 2)`` middle channels.
- ``overlap_act``: as ``overlap`` with an activation between the convs.

A stock (patch-stem) checkpoint loaded into ``overlap``/``overlap_tiered`` is converted by
:func:`convert_patch_stem_to_overlap` so the network computes *exactly* the same function at
load time (for inputs whose height and width are multiples of 4, e.g. 224-px tiles); fine-tuning
can then use the finer stem. ``overlap_act`` cannot be converted; it needs an explicit
``stem_init="random"`` (documented, seeded fresh initialisation of the stem).

Preprocessing follows the model's pretrained config (``timm.data.resolve_model_data_config``):
uint8 RGB tiles (B, T, T, 3) → float (B, 3, T, T), scaled to [0, 1] and normalised with the
config's mean/std. Resize policy (:data:`RESIZE_POLICIES`): ``"none"`` (default) never resizes,
because ConvNeXt is fully convolutional and the tiles were already extracted at the target
µm/px — resizing would change the physical scale; ``"input_size"`` resizes tiles whose size
differs from the config's ``input_size`` with the config's interpolation. Tiles are never
cropped (``crop_pct`` is recorded for provenance only): a tile is the tissue area it stands for.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import file_sha256
from .errors import ConfigError, DeviceError, EncoderError, InputNotFoundError, WeightsError, one_line

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_RESIZE",
    "DEFAULT_STEM",
    "DEFAULT_STEM_INIT",
    "RESIZE_POLICIES",
    "STEMS",
    "STEM_INITS",
    "Encoder",
    "EncoderConfig",
    "StemSpec",
    "build_encoder",
    "convert_patch_stem_to_overlap",
    "load_weights",
    "register_stem",
    "resolve_device",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "convnext_tiny"
DEFAULT_STEM = "patch"
DEFAULT_STEM_INIT = "checkpoint"
DEFAULT_RESIZE = "none"
#: Seed of the documented fresh stem initialisation (``stem_init="random"``), so it is reproducible.
STEM_INIT_SEED = 0
#: ``weights_sha256`` of an encoder with random weights.
RANDOM = "random"
#: Seed of the random initialisation used when no weights are given.
RANDOM_INIT_SEED = 0

_TIMM_MODULE = "convnext"
_RESERVED_TIMM_KWARGS = frozenset({"num_classes", "stem_type", "pretrained", "features_only"})
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.")
_HEAD_CLASSIFIER_PREFIX = "head.fc."
_MAX_LISTED_KEYS = 4
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order on the hub


# --------------------------------------------------------------------------------------- stems


@dataclass(frozen=True)
class StemSpec:
    """One stem choice.

    Attributes:
        name: Registry name (``--stem``).
        timm_stem_type: ``stem_type`` passed to ``timm.models.convnext.ConvNeXt``.
        layout: State-dict layout of the stem: ``"patch"`` (stem.0 conv 4×4, stem.1 norm),
            ``"overlap"`` (stem.0 conv, stem.1 conv, stem.2 norm) or ``"overlap_act"``
            (stem.0 conv, stem.1 activation, stem.2 conv, stem.3 norm).
        exact_from_patch: Whether a patch-stem checkpoint converts exactly into this stem.
        description: One line for help texts.
    """

    name: str
    timm_stem_type: str
    layout: str
    exact_from_patch: bool
    description: str


#: Registry of stems by name. Extend with :func:`register_stem`.
STEMS: dict[str, StemSpec] = {}


def register_stem(spec: StemSpec) -> StemSpec:
    """Add (or replace) a stem in :data:`STEMS`; ``spec.timm_stem_type`` must be one timm knows."""
    STEMS[spec.name] = spec
    return spec


register_stem(StemSpec("patch", "patch", "patch", True, "stock 4x4 stride-4 conv + norm"))
register_stem(
    StemSpec("overlap", "overlap", "overlap", True, "conv3x3 s2 (dims[0] ch) -> conv3x3 s2 -> norm, no activation")
)
register_stem(
    StemSpec(
        "overlap_tiered", "overlap_tiered", "overlap", True, "conv3x3 s2 (dims[0]//2 ch) -> conv3x3 s2 -> norm"
    )
)
register_stem(
    StemSpec(
        "overlap_act",
        "overlap_act",
        "overlap_act",
        False,
        "conv3x3 s2 -> activation -> conv3x3 s2 -> norm (patch checkpoints need stem_init='random')",
    )
)

#: How the stem is initialised when a checkpoint is loaded: from the checkpoint (converted when
#: needed and exact), or fresh with a fixed seed (changes the function; logged).
STEM_INITS: dict[str, str] = {
    "checkpoint": "load the stem from the checkpoint, converting a patch stem exactly; refuse otherwise",
    "random": f"ignore the checkpoint's stem; initialise it fresh (trunc-normal std 0.02, seed {STEM_INIT_SEED})",
}


# ------------------------------------------------------------------------------- preprocessing


def _resize_none(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    return x


def _resize_to_input_size(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    import torch.nn.functional as F

    mode = interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bicubic"
    kwargs: dict[str, Any] = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    # Bicubic overshoots; keep the pixel range before normalising.
    return F.interpolate(x, size=size, mode=mode, **kwargs).clamp_(0.0, 255.0)


#: Resize policies by name: ``f(x_float_0_255_nchw, (H, W), interpolation) -> x``.
RESIZE_POLICIES: dict[str, Callable[[torch.Tensor, tuple[int, int], str], torch.Tensor]] = {
    "none": _resize_none,
    "input_size": _resize_to_input_size,
}


# -------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that defines an encoder. ``None`` means the library default.

    Attributes:
        model: timm ConvNeXt name, optionally with a pretrained tag (``convnext_tiny.fb_in1k``).
        stem: Name in :data:`STEMS` (default ``"patch"``).
        weights: Path of a safetensors file or torch state dict.
        pretrained: Load timm's pretrained weights from the local Hugging Face cache (offline).
        stem_init: Name in :data:`STEM_INITS` (default ``"checkpoint"``).
        resize: Name in :data:`RESIZE_POLICIES` (default ``"none"``).
        timm_kwargs: Extra ``timm.create_model`` keyword arguments as sorted ``(name, value)`` pairs.
    """

    model: str = DEFAULT_MODEL
    stem: str | None = DEFAULT_STEM
    weights: str | None = None
    pretrained: bool = False
    stem_init: str | None = None
    resize: str | None = None
    timm_kwargs: tuple[tuple[str, Any], ...] = field(default=())

    def build(self) -> Encoder:
        """Build the :class:`Encoder` this configuration describes."""
        return build_encoder(
            self.model,
            stem=self.stem,
            weights=self.weights,
            pretrained=self.pretrained,
            stem_init=self.stem_init,
            resize=self.resize,
            **dict(self.timm_kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``timm_kwargs`` as a dict)."""
        out = asdict(self)
        out["timm_kwargs"] = dict(self.timm_kwargs)
        return out


# --------------------------------------------------------------------------------------- device


def resolve_device(device: str | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into a usable device.

    ``"auto"`` (or ``None``) picks CUDA if available, else MPS if available, else CPU.

    Raises:
        DeviceError: The device string is unknown or the device is not available.
    """
    import torch

    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(
                f"device {device!r} requested but only {count} CUDA device(s) exist; use cuda:0..{count - 1}"
            )
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(
                f"device {device!r} requested but MPS is not available; use --device cpu or --device auto"
            )
        return dev
    raise DeviceError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")


# ------------------------------------------------------------------------------ stem conversion


def convert_patch_stem_to_overlap(
    state_dict: Mapping[str, torch.Tensor],
    stem_type: str = "overlap",
    mid_chs: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rewrite a patch-stem ConvNeXt state dict for an overlapping stem, preserving the function.

    Two stacked 3×3 stride-2 convs (padding 1) without activation reproduce a 4×4 stride-4
    conv exactly. conv1 copies, at each of its positions, the 2×2 pixels of every input
    channel ``c`` at taps (1..2, 1..2) into channel ``m = 4c + 2dy + dx`` (weights 0/1, bias 0,
    other channels 0): ``h[m, p, q] = x[c, 2p + dy, 2q + dx]``. conv2 places these sub-blocks at
    its taps (1..2, 1..2): ``W2[o, m, 1 + a, 1 + b] = Wpatch[o, c, 2a + dy, 2b + dx]`` (tap 0
    zero, bias = patch bias), so ``y[o, i, j] = sum Wpatch[o, c, u, v] x[c, 4i + u, 4j + v]``.
    The norm layer (``stem.1.*``) moves to ``stem.2.*``. Exact when the input height and
    width are multiples of 4 (otherwise the overlap stem adds one border row/column).

    Args:
        state_dict: timm-layout state dict with a patch stem (``stem.0.weight`` of shape
            (dims0, in_chans, 4, 4)). Not modified.
        stem_type: Target stem, ``"overlap"`` or ``"overlap_tiered"`` (:data:`STEMS`).
        mid_chs: Middle channels of the target stem; default as timm: ``dims0`` for
            ``overlap``, ``make_divisible(dims0 // 2)`` for ``overlap_tiered``.

    Returns:
        A new state dict (other entries shared, not copied).

    Raises:
        EncoderError: The target stem cannot be reached exactly, or ``mid_chs < 4 * in_chans``.
        WeightsError: ``state_dict`` has no 4×4 patch stem.
    """
    import torch

    spec = STEMS.get(stem_type)
    if spec is None or spec.layout != "overlap" or not spec.exact_from_patch:
        exact = sorted(n for n, s in STEMS.items() if s.layout == "overlap" and s.exact_from_patch)
        raise EncoderError(
            f"a patch stem converts exactly only to stems {exact}, not {stem_type!r} "
            "(an activation inside the stem makes exact conversion impossible; use stem_init='random')"
        )
    w_patch = state_dict.get("stem.0.weight")
    if w_patch is None or w_patch.ndim != 4 or tuple(w_patch.shape[-2:]) != (4, 4):
        shape = None if w_patch is None else tuple(w_patch.shape)
        raise WeightsError(f"state dict has no 4x4 patch stem (stem.0.weight shape {shape}); cannot convert it")
    dims0, in_chans = int(w_patch.shape[0]), int(w_patch.shape[1])
    if mid_chs is None:
        if "tiered" in spec.timm_stem_type:
            from timm.layers import make_divisible

            mid_chs = int(make_divisible(dims0 // 2))
        else:
            mid_chs = dims0
    if mid_chs < 4 * in_chans:
        raise EncoderError(
            f"stem {stem_type!r} has {mid_chs} middle channels; exact conversion needs at least {4 * in_chans}"
        )

    w1 = torch.zeros(mid_chs, in_chans, 3, 3, dtype=w_patch.dtype)
    w2 = torch.zeros(dims0, mid_chs, 3, 3, dtype=w_patch.dtype)
    for c in range(in_chans):
        for dy in range(2):
            for dx in range(2):
                m = 4 * c + 2 * dy + dx
                w1[m, c, 1 + dy, 1 + dx] = 1.0
                for a in range(2):
                    for b in range(2):
                        w2[:, m, 1 + a, 1 + b] = w_patch[:, c, 2 * a + dy, 2 * b + dx]

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("stem.0."):
            continue
        if key.startswith("stem.1."):
            out["stem.2." + key[len("stem.1.") :]] = value
        else:
            out[key] = value
    out["stem.0.weight"] = w1
    out["stem.1.weight"] = w2
    b_patch = state_dict.get("stem.0.bias")
    if b_patch is not None:  # conv_bias=True models: conv1 gets a zero bias, conv2 the patch bias
        out["stem.0.bias"] = torch.zeros(mid_chs, dtype=b_patch.dtype)
        out["stem.1.bias"] = b_patch
    return out


def _checkpoint_stem_layout(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Layout of the stem stored in a timm-layout state dict (see :class:`StemSpec`)."""

    def ndim(key: str) -> int:
        t = sd.get(key)
        return -1 if t is None else t.ndim

    if ndim("stem.0.weight") == 4 and ndim("stem.1.weight") == 4:
        return "overlap"
    if ndim("stem.0.weight") == 4 and ndim("stem.2.weight") == 4:
        return "overlap_act"
    if ndim("stem.0.weight") == 4:
        return "patch"
    return None


def _stem_name_hint(layout: str) -> str:
    """Stem names whose layout matches a checkpoint's, for error messages."""
    names = [n for n, s in STEMS.items() if s.layout == layout]
    return " or ".join(repr(n) for n in names) if names else repr(layout)


# ------------------------------------------------------------------------------- weights files


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header.
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= size - 8


def _read_state_dict(path: Path) -> dict[str, Any]:
    """Read a safetensors file or a torch state dict (``weights_only=True``) onto the CPU."""
    import torch

    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"weights file {path} is not a readable safetensors file: {one_line(exc)}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise WeightsError(
            f"weights file {path} is not a plain tensor state dict (torch.load(weights_only=True) refused it: "
            f"{one_line(exc)[:160]}); re-save it as safetensors or with torch.save(model.state_dict(), path)"
        ) from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _unwrap_state_dict(obj: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Strip common wrappers ({"state_dict": ...}, {"model": ...}) and prefixes ("module.")."""
    import torch

    sd: Mapping[str, Any] = obj
    for _ in range(4):  # nested wrappers such as {"model": {"state_dict": ...}}
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"weights file {path} holds no tensors (keys: {_fmt_keys(list(sd))})")
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
    return tensors


def _fmt_keys(keys: list[str], n: int = _MAX_LISTED_KEYS) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _to_timm_layout(sd: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Remap original Facebook / OpenCLIP ConvNeXt checkpoints with timm's own filter."""
    if "downsample_layers.0.0.weight" not in sd and not any(k.startswith("visual.trunk.") for k in sd):
        return sd
    from timm.models.convnext import checkpoint_filter_fn

    try:
        return dict(checkpoint_filter_fn(sd, model))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise WeightsError(
            f"weights file {path} looks like an original ConvNeXt checkpoint but does not fit: {one_line(exc)}"
        ) from exc


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _init_stem_fresh(model: nn.Module) -> None:
    """Documented fresh stem initialisation (timm's ConvNeXt init, fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(STEM_INIT_SEED)
    with torch.no_grad():
        for module in model.stem.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.trunc_normal_(module.weight, std=0.02, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif module is not model.stem and hasattr(module, "reset_parameters"):
                module.reset_parameters()


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    stem: str,
    stem_init: str | None = None,
) -> str:
    """Load a weights file into a timm ConvNeXt built with ``stem``; return the file's sha256.

    Accepts safetensors files and torch state dicts (.pth/.pt/.bin, read with
    ``torch.load(weights_only=True)``, so arbitrary pickled objects are refused), inside common
    wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and with ``module.``-style prefixes;
    original Facebook ConvNeXt checkpoints are remapped with timm's filter. Classifier keys
    (``head.fc.*``) are ignored. A patch-stem checkpoint loaded into an exactly convertible stem
    is converted (:func:`convert_patch_stem_to_overlap`).

    Args:
        model: timm ConvNeXt (``num_classes=0``).
        path: Weights file.
        stem: Name in :data:`STEMS` the model was built with.
        stem_init: Name in :data:`STEM_INITS`; ``None`` means ``"checkpoint"``.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        WeightsError: Unreadable file, or keys/shapes that do not fit the model.
        EncoderError: The checkpoint's stem cannot be converted exactly to ``stem``.
    """
    path = Path(path).expanduser()
    spec = _stem_spec(stem)
    stem_init = _stem_init_name(stem_init)
    if not path.is_file():
        raise InputNotFoundError(f"weights file {path} does not exist; pass an existing .safetensors/.pth file")
    sha = file_sha256(path)
    sd = _unwrap_state_dict(_read_state_dict(path), path)
    sd = _to_timm_layout(sd, model, path)
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_CLASSIFIER_PREFIX)}
    arch = _arch_name(model)

    fresh_stem = stem_init == "random"
    src = _checkpoint_stem_layout(sd)
    if fresh_stem:
        sd = {k: v for k, v in sd.items() if not k.startswith("stem.")}
    elif src is not None and src != spec.layout:
        if src == "patch" and spec.exact_from_patch:
            mid_chs = int(model.stem[0].out_channels)
            sd = convert_patch_stem_to_overlap(sd, spec.name, mid_chs)
            logger.info("converted the patch stem of %s to stem %r (function-preserving)", path, spec.name)
        elif src == "patch":
            raise EncoderError(
                f"weights file {path} has a patch stem, which cannot be converted exactly to stem {spec.name!r} "
                "(activation inside the stem); use stem 'overlap' or pass stem_init='random' to initialise "
                "the stem fresh (changes the function)"
            )
        else:
            raise WeightsError(
                f"weights file {path} has an overlapping stem ({src}), which cannot be converted to stem "
                f"{spec.name!r}; use stem {_stem_name_hint(src)} or stem_init='random'"
            )

    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in sd and not (fresh_stem and k.startswith("stem."))]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_fmt_keys(unexpected)}")
        if mismatched:
            shown = [f"{k} {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}" for k in mismatched]
            parts.append(f"shape mismatch {_fmt_keys(shown)}")
        raise WeightsError(
            f"weights file {path} does not fit {arch} with stem {spec.name!r}: {'; '.join(parts)}; "
            "check that --model names the checkpoint's architecture"
        )
    model.load_state_dict(sd, strict=not fresh_stem)
    if fresh_stem:
        _init_stem_fresh(model)
        logger.warning(
            "stem of %s initialised fresh (stem_init='random', seed %d): the stem weights of %s are not used "
            "and the network no longer computes the checkpoint's function until fine-tuned",
            arch,
            STEM_INIT_SEED,
            path,
        )
    return sha


# ---------------------------------------------------------------------------- pretrained cache


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _find_pretrained_file(cfg: Mapping[str, Any], name: str) -> Path:
    """Locate timm's pretrained weights for ``cfg`` in local caches only (never downloads).

    Raises:
        WeightsError: Nothing is cached; the message names where to put which file.
    """
    file = cfg.get("file")
    if file and Path(file).expanduser().is_file():
        return Path(file).expanduser()

    cache = _hf_hub_cache()
    hub_id = cfg.get("hf_hub_id")
    hub_files: list[str] = []
    if hub_id:
        repo_id, _, revision = str(hub_id).partition("@")
        hub_files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(_HF_WEIGHT_FILES)
        from huggingface_hub import try_to_load_from_cache

        for filename in hub_files:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache), revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)

    url = cfg.get("url")
    torch_file: Path | None = None
    if url:
        import torch.hub
        from urllib.parse import urlparse

        torch_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(str(url)).path).name
        if torch_file.is_file():
            return torch_file

    if hub_id:
        repo_id = str(hub_id).partition("@")[0]
        where = (
            f"put the Hugging Face repo {repo_id} ({hub_files[0]}) into the cache {cache} "
            f"(i.e. {cache}/models--{repo_id.replace('/', '--')}/snapshots/<rev>/{hub_files[0]}, e.g. "
            f"`hf download {repo_id} --cache-dir {cache}` on a connected machine)"
        )
    elif torch_file is not None:
        where = f"put {url} at {torch_file}"
    else:
        where = "timm knows no download location for it"
    raise WeightsError(
        f"pretrained weights for {name} are not available offline: {where}, or pass --weights PATH"
    )


# ------------------------------------------------------------------------------------- encoder


class Encoder:
    """A ConvNeXt in eval mode plus its provenance and preprocessing.

    Attributes:
        model: The timm ConvNeXt (``num_classes=0``), eval mode.
        num_features: Embedding size.
        config: The resolved :class:`EncoderConfig`.
        weights_sha256: sha256 of the weights file, or ``"random"``.
        weights_path: The weights file actually read (for ``pretrained``, the cache file), or None.
        preprocessing: JSON-able preprocessing description (see :meth:`preprocess`).
        channels_last: Whether :meth:`preprocess` returns channels-last tensors (set by :meth:`to`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: EncoderConfig,
        weights_sha256: str,
        weights_path: str | None,
        preprocessing: dict[str, Any],
    ) -> None:
        self.model = model.eval()
        self.num_features = int(model.num_features)
        self.config = config
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.preprocessing = preprocessing
        self.channels_last = False
        self._norm_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"Encoder(key={self.key!r}, num_features={self.num_features}, device={self.device})"

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def key(self) -> str:
        """Store key naming the configuration: ``<model>-<stem>-<sha12|random>[-stemrand][-resize]``."""
        sha = self.weights_sha256
        parts = [self.config.model, str(self.config.stem), sha if sha == RANDOM else sha[:12]]
        if sha != RANDOM and self.config.stem_init == "random":
            parts.append("stemrand")
        if self.config.resize != DEFAULT_RESIZE:
            parts.append(f"resize_{self.config.resize}")
        return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))

    def attrs(self) -> dict[str, Any]:
        """JSON-able provenance to store with the embeddings."""
        import timm
        import torch

        from . import __version__

        return {
            "key": self.key,
            "model": self.config.model,
            "architecture": _arch_name(self.model),
            "stem": self.config.stem,
            "stem_init": self.config.stem_init,
            "pretrained": self.config.pretrained,
            "weights_sha256": self.weights_sha256,
            "weights_path": self.weights_path,
            "num_features": self.num_features,
            "preprocessing": dict(self.preprocessing),
            "timm_kwargs": dict(self.config.timm_kwargs),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "wsi_convnext_version": __version__,
        }

    def to(self, device: str | torch.device | None = None, *, channels_last: bool | None = None) -> Encoder:
        """Move the model (``device`` may be ``"auto"``) and/or switch channels-last; returns self."""
        import torch

        if device is not None:
            dev = device if isinstance(device, torch.device) else resolve_device(device)
            self.model.to(dev)
        if channels_last is not None:
            self.channels_last = bool(channels_last)
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            self.model.to(memory_format=fmt)
        return self

    def _mean_inv_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        cached = self._norm_cache.get(str(device))
        if cached is None:
            mean = torch.tensor(self.preprocessing["mean"], dtype=torch.float32).mul_(255.0)
            inv_std = 1.0 / torch.tensor(self.preprocessing["std"], dtype=torch.float32).mul_(255.0)
            cached = (mean.view(1, -1, 1, 1).to(device), inv_std.view(1, -1, 1, 1).to(device))
            self._norm_cache[str(device)] = cached
        return cached

    def preprocess(self, batch: torch.Tensor | np.ndarray, *, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 RGB tiles (B, H, W, 3) → normalised float32 (B, 3, H', W') on ``device``.

        Scales to [0, 1], resizes per the resize policy (default: never), subtracts the config's
        mean and divides by its std. The uint8 batch is moved first (4× less traffic).

        Args:
            batch: uint8 tensor or array, NHWC, RGB.
            device: Target device; default the model's.

        Raises:
            EncoderError: Wrong dtype or shape.
        """
        import numpy as np
        import torch

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch if batch.flags.writeable else batch.copy())
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            desc = f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}"
            raise EncoderError(f"tiles must be a uint8 RGB batch of shape (B, H, W, 3), got {desc}")
        dev = self.device if device is None else torch.device(device)
        x = batch.to(dev, non_blocking=True).permute(0, 3, 1, 2).float()  # strides stay channels-last
        size = tuple(int(s) for s in self.preprocessing["input_size"][-2:])
        x = RESIZE_POLICIES[self.preprocessing["resize"]](x, size, self.preprocessing["interpolation"])
        mean, inv_std = self._mean_inv_std(dev)
        x = x.sub_(mean).mul_(inv_std)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings (B, num_features) under ``torch.inference_mode``.

        ``batch`` is either raw uint8 tiles (B, H, W, 3), preprocessed here, or an already
        preprocessed float batch (B, 3, H, W).
        """
        import torch

        if not isinstance(batch, torch.Tensor) or batch.dtype == torch.uint8:
            x = self.preprocess(batch)
        else:
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise EncoderError(f"a float batch must be preprocessed (B, 3, H, W), got {tuple(batch.shape)}")
            x = batch.to(self.device)
        with torch.inference_mode():
            return self.model(x)

    __call__ = forward


def _stem_spec(stem: str | None) -> StemSpec:
    name = DEFAULT_STEM if stem is None else stem
    spec = STEMS.get(name)
    if spec is None:
        raise EncoderError(f"unknown stem {name!r}: choose one of {', '.join(STEMS)}")
    return spec


def _stem_init_name(stem_init: str | None) -> str:
    name = DEFAULT_STEM_INIT if stem_init is None else stem_init
    if name not in STEM_INITS:
        raise EncoderError(f"unknown stem_init {name!r}: choose one of {', '.join(STEM_INITS)}")
    return name


def _check_model_name(model: str) -> None:
    import timm
    from timm.models import is_model_in_modules, split_model_name_tag

    arch, _tag = split_model_name_tag(model)
    hint = "list valid names with timm.list_models('convnext*') (e.g. convnext_atto ... convnext_xlarge)"
    if not timm.is_model(arch):
        raise EncoderError(f"unknown model {model!r}: {hint}")
    if not is_model_in_modules(arch, [_TIMM_MODULE]):
        raise EncoderError(f"model {model!r} is not a ConvNeXt: {hint}")


def _preprocessing(model: nn.Module, resize: str) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    return {
        "input": "uint8 RGB (B, H, W, 3)",
        "scale": 1.0 / 255.0,
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "resize": resize,
        "crop": "none",
        "pretrained_tag": tag,
    }


def build_encoder(
    model: str = DEFAULT_MODEL,
    *,
    stem: str | None = DEFAULT_STEM,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    stem_init: str | None = None,
    resize: str | None = None,
    **timm_kwargs: Any,
) -> Encoder:
    """Build a ConvNeXt tile encoder.

    Args:
        model: timm ConvNeXt name, optionally with a pretrained tag (``convnext_tiny.fb_in1k``).
        stem: Name in :data:`STEMS`; ``None`` means ``"patch"``.
        weights: Weights file (see :func:`load_weights`).
        pretrained: Load timm's pretrained weights for ``model``'s tag from the local Hugging
            Face (or torch hub) cache; never downloads.
        stem_init: Name in :data:`STEM_INITS`; ``None`` means ``"checkpoint"``.
        resize: Name in :data:`RESIZE_POLICIES`; ``None`` means ``"none"``.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Without ``weights`` and ``pretrained`` the weights are random (logged at WARNING,
    ``weights_sha256 == "random"``), drawn with the fixed seed :data:`RANDOM_INIT_SEED`.

    Raises:
        EncoderError: Unknown or non-ConvNeXt model, unknown stem/stem_init/resize, bad timm kwargs,
            or a stem conversion that is impossible.
        ConfigError: Both ``weights`` and ``pretrained``.
        InputNotFoundError, WeightsError: See :func:`load_weights`; pretrained weights not cached.
    """
    import timm

    if not isinstance(model, str) or not model:
        raise EncoderError(f"model must be a timm ConvNeXt name, got {model!r}")
    spec = _stem_spec(stem)
    stem_init_name = _stem_init_name(stem_init)
    resize_name = DEFAULT_RESIZE if resize is None else resize
    if resize_name not in RESIZE_POLICIES:
        raise EncoderError(f"unknown resize policy {resize_name!r}: choose one of {', '.join(RESIZE_POLICIES)}")
    if weights is not None and pretrained:
        raise ConfigError("pass either weights (--weights PATH) or pretrained (--pretrained), not both")
    reserved = sorted(_RESERVED_TIMM_KWARGS & timm_kwargs.keys())
    if reserved:
        raise EncoderError(f"timm arguments {reserved} are set by build_encoder; use stem=/pretrained= instead")
    _check_model_name(model)

    import torch

    try:
        # A fixed seed makes "random" weights one reproducible model, so a random-weight
        # feature key names the same function in every run (resume, demo, benchmarks).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            net = timm.create_model(
                model, pretrained=False, num_classes=0, stem_type=spec.timm_stem_type, **timm_kwargs
            )
    except (TypeError, RuntimeError, ValueError, AssertionError) as exc:
        raise EncoderError(f"cannot build {model!r} with stem {spec.name!r}: {one_line(exc)}") from exc
    net.eval()

    weights_path: str | None = None
    if weights is not None:
        weights_path = str(Path(weights).expanduser())
        sha = load_weights(net, weights_path, stem=spec.name, stem_init=stem_init_name)
    elif pretrained:
        cfg = dict(getattr(net, "pretrained_cfg", None) or {})
        name = f"{cfg.get('architecture', model)}.{cfg.get('tag')}" if cfg.get("tag") else model
        found = _find_pretrained_file(cfg, name)
        weights_path = str(found)
        sha = load_weights(net, found, stem=spec.name, stem_init=stem_init_name)
    else:
        sha = RANDOM
        logger.warning(
            "encoder %s (stem %r) has RANDOM weights: no weights file and no pretrained weights were given, so "
            "its embeddings carry no learned features; recorded as weights_sha256='random'",
            model,
            spec.name,
        )

    config = EncoderConfig(
        model=model,
        stem=spec.name,
        weights=weights_path if weights is not None else None,
        pretrained=bool(pretrained),
        stem_init=stem_init_name,
        resize=resize_name,
        timm_kwargs=tuple(sorted(timm_kwargs.items())),
    )
    return Encoder(net, config, sha, weights_path, _preprocessing(net, resize_name))
