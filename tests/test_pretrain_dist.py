"""Distributed pretraining on the CPU: 2 gloo processes launched by torchrun match 1 process, and a
rank that dies makes the other stop with a clear error instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_data_labelled import colour_folder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "wsi-convnext"
ARGS = ["--batch-size", "8", "--threads", "1", "--num-workers", "0", "--device", "cpu", "--steps", "3",
        "--global-size", "48", "--local-size", "32", "--n-local", "2", "--seed", "5"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("method", ["dino", "simclr"])
def test_two_gloo_ranks_match_one_process(tmp_path: Path, method: str) -> None:
    from safetensors.torch import load_file

    data = colour_folder(tmp_path / "data", n=8, size=64)
    args = [str(data), *ARGS, "--method", method]
    subprocess.run([sys.executable, str(CLI), "pretrain", *args, "--out", str(tmp_path / "one")], env=_env(), check=True, timeout=600)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port()), str(CLI)]  # fmt: skip
    res = subprocess.run([*launch, "pretrain", *args, "--out", str(tmp_path / "two")], env=_env(), timeout=600,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]["world_size"] == 2
    l1, l2 = [r["loss"] for r in one["history"]], [r["loss"] for r in two["history"]]
    assert len(l1) == len(l2) == 3
    np.testing.assert_allclose(l2, l1, rtol=0, atol=1e-4)
    a, b = load_file(str(tmp_path / "one" / "encoder.safetensors")), load_file(str(tmp_path / "two" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=0, atol=1e-4, err_msg=k)


def test_pretrain_on_node_starts_the_ranks_and_says_why_one_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the cohort's pretrain stage calls: N ranks under torchrun --standalone (here 2 gloo ranks)."""
    from wsi_convnext.errors import DistributedError
    from wsi_convnext.pretrain import PretrainConfig, pretrain_encoder, pretrain_on_node

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = colour_folder(tmp_path / "data", n=8, size=64)
    kw = {"model": "convnext_atto", "batch_size": 8, "threads": 1, "num_workers": 0, "device": "cpu", "steps": 2,
          "global_size": 48, "local_size": 32, "n_local": 2, "seed": 5}  # fmt: skip
    one = pretrain_encoder(PretrainConfig(data=(str(data),), out=str(tmp_path / "one"), **kw))
    two = pretrain_on_node(PretrainConfig(data=(str(data),), out=str(tmp_path / "two"), **kw), nproc=2)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert json.loads((two / "config.json").read_text())["resolved"]["world_size"] == 2
    np.testing.assert_allclose([r["loss"] for r in m2["history"]], [r["loss"] for r in m1["history"]], rtol=0, atol=1e-4)
    with pytest.raises(DistributedError, match="fewer than one batch"):
        pretrain_on_node(PretrainConfig(data=(str(data),), out=str(tmp_path / "big"), **{**kw, "batch_size": 512}), nproc=2)
    assert not (tmp_path / "big").exists()


_RANK = """
import sys
from wsi_convnext.pretrain import PretrainConfig, pretrain_encoder
cfg = PretrainConfig(data=(sys.argv[1],), out=sys.argv[2], model="convnext_atto", batch_size=8, threads=1, num_workers=0,
                     device="cpu", steps=200, global_size=48, local_size=32, n_local=0, checkpoint_every=1, dist_timeout=20)
pretrain_encoder(cfg)
"""


def test_a_dead_rank_stops_the_other_with_a_clear_error(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", n=8, size=64)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(data), str(tmp_path / "enc")], env=env,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    ckpt = tmp_path / ".enc.work" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.is_file() and procs[0].poll() is None:
        time.sleep(0.1)
    assert ckpt.is_file(), procs[0].stderr.read() if procs[0].poll() is not None else "no checkpoint"
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    t0 = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        if procs[0].poll() is None:
            procs[0].kill()
    assert procs[0].returncode != 0
    assert time.time() - t0 < 90
    assert "DistributedError" in err and "lost contact with the other ranks" in err, err[-2000:]
    assert not (tmp_path / "enc").exists()


@pytest.mark.slurm
def test_pretrain_slurm_sbatch_runs_two_srun_ranks(tmp_path: Path) -> None:
    """pipelines/pretrain-slurm.sbatch on the CPU: 2 srun tasks become 2 DDP ranks (gloo)."""
    import shutil

    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        pytest.skip("no SLURM (sbatch/sinfo missing)")
    res = subprocess.run(["sinfo", "-h", "-t", "idle,mix", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if res.returncode or not res.stdout.strip():
        pytest.skip(f"no idle SLURM node ({(res.stderr or res.stdout).strip()[:200]})")
    data = colour_folder(tmp_path / "data", n=8, size=64)
    env = {**_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "DATA": str(data),
           "OUT": str(tmp_path / "enc"), "DEVICE": "cpu", "BATCH": "8", "STEPS": "2", "MODEL": "convnext_atto",
           "EXTRA_ARGS": "--global-size 48 --local-size 32 --n-local 2 --threads 1"}  # fmt: skip
    script = REPO / "pipelines" / "pretrain-slurm.sbatch"
    subprocess.run(["sbatch", "--wait", "--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=4G", "--time=10",
                    f"--partition={res.stdout.split()[0].rstrip('*')}", f"--output={tmp_path}/log-%j.out", str(script)],
                   env=env, check=True, timeout=900)  # fmt: skip
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["stem"] == "overlap"
