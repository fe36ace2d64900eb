"""Shared fixtures for the BitNet tests.

transformers decorates its BitNet unpack and activation-quant functions with ``torch.compile``; on a
2-core CPU the first Inductor compile costs ~20 s. The tests run those same functions eagerly instead
(same Python code, no C++ codegen) by disabling TorchDynamo for the duration of each test.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo


@pytest.fixture(autouse=True)
def _eager_transformers_bitnet():
    with torch._dynamo.config.patch(disable=True):
        yield
