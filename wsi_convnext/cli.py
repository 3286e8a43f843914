"""The ``wsi-convnext`` command line: thin Typer wrappers around library functions.

Heavy libraries (torch, dask, zarr, openslide) are imported inside the commands, so
``wsi-convnext --help`` stays instant. Errors of the library are printed as one line
(``--debug`` shows the traceback); exit code 1 means a slide or step failed, 2 a usage error.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    name="wsi-convnext",
    help="Tile whole-slide images, embed tiles with ConvNeXt, and predict slide labels with MIL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False, "verbose": False}


# --- choices from the library's registries --------------------------------------------------
# Typer evaluates the option annotations when the app runs, not when this module is imported,
# so the names below are the registries' at that moment: a registered addition appears in
# --help, and the library (which checks each value once, where it enters) accepts it. The
# registries these read import no torch, so --help stays instant.


def _stem_names() -> tuple[str, ...]:
    from .encoders import FAMILIES

    return tuple(dict.fromkeys(n for family in FAMILIES.values() for n in family.stems))


def _aggregator_names() -> tuple[str, ...]:
    from .mil.config import AGGREGATORS  # the built-ins are declared by name: no torch

    return AGGREGATORS.names()


def _default_aggregator() -> str:
    from dataclasses import fields

    from .mil.config import TrainConfig  # torch-free

    return next(f.default for f in fields(TrainConfig) if f.name == "aggregator")


def _stain_names() -> list[str]:
    from .transforms import stain_names

    return stain_names()


def _backend_names() -> list[str]:
    from .slide import available_backends

    return ["auto", *available_backends()]


def _device_help() -> str:
    from .encoders.device import DEVICE_FORMS

    return f"Compute device: {DEVICE_FORMS}."


def _stain(value: str) -> str:
    """``--stain``, checked here once: the library's transform registry also holds augmentations."""
    if value not in _stain_names():
        raise ValueError(f"unknown stain normalisation {value!r}; choose one of {', '.join(_stain_names())}")
    return value


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


#: OS errors that mean "the system refused this write or read", reported in one line.
_OS_REFUSALS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}
)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into a one-line message and an exit code."""
    from .errors import USAGE_ERRORS, WsiConvnextError, one_line
    from .params import ParameterError

    try:
        yield
    except typer.Exit:
        raise
    except WsiConvnextError as exc:
        if _state["debug"]:
            raise
        _err(exc.as_flag() if isinstance(exc, ParameterError) else one_line(exc))
        raise typer.Exit(2 if isinstance(exc, USAGE_ERRORS) else 1)
    except OSError as exc:
        # A refusal no check could foresee (e.g. a folder made read-only mid-run): still one line.
        if _state["debug"] or exc.errno not in _OS_REFUSALS or not exc.filename:
            raise
        _err(f"{exc.filename}: {exc.strerror}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130)


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logging.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress messages.")] = False,
) -> None:
    """wsi-convnext: slide → tiles → ConvNeXt embeddings → slide prediction."""
    _state["debug"] = debug
    _state["verbose"] = verbose
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@contextmanager
def _progress_bar(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr, handed out as an ``update(done, total, label=None)`` callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task(description, total=total)

        def update(done: int, total: int | None = None, label: str | None = None) -> None:
            bar.update(task, completed=done, total=total, description=label or description)

        yield update


def _print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    Console().print(table)


# --- tile / info --------------------------------------------------------------------------


@app.command()
def tile(
    inputs: Annotated[list[Path], typer.Argument(help="Slide files, folders (searched recursively) or CSV manifests (path[,slide_id][,slide_mpp]).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for <slide_id>.zarr stores.")] = Path("tiles"),
    mpp: Annotated[float, typer.Option(help="Target resolution, µm/px.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 224,
    overlap: Annotated[int, typer.Option(help="Overlap between tiles, in output pixels.")] = 0,
    min_tissue: Annotated[Optional[float], typer.Option(help="Minimum tissue fraction to keep a tile (default: 0.25).")] = None,
    tissue: Annotated[Optional[list[str]], typer.Option("--tissue", metavar="KEY=VALUE", help="Tissue-detection parameter, repeatable, e.g. --tissue min_object_um2=1000; any TissueParams field, as in the run TOML's tile.tissue table (see wsi_convnext.tiling.tissue.TissueParams).")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality.")] = 90,
    lossless: Annotated[bool, typer.Option(help="Store tiles as lossless PNG instead of JPEG.")] = False,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px for slides without (or with wrong) metadata.")] = None,
    allow_upsample: Annotated[bool, typer.Option(help="Allow a target finer than the scan.")] = False,
    backend: Annotated[str, typer.Option(help=f"Slide reader: {', '.join(_backend_names())}.")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Parallel readers per slide (processes for large slides; default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Re-tile slides whose store was made with other parameters.")] = False,
    fingerprint: Annotated[str, typer.Option(help="Slide change detection: quick (size + first/last MiB) or full (hash every byte).")] = "quick",
) -> None:
    """Find tissue and cut tiles at an exact µm/px into one zarr store per slide."""
    with _errors():
        from .errors import ConfigError
        from .inputs import discover_slides
        from .outputs.manifest import RunManifest, recorded_slide_ids, tile_manifest_row
        from .params import ParameterError
        from .slide.mpp import check_slide_mpp
        from .tiling.tiler import TileParams, tile_slides
        from .tiling.tissue import TissueParams

        try:
            tissue_params = TissueParams.from_assignments(tissue) if tissue else None
        except ConfigError as exc:
            raise ConfigError(f"--tissue: {exc}") from exc
        params = TileParams.from_kwargs(
            mpp=mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue, quality=quality,
            encoding="png" if lossless else "jpeg", allow_upsample=allow_upsample, backend=backend, workers=workers,
            tissue=tissue_params, fingerprint=fingerprint,
        )  # fmt: skip
        problem = None if slide_mpp is None else check_slide_mpp(slide_mpp)
        if problem:  # refused before any slide is opened, by the rule open_slide applies
            raise ParameterError("slide_mpp", problem, slide_mpp)
        slides = discover_slides(inputs, slide_mpp=slide_mpp, recorded=recorded_slide_ids(out))
        from ._io import ensure_dir

        ensure_dir(out)
        with RunManifest(out / "manifest.csv") as manifest, _progress_bar("tiling", total=len(slides)) as update:
            done = {"n": 0}

            def on_result(r: Any) -> None:
                done["n"] += 1
                manifest.record(tile_manifest_row(r))
                update(done["n"], len(slides))
                if r.status == "failed":
                    _err(r.error)

            results = tile_slides(slides, out, params, overwrite=overwrite, on_result=on_result)
        _print_table(
            f"tiles → {out}", ["slide", "status", "tiles", "seconds", "error"],
            [[r.slide_id, r.status, r.n_tiles, f"{r.seconds:.1f}", r.error] for r in results],
        )  # fmt: skip
        failed = sum(r.status == "failed" for r in results)
        typer.echo(f"{len(results) - failed} of {len(results)} slides tiled; manifest: {out / 'manifest.csv'}")
        if failed:
            raise typer.Exit(1)


@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="A slide file.")],
    backend: Annotated[str, typer.Option(help=f"Slide reader: {', '.join(_backend_names())}.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show levels, mpp, vendor, objective and associated images of a slide."""
    with _errors():
        import json

        from .slide import slide_info

        data = slide_info(slide, backend=backend)
        if as_json:
            typer.echo(json.dumps(data, indent=2, default=str))
            return
        for key, value in data.items():
            if key == "levels":
                continue
            typer.echo(f"{key:>18}: {value}")
        _print_table(
            "levels", ["level", "width", "height", "downsample", "tile"],
            [[lv["level"], lv["width"], lv["height"], f"{lv['downsample']:.4g}", f"{lv.get('tile_width')}×{lv.get('tile_height')}"] for lv in data["levels"]],
        )  # fmt: skip


# --- embed / export -----------------------------------------------------------------------


def _model_help() -> str:
    """Encoder names for help texts: the families and the registered presets (no torch import)."""
    from .encoders import PRESETS

    return (
        f"Encoder: a timm ConvNeXt (stems), any other timm name or hf-hub:ORG/NAME, or a preset "
        f"({', '.join(PRESETS)}); see docs/encoders.md."
    )


def _device_list(devices: str | None) -> list[str] | None:
    return None if devices is None else [d.strip() for d in devices.split(",") if d.strip()]


@app.command()
def embed(
    stores: Annotated[list[Path], typer.Argument(help="Stores (<slide_id>.zarr) or folders of stores.")],
    model: Annotated[str, typer.Option(help=_model_help())] = "convnext_tiny",
    stem: Annotated[Optional[str], typer.Option(help=f"Encoder stem: {', '.join(_stem_names())} (default: the stem recorded with --weights, else the family's default).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Weights file (safetensors or state dict), or a finetune output folder.")] = None,
    pretrained: Annotated[bool, typer.Option(help="timm pretrained weights via the Hugging Face cache (downloaded when online unless HF_HUB_OFFLINE=1).")] = False,
    resize: Annotated[Optional[str], typer.Option(help="none (default: tiles keep their µm/px) or input_size (resample to the model's input size).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help=_device_help())] = "auto",
    devices: Annotated[
        Optional[str], typer.Option(help="Several devices, e.g. cuda:0,cuda:1: the stores are split, one process each.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Stored embedding dtype: float16 or float32.")] = "float16",
    num_workers: Annotated[
        Optional[int], typer.Option(help="JPEG decoding threads (default: measured on CPU, cores - 1 on GPU).")
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (CUDA).")] = False,
    stain: Annotated[str, typer.Option(parser=_stain, help=f"Stain normalisation: {', '.join(_stain_names())} (features/<key>-<stain key>).")] = "none",
    stain_reference: Annotated[Optional[Path], typer.Option(help="Reference H&E tile/image for --stain (default: built-in).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Recompute embeddings that already exist.")] = False,
) -> None:
    """Stream tiles through an encoder and store one embedding per tile."""
    with _errors():
        from .embed import embed_stores
        from .transforms import build_transform

        transform = build_transform(stain, reference=stain_reference)

        with _progress_bar("embedding") as update:

            def on_result(r: Any) -> None:
                if r.status == "failed":
                    _err(f"{r.store_path}: {r.error}")

            results = embed_stores(
                stores, model=model, stem=stem, weights=weights, pretrained=pretrained, resize=resize, batch_size=batch_size,
                device=device, devices=_device_list(devices), dtype=dtype, overwrite=overwrite,
                num_workers=num_workers, compile=compile, transform=transform, progress=update, on_result=on_result,
            )  # fmt: skip
        _print_table(
            "embeddings", ["slide", "status", "tiles", "seconds", "key / error"],
            [[r.slide_id, r.status, r.n_tiles, f"{r.seconds:.1f}", r.error or r.key] for r in results],
        )  # fmt: skip
        if any(r.status == "failed" for r in results):
            raise typer.Exit(1)


def _export_formats_help() -> str:
    from .outputs.exports import FORMATS  # stdlib-only registry: --help stays instant

    return "Output format: " + "; ".join(f"{f.name} = {f.description}" for f in FORMATS.values()) + "."


@app.command()
def export(
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("features"),
    fmt: Annotated[str, typer.Option("--format", help=_export_formats_help())] = "h5",
    features: Annotated[Optional[str], typer.Option(help="Feature key (needed when a store holds several).")] = None,
    cohort: Annotated[bool, typer.Option("--cohort", help="One file for all slides (OUT/cohort.h5ad; anndata).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Write each slide's embeddings, coords and scores for other tools (CLAM/TRIDENT, QuPath, scverse)."""
    with _errors():
        from .outputs.export import export_features

        failed: list[str] = []
        paths = export_features(
            stores, out, fmt=fmt, feature_key=features, cohort=cohort, overwrite=overwrite,
            on_failure=lambda path, error: failed.append(error),
        )  # fmt: skip
        typer.echo(f"wrote {len(paths)} file(s) to {out}" + (f"; {len(failed)} store(s) failed" if failed else ""))
        for msg in failed:
            _err(msg)
        if failed:
            raise typer.Exit(1)


@app.command()
def verify(
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
) -> None:
    """Re-hash every chunk of each store against the checksums recorded when it was written."""
    with _errors():
        from .store import verify_stores

        def on_result(r: Any) -> None:
            typer.echo(f"{r.status:>12}  {r.path}  ({r.files} chunk files)")
            for line in r.problems[:20]:
                (_err if r.status in ("damaged", "invalid") else typer.echo)(line)

        results = verify_stores(stores, on_result=on_result)
        bad = sum(r.status in ("damaged", "invalid") for r in results)
        typer.echo(f"{len(results) - bad} of {len(results)} stores verified without damage")
        if bad:
            raise typer.Exit(1)

# --- encoder training: finetune / predict-tiles ----------------------------------------------


@app.command()
def finetune(
    data: Annotated[list[Path], typer.Argument(help="Image folder (one sub-folder per class), CSV path,label[,group][,split], or tile stores (with --labels).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (ENC_DIR): encoder.safetensors, head, config, metrics, curves.")],
    labels: Annotated[Optional[Path], typer.Option(help="For stores: CSV slide_id,label[,patient_id][,split]; every tile takes its slide's label.")] = None,
    model: Annotated[str, typer.Option(help=_model_help())] = "convnext_atto",
    stem: Annotated[Optional[str], typer.Option(help=f"Encoder stem: {', '.join(_stem_names())} (default: the stem recorded with --weights, else the family's default).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Start from a weights file or an earlier finetune output folder.")] = None,
    pretrained: Annotated[bool, typer.Option(help="Start from timm's pretrained weights (local Hugging Face cache).")] = False,
    stem_init: Annotated[Optional[str], typer.Option(help="checkpoint (convert a patch stem exactly) or random.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: 10 unless --steps).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (instead of --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 32,
    accumulate: Annotated[int, typer.Option(help="Gradient accumulation: forward passes per optimiser step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine with warm-up).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (never on norms and biases).")] = 0.05,
    warmup: Annotated[float, typer.Option(help="Warm-up fraction of all steps.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.1,
    freeze: Annotated[str, typer.Option(help="none, stem, or stages:K (freeze the first K stages).")] = "none",
    layer_decay: Annotated[float, typer.Option(help="Layer-wise learning-rate decay (1 = off).")] = 1.0,
    crop_size: Annotated[Optional[int], typer.Option(help="Training random-crop side in px, at the tiles' µm/px (default: tile size).")] = None,
    eval_size: Annotated[Optional[int], typer.Option(help="Validation centre-crop side in px (default: tile size).")] = None,
    on_size: Annotated[str, typer.Option(help="Mixed tile sizes: crop (to the training size) or refuse.")] = "crop",
    augment: Annotated[str, typer.Option(help="histology (flips, 90° rotations, HED/colour jitter), geometric or none.")] = "histology",
    balance: Annotated[str, typer.Option(help="auto, none, class or class_group (stores: auto = class_group).")] = "auto",
    val_frac: Annotated[float, typer.Option(help="Fraction of groups for validation (without a split column).")] = 0.2,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping: epochs without a better validation score.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help=_device_help())] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (CUDA).")] = False,
    num_workers: Annotated[Optional[int], typer.Option(help="Decoding worker processes.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (1 is often fastest on a busy machine).")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an output folder of another configuration.")] = False,
) -> None:
    """Fine-tune (or train from scratch) a tile encoder on labelled tiles; resumable."""
    with _errors():
        from .finetune import FinetuneConfig, finetune_encoder

        cfg = FinetuneConfig(
            data=tuple(str(d) for d in data), out=str(out), labels=str(labels) if labels else None, model=model,
            stem=stem, weights=str(weights) if weights else None, pretrained=pretrained, stem_init=stem_init,
            epochs=epochs, steps=steps, batch_size=batch_size, accumulate=accumulate, lr=lr, weight_decay=weight_decay,
            warmup=warmup, label_smoothing=label_smoothing, freeze=freeze, layer_decay=layer_decay, crop_size=crop_size,
            eval_size=eval_size, on_size=on_size, augment=augment, balance=balance, val_frac=val_frac, patience=patience,
            seed=seed, device=device, compile=compile, num_workers=num_workers, threads=threads, strict=strict,
            overwrite=overwrite,
        )  # fmt: skip
        with _progress_bar("fine-tuning") as update:

            def on_progress(p: Any) -> None:
                v = p.val or {}
                val = f" val bal.acc {v['balanced_accuracy']:.3f} auc {v['auc']:.3f}" if v.get("balanced_accuracy") is not None else ""
                loss = f" loss {p.loss:.3f}" if p.loss is not None else ""
                update(p.step, p.total_steps, f"epoch {p.epoch + (p.event != 'epoch')}/{p.total_epochs}{loss}{val}")

            failed: list[str] = []
            path = finetune_encoder(cfg, progress=on_progress, on_failure=lambda p, error: failed.append(error))
        typer.echo((path / "metrics.md").read_text())
        typer.echo(f"encoder: {path / 'encoder.safetensors'}  (embed --weights it with --model {model}; it records its stem)")
        for msg in failed:
            _err(msg)
        if failed:
            raise typer.Exit(1)


@app.command("predict-tiles")
def predict_tiles(
    enc_dir: Annotated[Path, typer.Argument(help="Output folder of `finetune`.")],
    data: Annotated[list[Path], typer.Argument(help="Image folder, CSV path[,label][,group], or tile stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Per-tile predictions CSV.")] = Path("tiles.csv"),
    labels: Annotated[Optional[Path], typer.Option(help="For stores: CSV slide_id,label (adds metrics).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help=_device_help())] = "auto",
    num_workers: Annotated[Optional[int], typer.Option(help="Decoding worker processes.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
) -> None:
    """Per-tile class probabilities (and metrics when labels are known); for stores also scores/<name> for heatmaps."""
    with _errors():
        from .finetune import predict_tiles as run_predict_tiles
        from .labels.metrics import format_metrics_table

        with _progress_bar("predicting tiles") as update:
            res = run_predict_tiles(
                enc_dir, data, labels=labels, out_csv=out, batch_size=batch_size, device=device,
                num_workers=num_workers, strict=strict, progress=lambda d, t: update(d, t),
            )  # fmt: skip
        if res.metrics is not None:
            typer.echo(format_metrics_table(res.metrics, title=f"{len(res.tiles)} tiles"))
        if res.skipped:
            _err(f"skipped {len(res.skipped)} unreadable tile(s), e.g. {res.skipped[0][0]}")
        typer.echo(f"predictions: {out}" + (f"; scores/{res.score_name} written into the stores" if res.score_name else ""))


# --- self-supervised pretraining / probe -------------------------------------------------------


def _method_names() -> tuple[str, ...]:
    from .pretrain.methods import METHODS  # the built-ins are declared by name: no torch

    return METHODS.names()


@app.command()
def pretrain(
    data: Annotated[list[Path], typer.Argument(help="Tile stores or folders of them, an image folder or a CSV (labels ignored).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (ENC_DIR): encoder.safetensors, config, metrics, curves.")],
    model: Annotated[str, typer.Option(help="timm ConvNeXt name (with a tag for --init pretrained, e.g. convnext_tiny.dinov3_lvd1689m).")] = "convnext_atto",
    stem: Annotated[Optional[str], typer.Option(help=f"Encoder stem: {', '.join(_stem_names())} (default: the stem recorded with --init weights, else the family's default).")] = None,
    init: Annotated[str, typer.Option(help="random, pretrained (the model's timm tag) or a weights file / finetune or pretrain ENC_DIR.")] = "random",
    method: Annotated[str, typer.Option(help=f"Self-supervised method: {', '.join(_method_names())}.")] = "dino",
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (default 200 unless --epochs).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the tiles (instead of --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch: tiles per step over all ranks.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine with warm-up).")] = 5e-4,
    global_size: Annotated[int, typer.Option(help="Global crop side in px, at the tiles' µm/px.")] = 96,
    local_size: Annotated[int, typer.Option(help="Local crop side in px.")] = 48,
    n_local: Annotated[int, typer.Option(help="Local crops per tile (DINO multi-crop).")] = 4,
    hed_sigma: Annotated[float, typer.Option(help="HED stain jitter strength (0 = off).")] = 0.05,
    probe: Annotated[Optional[Path], typer.Option(help="Labelled tiles (never part of DATA) to probe periodically; the best probe step is kept.")] = None,
    probe_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (default: 4 times per run).")] = None,
    on_collapse: Annotated[str, typer.Option(help="warn or stop when the features collapse.")] = "warn",
    dist_timeout: Annotated[float, typer.Option(help="Under torchrun/srun: seconds a rank waits for the others before failing.")] = 300.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help=_device_help() + " Under torchrun/srun: each rank's local GPU.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the backbone (CUDA).")] = False,
    num_workers: Annotated[Optional[int], typer.Option(help="Decoding/augmentation worker processes per rank.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads per process.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an output folder (or checkpoint) of another configuration.")] = False,
) -> None:
    """Self-supervised pretraining of a ConvNeXt tile encoder on unlabelled tiles; resumable, torchrun/srun-ready."""
    with _errors():
        from .pretrain import PretrainConfig, pretrain_encoder

        cfg = PretrainConfig(
            data=tuple(str(d) for d in data), out=str(out), model=model, stem=stem, init=init, method=method, steps=steps,
            epochs=epochs, batch_size=batch_size, lr=lr, global_size=global_size, local_size=local_size, n_local=n_local,
            hed_sigma=hed_sigma, probe=str(probe) if probe else None, probe_every=probe_every, on_collapse=on_collapse,
            dist_timeout=dist_timeout, seed=seed, device=device, compile=compile, num_workers=num_workers, threads=threads,
            strict=strict, overwrite=overwrite,
        )  # fmt: skip
        with _progress_bar("pretraining") as update:

            def on_progress(p: Any) -> None:
                update(p.step, p.total_steps, f"{method} step {p.step}/{p.total_steps}" + (f" loss {p.loss:.3f}" if p.loss is not None else ""))

            path = pretrain_encoder(cfg, progress=on_progress)
        if path.is_dir():
            typer.echo((path / "metrics.md").read_text())
            typer.echo(f"encoder: {path / 'encoder.safetensors'}  (embed --weights {path}; model and stem are picked up)")


@app.command("probe")
def probe_cmd(
    encoder: Annotated[str, typer.Argument(help="ENC_DIR or weights file, 'random' or 'pretrained' (with --model).")],
    data: Annotated[list[Path], typer.Argument(help="Labelled tiles: image folder, CSV path,label[,group][,split], or stores with --labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for probe.json and probe.md.")] = Path("probe"),
    test: Annotated[Optional[Path], typer.Option(help="Held-out labelled tiles (default: a group-disjoint split of DATA).")] = None,
    model: Annotated[Optional[str], typer.Option(help="timm model (default: from the weights' metadata).")] = None,
    stem: Annotated[Optional[str], typer.Option(help=f"Encoder stem: {', '.join(_stem_names())} (default: from the weights' metadata).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Add the first-order pixel-statistics baseline (the data set's shortcut ceiling).")] = False,
    test_frac: Annotated[float, typer.Option(help="Share of groups held out when --test is absent.")] = 0.3,
    n_boot: Annotated[int, typer.Option(help="Group-bootstrap resamples for the 95% CIs.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help=_device_help())] = "auto",
    num_workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the split, the probe and the bootstrap.")] = 0,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
) -> None:
    """Linear and kNN probes of an encoder on labelled tiles: balanced accuracy and macro AUC with group-bootstrap CIs."""
    with _errors():
        from .pretrain.probe import run_probe

        res = run_probe(
            encoder, [str(d) for d in data], out=out, test=str(test) if test else None, model=model, stem=stem,
            baseline=baseline, device=device, seed=seed, n_boot=n_boot, test_frac=test_frac, batch_size=batch_size,
            num_workers=num_workers, strict=strict,
        )  # fmt: skip
        typer.echo(res.table)
        typer.echo(f"probe: {res.out / 'probe.json'}")


# --- MIL: train / evaluate / predict / heatmap ----------------------------------------------


def _mil_progress(update: Callable[..., None]) -> Callable[[str, int, int], None]:
    return lambda what, done, total: update(done, total, what)


@app.command()
def train(
    stores: Annotated[list[Path], typer.Argument(help="Stores with embeddings, or folders of stores.")],
    labels: Annotated[Path, typer.Option(help="CSV: slide_id,label[,patient_id][,split|fold].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")] = Path("model"),
    aggregator: Annotated[Optional[str], typer.Option(help=f"MIL aggregator: {', '.join(_aggregator_names())} (default: {_default_aggregator()}).")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds (ignored with a split/fold column).")] = 5,
    features: Annotated[Optional[str], typer.Option(help="Feature key (needed when stores hold several).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs per fold.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model folder.")] = False,
) -> None:
    """Cross-validate a MIL aggregator on labelled slides and save the final model."""
    with _errors():
        from .mil.api import train as train_mil
        from .mil.training import TrainConfig
        from .store import find_stores

        config = TrainConfig.create(aggregator=aggregator, folds=folds, epochs=epochs, lr=lr, seed=seed)
        failed: list[str] = []
        with _progress_bar("training") as update:
            report = train_mil(
                find_stores(stores), labels, out, config, feature_key=features, overwrite=overwrite,
                progress=_mil_progress(update), on_failure=lambda path, error: failed.append(error),
            )  # fmt: skip
        typer.echo(report.table)
        for role, path in report.files.items():
            typer.echo(f"{role:>16}: {path}")
        for msg in failed:
            _err(msg)
        if failed:
            raise typer.Exit(1)


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `train`.")],
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
    labels: Annotated[Path, typer.Option(help="CSV: slide_id,label.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for metrics, ROC and predictions.")] = None,
) -> None:
    """Score a trained model on a labelled set."""
    with _errors():
        from .mil.api import evaluate as evaluate_mil
        from .labels.metrics import format_metrics_table
        from .store import find_stores

        failed: list[str] = []
        metrics = evaluate_mil(model_dir, find_stores(stores), labels, out, on_failure=lambda path, error: failed.append(error))
        typer.echo(format_metrics_table(metrics, title=f"evaluation of {model_dir}"))
        for msg in failed:
            _err(msg)
        if failed:
            raise typer.Exit(1)


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `train`.")],
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV.")] = Path("predictions.csv"),
    heatmaps: Annotated[Optional[Path], typer.Option(help="Also draw heatmaps and top-k montages into this folder.")] = None,
) -> None:
    """Predict slide labels; per-tile attention scores are written into each store."""
    with _errors():
        from .mil.api import predict as predict_mil
        from .store import find_stores

        paths = find_stores(stores)
        with _progress_bar("predicting", total=len(paths)) as update:
            preds = predict_mil(
                model_dir, paths, out_csv=out, write_scores=True, progress=_mil_progress(update), on_error="record"
            )
        _print_table(
            "predictions", ["slide", "predicted", "probabilities", "tiles", "error"],
            [[p.slide_id, p.predicted, " ".join(f"{c}={v:.3f}" for c, v in p.probabilities.items()), p.n_tiles, p.error] for p in preds],
        )  # fmt: skip
        for p in preds:
            if p.status == "failed":
                _err(p.error or "")
        typer.echo(f"predictions: {out}")
        not_drawn: list[str] = []
        if heatmaps is not None:
            from .outputs.heatmap import heatmaps as draw

            good = [path for path, p in zip(paths, preds) if p.status != "failed"]
            drawn = draw(model_dir, good, heatmaps, on_failure=lambda path, error: not_drawn.append(error)) if good else {}
            typer.echo(f"heatmaps: {len(drawn)} slide(s) in {heatmaps}")
            for msg in not_drawn:
                _err(msg)
        if any(p.status == "failed" for p in preds) or not_drawn:
            raise typer.Exit(1)


@app.command()
def heatmap(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `train`.")],
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures.")] = Path("heatmaps"),
    top_k: Annotated[int, typer.Option(help="Tiles in the top-k montage.")] = 16,
) -> None:
    """Draw attention heatmaps (thumbnail + colour bar) and top-k tile montages (MODEL_DIR: train or finetune output)."""
    with _errors():
        from .outputs.heatmap import heatmaps as draw

        failed: list[str] = []
        drawn = draw(model_dir, stores, out, top_k=top_k, on_failure=lambda path, error: failed.append(error))
        for sid, paths in drawn.items():
            typer.echo(f"{sid}: {paths.heatmap}  {paths.montage}")
        for msg in failed:
            _err(msg)
        if failed:
            raise typer.Exit(1)


@app.command()
def view(
    path: Annotated[Path, typer.Argument(help="A run or tile output folder, one store, or a slide.")],
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1 exposes the slides to the network.")] = "127.0.0.1",
) -> None:
    """Serve a slide viewer with the pipeline's overlays (tissue, tiles, scores) and print its URL; Ctrl-C stops it."""
    with _errors():
        from .outputs.viewer import ViewerServer

        ViewerServer(path, host=host, port=port).serve_forever(lambda url: typer.echo(f"viewer: {url}  (Ctrl-C stops it)"))


# --- demo / run -----------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("wsi-convnext-demo"),
    slides: Annotated[int, typer.Option(help="Slides in the generated cohort.")] = 32,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Also fine-tune the encoder on weak labels of half the slides and compare MIL on random against fine-tuned features on the other half (a few more minutes on 2 cores; at this budget the sign of the difference is noise: the measured comparison is benchmarks/mil.py --finetune, BENCHMARKS.md).")] = False,
    finetune_steps: Annotated[int, typer.Option(help="Optimiser steps of the --finetune step.")] = 60,
) -> None:
    """Run the whole pipeline on a generated cohort: tile → embed → train (CV) → metrics, ROC, heatmaps (--finetune: also fine-tuned vs random features)."""
    with _errors():
        from .demo import run_demo

        with _progress_bar("demo") as update:
            result = run_demo(
                out, n_slides=slides, finetune=finetune, finetune_steps=finetune_steps,
                progress=lambda stage, done, total: update(done, total, stage),
            )  # fmt: skip
        typer.echo(result.metrics_table)
        if result.finetune_table:
            typer.echo(result.finetune_table)
        else:
            typer.echo("encoder training: random against fine-tuned features is measured over seeds in BENCHMARKS.md "
                       "(benchmarks/mil.py --finetune); `demo --finetune` runs one small, noisy comparison")
        typer.echo(f"slides:  {result.slides}")
        typer.echo(f"stores:  {result.tiles}  (one <slide_id>.zarr per slide; manifest.csv)")
        typer.echo(f"model:   {result.model}")
        for role, paths in result.pictures.items():
            for p in paths:
                typer.echo(f"{role:>15}: {p}")


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Run config (TOML); see pipelines/.")] = None,
    slides: Annotated[Optional[list[Path]], typer.Option(help="Slide folder(s), files or CSV manifest(s).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder.")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="Target µm/px of the tiles.")] = None,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px for slides without metadata.")] = None,
    model: Annotated[Optional[str], typer.Option(help=_model_help())] = None,
    stem: Annotated[Optional[str], typer.Option(help=f"Encoder stem: {', '.join(_stem_names())} (default: the family's).")] = None,
    predict: Annotated[Optional[Path], typer.Option("--predict", help="Model folder: also predict each slide.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Existing Dask scheduler, tcp://host:port.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Local Dask worker processes (default: one per core).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Process shard I/N of the cohort (0-based), e.g. for job arrays.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Redo finished slides.")] = None,
) -> None:
    """Run tile → embed (→ predict) over a cohort on Dask; resumable; writes manifest.csv and report.html."""
    with _errors():
        import os

        if not (_state["debug"] or _state["verbose"]):
            # distributed logs every worker start/stop at INFO; read before it is imported.
            os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        from .cohort import run_cohort
        from .config import load_config

        cfg = load_config(config, {
            "slides": [str(s) for s in slides] if slides else None, "out": str(out) if out else None,
            "tile.mpp": mpp, "slide_mpp": slide_mpp, "embed.model": model, "embed.stem": stem,
            "predict.model_dir": str(predict) if predict else None, "scheduler": scheduler, "shard": shard,
            "overwrite": overwrite, "local.n_workers": workers,
        })  # fmt: skip
        with _progress_bar("slides") as update:

            def on_progress(p: Any) -> None:
                if p.event == "start" and p.dashboard:
                    typer.echo(f"Dask dashboard: {p.dashboard}", err=True)
                label = f"slides (failed {p.failed}, running {p.running})"
                update(p.finished, p.total, label)

            summary = run_cohort(cfg, progress=on_progress)
        typer.echo(
            f"{summary.total} slides: {summary.ran} done, {summary.skipped} skipped, {summary.failed} failed; "
            f"manifest: {summary.manifest}; report: {summary.report}"
        )
        for row in summary.failures[:20]:
            _err(f"{row.slide_id} ({row.stage}): {row.error_type}: {row.error}")
        raise typer.Exit(summary.exit_code)
