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


@pytest.fixture(autouse=True)
def _eager_transformers_bitnet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True):
            yield
    finally:
        torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, **overrides):
    """A random tiny Llama (fp32, eval mode) and its config dict; biases, if any, are made non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.05)
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model, model.config.to_dict()


@pytest.fixture
def tiny():
    return tiny_llama
