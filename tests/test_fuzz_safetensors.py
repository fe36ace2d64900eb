"""Fuzzing the safetensors reader against the safetensors library on the same bytes.

A small valid file's header is mutated (offsets, shapes, dtypes, the length field, JSON nesting,
metadata, raw bytes). For every mutant, either both read it and every tensor is byte-identical, or ours
raises a one-line MergeError; it never raises anything else and never accepts what the library rejects.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from mergesmith.core.errors import MergeError
from mergesmith.core.model import read_safetensors_header, read_tensor

TENSORS = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1.5, -2.0, 0.0, 4.0], dtype=torch.float16),
    "c": torch.tensor([7], dtype=torch.int64),
    "d": torch.zeros(0, dtype=torch.uint8),
}
VALID = save(TENSORS, metadata={"format": "pt"})
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN :]
# dtypes the library knows and mergesmith does not merge (accepting them is not required of us)
LIBRARY_ONLY_DTYPES = {"U16", "U32", "U64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "F8_E4M3FNUZ"}

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
small_int = st.one_of(
    st.integers(min_value=0, max_value=64), st.sampled_from([2**31, 2**32, 2**62, 2**64 - 1])
)
dtype_value = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "U16", "u8", "F8_E4M3"]),
    json_value,
)
shape_value = st.one_of(st.lists(small_int, max_size=3), st.lists(json_leaf, max_size=3), json_value)
offsets_value = st.one_of(
    st.lists(small_int, min_size=2, max_size=2), st.lists(json_leaf, max_size=3), json_value
)


@st.composite
def header_mutation(draw) -> dict:
    header = json.loads(json.dumps(HEADER))
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(
            st.sampled_from(["dtype", "shape", "offsets", "drop", "extra", "metadata", "entry", "swap"])
        )
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if kind in ("dtype", "shape", "offsets", "entry") and not isinstance(entry, dict):
            continue  # dropped or replaced by an earlier mutation
        if kind == "dtype":
            header[name]["dtype"] = draw(dtype_value)
        elif kind == "shape":
            header[name]["shape"] = draw(shape_value)
        elif kind == "offsets":
            header[name]["data_offsets"] = draw(offsets_value)
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "extra":
            header[draw(st.text(max_size=5))] = draw(json_value)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_value)
        elif kind == "entry":
            header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets", "x"]))] = draw(json_value)
        elif kind == "swap":
            other = draw(st.sampled_from(names))
            if isinstance(header.get(name), dict) and isinstance(header.get(other), dict):
                header[name]["data_offsets"], header[other]["data_offsets"] = (
                    header[other]["data_offsets"],
                    header[name]["data_offsets"],
                )
    return header


def encode(header_text: bytes, data: bytes = DATA, length: int | None = None) -> bytes:
    n = len(header_text) if length is None else length
    return struct.pack("<Q", n) + header_text + data


@st.composite
def mutant_file(draw) -> bytes:
    """A mutated header (structured), or raw damage: length field, nesting, truncation, bytes."""
    kind = draw(
        st.sampled_from(["header", "header", "length", "nesting", "truncate", "append", "byte", "text"])
    )
    if kind == "header":
        return encode(json.dumps(draw(header_mutation())).encode())
    header_text = VALID[8 : 8 + HEADER_LEN]
    if kind == "length":
        n = draw(st.one_of(st.integers(min_value=0, max_value=len(VALID) + 8), st.integers(0, 2**64 - 1)))
        return encode(header_text, length=n)
    if kind == "nesting":
        depth = draw(st.integers(min_value=1, max_value=3000))
        where = draw(st.sampled_from(["metadata", "shape", "top"]))
        nested = "[" * depth + "]" * depth
        if where == "top":
            text = '{"x":' + nested + "}"
        elif where == "metadata":
            text = '{"__metadata__":{"k":' + nested + "}}"
        else:
            text = '{"a":{"dtype":"F32","shape":' + nested + ',"data_offsets":[0,0]}}'
        return encode(text.encode(), b"")
    if kind == "truncate":
        return VALID[: draw(st.integers(min_value=0, max_value=len(VALID) - 1))]
    if kind == "append":
        return VALID + draw(st.binary(min_size=1, max_size=16))
    if kind == "byte":
        data = bytearray(VALID)
        i = draw(st.integers(min_value=0, max_value=8 + HEADER_LEN - 1))
        data[i] = draw(st.integers(min_value=0, max_value=255))
        return bytes(data)
    text = draw(
        st.sampled_from(
            [
                '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                '{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}',
                '{"\\ud800":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
                '{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
                '{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
                '  {"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}    ',
                '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x',
                "[]",
            ]
        )
    )
    return encode(text.encode("utf-8", "surrogatepass"), b"\x00\x00\x80\x3f")


def library_read(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from ``path``, or None if it rejects the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def our_read(path: Path) -> dict[str, torch.Tensor] | MergeError:
    try:
        infos = read_safetensors_header(path)
        return {name: read_tensor(info) for name, info in infos.items()}
    except MergeError as exc:
        return exc


def same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return x.reshape(-1).view(torch.uint8).tolist() == y.reshape(-1).view(torch.uint8).tolist()


def check_against_library(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(data)
        start = time.perf_counter()
        ours = our_read(path)
        assert time.perf_counter() - start < 5.0
        theirs = library_read(path)
    if isinstance(ours, MergeError):
        assert "\n" not in str(ours)
        if theirs is not None:  # we may refuse only dtypes the library knows and mergesmith does not use
            header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
            codes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
            assert codes & LIBRARY_ONLY_DTYPES, f"we refused what the library reads: {ours}"
        return
    assert theirs is not None, "we accepted a file the safetensors library rejects"
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert same_tensor(ours[name], theirs[name]), name


def test_the_valid_file_reads_like_the_library() -> None:
    check_against_library(VALID)


@settings(
    max_examples=400,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutant_file())
def test_mutated_headers_read_like_the_library_or_fail_in_one_line(data: bytes) -> None:
    check_against_library(data)


@pytest.mark.parametrize(
    "text, data, why",
    [
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\x00" * 12, "gap"),
        (
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            b"\x00" * 8,
            "overlaps",
        ),
        ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\x00" * 8, "after the last tensor"),
        ('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\x00" * 4, "non-negative"),
        ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\x00" * 4, "non-negative"),
        ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', b"\x00" * 4, "end before"),
        ('{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}', b"\x00" * 4, "dtype"),
        ('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}}', b"\x00" * 4, "needs 12"),
        ('{"__metadata__":{"k":1}}', b"", "__metadata__"),
        ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\x00" * 2, "truncated"),
    ],
)
def test_named_header_faults(tmp_path: Path, text: str, data: bytes, why: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(encode(text.encode(), data))
    assert library_read(path) is None  # the library refuses each of these too
    with pytest.raises(MergeError, match=why) as info:
        read_safetensors_header(path)
    assert "\n" not in str(info.value)


def test_a_huge_claimed_tensor_costs_nothing(tmp_path: Path) -> None:
    """A header that claims a 16 EiB tensor is refused from its numbers alone: nothing is read for it."""
    path = tmp_path / "m.safetensors"
    text = '{"a":{"dtype":"F64","shape":[2305843009213693951],"data_offsets":[0,18446744073709551608]}}'
    path.write_bytes(encode(text.encode(), b""))
    start = time.perf_counter()
    with pytest.raises(MergeError, match="truncated"):
        read_safetensors_header(path)
    assert time.perf_counter() - start < 1.0
    assert path.stat().st_size < 200  # nothing was reserved on disk either


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(MergeError, match="header length"):
        read_safetensors_header(path)
