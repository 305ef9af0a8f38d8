from __future__ import annotations

import pytest
import torch

from serve_app.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def bf16_seed():
    torch.manual_seed(0)
    yield torch.bfloat16
