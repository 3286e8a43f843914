"""The fine-tuning loop: model set-up, optimiser, schedule, resumable checkpoints.

:func:`finetune_encoder` is the library entry point (the CLI, the cohort stage and the
benchmarks call it). A run is a pure function of its configuration's result fields, the data
(tiles, labels, groups) and the starting weights: its training fingerprint (:meth:`FinetuneConfig.training_fingerprint`).

Resuming. While training, the state lives in a hidden work folder next to the output
(``.<ENC_DIR name>.work/checkpoint.pt``), rewritten atomically at every epoch end (and every
``checkpoint_every`` steps): model, head, optimiser, scheduler, torch RNG state, epoch, step and
position in the epoch's data order, history, best state. Rerunning the same command after a
crash or SIGKILL resumes from it; the data order and augmentations are functions of (seed,
epoch, position), so on CPU the resumed run ends with the same weights as an uninterrupted one.
The output folder appears (atomically) only when training finished.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_path, cpu_count
from ..data.labelled import (
    CorruptTileError,
    EpochSampler,
    LabelledTileDataset,
    LabelledTiles,
    collate_tiles,
    grouped_split,
    load_labelled_tiles,
)
from ..encoders.weights import CONFIG_FILE, ENCODER_FILE
from ..errors import ConfigError, OnFailure, StoreExistsError, WeightsError
from .config import FinetuneConfig, parse_freeze
from .outputs import HEAD_FILE

if TYPE_CHECKING:
    import torch

    from ..encoders import Encoder

__all__ = [
    "FinetuneProgress", "StartPoint", "StepProgress", "default_workers", "finetune_encoder", "prepare_model",
    "read_checkpoint", "state_dict_cpu", "warmup_cosine", "work_dir",
]  # fmt: skip

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class StepProgress:
    """One progress report of a training run (finetune, pretrain).

    Attributes:
        event: What happened (``start``, ``resume``, ``step``, ``done``; each run adds its own).
        step: Optimiser steps done.
        total_steps: Optimiser steps of the whole run.
        loss: Training loss of the last step (or epoch), if any.
        lr: Learning rate (of the head group in finetune).
    """

    event: str
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None


@dataclass(frozen=True)
class FinetuneProgress(StepProgress):
    """A finetune progress report (``event`` ``epoch``: after validation).

    Attributes:
        epoch: Current epoch (0-based; after ``epoch`` events the finished one).
        total_epochs: Epochs of the run.
        val: Validation metrics of the last epoch (``loss``, ``accuracy``, ``balanced_accuracy``, ``auc``).
    """

    epoch: int = 0
    total_epochs: int = 0
    val: dict[str, float] | None = None


ProgressFn = Callable[[FinetuneProgress], None]


@dataclass
class StartPoint:
    """Where training starts: ``kind`` is ``scratch``, ``weights``, ``pretrained`` or ``finetune``."""

    kind: str
    weights_path: str | None
    weights_sha256: str
    stem_converted: bool = False
    head_loaded: bool = False
    init_seed: int | None = None
    source_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "weights_path": self.weights_path, "weights_sha256": self.weights_sha256,
            "stem_converted": self.stem_converted, "head_loaded": self.head_loaded, "init_seed": self.init_seed,
            "source_model": self.source_config.get("model"), "source_stem": self.source_config.get("stem"),
        }  # fmt: skip


def work_dir(out: str | Path) -> Path:
    """The hidden folder holding the resumable state of a run writing ``out``."""
    p = Path(out)
    return p.parent / f".{p.name}.work"


# ----------------------------------------------------------------------------------- model set-up


def _resolve_start(config: FinetuneConfig) -> tuple[Path | None, dict[str, Any]]:
    """(weights file, earlier finetune config) for ``--weights`` (a file or an ENC_DIR)."""
    if config.weights is None:
        return None, {}
    p = Path(config.weights).expanduser()
    if p.is_dir():
        enc = p / ENCODER_FILE
        if not enc.is_file():
            raise WeightsError(f"{p}: a folder given as --weights must be a finetune output with {ENCODER_FILE}")
        try:
            return enc, json.loads((p / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return enc, {}
    return p, {}


def prepare_model(
    config: FinetuneConfig, classes: tuple[str, ...] | list[str]
) -> tuple[Encoder, torch.nn.Linear, StartPoint]:
    """Build the encoder and the linear head training starts from.

    A stock patch-stem checkpoint loaded with an overlapping stem goes through the exact
    conversion of ``wsi_convnext.encoders`` (same function at the start). From scratch, the
    network is initialised with its family's init (timm's ConvNeXt init for ConvNeXt) under
    ``config.seed``; the head is
    initialised under ``config.seed`` too, unless an earlier finetune output with the same
    classes supplies it.

    Raises:
        WeightsError: Weights made for another model (by metadata or shape), or for a stem that
            cannot be converted to ``config.stem``.
        EncoderError: Unknown model/stem, impossible conversion.
    """
    import torch

    from ..encoders import META_MODEL, META_STEM, build_encoder, read_weights_metadata

    weights, source = _resolve_start(config)
    if weights is not None:
        meta = read_weights_metadata(weights)
        src_model = meta.get(META_MODEL) or source.get("model")
        if src_model and src_model.split(".")[0] != config.model.split(".")[0]:
            raise WeightsError(
                f"weights file {weights} was trained for model {src_model!r}, not {config.model!r}; pass --model {src_model}"
            )
        if meta.get(META_STEM) and not source:
            source = {"model": meta.get(META_MODEL), "stem": meta.get(META_STEM)}
    kwargs: dict[str, Any] = {"drop_path_rate": config.drop_path} if config.drop_path > 0 else {}
    encoder = build_encoder(
        # Starting from a checkpoint of another stem is a conversion the user asked for by
        # choosing --stem: the exact patch → overlap conversion, or an error where impossible.
        config.model, stem=config.stem, weights=weights, pretrained=config.pretrained,
        stem_init=config.stem_init or ("checkpoint" if weights is not None else None),
        **kwargs,
    )  # fmt: skip
    if weights is not None:
        kind = "finetune" if source.get("fingerprint") or (weights.parent / CONFIG_FILE).is_file() else "weights"
    else:
        kind = "pretrained" if config.pretrained else "scratch"
    src_stem = source.get("stem")
    start = StartPoint(
        kind, encoder.weights_path, encoder.weights_sha256,
        stem_converted=bool(weights is not None or config.pretrained)
        and (src_stem or encoder.family.default_stem) != encoder.stem.name,
        source_config=source,
    )  # fmt: skip
    if kind == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            encoder.family.init_weights(encoder.model)
        start.init_seed = config.seed
    head = torch.nn.Linear(encoder.num_features, len(classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 7919)
        torch.nn.init.trunc_normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)
    if kind == "finetune" and list(source.get("classes") or []) == list(classes):
        from safetensors.torch import load_file

        head_path = weights.parent / HEAD_FILE
        if head_path.is_file():
            sd = load_file(str(head_path))
            if tuple(sd["weight"].shape) == tuple(head.weight.shape):
                head.load_state_dict(sd)
                start.head_loaded = True
    return encoder, head, start


def _param_groups(
    encoder: Encoder, head: torch.nn.Module, config: FinetuneConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """AdamW groups: layer-wise LR scale, no weight decay on 1-D parameters; frozen parts left out."""
    kind, k = parse_freeze(config.freeze)
    groups = encoder.parameter_groups()
    stage_names = [n for n in groups if n.startswith("stages.")]
    n_stages = len(stage_names)
    if kind == "stages" and k > n_stages:
        raise ConfigError(f"--freeze stages:{k} but {config.model} has only {n_stages} stages; use stages:0..{n_stages}")
    frozen = set()
    if kind == "stem":
        frozen.add("stem")
    elif kind == "stages":
        frozen.update(stage_names[:k])
    # depth from the top: head 0, last stage 1, ..., first stage n_stages, stem n_stages + 1
    depth = {"head": 0, "stem": n_stages + 1}
    depth.update({name: n_stages - i for i, name in enumerate(stage_names)})
    out: list[dict[str, Any]] = []
    n_train = n_frozen = 0
    for name, params in list(groups.items()) + [("classifier", list(head.parameters()))]:
        scale = config.layer_decay ** depth.get(name, 0)
        if name in frozen:
            for p in params:
                p.requires_grad_(False)
            n_frozen += sum(p.numel() for p in params)
            continue
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        n_train += sum(p.numel() for p in params)
        for suffix, ps, wd in (("", decay, config.weight_decay), (".no_decay", no_decay, 0.0)):
            if ps:
                out.append({"params": ps, "weight_decay": wd, "lr_scale": scale, "name": name + suffix})
    info = {"frozen": sorted(frozen), "trainable_params": n_train, "frozen_params": n_frozen}
    return out, info


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor per step (for ``LambdaLR``): linear warm-up, then cosine to ``min_ratio``."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ---------------------------------------------------------------------------------------- helpers


def default_workers(device_type: str) -> int:
    """DataLoader worker processes by default: up to 4 (CPU) or 8 (accelerator), leaving one core."""
    n = cpu_count()
    return max(0, min(4 if device_type == "cpu" else 8, n - 1))


def _colour_jitter(hed_sigma: float, bcs: float = 0.1) -> Callable[..., Any]:
    """The ``histology`` colour augmentation: HED jitter (scale and shift ±σ) then brightness/contrast
    (±``bcs``), the registered tile transforms drawing from the generator given per batch."""
    from ..transforms.augment import BrightnessContrast, HedJitter

    steps = ([HedJitter(sigma=hed_sigma, bias=hed_sigma)] if hed_sigma > 0 else []) + [BrightnessContrast(bcs, bcs)]

    def colour(x: Any, generator: Any) -> Any:
        for t in steps:
            x = t.apply(x, generator)
        return x

    return colour


def _rng_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _evaluate(
    net: Callable[[torch.Tensor], torch.Tensor], encoder: Encoder, loader: Any, n_classes: int, device: torch.device,
    autocast: Any, bad: dict[str, str], tiles: LabelledTiles, strict: bool,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:  # fmt: skip
    """Validation loss and metrics: (metrics, y, probs)."""
    import torch

    from ..labels.metrics import balanced_accuracy, roc_auc

    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    with torch.no_grad():
        for batch in loader:
            _note_bad(batch.bad, tiles, bad, strict)
            if not len(batch.y):
                continue
            x = encoder.preprocess(batch.tiles, device=device)
            with autocast():
                logits = net(x)
            ps.append(torch.softmax(logits.float(), -1).cpu().numpy())
            ys.append(batch.y.numpy())
    if not ys:
        return {}, np.zeros(0, dtype=np.int64), np.zeros((0, n_classes))
    y = np.concatenate(ys)
    p = np.concatenate(ps).astype(np.float64)
    loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    metrics = {
        "loss": loss,
        "accuracy": float((p.argmax(1) == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, p),
        "auc": roc_auc(y, p) if len(np.unique(y)) > 1 else float("nan"),
    }
    return metrics, y, p


def _note_bad(items: list[tuple[int, str]], tiles: LabelledTiles, bad: dict[str, str], strict: bool) -> None:
    for i, reason in items:
        ref = str(tiles.refs[i])
        if strict:
            raise CorruptTileError(f"{reason}; remove it or drop --strict to skip it")
        if ref not in bad:
            logger.warning("skipped unreadable tile %s", reason)
        bad[ref] = reason


def _better(val: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    a, b = val.get("balanced_accuracy", float("nan")), best.get("balanced_accuracy", float("nan"))
    if not math.isfinite(b) or (math.isfinite(a) and a > b + 1e-12):
        return True
    return math.isfinite(a) and abs(a - b) <= 1e-12 and val.get("loss", math.inf) < best.get("loss", math.inf)


def state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def read_checkpoint(path: Path, fingerprint: str, *, overwrite: bool) -> dict[str, Any] | None:
    """The resumable state at ``path`` if it belongs to the run ``fingerprint``; None to start again.

    An unreadable (torn, foreign) checkpoint is logged and ignored; one of another configuration
    is ignored with ``overwrite``.

    Raises:
        StoreExistsError: The checkpoint belongs to another configuration and ``overwrite`` is false.
    """
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn/foreign checkpoint: start again
        logger.warning("%s: unreadable checkpoint (%s); starting again", path, exc)
        return None
    if ck.get("fingerprint") != fingerprint:
        if not overwrite:
            raise StoreExistsError(
                f"{path.parent}: holds the checkpoint of another configuration; rerun that command to resume it, "
                "or pass --overwrite to start this one"
            )
        return None
    return ck


# --------------------------------------------------------------------------------------------- run


def finetune_encoder(
    config: FinetuneConfig, progress: ProgressFn | None = None, on_failure: OnFailure | None = None
) -> Path:
    """Fine-tune (or train from scratch) a ConvNeXt tile encoder; returns the output folder.

    See the module docstring for resuming and :mod:`wsi_convnext.finetune.outputs` for the files.
    A finished output folder with the same fingerprint is returned as is. With ``on_failure``, a
    tile store that fails its check (damaged, replaced, missing chunk) is reported through
    ``on_failure(path, message)`` and left out; the outputs list it under ``failed_stores``.

    Raises:
        InputNotFoundError, LabelsError, CorruptTileError: Bad data (see :mod:`wsi_convnext.data.labelled`).
        ConfigError: Invalid options (e.g. ``--freeze stages:9``, a batch larger than the data).
        WeightsError, EncoderError: Weights for another model or a stem that cannot be reached.
        DeviceError: The requested device is absent.
        StoreExistsError: ``out`` holds another run's result and ``overwrite`` is false.
    """
    from .._io import ensure_dir, path_lock

    ensure_dir(config.out, create=False)
    # One writer per ENC_DIR: a second run on the same folder waits, then finds it finished
    # (same fingerprint) or resumes from the checkpoint; it never writes beside the first.
    with path_lock(Path(config.out)):
        return _finetune_encoder(config, progress, on_failure)


def _finetune_encoder(config: FinetuneConfig, progress: ProgressFn | None, on_failure: OnFailure | None) -> Path:
    import torch

    from ..encoders import resolve_device
    from .outputs import read_training_fingerprint, write_outputs

    cfg = config
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tiles = load_labelled_tiles(cfg.data, labels=cfg.labels, strict=cfg.strict, on_failure=on_failure)
    tiles.require_classes(2)
    train_idx, val_idx, test_idx = grouped_split(tiles, val_frac=cfg.val_frac, seed=cfg.seed)
    if len(test_idx):
        logger.info("%d tiles in the 'test' split are not used for fine-tuning", len(test_idx))
    train_tiles, val_tiles = tiles.subset(train_idx), tiles.subset(val_idx)
    train_tiles.require_classes(2)

    encoder, head, start = prepare_model(cfg, tiles.classes)
    cfg = replace(cfg, stem=encoder.config.stem)  # the stem the weights or the family chose
    fingerprint = cfg.training_fingerprint(tiles.data_fingerprint(), start.weights_sha256)
    if out.exists():
        done = read_training_fingerprint(out)
        if done == fingerprint and not cfg.overwrite:
            logger.info("%s: already fine-tuned with this configuration; nothing to do", out)
            return out
        if not cfg.overwrite:
            raise StoreExistsError(f"{out}: already exists (another configuration or not a finetune output); pass --overwrite to replace it")

    balance = cfg.balance if cfg.balance != "auto" else ("class_group" if tiles.kind == "stores" else "none")
    crop = cfg.crop_size
    train_ds = LabelledTileDataset(train_tiles, size=crop, train=True, augment=cfg.augment != "none", on_size=cfg.on_size)
    val_ds = LabelledTileDataset(val_tiles, size=cfg.eval_size, train=False, on_size=cfg.on_size) if len(val_tiles) else None
    micro = cfg.batch_size
    per_step = micro * cfg.accumulate
    steps_per_epoch = len(train_tiles) // per_step
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{tiles.source}: {len(train_tiles)} training tiles are fewer than one step "
            f"(--batch-size {micro} × accumulate {cfg.accumulate}); lower --batch-size"
        )
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    total_epochs = -(-total_steps // steps_per_epoch)
    warmup_steps = int(round(cfg.warmup * total_steps))
    sampler = EpochSampler(
        train_tiles.y, train_tiles.groups, balance=balance, seed=cfg.seed, num_samples=steps_per_epoch * per_step
    )

    groups, freeze_info = _param_groups(encoder, head, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, cfg.min_lr_ratio))

    # ---- resume
    work = work_dir(out)
    ckpt_path = work / "checkpoint.pt"
    state: dict[str, Any] = {"epoch": 0, "pos": 0, "step": 0, "history": [], "best": None, "best_epoch": None,
                             "bad": {}, "train_seconds": 0.0, "train_tiles": 0, "epoch_losses": []}  # fmt: skip
    best_state: dict[str, Any] | None = None
    resumed = False
    if ckpt_path.is_file():
        ck = read_checkpoint(ckpt_path, fingerprint, overwrite=cfg.overwrite)
        if ck is not None:
            encoder.model.load_state_dict(ck["model"])
            head.load_state_dict(ck["head"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["torch_rng"])
            if ck.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(ck["cuda_rng"]))
            state = json.loads(ck["state"])
            best_state = ck.get("best_state")
            resumed = True
            logger.info("resuming %s at epoch %d, step %d", out, state["epoch"], state["step"])
    elif work.exists():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    def save_checkpoint() -> None:
        payload = {
            "version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
            "model": state_dict_cpu(encoder.model), "head": state_dict_cpu(head),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "state": json.dumps(state), "best_state": best_state,
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        }  # fmt: skip
        with atomic_path(ckpt_path) as tmp:
            torch.save(payload, tmp)

    # ---- device, precision
    encoder.model.to(device)
    head.to(device)
    from ..encoders import resolve_precision

    cuda = device.type == "cuda"
    prec = resolve_precision(device)
    encoder.to(channels_last=prec.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
    for st in optimizer.state.values():  # optimiser moments follow the parameters
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)

    autocast = functools.partial(prec.autocast, device)
    # Loss scaling for float16 autocast (CUDA without bfloat16), a no-op otherwise. Its state is
    # not checkpointed: a resumed float16 run starts with a fresh scale.
    scaler = prec.grad_scaler(device)

    body: Callable[[torch.Tensor], torch.Tensor] = encoder.model
    if cfg.compile and cuda:
        body = torch.compile(encoder.model)

    def net(x: torch.Tensor) -> torch.Tensor:
        return head(body(x))

    colour = _colour_jitter(cfg.hed_sigma) if cfg.augment == "histology" else None
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    workers = default_workers(device.type) if cfg.num_workers is None else cfg.num_workers
    loader_kw: dict[str, Any] = {"num_workers": workers, "collate_fn": collate_tiles, "pin_memory": cuda}
    if workers:
        loader_kw.update(persistent_workers=True, prefetch_factor=2)
    from torch.utils.data import DataLoader

    train_loader = DataLoader(train_ds, batch_size=micro, sampler=sampler, drop_last=False, **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=max(micro, 64), shuffle=False, **loader_kw) if val_ds is not None else None
    bad: dict[str, str] = dict(state["bad"])

    def report(event: str, loss: float | None = None, val: dict[str, float] | None = None) -> None:
        if progress is not None:
            lr = optimizer.param_groups[-1]["lr"]
            progress(FinetuneProgress(event, state["step"], total_steps, loss, lr, epoch=state["epoch"], total_epochs=total_epochs, val=val))

    report("resume" if resumed else "start")
    stop = state["step"] >= total_steps
    while not stop and state["epoch"] < total_epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start=state["pos"] * per_step)
        encoder.train(True)
        head.train()
        losses: list[float] = state.setdefault("epoch_losses", [])  # kept across a mid-epoch resume
        micro_i = 0
        acc_loss = 0.0
        t0 = time.perf_counter()
        n_seen = 0
        optimizer.zero_grad(set_to_none=True)
        for batch in train_loader:
            _note_bad(batch.bad, train_tiles, bad, cfg.strict)
            micro_i += 1
            if len(batch.y):
                gen = torch.Generator().manual_seed(_rng_seed(cfg.seed, epoch, state["pos"], micro_i))
                transform = None if colour is None else functools.partial(colour, generator=gen)
                x = encoder.preprocess(batch.tiles, device=device, transform=transform)
                y = batch.y.to(device, non_blocking=True)
                with autocast():
                    loss = criterion(net(x).float(), y) / cfg.accumulate
                scaler.scale(loss).backward()
                acc_loss += float(loss.detach())
                n_seen += len(batch.y)
            if micro_i % cfg.accumulate:
                continue
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro_i = 0
            state["step"] += 1
            state["pos"] += 1
            losses.append(acc_loss)
            report("step", acc_loss)
            acc_loss = 0.0
            if state["step"] >= total_steps:
                stop = True
                break
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["pos"] < steps_per_epoch:
                state["bad"] = bad
                save_checkpoint()
        state["train_seconds"] += time.perf_counter() - t0
        state["train_tiles"] += n_seen
        # ---- epoch end: validate, select, checkpoint
        record: dict[str, Any] = {"epoch": epoch, "step": state["step"],
                                  "train_loss": float(np.mean(losses)) if losses else None}  # fmt: skip
        val_probs = None
        if val_loader is not None:
            encoder.train(False)
            head.eval()
            metrics, vy, vp = _evaluate(net, encoder, val_loader, len(tiles.classes), device, autocast, bad, val_tiles, cfg.strict)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            val_probs = (vy, vp, metrics)
        state["history"].append(record)
        val_metrics = val_probs[2] if val_probs is not None else None
        if val_probs is None or _better(val_metrics, state["best"]):
            state["best"] = val_metrics
            state["best_epoch"] = epoch
            best_state = {"model": state_dict_cpu(encoder.model), "head": state_dict_cpu(head)}
            if val_probs is not None:
                best_state["val_y"] = torch.from_numpy(val_probs[0])
                best_state["val_probs"] = torch.from_numpy(val_probs[1])
        state["epoch"] = epoch + 1
        state["pos"] = 0
        state["epoch_losses"] = []
        if cfg.patience is not None and val_probs is not None and epoch - state["best_epoch"] >= cfg.patience:
            logger.info("early stop after epoch %d: no better validation score for %d epochs", epoch, cfg.patience)
            stop = True
        state["bad"] = bad
        save_checkpoint()
        report("epoch", record["train_loss"], val_metrics)

    if best_state is None:  # cannot happen: steps >= 1 runs at least one epoch
        raise RuntimeError(f"{out}: training ran no epoch")
    path = write_outputs(
        out, config=cfg, encoder=encoder, best_state=best_state, state=state, tiles=tiles, split_sizes={
            "train": len(train_idx), "val": len(val_idx), "test_unused": len(test_idx)},
        start=start, fingerprint=fingerprint, freeze_info=freeze_info, balance=balance,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, skipped=tiles.skipped + sorted(bad.items()),
        crop_size=train_ds.size,
        # Without a validation part, predictions still use --eval-size (default: the tile size).
        eval_size=val_ds.size if val_ds is not None else int(cfg.eval_size or tiles.sizes.min()),
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    report("done", None, state["best"])
    return path
