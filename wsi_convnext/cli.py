"""The ``wsi-convnext`` command line: thin Typer wrappers around library functions.

Heavy libraries (torch, dask, zarr, openslide) are imported inside the commands, so
``wsi-convnext --help`` stays instant. Errors of the library are printed as one line
(``--debug`` shows the traceback); exit code 1 means a slide or step failed, 2 a usage error.
"""

from __future__ import annotations

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

# Errors that mean "you called it wrong" (exit 2) rather than "a slide failed" (exit 1).
_USAGE_ERRORS = ("ConfigError", "InputNotFoundError", "DeviceError", "EncoderError", "WeightsError", "LabelsError")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into a one-line message and an exit code."""
    from .errors import WsiConvnextError, one_line

    try:
        yield
    except typer.Exit:
        raise
    except WsiConvnextError as exc:
        if _state["debug"]:
            raise
        _err(one_line(exc))
        raise typer.Exit(2 if type(exc).__name__ in _USAGE_ERRORS or isinstance(exc, FileNotFoundError) else 1)
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
    inputs: Annotated[list[Path], typer.Argument(help="Slide files, folders (searched recursively) or CSV manifests (path[,slide_id][,mpp]).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for <slide_id>.zarr stores.")] = Path("tiles"),
    mpp: Annotated[float, typer.Option(help="Target resolution, µm/px.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 224,
    overlap: Annotated[int, typer.Option(help="Overlap between tiles, in output pixels.")] = 0,
    min_tissue: Annotated[Optional[float], typer.Option(help="Minimum tissue fraction to keep a tile [default: 0.25].")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality.")] = 90,
    lossless: Annotated[bool, typer.Option(help="Store tiles as lossless PNG instead of JPEG.")] = False,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px for slides without (or with wrong) metadata.")] = None,
    allow_upsample: Annotated[bool, typer.Option(help="Allow a target finer than the scan.")] = False,
    backend: Annotated[str, typer.Option(help="Slide reader: auto, openslide or tiffslide.")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Parallel readers per slide (processes for large slides) [default: all cores].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Re-tile slides whose store was made with other parameters.")] = False,
) -> None:
    """Find tissue and cut tiles at an exact µm/px into one zarr store per slide."""
    with _errors():
        from .inputs import discover_slides
        from .outputs.manifest import RunManifest
        from .tiler import TileParams, tile_manifest_row, tile_slides

        params = TileParams.from_kwargs(
            mpp=mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue, quality=quality,
            encoding="png" if lossless else "jpeg", allow_upsample=allow_upsample, backend=backend, workers=workers,
        )  # fmt: skip
        params.validate()
        slides = discover_slides(inputs, slide_mpp=slide_mpp)
        out.mkdir(parents=True, exist_ok=True)
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
    backend: Annotated[str, typer.Option(help="Slide reader: auto, openslide or tiffslide.")] = "auto",
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


@app.command()
def embed(
    stores: Annotated[list[Path], typer.Argument(help="Stores (<slide_id>.zarr) or folders of stores.")],
    model: Annotated[str, typer.Option(help="timm ConvNeXt name.")] = "convnext_tiny",
    stem: Annotated[str, typer.Option(help="Stem: patch (stock 4×4/4), overlap, overlap_tiered, overlap_act.")] = "patch",
    weights: Annotated[Optional[Path], typer.Option(help="Weights file (safetensors or state dict).")] = None,
    pretrained: Annotated[bool, typer.Option(help="timm pretrained weights from the local Hugging Face cache.")] = False,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Stored embedding dtype: float16 or float32.")] = "float16",
    num_workers: Annotated[Optional[int], typer.Option(help="JPEG decoding threads.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (CUDA).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Recompute embeddings that already exist.")] = False,
) -> None:
    """Stream tiles through a ConvNeXt and store one embedding per tile."""
    with _errors():
        from .embed import embed_stores

        with _progress_bar("embedding") as update:

            def on_result(r: Any) -> None:
                if r.status == "failed":
                    _err(f"{r.store_path}: {r.error}")

            results = embed_stores(
                stores, model=model, stem=stem, weights=weights, pretrained=pretrained, batch_size=batch_size,
                device=device, dtype=dtype, overwrite=overwrite, num_workers=num_workers, compile=compile,
                progress=update, on_result=on_result,
            )  # fmt: skip
        _print_table(
            "embeddings", ["slide", "status", "tiles", "seconds", "key / error"],
            [[r.slide_id, r.status, r.n_tiles, f"{r.seconds:.1f}", r.error or r.key] for r in results],
        )  # fmt: skip
        if any(r.status == "failed" for r in results):
            raise typer.Exit(1)


@app.command()
def export(
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("features"),
    fmt: Annotated[str, typer.Option("--format", help="Output format: h5 (CLAM/TRIDENT layout).")] = "h5",
    features: Annotated[Optional[str], typer.Option(help="Feature key (needed when a store holds several).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Write each slide's embeddings and coords for other tools (HDF5 with features and coords)."""
    with _errors():
        from .outputs.export import export_features

        paths = export_features(stores, out, fmt=fmt, feature_key=features, overwrite=overwrite)
        typer.echo(f"wrote {len(paths)} file(s) to {out}")


# --- MIL: train / evaluate / predict / heatmap ----------------------------------------------


def _mil_progress(update: Callable[..., None]) -> Callable[[str, int, int], None]:
    return lambda what, done, total: update(done, total, what)


@app.command()
def train(
    stores: Annotated[list[Path], typer.Argument(help="Stores with embeddings, or folders of stores.")],
    labels: Annotated[Path, typer.Option(help="CSV: slide_id,label[,patient_id][,split|fold].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")] = Path("model"),
    aggregator: Annotated[str, typer.Option(help="MIL aggregator: mean, maxpool, abmil, dsmil, clam_sb.")] = "dsmil",
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
        from .store import find_stores

        with _progress_bar("training") as update:
            report = train_mil(
                find_stores(stores), labels, out, aggregator=aggregator, folds=folds, feature_key=features,
                epochs=epochs, lr=lr, seed=seed, overwrite=overwrite, progress=_mil_progress(update),
            )  # fmt: skip
        typer.echo(report.table)
        for role, path in report.files.items():
            typer.echo(f"{role:>16}: {path}")


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
        from .mil.metrics import format_metrics_table
        from .store import find_stores

        metrics = evaluate_mil(model_dir, find_stores(stores), labels, out)
        typer.echo(format_metrics_table(metrics, title=f"evaluation of {model_dir}"))


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
            preds = predict_mil(model_dir, paths, out_csv=out, write_scores=True, progress=_mil_progress(update))
        _print_table(
            "predictions", ["slide", "predicted", "probabilities", "tiles"],
            [[p.slide_id, p.predicted, " ".join(f"{c}={v:.3f}" for c, v in p.probabilities.items()), p.n_tiles] for p in preds],
        )  # fmt: skip
        typer.echo(f"predictions: {out}")
        if heatmaps is not None:
            from .outputs.heatmap import heatmaps as draw

            drawn = draw(model_dir, paths, heatmaps)
            typer.echo(f"heatmaps: {len(drawn)} slide(s) in {heatmaps}")


@app.command()
def heatmap(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `train`.")],
    stores: Annotated[list[Path], typer.Argument(help="Stores or folders of stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures.")] = Path("heatmaps"),
    top_k: Annotated[int, typer.Option(help="Tiles in the top-k montage.")] = 16,
) -> None:
    """Draw attention heatmaps (thumbnail + colour bar) and top-k tile montages."""
    with _errors():
        from .outputs.heatmap import heatmaps as draw

        drawn = draw(model_dir, stores, out, top_k=top_k)
        for sid, paths in drawn.items():
            typer.echo(f"{sid}: {paths.heatmap}  {paths.montage}")


# --- demo / run -----------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("wsi-convnext-demo"),
    slides: Annotated[int, typer.Option(help="Slides in the generated cohort.")] = 32,
) -> None:
    """Run the whole pipeline on a generated cohort: tile → embed → train (CV) → metrics, ROC, heatmaps."""
    with _errors():
        from .demo import run_demo

        with _progress_bar("demo") as update:
            result = run_demo(out, n_slides=slides, progress=lambda stage, done, total: update(done, total, stage))
        typer.echo(result.metrics_table)
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
    model: Annotated[Optional[str], typer.Option(help="timm ConvNeXt name.")] = None,
    stem: Annotated[Optional[str], typer.Option(help="Encoder stem: patch or overlap.")] = None,
    predict: Annotated[Optional[Path], typer.Option("--predict", help="Model folder: also predict each slide.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Existing Dask scheduler, tcp://host:port.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Local Dask worker processes [default: one per core].")] = None,
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
            f"{summary.total} slides: {summary.done} done, {summary.skipped} skipped, {summary.failed} failed; "
            f"manifest: {summary.manifest}; report: {summary.report}"
        )
        for row in summary.failures[:20]:
            _err(f"{row.slide_id} ({row.stage}): {row.error_type}: {row.error}")
        raise typer.Exit(summary.exit_code)
