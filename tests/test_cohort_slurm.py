"""`wsi-convnext run` on a real SLURM cluster: dask-jobqueue jobs, job arrays, a cancelled job.

These tests submit real jobs with sbatch. They skip with the reason when ``sbatch``/``sinfo``
are missing or no node is idle (``sudo .ci/start-slurm.sh`` starts a single-node cluster);
with ``WSI_TEST_SLURM=require`` (set by ``.ci/run`` once SLURM is up) they fail instead.
Everything is driven through the CLI and public config keys. Jobs ask for 1 core each and
the slides are tiny, so the module runs in a few minutes on a 2-core machine.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

BIN = Path(sys.executable).parent
JOB_NAME = "wsi-convnext"  # the name the cohort runner gives its worker jobs
GOOD = ("tiny_0", "tiny_1")
BROKEN = "broken"


def _slurm_missing(reason: str) -> None:
    if os.environ.get("WSI_TEST_SLURM") == "require":
        pytest.fail(f"WSI_TEST_SLURM=require but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def partition() -> str:
    """The partition of an idle SLURM node (skips without a usable SLURM)."""
    for exe in ("sbatch", "sinfo", "squeue", "scancel"):
        if shutil.which(exe) is None:
            _slurm_missing(f"no {exe} on PATH: no SLURM here (sudo .ci/start-slurm.sh starts a single-node cluster)")
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        _slurm_missing("sinfo did not answer within 30 s (is slurmctld running?)")
    names = [p.strip().rstrip("*") for p in res.stdout.split()]
    if res.returncode != 0 or not names:
        _slurm_missing(f"no idle SLURM node (sinfo: {(res.stderr or res.stdout).strip()[:200] or 'none idle'})")
    return names[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny generated slides (~50 tiles each at 0.5 µm/px) and a truncated copy that cannot be opened."""
    from wsi_convnext.synthetic import SyntheticSlideSpec, TissueSpec, truncate_copy, write_synthetic_slide

    folder = tmp_path_factory.mktemp("slurm-cohort")
    for i, name in enumerate(GOOD):
        spec = SyntheticSlideSpec(width=3000, height=2000, mpp=0.5, downsamples=(1, 4), seed=i,
                                  tissue=TissueSpec(n_blobs=1, coverage=0.4))  # fmt: skip
        write_synthetic_slide(folder / f"{name}.svs", spec, workers=1)
    truncate_copy(folder / f"{GOOD[0]}.svs", folder / f"{BROKEN}.svs", 0.3)
    return folder


def _env() -> dict[str, str]:
    # sbatch exports this environment to the jobs: the same venv and the same code.
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _slurm_config(tmp: Path, partition: str, slides: Path, out: Path, *, embed: bool, maximum_jobs: int = 2) -> Path:
    embed_table = '[embed]\nmodel = "convnext_atto"\nbatch_size = 16\ndevice = "cpu"\n' if embed else ""
    return _toml(tmp / "slurm.toml", f"""
slides = ["{slides}"]
out = "{out}"
cluster = "slurm"
retries = 2
[tile]
mpp = 0.5
tile_size = 224
{embed_table}
[slurm]
queue = "{partition}"
cores = 1
memory = "3GiB"
processes = 1
walltime = "00:20:00"
log_directory = "{tmp / 'logs'}"
local_directory = "{tmp / 'scratch'}"
minimum_jobs = 0
maximum_jobs = {maximum_jobs}
""")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _final(rows: list[dict[str, str]]) -> dict[tuple[str, str], str]:
    """(slide_id, stage) → last recorded status."""
    return {(r["slide_id"], r["stage"]): r["status"] for r in rows}


def _jobs(state: str = "R") -> set[str]:
    res = subprocess.run(["squeue", "-h", "--name", JOB_NAME, "-t", state, "-o", "%i"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    return set(res.stdout.split())


def test_run_on_slurm_tiles_embeds_and_records_failures(tmp_path: Path, partition: str, cohort: Path) -> None:
    out = tmp_path / "out"
    config = _slurm_config(tmp_path, partition, cohort, out, embed=True)
    res = subprocess.run([str(BIN / "wsi-convnext"), "run", str(config)], capture_output=True, text=True,
                         timeout=900, env=_env())  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]  # one slide failed, the others are done
    final = _final(_rows(out / "manifest.csv"))
    for sid in GOOD:
        assert final[(sid, "tile")] == "done" and final[(sid, "embed")] == "done", final
    assert final[(BROKEN, "tile")] == "failed" and (BROKEN, "embed") not in final
    broken = [r for r in _rows(out / "manifest.csv") if r["slide_id"] == BROKEN and r["status"] == "failed"]
    assert broken[-1]["error_type"] == "SlideOpenError" and f"{BROKEN}.svs" in broken[-1]["error"]

    from wsi_convnext import open_store

    for sid in GOOD:
        store = open_store(out / f"{sid}.zarr")
        feats = store.features()
        assert len(store) > 10 and feats.shape == (len(store), 320)  # convnext_atto: 320 features
    assert not (out / f"{BROKEN}.zarr").exists()
    report = (out / "report.html").read_text(encoding="utf-8")
    assert all(sid in report for sid in (*GOOD, BROKEN)) and "SlideOpenError" in report
    # The work ran in SLURM jobs: each wrote its log where the config said.
    logs = list((tmp_path / "logs").glob("*.err"))
    assert logs, "no SLURM job logs: the workers did not run as jobs"


def test_job_array_shards_cover_every_slide_once(tmp_path: Path, partition: str, cohort: Path) -> None:
    out = tmp_path / "out"
    config = _toml(tmp_path / "local.toml", f"""
slides = ["{cohort}"]
out = "{out}"
cluster = "local"
[tile]
mpp = 0.5
[local]
n_workers = 1
threads_per_worker = 1
memory_limit = "3GiB"
""")
    script = Path(__file__).resolve().parent.parent / "pipelines" / "slurm-array.sbatch"
    # Command-line options win over the script's #SBATCH lines (its GPU partition and sizes).
    cmd = [
        "sbatch", "--wait", "--array=0-2", f"--partition={partition}", "--cpus-per-task=1", "--mem=3G",
        "--gres=none", "--time=00:20:00", f"--output={tmp_path}/array-%A_%a.out",
        f"--export=ALL,CONFIG={config},N_SHARDS=3", str(script),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("array-*.out")))
    # --wait returns the highest exit code of the array: 1 from the shard with the broken slide.
    assert res.returncode == 1, f"{res.stderr}\n{logs[-3000:]}"
    for i in range(3):  # every array task ran its own shard
        assert f"shard {i}/3 of {config}" in logs
    # A shard's manifest lists its slides (an empty shard writes none).
    seen: Counter[str] = Counter()
    for m in out.glob("manifest-shard-*-of-3.csv"):
        assert m.name in {f"manifest-shard-{i}-of-3.csv" for i in range(3)}
        seen.update({r["slide_id"] for r in _rows(m)})
    assert seen == Counter({*GOOD, BROKEN}), seen  # every slide in exactly one shard
    for sid in GOOD:
        assert (out / f"{sid}.zarr").is_dir()
    report = (out / "report.html").read_text(encoding="utf-8")
    assert all(sid in report for sid in (*GOOD, BROKEN))


def test_cancelled_worker_job_is_retried_and_the_run_completes(tmp_path: Path, partition: str, cohort: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in GOOD:
        (slides / f"{sid}.svs").symlink_to(cohort / f"{sid}.svs")
    out = tmp_path / "out"
    config = _slurm_config(tmp_path, partition, slides, out, embed=True, maximum_jobs=1)
    before = _jobs("all")
    proc = subprocess.Popen([str(BIN / "wsi-convnext"), "run", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        # Wait until the one worker job has finished a stage and is working on the next
        # (the window keeps it busy), then cancel it.
        deadline = time.monotonic() + 600
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            running = _jobs("R") - before
            manifest = out / "manifest.csv"
            done = manifest.is_file() and any(r["status"] == "done" for r in _rows(manifest))
            if running and done:
                victim = sorted(running)[0]
                break
            time.sleep(0.5)
        assert victim is not None, "no running worker job with a finished stage to cancel"
        subprocess.run(["scancel", victim], check=True, timeout=30)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert victim not in _jobs("R")
    final = _final(_rows(out / "manifest.csv"))
    for sid in GOOD:
        assert final[(sid, "tile")] == "done" and final[(sid, "embed")] == "done", final
    # The job really was cancelled, the task it was running was submitted again (the runner
    # logs each retry), and a new worker job took over.
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.err")}
    assert f"JOB {victim} ON" in logs.get(f"{JOB_NAME}-{victim}.err", "") and "CANCELLED" in logs[f"{JOB_NAME}-{victim}.err"]
    assert re.search(r"worker died.*resubmitting", stderr), stderr[-3000:]
    assert len(logs) >= 2, "no replacement worker job was started"
