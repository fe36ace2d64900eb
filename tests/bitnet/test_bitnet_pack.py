"""The 2-bit packing is exactly transformers' BitNet layout (checked with transformers' own code)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from mergesmith.core.bitnet.pack import pack_rows_into, pack_ternary, packed_rows, unpack_ternary


def _codes(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 64, 65, 66, 67])
def test_round_trip_and_transformers_layout(rows):
    codes = _codes(rows, 7, seed=rows)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_rows(rows), 7)
    assert torch.equal(unpack_ternary(packed, rows), codes)
    # byte-identical to transformers' packer (which mutates its input, hence the clone)
    assert torch.equal(packed, pack_weights(codes.clone().to(torch.int64)))
    # transformers' unpacker reads our bytes back: the first `rows` rows are our codes,
    # the padding slots of a short last chunk come back as -1 (bits 00)
    theirs = unpack_weights(packed, dtype=torch.float32)
    assert theirs.shape == (4 * packed_rows(rows), 7)
    assert torch.equal(theirs[:rows], codes.float())
    assert (theirs[rows:] == -1).all()


def test_documented_example_byte():
    """transformers' docstring: byte 0b10100001 holds 0, -1, 1, 1 at rows 0, 2, 4, 6 of 8 rows."""
    codes = torch.zeros(8, 1, dtype=torch.int8)
    codes[[0, 2, 4, 6], 0] = torch.tensor([0, -1, 1, 1], dtype=torch.int8)
    codes[[1, 3, 5, 7], 0] = torch.tensor([-1, -1, 0, 1], dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed[0, 0] == 0b10100001
    assert packed[1, 0] == 0b10010000


def test_one_dimensional_and_validation():
    codes = torch.tensor([1, -1, 0, 1, 1], dtype=torch.int8)
    assert torch.equal(unpack_ternary(pack_ternary(codes), 5), codes)
    with pytest.raises(ValueError, match="must be in"):
        pack_ternary(torch.tensor([[2]]))
    with pytest.raises(ValueError, match="do not pack"):
        unpack_ternary(pack_ternary(codes), 9)


@pytest.mark.parametrize("rows", [1, 4, 7, 13, 64, 67])
@pytest.mark.parametrize("step", [1, 3, 5, 100])
def test_packing_row_chunks_in_place_equals_packing_all(rows, step):
    """Row chunks ORed into a zeroed buffer (the streamed ternary merge output) give pack_ternary."""
    codes = _codes(rows, 5, seed=rows + step)
    packed = torch.zeros((packed_rows(rows), 5), dtype=torch.uint8)
    for r0 in range(0, rows, step):
        pack_rows_into(packed, codes[r0 : r0 + step], r0)
    assert torch.equal(packed, pack_ternary(codes))
