"""One dtype vocabulary: tensor descriptions hold safetensors codes and refuse anything else."""

from pathlib import Path

import pytest
import torch

from mergesmith.core import dtypes
from mergesmith.core.model import TensorInfo
from mergesmith.core.write import TensorSpec


@pytest.mark.parametrize("wrong", [torch.bfloat16, "bfloat16", "bf16", None])
def test_descriptions_take_codes_only(wrong):
    with pytest.raises(TypeError, match="not a safetensors code"):
        TensorSpec("w", wrong, (2, 2))
    with pytest.raises(TypeError, match="not a safetensors code"):
        TensorInfo("w", wrong, (2, 2), Path("x.safetensors"), 0)


@pytest.mark.parametrize("code", sorted(dtypes.CODES))
def test_the_torch_boundary_round_trips(code):
    spec = TensorSpec("w", code, (3, 5))
    assert spec.code == code and dtypes.code_of(spec.dtype) == code
    assert spec.nbytes == 15 * spec.dtype.itemsize


def test_config_spellings_parse_to_codes():
    assert [dtypes.parse_code(n, "dtype") for n in ("bfloat16", "torch.float16", "fp32", None)] == [
        "BF16",
        "F16",
        "F32",
        None,
    ]
