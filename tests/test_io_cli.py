"""Output folders and files (``_io.ensure_dir`` / ``check_output_file``) through every command.

Issue 20, item 4: a read-only output folder, a file where a folder is expected and the
reverse are one-line errors with a non-zero exit, checked before any work (the model
folders given here do not even exist: the output is refused first). Real subprocess CLI
runs; as root (who may write anywhere) the commands run as user ``nobody``.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real CLI runs, each a fresh interpreter

EXE = Path(sys.executable).parent / "wsi-convnext"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path) -> Iterator[Path]:
    """A folder anyone may read, holding a real store, a slide and a read-only folder ``ro``."""
    root = Path(tempfile.mkdtemp(prefix="wsi-io-", dir="/tmp"))
    root.chmod(0o755)
    shutil.copy(cmu_slide, root / "s.svs")
    subprocess.run([str(EXE), "tile", str(root / "s.svs"), "--out", str(root / "tiles"), "--workers", "1"],
                   check=True, capture_output=True, env=_env())  # fmt: skip
    (root / "ro").mkdir(mode=0o555)
    (root / "ro").chmod(0o555)
    (root / "a-file").write_text("not a folder\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp", "OMP_NUM_THREADS": "1"}


_SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
#: Runs the CLI with the checkout and this venv's packages on sys.path, for an interpreter outside the venv.
_BOOTSTRAP = "import sys; sys.path[:0] = {paths!r}; from wsi_convnext.cli import app; app(prog_name='wsi-convnext')"


@functools.cache
def _unprivileged_prefix() -> list[str] | None:
    """How user ``nobody`` runs the CLI here, or None when it cannot.

    The venv's interpreter may live under root's private home (a pyenv build), which ``nobody``
    cannot enter; then the system Python of the same minor version runs the CLI with the
    checkout and the venv's site-packages on its path.
    """
    if shutil.which("setpriv") is None:
        return None
    probe = ["--help"]
    if subprocess.run([*_SETPRIV, str(EXE), *probe], capture_output=True, env=_env(), cwd="/tmp").returncode == 0:
        return [*_SETPRIV, str(EXE)]
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        return None
    same = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    if same.stdout.strip() != str(tuple(sys.version_info[:2])):
        return None
    import site

    prefix = [*_SETPRIV, system, "-c", _BOOTSTRAP.format(paths=[str(REPO), *site.getsitepackages()])]
    ok = subprocess.run([*prefix, *probe], capture_output=True, env=_env(), cwd="/tmp").returncode == 0
    return prefix if ok else None


def _cli(args: list[str], *, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [str(EXE), *args]
    if unprivileged and os.geteuid() == 0:
        prefix = _unprivileged_prefix()
        if prefix is None:
            pytest.skip("user nobody can run neither this venv's wsi-convnext nor a system Python of its version")
        cmd = [*prefix, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd="/tmp")


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _commands(w: Path, out: Path) -> dict[str, list[str]]:
    """Each command with ``out`` as the folder it writes (and inputs that need not be valid beyond that)."""
    store, nomodel = str(w / "tiles" / "s.zarr"), str(w / "no-model")
    return {
        "tile": ["tile", str(w / "s.svs"), "--out", str(out)],
        "export": ["export", store, "--out", str(out)],
        "train": ["train", store, "--labels", str(w / "labels.csv"), "--out", str(out)],
        "evaluate": ["evaluate", nomodel, store, "--labels", str(w / "labels.csv"), "--out", str(out)],
        "heatmap": ["heatmap", nomodel, store, "--out", str(out)],
        "finetune": ["finetune", str(w / "tiles"), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
        "run": ["run", "--slides", str(w / "s.svs"), "--out", str(out), "--workers", "1"],
        "predict": ["predict", nomodel, store, "--out", str(out / "p.csv")],
        "predict-tiles": ["predict-tiles", nomodel, store, "--out", str(out / "p.csv")],
    }


FOLDER_COMMANDS = ["tile", "export", "train", "evaluate", "heatmap", "finetune", "demo", "run"]
ALL_COMMANDS = FOLDER_COMMANDS + ["predict", "predict-tiles"]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_read_only_output_folder_is_one_line(world: Path, command: str) -> None:
    for out in (world / "ro", world / "ro" / "missing" / "deeper"):  # existing, and to be created in it
        err = _one_line(_cli(_commands(world, out)[command], unprivileged=True))
        assert str(world / "ro") in err and ("cannot write" in err or "Permission denied" in err), err
    assert not any((world / "ro").iterdir())


@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_out_naming_a_file_where_a_folder_is_expected(world: Path, command: str) -> None:
    for out in (world / "a-file", world / "a-file" / "sub"):
        err = _one_line(_cli(_commands(world, out)[command]))
        assert str(out) in err and "file" in err, err
    assert (world / "a-file").read_text() == "not a folder\n"


@pytest.mark.parametrize("command", ["predict", "predict-tiles"])
def test_out_naming_a_folder_where_a_file_is_expected(world: Path, command: str) -> None:
    args = _commands(world, world / "x")[command]
    args[-1] = str(world / "tiles")  # an existing folder as the CSV
    err = _one_line(_cli(args))
    assert "is a folder" in err, err
    args[-1] = str(world / "a-file" / "p.csv")
    assert "which is a file" in _one_line(_cli(args))


def test_ensure_dir_refuses_a_read_only_file_system_mode(tmp_path: Path) -> None:
    """The check itself, in-process: a folder without write permission (as a non-root user)."""
    from wsi_convnext._io import check_output_file, ensure_dir
    from wsi_convnext.errors import OutputWriteError

    if os.geteuid() == 0:
        pytest.skip("root may write into any folder; the subprocess tests above cover it")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(OutputWriteError, match="cannot write"):
        ensure_dir(ro)
    with pytest.raises(OutputWriteError, match="cannot write"):
        check_output_file(ro / "p.csv")


def test_embed_into_a_read_only_store_fails_that_store_in_one_line(world: Path) -> None:
    store = world / "ro-store" / "s.zarr"
    shutil.copytree(world / "tiles" / "s.zarr", store)
    for p in [store, *store.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    res = _cli(["embed", str(store), "--model", "convnext_atto"], unprivileged=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "cannot write into this folder" in res.stderr and str(store) in res.stderr
