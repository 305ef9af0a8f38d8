"""Fixtures for the optimisation tests: they hold on every CPU class.

The dtype under test is the one the service picks for this CPU (`model.dtype: auto`): bf16
where it is native, float32 elsewhere. oneDNN's bf16 kernels need AVX-512 (or
avx_ne_convert): tests of them at bf16 skip, naming the CPU, where they cannot run. CI also
runs this folder with the CPU capped to AVX2 (`SDXL_SERVE_CPU_CLASS=avx2`, with oneDNN and
ATen capped to match) on hosts that have more.
"""

from __future__ import annotations

import pytest
import torch

from serve_app.model import cpu
from serve_app.model.diffusers_generator import DTYPES
from serve_app.model.optimize import onednn_bf16_supported
from serve_app.model.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def auto_dtype() -> torch.dtype:
    """The dtype `model.dtype: auto` picks on this CPU."""
    return DTYPES[cpu.choose_dtype("auto", "cpu", cpu.host()).name]


def skip_unless_onednn_runs(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not onednn_bf16_supported():
        pytest.skip(f"oneDNN bf16 kernels need avx512bw/vl/dq or avx_ne_convert; this CPU is "
                    f"{cpu.host().describe()}")


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request) -> torch.dtype:
    """Both dtypes, for module-level tests that run in milliseconds."""
    torch.manual_seed(0)
    return request.param


@pytest.fixture
def packed_dtype(dtype) -> torch.dtype:
    """Both dtypes where oneDNN's kernels for them run on this CPU."""
    skip_unless_onednn_runs(dtype)
    return dtype
