"""Layering rules of the library (issue 8), checked by parsing imports with ``ast``, plus the
two rules that need a running interpreter: instant CLI help, and user reader backends in the
worker processes that tile large slides."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsi_convnext"

IO_LIBRARIES = {"openslide", "tiffslide", "tifffile", "zarr", "torch", "timm", "imagecodecs", "h5py"}
DASK = {"dask", "distributed", "dask_jobqueue"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _eager_nodes(tree: ast.AST) -> list[ast.AST]:
    """Nodes that run at import time (everything outside function bodies)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return out


@cache
def _imports(module: str, eager: bool = False) -> frozenset[str]:
    """Modules ``module`` imports, resolved: anywhere in its body (lazy imports included), or
    only at import time (``eager``)."""
    path = _modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _eager_nodes(tree) if eager else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from . import cli` / `from .slide import base` name modules, not attributes.
            for alias in node.names:
                if f"{prefix}.{alias.name}" in _modules():
                    found.add(f"{prefix}.{alias.name}")
    return frozenset(found)


def _top(name: str) -> str:
    return name.split(".")[0]


def _closure(module: str) -> set[str]:
    """``module`` and the library modules it reaches: all of its own imports (lazy ones too),
    then, at any depth, what those modules import when they are imported."""
    seen, todo = {module}, [module]
    while todo:
        current = todo.pop()
        for dep in _imports(current, eager=current != module):
            # `import wsi_convnext.slide.base` also runs the parents' __init__.
            parts = dep.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in _modules() and name not in seen:
                    seen.add(name)
                    todo.append(name)
    return seen


def _external(modules: set[str], root: str | None = None) -> dict[str, set[str]]:
    """Third-party top-level packages each module imports (eager only, except for ``root``)."""
    return {
        m: {_top(d) for d in _imports(m, eager=root is not None and m != root) if _top(d) != "wsi_convnext"}
        for m in modules
    }


def test_the_rules_see_the_package() -> None:
    mods = _modules()
    assert {"wsi_convnext.tiling.grid", "wsi_convnext.tiling.tissue", "wsi_convnext.store", "wsi_convnext.cli"} <= set(mods)
    assert "wsi_convnext.slide.base" in mods and "wsi_convnext.synthetic.write" in mods
    # The parser resolves relative and lazy imports (tiler imports slide inside functions).
    assert "wsi_convnext.slide" in _imports("wsi_convnext.tiling.tiler")
    assert "openslide" in _imports("wsi_convnext.slide.openslide")


@pytest.mark.parametrize("module", ["wsi_convnext.tiling.grid", "wsi_convnext.tiling.tissue"])
def test_tiling_and_tissue_import_no_io_library(module: str) -> None:
    reached = _closure(module)
    banned = IO_LIBRARIES | DASK
    bad = {m: sorted(libs & banned) for m, libs in _external(reached, module).items() if libs & banned}
    assert not bad, f"{module} reaches I/O libraries: {bad}"


@pytest.mark.parametrize("module", ["wsi_convnext.tiling.grid", "wsi_convnext.tiling.tissue"])
def test_tiling_and_tissue_name_no_cli_flag(module: str) -> None:
    """Pure modules speak in parameters; the CLI (or the tiler) adds the flag names."""
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    flags = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and re.search(r"(?<![\w-])--[a-z][a-z-]+", node.value)
    ]  # fmt: skip
    assert not flags, f"{module} names CLI flags: {flags}"


def test_no_library_module_imports_cli() -> None:
    bad = sorted(m for m in _modules() if m != "wsi_convnext.cli" and "wsi_convnext.cli" in _imports(m))
    assert not bad, f"library modules importing the CLI: {bad}"


def test_only_cohort_imports_dask() -> None:
    """Works for ``cohort.py`` and for a ``cohort/`` package alike."""

    def in_cohort(m: str) -> bool:
        return m == "wsi_convnext.cohort" or m.startswith("wsi_convnext.cohort.")

    users = {m for m, libs in _external(set(_modules())).items() if libs & DASK}
    assert users, "no module imports dask: the rule would be vacuous"
    assert all(in_cohort(m) for m in users), f"dask outside cohort: {sorted(m for m in users if not in_cohort(m))}"


@pytest.mark.parametrize("room", ["wsi_convnext.labels", "wsi_convnext.data"])
def test_labels_and_data_stand_below_mil_and_finetune(room: str) -> None:
    """Labels, splits and metrics are shared by data/, mil/, finetune/: they and data/ import neither."""
    mods = [m for m in _modules() if m == room or m.startswith(room + ".")]
    assert mods
    bad = {m: sorted(i for i in _imports(m) if _top_room(i) in ("mil", "finetune", "cohort")) for m in mods}
    assert not {m: v for m, v in bad.items() if v}, f"{room} imports a room above it: {bad}"


def _top_room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "wsi_convnext" else ""


def test_store_imports_no_torch() -> None:
    reached = _closure("wsi_convnext.store")
    bad = {m: libs for m, libs in _external(reached, "wsi_convnext.store").items() if {"torch", "timm"} & libs}
    assert not bad, f"store reaches torch: {bad}"


def test_help_imports_neither_torch_nor_dask() -> None:
    """``wsi-convnext --help`` and every ``COMMAND --help``, each checked in a fresh interpreter state."""
    code = textwrap.dedent(
        """
        import json, sys
        import typer.main
        from typer.testing import CliRunner
        from wsi_convnext.cli import app

        commands = sorted(typer.main.get_command(app).commands)
        runner = CliRunner()
        report = {}
        for args in [["--help"]] + [[name, "--help"] for name in commands]:
            result = runner.invoke(app, args)
            heavy = sorted(m for m in ("torch", "timm", "dask", "distributed") if m in sys.modules)
            report[" ".join(args)] = {"rc": result.exit_code, "heavy": heavy, "out": result.output[:200]}
        print(json.dumps(report))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) >= 8 and "tile --help" in report  # the loop covered the commands
    for args, r in report.items():
        assert r["rc"] == 0, f"`wsi-convnext {args}` failed: {r['out']}"
        assert "Usage" in r["out"], args
        assert not r["heavy"], f"`wsi-convnext {args}` imported {r['heavy']}"


USER_BACKEND = '''
"""A user's reader backend: tiffslide that leaves a mark per process that opened a slide."""
import os
from pathlib import Path

from wsi_convnext.slide import TiffSlideReader


class MarkingReader(TiffSlideReader):
    backend = "marking"

    def _open(self):
        (Path(os.environ["WSI_TEST_BACKEND_MARKS"]) / str(os.getpid())).touch()
        return super()._open()
'''


@pytest.mark.slow
def test_user_backend_is_used_in_tiling_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_convnext.tiling import tiler
    from wsi_convnext.slide import base as slide_base
    from wsi_convnext.slide import register_backend
    from wsi_convnext.store import open_store
    from wsi_convnext.synthetic import SyntheticSlideSpec, write_synthetic_slide

    monkeypatch.setattr(slide_base._BACKENDS, "_items", slide_base._BACKENDS.snapshot())
    monkeypatch.setattr(slide_base, "_AUTO_ORDER", list(slide_base._AUTO_ORDER))
    (tmp_path / "user_backend_mod.py").write_text(USER_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("WSI_TEST_BACKEND_MARKS", str(marks))
    import user_backend_mod

    # The module does not register itself: the worker must do it from the import path.
    register_backend("marking", user_backend_mod.MarkingReader, auto=False)

    side = math.ceil(math.sqrt(tiler.PROCESS_MIN_TILES)) + 1  # tiles per side: enough for processes
    tile_px = 64
    spec = SyntheticSlideSpec(
        width=side * tile_px + 10, height=side * tile_px + 10, mpp=0.5, pattern="lines", flavour="generic",
        downsamples=(1,), compression="zlib", tile=256,
    )  # fmt: skip
    slide = write_synthetic_slide(tmp_path / "big.tiff", spec, workers=1)
    params = tiler.TileParams(mpp=0.5, tile_size=tile_px, min_tissue=0.0, backend="marking", workers=2, encoding="png")
    result = tiler.tile_slide(slide.path, tmp_path / "out", params)

    assert result.n_tiles == side * side >= tiler.PROCESS_MIN_TILES
    assert open_store(result.store_path).attrs["source"]["backend"] == "marking"
    workers = {int(p.name) for p in marks.iterdir()} - {os.getpid()}
    assert len(workers) >= 1, "no worker process opened the slide with the user's backend"
    assert "marking" not in slide_base._AUTO_ORDER


def _library_target(name: str) -> str | None:
    """The library module an imported name resolves to (the longest known prefix), or None."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_circle_spans_two_rooms() -> None:
    """Circles of imports (lazy ones included) stay inside one room (a top-level module or package).

    The package root is left out: it only re-exports lazily (``wsi_convnext.open_store``).
    """
    root = "wsi_convnext"
    graph = {
        m: {t for i in _imports(m) if (t := _library_target(i)) and t not in (m, root)} for m in _modules() if m != root
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(component)

    for m in sorted(graph):
        if m not in index:
            visit(m)

    def room(m: str) -> str:
        return ".".join(m.split(".")[:2])

    spanning = [sorted(c) for c in circles if len({room(m) for m in c}) > 1]
    assert not spanning, f"import circles across rooms: {spanning}"
