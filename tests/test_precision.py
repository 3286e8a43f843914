"""Tests for wsi_convnext.encoders.precision: the one precision policy (embed, finetune, predict-tiles)."""

from __future__ import annotations

import pytest
import torch

from wsi_convnext.encoders import PRECISIONS, Precision, resolve_precision


@pytest.mark.parametrize("amp", [None, False, True])
def test_cpu_runs_in_float32_whatever_amp_says(amp: bool | None) -> None:
    p = resolve_precision(torch.device("cpu"), amp)
    assert p == Precision("float32", None, False, False)
    with p.autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_channels_last_override_and_unknown_device_types() -> None:
    assert resolve_precision(torch.device("cpu"), channels_last=True).channels_last is True
    assert resolve_precision(torch.device("meta")).name == "float32"  # not in PRECISIONS: float32
    assert set(PRECISIONS) >= {"cuda", "cpu", "mps"}


def test_grad_scaler_scales_only_under_float16() -> None:
    cpu = torch.device("cpu")
    assert not resolve_precision(cpu).grad_scaler(cpu).is_enabled()
    assert not Precision("bfloat16", "bfloat16", False, False).grad_scaler(cpu).is_enabled()


def test_autocast_enters_the_policy_dtype() -> None:
    p = Precision("bfloat16", "bfloat16", False, False)
    with p.autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocasts_in_bfloat16_where_supported_else_float16() -> None:
    p = resolve_precision(torch.device("cuda"))
    assert p.name == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert p.channels_last and p.pin_memory
    assert resolve_precision(torch.device("cuda"), amp=False).name == "float32"
    assert p.grad_scaler(torch.device("cuda")).is_enabled() == (p.name == "float16")
