"""The pretraining loop: start point, method, multi-crop data, DDP, resumable checkpoints.

:func:`pretrain_encoder` is the library entry point (the CLI and the benchmarks call it). It
reuses fine-tuning's machinery: the start point (:func:`wsi_convnext.finetune.train.prepare_model`:
random init under the seed, timm tags, earlier ENC_DIRs, the exact patch → overlap conversion),
the warm-up + cosine schedule, the hidden work folder and its atomic checkpoint.

A run is a pure function of its configuration's result fields, the data (tiles and groups,
labels ignored), the starting weights and the probe set: its fingerprint. Resuming works as in
``finetune``: the checkpoint (every ``checkpoint_every`` steps and at epoch ends) holds the
method (student, heads, teacher, centre), optimiser, scheduler, RNG state and position; the
data order and every view are functions of (seed, epoch, position), so on the CPU with one
process a resumed run ends bit-identical to an uninterrupted one.

Distributed: see :mod:`.dist`. The global batch is cut into equal per-rank slices (its size must
be divisible by the world size), gradients are averaged by DDP, the DINO centre and SimCLR's
negatives span the global batch, and logged losses are all-reduced, so the schedule and the
result do not depend on the number of ranks (up to float summation order). Rank 0 writes the
checkpoint and the outputs; the work folder must be on a file system every rank sees.

Collapse: at every evaluation the effective rank of the exported backbone's features on a fixed
sample of tiles is measured (and the teacher entropy recorded every step for DINO). A rank below
:data:`COLLAPSE_RANK`, a teacher entropy below :data:`COLLAPSE_ENTROPY` (one prototype) or, after
the warm-up, above :data:`COLLAPSE_UNIFORM` × log(out_dim) (uniform output) is a collapse: logged
as a warning, recorded in ``metrics.json`` and, with ``on_collapse="stop"``, an error.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_path, path_lock
from ..errors import ConfigError, CorruptTileError, DeviceError, StoreExistsError, WsiConvnextError
from ..finetune.train import StepProgress, default_workers, read_checkpoint, state_dict_cpu, warmup_cosine, work_dir
from .config import PretrainConfig
from .data import MultiCropDataset, ShardSampler, collate_views, load_unlabelled_tiles, tile_keys
from .dist import DistEnv, detect_env, process_group

if TYPE_CHECKING:
    import torch

    from ..data.labelled import LabelledTiles
    from ..encoders import Encoder

__all__ = [
    "COLLAPSE_ENTROPY", "COLLAPSE_RANK", "COLLAPSE_UNIFORM", "CollapseError", "PretrainProgress", "node_processes",
    "pretrain_encoder", "pretrain_on_node",
]  # fmt: skip

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
#: Effective feature rank at or below which the features count as collapsed.
COLLAPSE_RANK = 1.5
#: Teacher entropy (nats) below which DINO's teacher counts as collapsed onto one prototype.
COLLAPSE_ENTROPY = 0.05
#: Fraction of log(out_dim) above which DINO's teacher counts as collapsed to the uniform output.
COLLAPSE_UNIFORM = 0.995
_EVAL_TILES = 128
#: How a rank started by :func:`pretrain_on_node` prints its one-line error.
RANK_ERROR = "wsi-convnext pretrain rank error: "


class CollapseError(WsiConvnextError, RuntimeError):
    """The features collapsed and ``on_collapse`` is ``stop``."""


@dataclass(frozen=True)
class PretrainProgress(StepProgress):
    """A pretrain progress report (``event`` ``eval``: after an evaluation, in ``evaluation``)."""

    evaluation: dict[str, Any] | None = None


ProgressFn = Callable[[PretrainProgress], None]


def pretrain_encoder(config: PretrainConfig, progress: ProgressFn | None = None) -> Path:
    """Pretrain a ConvNeXt tile encoder without labels; returns the output folder (on every rank).

    A finished output folder with the same fingerprint is returned as is.

    Raises:
        InputNotFoundError, CorruptTileError: Bad data (see :mod:`wsi_convnext.data.labelled`).
        ConfigError: Fewer tiles than one batch, tiles smaller than the global crop, a probe set that
            overlaps the data, a global batch the world size does not divide.
        WeightsError, EncoderError: Weights for another model, or a stem that cannot be reached.
        DeviceError: The requested device is absent.
        StoreExistsError: ``out`` or its work folder belongs to another configuration (``overwrite``).
        DistributedError: A rank died or the launcher's environment is wrong.
        CollapseError: Collapse with ``on_collapse="stop"``.
    """
    env = detect_env()
    if env.distributed:  # one writer already: rank 0; a lock would deadlock the other ranks
        return _pretrain(config, progress, env)
    with path_lock(Path(config.out)):
        return _pretrain(config, progress, env)


def node_processes(config: PretrainConfig) -> int:
    """Ranks :func:`pretrain_on_node` starts: one per visible GPU when ``device`` resolves to CUDA
    without naming one GPU (the most that divide the global batch), else 1."""
    import torch

    from ..encoders import resolve_device

    if resolve_device(config.device).type != "cuda" or ":" in config.device:
        return 1
    n = torch.cuda.device_count()
    return max(k for k in range(1, max(n, 1) + 1) if config.batch_size % k == 0)


def pretrain_on_node(config: PretrainConfig, progress: ProgressFn | None = None, *, nproc: int | None = None) -> Path:
    """Pretrain with every GPU of this node: ``nproc`` (default :func:`node_processes`) ranks under
    ``torchrun --standalone``, each running :func:`pretrain_encoder`; one rank runs in this process.

    The ranks are subprocesses (so this works inside a daemonic Dask worker); ``progress`` is only
    reported by a run in this process. Returns the output folder.

    Raises:
        DistributedError: A rank failed (its last output lines are in the message).
        See :func:`pretrain_encoder` for the rest.
    """
    import subprocess
    import sys
    import tempfile

    from ..errors import DistributedError

    n = node_processes(config) if nproc is None else nproc
    if n <= 1 or detect_env().distributed:
        return pretrain_encoder(config, progress)
    with tempfile.TemporaryDirectory(prefix="wsi-pretrain-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(config.to_dict()))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "wsi_convnext.pretrain", str(cfg_path)]  # fmt: skip
        logger.info("pretraining %s on %d ranks: %s", config.out, n, " ".join(cmd))
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        lines = (run.stderr or run.stdout).strip().splitlines()
        said = [ln.split(RANK_ERROR, 1)[1] for ln in lines if RANK_ERROR in ln]
        why = said[0] if said else " | ".join(lines[-4:])
        raise DistributedError(f"{config.out}: pretraining on {n} ranks failed (exit {run.returncode}): {why}")
    return Path(config.out)


def _device(config: PretrainConfig, env: DistEnv) -> torch.device:
    import torch

    from ..encoders import resolve_device

    dev = resolve_device(config.device)
    if env.distributed and dev.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise DeviceError(f"rank {env.rank}: local rank {env.local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node")
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    return dev


def _start_encoder(cfg: PretrainConfig) -> tuple[Encoder, Any]:
    """The starting encoder and its :class:`~wsi_convnext.finetune.train.StartPoint` (via finetune)."""
    from ..finetune.config import FinetuneConfig
    from ..finetune.train import prepare_model

    fcfg = FinetuneConfig(
        data=cfg.data, out=cfg.out, model=cfg.model, stem=cfg.stem, weights=cfg.init_path,
        pretrained=cfg.init == "pretrained", seed=cfg.seed,
    )  # fmt: skip
    encoder, _head, start = prepare_model(fcfg, ("a", "b"))
    return encoder, start


def _check_probe_set(cfg: PretrainConfig, tiles: LabelledTiles) -> LabelledTiles | None:
    if cfg.probe is None:
        return None
    from ..data.labelled import load_labelled_tiles

    probe = load_labelled_tiles(cfg.probe, strict=cfg.strict)
    probe.require_classes(2)
    shared = sorted(tile_keys(probe) & tile_keys(tiles))
    if shared:
        raise ConfigError(
            f"probe set {cfg.probe} overlaps the pretraining data ({len(shared)} shared: {', '.join(shared[:3])}); "
            "a probe must be held out: remove those tiles from one of them"
        )
    return probe


def _pretrain(cfg: PretrainConfig, progress: ProgressFn | None, env: DistEnv) -> Path:
    import torch

    from ..finetune.outputs import read_training_fingerprint
    from .methods import METHODS, build_method
    from .outputs import write_outputs

    out = Path(cfg.out)
    if cfg.batch_size % env.world_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is not divisible by the world size {env.world_size} ({env.launcher}); "
            "the global batch must split evenly over the ranks"
        )
    device = _device(cfg, env)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tiles = load_unlabelled_tiles(cfg.data, strict=cfg.strict)
    if len(tiles) < cfg.batch_size:
        raise ConfigError(f"{tiles.source}: {len(tiles)} readable tile(s) are fewer than one batch (--batch-size {cfg.batch_size}); add tiles or lower --batch-size")
    probe_tiles = _check_probe_set(cfg, tiles)
    dataset = MultiCropDataset(
        tiles, global_size=cfg.global_size, local_size=cfg.local_size, n_local=cfg.n_local if METHODS.lookup(cfg.method).multi_crop else 0,
        hed_sigma=cfg.hed_sigma, brightness_contrast=cfg.brightness_contrast, blur=cfg.blur,
    )  # fmt: skip
    encoder, start = _start_encoder(cfg)
    data_fp = tiles.data_fingerprint()  # labels are one constant here
    probe_fp = "" if probe_tiles is None else probe_tiles.data_fingerprint()
    fingerprint = cfg.fingerprint(data_fp, start.weights_sha256 + probe_fp)
    if out.exists():
        if read_training_fingerprint(out) == fingerprint and not cfg.overwrite:
            logger.info("%s: already pretrained with this configuration; nothing to do", out)
            return out
        if not cfg.overwrite:
            raise StoreExistsError(f"{out}: already exists (another configuration or not a pretrain output); pass --overwrite to replace it")

    method = build_method(cfg.method, encoder.model, encoder.num_features, cfg)
    per_step = cfg.batch_size
    steps_per_epoch = len(tiles) // per_step
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup * total_steps))
    every_ckpt = cfg.checkpoint_every or max(1, total_steps // 20)
    every_eval = cfg.probe_every or max(1, total_steps // 4)
    sampler = ShardSampler(
        tiles.y, tiles.groups, batch=per_step, rank=env.rank, world=env.world_size,
        balance="class_group", seed=cfg.seed, num_samples=steps_per_epoch * per_step,
    )  # fmt: skip

    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, cfg.min_lr_ratio))

    # ---- resume
    work = work_dir(out)
    ckpt_path = work / "checkpoint.pt"
    state: dict[str, Any] = {"epoch": 0, "pos": 0, "step": 0, "total_steps": total_steps, "history": [], "evaluations": [],
                             "collapse": [], "bad": {}, "train_seconds": 0.0, "train_tiles": 0, "best": None}  # fmt: skip
    best_backbone: dict[str, Any] | None = None
    resumed = False
    if ckpt_path.is_file():
        ck = read_checkpoint(ckpt_path, fingerprint, overwrite=cfg.overwrite)
        if ck is not None:
            method.load_state_dict(ck["method"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["torch_rng"])
            state = json.loads(ck["state"])
            best_backbone = ck.get("best_backbone")
            resumed = True
            logger.info("resuming %s at step %d", out, state["step"])
    elif work.exists() and env.is_main:
        shutil.rmtree(work, ignore_errors=True)
    if env.is_main:
        work.mkdir(parents=True, exist_ok=True)

    def save_checkpoint() -> None:
        if not env.is_main:
            return
        payload = {
            "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "method": state_dict_cpu(method),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "state": json.dumps(state), "best_backbone": best_backbone,
        }  # fmt: skip
        with atomic_path(ckpt_path) as tmp:
            torch.save(payload, tmp)

    # ---- device, precision
    from ..encoders import resolve_precision

    method.to(device)
    cuda = device.type == "cuda"
    prec = resolve_precision(device)
    scaler = prec.grad_scaler(device)
    if prec.channels_last:
        method.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    if cuda:
        torch.backends.cudnn.benchmark = True
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)

    def autocast() -> Any:
        return prec.autocast(device)

    if cfg.compile and cuda:
        method.student.compile()

    workers = default_workers(device.type) if cfg.num_workers is None else cfg.num_workers
    from torch.utils.data import DataLoader

    loader_kw: dict[str, Any] = {"num_workers": workers, "collate_fn": collate_views, "pin_memory": prec.pin_memory}
    if workers:
        loader_kw.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=_worker_init)
    loader = DataLoader(dataset, batch_size=per_step // env.world_size, sampler=sampler, drop_last=False, **loader_kw)
    eval_idx = np.sort(np.random.default_rng(cfg.seed).choice(len(tiles), size=min(_EVAL_TILES, len(tiles)), replace=False))
    bad: dict[str, str] = dict(state["bad"])

    def report(event: str, loss: float | None = None, evaluation: dict[str, Any] | None = None) -> None:
        if progress is not None and env.is_main:
            progress(PretrainProgress(event, state["step"], total_steps, loss, optimizer.param_groups[0]["lr"], evaluation))

    def evaluate() -> dict[str, Any]:
        from .probe import embed_tiles, fit_probes

        backbone = method.export_backbone()
        was = backbone.training
        backbone.eval()
        feats, _, _ = embed_tiles(backbone, encoder, tiles.subset(eval_idx), size=cfg.global_size, device=device, autocast=autocast)
        from .methods.base import effective_rank

        rec: dict[str, Any] = {"step": state["step"], "feature_rank": effective_rank(torch.from_numpy(feats))}
        if probe_tiles is not None:
            rec["probe"] = fit_probes(backbone, encoder, probe_tiles, device=device, autocast=autocast, seed=cfg.seed, n_boot=0)
        backbone.train(was)
        recent = [h["teacher_entropy"] for h in state["history"][-5:] if h.get("teacher_entropy") is not None]
        if recent:
            rec["teacher_entropy"] = float(np.mean(recent))
        return rec

    net: Any = method
    with process_group(env, device, cfg.dist_timeout):
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(method, device_ids=[device] if cuda else None, broadcast_buffers=False)
        report("resume" if resumed else "start")
        method.train()
        while state["step"] < total_steps:
            epoch = state["epoch"]
            sampler.set_epoch(epoch, start=state["pos"] * per_step)
            t0 = time.perf_counter()
            n_seen = 0
            for batch in loader:
                for i, reason in batch.bad:
                    ref = str(tiles.refs[i])
                    if cfg.strict:
                        raise CorruptTileError(f"{reason}; remove it or drop --strict to skip it")
                    if ref not in bad:
                        logger.warning("skipped unreadable tile %s", reason)
                    bad[ref] = reason
                gv = batch.global_views
                g, b = gv.shape[:2]
                xg = encoder.preprocess(gv.flatten(0, 1), device=device).unflatten(0, (g, b))
                xl = None
                if batch.local_views.shape[0]:
                    lv = batch.local_views
                    xl = encoder.preprocess(lv.flatten(0, 1), device=device).unflatten(0, lv.shape[:2])
                with autocast():
                    loss, stats = net(xg, xl)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                state["step"] += 1
                state["pos"] += 1
                method.after_step(state["step"], total_steps)
                logged = torch.stack([loss.detach().float()] + [v.float() for v in stats.values()])
                if env.distributed:
                    torch.distributed.all_reduce(logged)
                    logged /= env.world_size
                rec = {"step": state["step"], "epoch": epoch, "loss": float(logged[0]), "lr": optimizer.param_groups[0]["lr"]}
                rec.update({k: float(v) for k, v in zip(stats, logged[1:])})
                state["history"].append(rec)
                n_seen += b
                report("step", rec["loss"])
                _check_collapse(cfg, state, rec.get("teacher_entropy"), None)
                done = state["step"] >= total_steps
                if done or state["step"] % every_eval == 0:
                    ev = evaluate()
                    state["evaluations"].append(ev)
                    _check_collapse(cfg, state, None, ev["feature_rank"])
                    score = (ev.get("probe") or {}).get("linear", {}).get("balanced_accuracy")
                    if probe_tiles is not None and (state["best"] is None or (score or -1) > state["best"]["score"]):
                        state["best"] = {"step": state["step"], "score": score}
                        best_backbone = state_dict_cpu(method.export_backbone())
                    report("eval", rec["loss"], ev)
                if done:
                    break
                if state["step"] % every_ckpt == 0:
                    state["bad"] = bad
                    state["train_seconds"] += time.perf_counter() - t0
                    state["train_tiles"] += n_seen
                    t0, n_seen = time.perf_counter(), 0
                    save_checkpoint()
                    if env.distributed:
                        torch.distributed.barrier()
            state["train_seconds"] += time.perf_counter() - t0
            state["train_tiles"] += n_seen
            if state["step"] < total_steps:
                state["epoch"] = epoch + 1
                state["pos"] = 0
                state["bad"] = bad
                save_checkpoint()
        state["bad"] = bad
        final = best_backbone if best_backbone is not None else state_dict_cpu(method.export_backbone())
        if env.is_main:
            write_outputs(
                out, config=cfg, encoder=encoder, backbone_state=final, state=state, tiles=tiles, start=start,
                fingerprint=fingerprint, data_fp=data_fp, total_steps=total_steps, world_size=env.world_size,
                skipped=tiles.skipped + sorted(bad.items()),
            )  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
        if env.distributed:
            torch.distributed.barrier()
    report("done", None, state["evaluations"][-1] if state["evaluations"] else None)
    return out


def _check_collapse(cfg: PretrainConfig, state: dict[str, Any], entropy: float | None, rank: float | None) -> None:
    what = None
    uniform = COLLAPSE_UNIFORM * math.log(cfg.out_dim)
    if entropy is not None and entropy < COLLAPSE_ENTROPY:
        what = f"teacher entropy {entropy:.3g} nats < {COLLAPSE_ENTROPY} (one prototype takes all)"
    elif entropy is not None and entropy > uniform and state["step"] > max(10, cfg.warmup * state.get("total_steps", 0)):
        what = f"teacher entropy {entropy:.3g} nats > {uniform:.3g} = {COLLAPSE_UNIFORM} × log(out_dim) (uniform: centring dominates)"
    elif rank is not None and rank <= COLLAPSE_RANK:
        what = f"feature effective rank {rank:.2f} <= {COLLAPSE_RANK} (all tiles map to one direction)"
    if what is None:
        return
    if not any(c["what"] == what.split(" ")[0] for c in state["collapse"]):
        logger.warning("collapse at step %d: %s; lower --lr, raise --teacher-temp/--center-momentum or change --method", state["step"], what)
    state["collapse"].append({"step": state["step"], "what": what.split(" ")[0], "detail": what})
    if cfg.on_collapse == "stop":
        raise CollapseError(f"{cfg.out}: collapse at step {state['step']}: {what}; lower --lr or change --method (or --on-collapse warn)")


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)

