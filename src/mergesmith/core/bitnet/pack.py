"""Pack four ternary values per byte in the layout of transformers' BitNet integration.

Layout (``transformers.integrations.bitnet.pack_weights`` / ``unpack_weights``), for a tensor of
``rows`` rows (dim 0) and any trailing shape:

* ``R = ceil(rows / 4)`` packed rows; the packed tensor has shape ``(R, *trailing)``, dtype uint8;
* rows are split into 4 consecutive chunks ``[0, R)``, ``[R, 2R)``, ``[2R, 3R)``, ``[3R, rows)``;
* the value ``t`` of row ``i*R + r`` is stored as ``t + 1`` in {0, 1, 2}, in bits ``2i .. 2i+1`` of
  packed row ``r`` (same column).

So byte ``b`` at (r, c) unpacks to rows r, R+r, 2R+r, 3R+r as ``((b >> 2i) & 3) - 1``.

Rows that are not a multiple of 4: the last chunk is short and its missing slots hold bits ``00``,
exactly as transformers packs them. transformers' unpack always returns ``4R`` rows, so those slots
come back as ``-1`` there; :func:`unpack_ternary` takes the true row count and drops them. Note that
transformers can only *load* packed linear weights whose ``out_features`` is a multiple of 4
(``BitLinear`` allocates ``out_features // 4`` rows and ``BitNetDeserialize`` only unpacks when
``4R == out_features``), so the exporter keeps such layers in high precision.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

VALUES_PER_BYTE = 4


def packed_rows(rows: int) -> int:
    """Number of packed rows for ``rows`` ternary rows: ``ceil(rows / 4)``."""
    return (rows + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in {-1, 0, 1} (any integer or float dtype, ``ndim >= 1``) into uint8.

    Returns a tensor of shape ``(ceil(rows/4), *codes.shape[1:])``. Does not modify ``codes``.
    """
    if codes.ndim < 1:
        raise ValueError("pack_ternary needs at least one dimension")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_ternary: codes must be in {-1, 0, 1}")
    rows = codes.shape[0]
    r = packed_rows(rows)
    biased = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((r, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        chunk = biased[i * r : (i + 1) * r]
        if chunk.shape[0]:
            packed[: chunk.shape[0]] |= chunk << (2 * i)
    return packed


def unpack_chunk(packed: torch.Tensor, i: int) -> torch.Tensor:
    """Codes (int8) of chunk ``i`` of ``packed`` (or of a block of its rows): rows ``i*R + r``."""
    return (((packed >> (2 * i)) & 3).to(torch.int8)) - 1


def unpack_ternary(
    packed: torch.Tensor, rows: int | None = None, dtype: torch.dtype = torch.int8
) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: codes of shape ``(rows, *packed.shape[1:])``.

    ``rows`` defaults to ``4 * packed.shape[0]`` (what transformers returns); it must satisfy
    ``ceil(rows / 4) == packed.shape[0]``.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_ternary expects uint8, got {packed.dtype}")
    r = packed.shape[0]
    if rows is None:
        rows = r * VALUES_PER_BYTE
    if packed_rows(rows) != r:
        raise ValueError(f"{rows} rows do not pack into {r} packed rows")
    codes = torch.cat([unpack_chunk(packed, i) for i in range(VALUES_PER_BYTE)], dim=0)[:rows]
    return codes.to(dtype)


def chunk_spans(rows: tuple[int, int], packed: int) -> Iterator[tuple[int, int, int]]:
    """Where rows ``[u0, u1)`` of a matrix with ``packed`` packed rows ``R`` live: the pieces
    ``(chunk i, first packed row, end packed row)``, in row order. Row ``u`` is 2-bit chunk
    ``u // R`` of packed row ``u % R``."""
    u0, u1 = rows
    if u1 <= u0:
        return
    for i in range(u0 // packed, (u1 - 1) // packed + 1):
        lo, hi = max(u0, i * packed), min(u1, (i + 1) * packed)
        yield i, lo - i * packed, hi - i * packed


def pack_rows_into(packed: torch.Tensor, codes: torch.Tensor, row0: int) -> None:
    """OR the codes of rows ``[row0, row0 + len(codes))`` into ``packed`` (uint8, zero where no row was
    packed yet), in place. Packing every row once this way gives :func:`pack_ternary` of all rows."""
    r = packed.shape[0]
    for i, p0, p1 in chunk_spans((row0, row0 + codes.shape[0]), r):
        block = codes[i * r + p0 - row0 : i * r + p1 - row0]
        packed[p0:p1] |= (block.to(torch.int16) + 1).to(torch.uint8) << (2 * i)
