"""The one dtype policy (device.resolve_dtype): what `auto` and an explicit request mean on each device."""

from __future__ import annotations

import pytest
import torch

from antimatter.config import DTYPE_NAMES
from antimatter.device import DTYPES, autocast, resolve_dtype
from antimatter.errors import UserError

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device whose bf16 support the test sets (no GPU needed: only the policy is under test)."""
    def set_bf16(ok: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: ok)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    return set_bf16


def test_names_match_the_config() -> None:
    assert tuple(DTYPES) == DTYPE_NAMES


def test_auto(gpu) -> None:
    assert resolve_dtype("auto", CPU) == "fp32"
    assert resolve_dtype("auto", torch.device("mps")) == "fp32"
    gpu(True)
    assert resolve_dtype("auto", GPU) == "bf16"
    gpu(False)
    assert resolve_dtype("auto", GPU) == "fp16"


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_explicit_is_used_as_asked(gpu, name: str) -> None:
    gpu(True)
    assert resolve_dtype(name, CPU) == name
    assert resolve_dtype(name, GPU) == name


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_setting(gpu) -> None:
    gpu(False)
    assert resolve_dtype("fp16", GPU, "eval.dtype") == "fp16"
    with pytest.raises(UserError, match=r"eval.dtype=bf16 but Tesla T4 has no bf16: use eval.dtype=fp16"):
        resolve_dtype("bf16", GPU, "eval.dtype")


def test_unknown_name_is_refused() -> None:
    with pytest.raises(UserError, match="train.dtype must be auto, bf16, fp16 or fp32, got 'fp64'"):
        resolve_dtype("fp64", CPU)


def test_autocast_only_for_half_precision() -> None:
    x = torch.ones(2, 2)
    with autocast(CPU, "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
