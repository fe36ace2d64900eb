"""Shared fixtures for the BitNet tests.

transformers decorates its BitNet unpack and activation-quant functions with ``torch.compile``; on a
2-core CPU the first Inductor compile costs ~20 s. The tests run those same functions eagerly instead
(same Python code, no C++ codegen) by disabling TorchDynamo for the duration of each test.

The models here are tiny, so intra-op threads only add synchronisation; on a shared 2-core machine
two threads made the QAT steps 10-70x slower than one. Each test runs single-threaded.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from tiny_models import tiny_llama


@pytest.fixture(autouse=True)
def _eager_transformers_bitnet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return tiny_llama
