"""Weights I/O for encoders: files, metadata, timm's pretrained weights through the Hugging Face hub.

- Files are read safetensors-first; torch files only with ``torch.load(weights_only=True)``, so
  pickles that carry arbitrary objects are refused.
- Checkpoints are unwrapped from common containers (``{"state_dict": ...}``, ``{"model": ...}``)
  and cleaned of wrapper prefixes with timm's ``clean_state_dict`` (``module.``, ``_orig_mod.``)
  plus a few whole-checkpoint prefixes timm does not strip (``model.``, ``encoder.``,
  ``backbone.``); the family's checkpoint filter then maps the keys onto the model; the
  classifier named by the model's timm ``pretrained_cfg['classifier']`` is dropped.
- A safetensors file written by :func:`save_encoder_weights` (``wsi-convnext finetune``) records
  the model and stem in its metadata (:data:`META_MODEL`, :data:`META_STEM`); a ``config.json``
  beside any weights file may record them too. :func:`~.base.build_encoder` checks the model and
  picks the stem up from them.
- ``pretrained`` weights come from the Hugging Face cache; when they are not cached and
  ``HF_HUB_OFFLINE`` is not set they are downloaded into it (``huggingface_hub.hf_hub_download``).
  Nothing touches the network at import.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_path, file_sha256
from ..errors import InputNotFoundError, WeightsError, listing, one_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .base import Encoder, EncoderFamily, Stem

__all__ = [
    "ENCODER_FILE",
    "META_MODEL",
    "META_PREFIX",
    "META_STEM",
    "find_pretrained_file",
    "hf_hub_cache",
    "load_weights",
    "read_state_dict",
    "read_weights_metadata",
    "resolve_weights_path",
    "save_encoder_weights",
    "unwrap_state_dict",
    "weights_metadata",
]

logger = logging.getLogger(__name__)

#: Prefix of every wsi-convnext entry in a safetensors file's metadata.
META_PREFIX = "wsi_convnext."
#: safetensors metadata / config.json key naming the model the weights were made for.
META_MODEL = f"{META_PREFIX}model"
#: safetensors metadata / config.json key naming the stem the weights were made with.
META_STEM = f"{META_PREFIX}stem"
#: The encoder file of a ``finetune`` output folder (accepted when ``--weights`` names the folder).
ENCODER_FILE = "encoder.safetensors"
#: Sidecar with the same information, read when the weights file has no metadata.
CONFIG_FILE = "config.json"

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
#: Whole-checkpoint prefixes beyond timm's clean_state_dict (stripped only when every key has it).
_EXTRA_PREFIXES = ("model.", "encoder.", "backbone.")
_MAX_LISTED_KEYS = 4
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order on the hub
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


# ------------------------------------------------------------------------------------- paths


def resolve_weights_path(path: str | os.PathLike[str]) -> Path:
    """The weights file ``path`` names: the file itself, or a ``finetune`` folder's encoder file.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        WeightsError: ``path`` is a folder without a recognised :data:`ENCODER_FILE`.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        inner = p / ENCODER_FILE
        if inner.is_file() and read_weights_metadata(inner).get(META_MODEL):
            return inner
        raise WeightsError(
            f"weights path {p} is a folder, not a weights file; pass the .safetensors/.pth file itself "
            f"(a `wsi-convnext finetune` output folder is accepted when it holds {ENCODER_FILE})"
        )
    if not p.is_file():
        raise InputNotFoundError(f"weights file {p} does not exist; pass an existing .safetensors/.pth file")
    return p


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


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path)


# ---------------------------------------------------------------------------------- metadata


def read_weights_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``wsi_convnext.*`` entries recorded for a weights file (empty if none).

    Read from the safetensors metadata first; otherwise from a ``config.json`` beside the file,
    which may hold the dotted keys (``{"wsi_convnext.model": ..., "wsi_convnext.stem": ...}``),
    a ``"wsi_convnext"`` object (``{"wsi_convnext": {"model": ..., "stem": ...}}``) or an
    ``"encoder"`` object with ``model`` and ``stem``. Never reads tensors.

    Raises:
        WeightsError: The ``config.json`` beside the file is not valid JSON.
    """
    p = Path(path)
    meta: dict[str, str] = {}
    if p.is_file() and _is_safetensors(p):
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = {k: str(v) for k, v in (fh.metadata() or {}).items() if k.startswith(META_PREFIX)}
        except Exception:  # noqa: BLE001 - an unreadable file is reported by read_state_dict
            meta = {}
    if META_MODEL in meta:
        return meta
    sidecar = p.parent / CONFIG_FILE
    if not sidecar.is_file():
        return meta
    try:
        cfg = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{sidecar} (beside weights {p.name}) is not valid JSON: {one_line(exc)}") from exc
    if not isinstance(cfg, dict):
        return meta
    found: dict[str, Any] = {k: v for k, v in cfg.items() if k.startswith(META_PREFIX)}
    for nested in ("wsi_convnext", "encoder"):
        sub = cfg.get(nested)
        if not found and isinstance(sub, dict) and isinstance(sub.get("model"), str):
            found = {META_MODEL: sub["model"], META_STEM: sub.get("stem")}
    return {**{k: str(v) for k, v in found.items() if isinstance(v, str) and v}, **meta}


def weights_metadata(model: str, stem: str, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The safetensors metadata of weights made for ``model`` with ``stem`` (what :func:`read_weights_metadata` reads).

    Args:
        model: The timm model name (:data:`META_MODEL`).
        stem: The stem name (:data:`META_STEM`).
        extra: More entries (e.g. a training fingerprint), written with ``str``; keys without a
            dot get the :data:`META_PREFIX`.
    """
    meta = {"format": "pt", META_MODEL: model, META_STEM: stem}
    for key, value in (extra or {}).items():
        meta[key if "." in key else f"{META_PREFIX}{key}"] = str(value)
    return meta


def save_encoder_weights(
    encoder: Encoder, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> str:
    """Write ``encoder``'s backbone as safetensors with its model and stem in the metadata.

    The file is written atomically and loads back with ``build_encoder(model, weights=path)``,
    which then picks the stem up by itself.

    Args:
        encoder: The encoder to save (its :attr:`~.base.Encoder.model` state dict, on the CPU).
        path: Target file (``.safetensors``).
        metadata: Extra string entries (e.g. a training fingerprint); keys without a dot get the
            ``wsi_convnext.`` prefix.

    Returns:
        The written file's sha256 (the feature key of embeddings made with it names it).
    """
    from safetensors.torch import save_file

    meta = weights_metadata(encoder.config.model, encoder.stem.name, metadata)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return file_sha256(path)


# ------------------------------------------------------------------------------- state dicts


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a safetensors file or a torch state dict (``weights_only=True``) onto the CPU.

    Raises:
        WeightsError: Unreadable file, a pickle with arbitrary objects, or not a mapping.
    """
    import torch

    path = Path(path)
    if _is_safetensors(path):
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


def unwrap_state_dict(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, out of their wrappers and without wrapper prefixes.

    Wrappers: ``{"state_dict"|"model_state_dict"|"model"|"module"|"net": ...}``, nested up to
    four deep (the plain weights are preferred over any EMA copy). Prefixes: timm's
    ``clean_state_dict`` (``module.``, ``_orig_mod.``, per key), then ``model.``/``encoder.``/
    ``backbone.`` when every key has it.

    Raises:
        WeightsError: No tensors.
    """
    import torch
    from timm.models import clean_state_dict

    sd: Mapping[str, Any] = obj
    for _ in range(4):  # nested wrappers such as {"model": {"state_dict": ...}}
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"weights file {path} holds no tensors (keys: {listing([str(k) for k in sd], _MAX_LISTED_KEYS)})")
    while True:
        tensors = clean_state_dict(tensors)
        prefix = next((p for p in _EXTRA_PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            return tensors
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}


def _cfg_modules(model: nn.Module, field: str) -> list[str]:
    """Module names from the model's timm ``pretrained_cfg[field]`` (a name or a tuple of names)."""
    value = (getattr(model, "pretrained_cfg", None) or {}).get(field)
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _drop_classifier(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the classifier named by ``pretrained_cfg['classifier']`` (the model has none)."""
    heads = _cfg_modules(model, "classifier")
    own = model.state_dict()
    drop = [h for h in heads if not any(k == h or k.startswith(h + ".") for k in own)]
    return {k: v for k, v in sd.items() if not any(k == h or k.startswith(h + ".") for h in drop)}


def _check_fits(
    sd: Mapping[str, torch.Tensor], model: nn.Module, *, skip: Any, path: Path, stem: Stem
) -> None:
    """Raise a one-line WeightsError naming missing, unexpected and mis-shaped keys."""
    from .base import arch_name

    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in sd and not skip(k)]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {listing(missing, _MAX_LISTED_KEYS)}")
    if unexpected:
        parts.append(f"unexpected keys {listing(unexpected, _MAX_LISTED_KEYS)}")
    if mismatched:
        shown = [f"{k} {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}" for k in mismatched]
        parts.append(f"shape mismatch {listing(shown, _MAX_LISTED_KEYS)}")
    first = [f"{c}.weight" for c in _cfg_modules(model, "first_conv")]
    hint = (
        f" (the first conv {first[0]} differs: another stem or input channels)"
        if any(k in mismatched for k in first)
        else ""
    )
    raise WeightsError(
        f"weights file {path} does not fit {arch_name(model)} with stem {stem.name!r}: {'; '.join(parts)}{hint}; "
        "check that --model names the checkpoint's architecture"
    )


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    stem: str | Stem,
    stem_init: str | None = None,
    family: EncoderFamily | None = None,
) -> str:
    """Load a weights file into a model built with ``stem``; return the file's sha256.

    Accepts safetensors files and torch state dicts (.pth/.pt/.bin, read with
    ``torch.load(weights_only=True)``, so arbitrary pickled objects are refused), inside common
    wrappers and with wrapper prefixes (:func:`unwrap_state_dict`). The family's checkpoint
    filter maps foreign layouts and converts stems (for ConvNeXt: original Facebook/OpenCLIP
    layouts, exact patch → overlap conversion); the classifier (``pretrained_cfg['classifier']``)
    is ignored.

    Args:
        model: Model from the family's ``create_model`` (``num_classes=0``).
        path: Weights file, or a ``finetune`` output folder (:func:`resolve_weights_path`).
        stem: The stem (object or name) ``model`` was built with.
        stem_init: Name in :data:`~.base.STEM_INITS`; ``None`` means ``"checkpoint"``.
        family: The model's family; default found from the model's architecture name.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        WeightsError: Unreadable file, or keys/shapes that do not fit the model.
        EncoderError: The checkpoint's stem cannot be converted exactly to ``stem``.
    """
    import torch

    from .base import STEM_INIT_SEED, _family_of_module, _stem_init_name, arch_name

    family = _family_of_module(model) if family is None else family
    spec = family.stem(stem)
    fresh_stem = _stem_init_name(stem_init) == "random"
    path = resolve_weights_path(path)
    sha = file_sha256(path)
    sd = unwrap_state_dict(read_state_dict(path), path)
    sd = family.checkpoint_filter(sd, model, stem=spec, fresh_stem=fresh_stem, source=str(path))
    sd = _drop_classifier(sd, model)

    def is_stem(key: str) -> bool:
        return fresh_stem and family.is_stem_key(model, key)

    if fresh_stem:
        sd = {k: v for k, v in sd.items() if not family.is_stem_key(model, k)}
    _check_fits(sd, model, skip=is_stem, path=path, stem=spec)
    model.load_state_dict(sd, strict=not fresh_stem)
    if fresh_stem:
        family.init_stem(model, torch.Generator().manual_seed(STEM_INIT_SEED))
        logger.warning(
            "stem of %s initialised fresh (stem_init='random', seed %d): the stem weights of %s are not used "
            "and the network no longer computes the checkpoint's function until fine-tuned",
            arch_name(model),
            STEM_INIT_SEED,
            path,
        )
    return sha


# ------------------------------------------------------------------------- pretrained weights


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, but at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _download_hf(repo_id: str, revision: str | None, filenames: list[str], cache: Path) -> tuple[Path | None, str]:
    """Download the first of ``filenames`` that exists in the repo; (path or None, why not)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    why = f"the hub repo has none of {filenames}"
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=str(cache))), ""
        except LocalEntryNotFoundError:  # no connection (and not cached)
            return None, "the Hugging Face hub could not be reached (HF_HUB_OFFLINE=1 skips trying)"
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - HTTP, auth, gated repo, disk full, ...
            return None, f"the download failed: {one_line(exc, 160)}"
    return None, why


def find_pretrained_file(cfg: Mapping[str, Any], name: str) -> Path:
    """Locate (or download) timm's pretrained weights described by a ``pretrained_cfg``.

    Order: ``cfg['file']``; the Hugging Face cache (:func:`hf_hub_cache`); the torch hub cache
    for ``cfg['url']``; then, unless ``HF_HUB_OFFLINE`` is set, a download into those caches.
    A cached file is used without asking the network (its sha256 is recorded anyway).

    Raises:
        WeightsError: Neither cached nor downloadable; one line naming where to put which file.
    """
    file = cfg.get("file")
    if file and Path(file).expanduser().is_file():
        return Path(file).expanduser()

    cache = hf_hub_cache()
    hub_id = cfg.get("hf_hub_id")
    repo_id, revision = "", None
    hub_files: list[str] = []
    if hub_id:
        repo_id, _, rev = str(hub_id).partition("@")
        revision = rev or None
        hub_files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(_HF_WEIGHT_FILES)
        from huggingface_hub import try_to_load_from_cache

        for filename in hub_files:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache), revision=revision)
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

    offline = _hf_offline()
    if not hub_id and torch_file is None:
        why = "timm knows no download location for them"
    elif offline:
        why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    if not offline and hub_id:
        logger.info("downloading pretrained weights of %s from the Hugging Face hub (%s)", name, repo_id)
        got, why = _download_hf(repo_id, revision, hub_files, cache)
        if got is not None:
            return got
    elif not offline and torch_file is not None:
        import torch.hub

        try:
            torch_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(str(url), str(torch_file), progress=False)
            return torch_file
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, OSError, ...
            why = f"the download failed: {one_line(exc, 160)}"

    if hub_id:
        repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
        where = (
            f"put {hub_files[0]} of the Hugging Face repo {repo_id} at {repo_dir}/snapshots/<commit>/{hub_files[0]}"
            f"{''.join(f' (or {f})' for f in hub_files[1:])} "
            f"with the commit hash in {repo_dir}/refs/{revision or 'main'} (e.g. `hf download {repo_id} "
            f"--cache-dir {cache}` on a connected machine)"
        )
    elif torch_file is not None:
        where = f"put {url} at {torch_file}"
    else:
        where = "put the file at the pretrained config's 'file' path"
    # Gated hub repos (presets) say in their pretrained config what access needs.
    access = "".join(f"; {note}" for note in cfg.get("notes") or () if str(note).startswith("gated"))
    licence = f" (licence: {cfg['license']}, {cfg.get('origin_url') or 'see its model card'})" if cfg.get("license") else ""
    raise WeightsError(
        f"pretrained weights for {name}{licence} are not in the cache and {why}{access}; {where}, or pass --weights PATH"
    )
