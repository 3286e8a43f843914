"""benchmarks/gpu.sh: clean exit without a GPU, and its driver end to end at tiny size on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_script_exits_cleanly_without_a_gpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "no CUDA GPU visible" in res.stderr and "--dry-run" in res.stderr
    assert "Traceback" not in res.stderr and "| measure" not in res.stdout


@pytest.mark.slow
def test_gpu_driver_dry_run_prints_one_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import gpu

    assert gpu.main(["--dry-run", "--tiles", "8", "--batch-size", "4", "--repeats", "1", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].split("|")[1].strip() == "measure" and len(table) == 2 + 6  # header, rule, 6 measurements
    embed_row = table[2].split("|")
    assert embed_row[1].strip() == "convnext_atto" and float(embed_row[5]) > 0  # embed/bare ratio
    assert "skipped: needs CUDA" in out
    assert any(row.split("|")[1].strip().startswith("pretraining") for row in table), table
    # The fine-tuning row's measurement itself, at tiny size (the row needs wsi_convnext.finetune).
    assert gpu.finetune_step_throughput("convnext_atto", torch.device("cpu"), 2, 1, amp=False) > 0
