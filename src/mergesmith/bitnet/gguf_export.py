"""GGUF export for llama.cpp: ternary matrices as TQ2_0 / TQ1_0, the rest as F32/F16/BF16.

Formats (llama.cpp ``ggml-common.h``; numpy code in the ``gguf`` package's ``quants.py``, which this
module calls, and whose ``dequantize`` the tests use to read the file back):

* TQ2_0: blocks of 256 weights in 66 bytes: ``qs[64]`` with 2-bit codes ``t + 1`` (byte ``m`` of each
  32-byte group holds elements ``m + 32 n`` in bits ``2n..2n+1``) and one fp16 ``d``: 2.0625 bits/weight.
* TQ1_0: 256 weights in 54 bytes, five (then four) trits per byte in base 3, plus fp16 ``d``:
  1.6875 bits/weight.

``d`` is the block **absmax**, so the weights are absmean-ternarised first and then handed to gguf's
quantiser as ``gamma * W~``: every block that is not all zero gets ``d = fp16(gamma)`` and codes ``W~``
exactly. A GGUF row (``in_features``) must be a multiple of 256; other matrices are written in high
precision.

Llama specifics: tensor names follow ``gguf``'s own name map (``blk.N.attn_q.weight``...), and the
rows of ``q_proj``/``k_proj`` are permuted from transformers' rotate-half RoPE layout to llama.cpp's
interleaved one (head by head, the two halves of each head are interleaved), which is what
transformers' GGUF loader undoes when it reads llama files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mergesmith.core.bitnet.constants import QTYPES
from mergesmith.core.bitnet.quant import Ternary

BLOCK = 256
GGUF_ARCH = {"llama": "llama", "mistral": "llama"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a declared dependency
        raise ImportError("GGUF export needs the 'gguf' package: pip install gguf") from exc
    return gguf


def ggml_type(qtype: str) -> Any:
    """``GGMLQuantizationType`` for ``"tq2_0"`` or ``"tq1_0"``."""
    gguf = _gguf()
    if qtype not in QTYPES:
        raise ValueError(f"GGUF ternary type must be one of {QTYPES}, got {qtype!r}")
    return gguf.GGMLQuantizationType[qtype.upper()]


def gguf_architecture(config: Mapping[str, Any]) -> str:
    """The llama.cpp architecture for ``config``; ValueError for those not supported here."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise ValueError(
            f"GGUF export supports llama-architecture models ({', '.join(GGUF_ARCH)}), not {model_type!r}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type != "default":
        raise ValueError(f"GGUF export does not handle rope_type {rope_type!r} yet")
    return GGUF_ARCH[model_type]


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_theta(config: Mapping[str, Any]) -> float:
    rope = config.get("rope_parameters")
    if isinstance(rope, Mapping) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def llama_metadata(
    config: Mapping[str, Any], qtype: str, name: str = "model", file_type: Any = None
) -> list[tuple[str, Any, Any]]:
    """Key/value metadata (``(key, value, GGUFValueType)``) of a llama GGUF; ``general.architecture``
    itself is written by ``GGUFWriter``. ``file_type`` (a ``LlamaFileType``, see
    :func:`gguf_file_type`) defaults to ``MOSTLY_<qtype>``."""
    gguf = _gguf()
    vt = gguf.GGUFValueType
    if file_type is None:
        file_type = gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]
    heads = int(config["num_attention_heads"])
    head_dim = _head_dim(config)
    kv: list[tuple[str, Any, Any]] = [
        ("general.name", name, vt.STRING),
        ("general.file_type", int(file_type), vt.UINT32),
        ("general.quantization_version", gguf.GGML_QUANT_VERSION, vt.UINT32),
        ("llama.vocab_size", int(config["vocab_size"]), vt.UINT32),
        ("llama.context_length", int(config.get("max_position_embeddings", 2048)), vt.UINT32),
        ("llama.embedding_length", int(config["hidden_size"]), vt.UINT32),
        ("llama.block_count", int(config["num_hidden_layers"]), vt.UINT32),
        ("llama.feed_forward_length", int(config["intermediate_size"]), vt.UINT32),
        ("llama.attention.head_count", heads, vt.UINT32),
        ("llama.attention.head_count_kv", int(config.get("num_key_value_heads") or heads), vt.UINT32),
        ("llama.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), vt.FLOAT32),
        ("llama.rope.freq_base", _rope_theta(config), vt.FLOAT32),
        ("llama.rope.dimension_count", head_dim, vt.UINT32),
    ]
    if head_dim * heads != int(config["hidden_size"]):
        kv.append(("llama.attention.key_length", head_dim, vt.UINT32))
        kv.append(("llama.attention.value_length", head_dim, vt.UINT32))
    return kv


def gguf_tensor_name(hf_name: str, n_blocks: int, arch: str = "llama") -> str:
    """llama.cpp name of a transformers tensor (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``); ValueError for a tensor llama.cpp has no slot for."""
    gguf = _gguf()
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF {arch} tensor for {hf_name}")
    return name


def rope_permute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from rotate-half to interleaved RoPE order.

    Within each head of ``d`` rows, row ``j`` of the first half goes to ``2j`` and row ``d/2 + j`` to
    ``2j + 1``. Works on codes, weights and biases alike (only dim 0 moves).
    """
    shape = rows.shape
    head_dim = shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rope_heads(hf_name: str, config: Mapping[str, Any]) -> int | None:
    heads = int(config["num_attention_heads"])
    if ".q_proj." in hf_name:
        return heads
    if ".k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or heads)
    return None


def ternary_fits(shape: tuple[int, ...]) -> bool:
    """TQ blocks run along a row: ``in_features`` must be a multiple of 256."""
    return len(shape) == 2 and shape[1] % BLOCK == 0


def quantize_ternary(ternary: Ternary, qtype: str) -> np.ndarray:
    """Raw TQ blocks (uint8, shape (rows, in/256 * block bytes)) of ``gamma * W~`` via gguf's quantiser."""
    gguf = _gguf()
    data = (ternary.codes.to(torch.float32) * ternary.scale.to(torch.float32)).numpy()
    return gguf.quants.quantize(data, ggml_type(qtype))


def float_array(tensor: torch.Tensor) -> tuple[np.ndarray, Any]:
    """High-precision GGUF storage: 1-D tensors and float32 as F32, float16 as F16, bfloat16 as BF16."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    if tensor.ndim <= 1 or tensor.dtype not in (torch.float16, torch.bfloat16):
        return tensor.detach().to(torch.float32).numpy(), t.F32
    if tensor.dtype == torch.float16:
        return tensor.detach().numpy(), t.F16
    return gguf.quants.quantize(tensor.detach().to(torch.float32).numpy(), t.BF16), t.BF16


@dataclass(frozen=True)
class GgufLayout:
    """What :func:`gguf_tensor` will produce for one tensor, known from its name, shape and dtype
    alone: the GGUF name, the numpy array's shape, dtype and byte size, and the GGML type. A GGUF
    writer needs all of them before the first tensor's data."""

    name: str
    shape: tuple[int, ...]
    np_dtype: Any
    nbytes: int
    ggml_type: Any
    weights: int = 0  # elements of a 2-D tensor (0 for 1-D ones), for :func:`gguf_file_type`


def gguf_layout(
    hf_name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ternary: bool,
    config: Mapping[str, Any],
    qtype: str = "tq2_0",
) -> GgufLayout:
    """The :class:`GgufLayout` of ``gguf_tensor(hf_name, ...)`` for a tensor of ``shape`` and ``dtype``
    (``ternary``: written as ``qtype``; else as :func:`float_array` stores it)."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    name = gguf_tensor_name(hf_name, int(config["num_hidden_layers"]), gguf_architecture(config))
    numel = math.prod(shape)
    weights = numel if len(shape) == 2 else 0
    if ternary:
        kind = ggml_type(qtype)
    elif len(shape) <= 1 or dtype not in (torch.float16, torch.bfloat16):
        return GgufLayout(name, tuple(shape), np.dtype(np.float32), 4 * numel, t.F32, weights)
    elif dtype == torch.float16:
        return GgufLayout(name, tuple(shape), np.dtype(np.float16), 2 * numel, t.F16, weights)
    else:
        kind = t.BF16
    byte_shape = tuple(gguf.quants.quant_shape_to_byte_shape(shape, kind))
    return GgufLayout(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), kind, weights)


def gguf_file_type(layouts: Sequence[GgufLayout]) -> tuple[Any, dict[str, int]]:
    """``general.file_type`` and the 2-D weights per storage type (``{"TQ2_0": n, "F16": m}``).

    llama.cpp's file types say which type *most* weights have ("mostly F16, except 1-D tensors");
    when llama.cpp finds no file type it names the most common tensor type. Here the type that holds
    the most 2-D weights wins, so a model whose matrices mostly stayed high precision (rows not a
    multiple of 256) is not labelled TQ2_0."""
    gguf = _gguf()
    counts: dict[str, int] = {}
    for lay in layouts:
        if lay.weights:
            counts[lay.ggml_type.name] = counts.get(lay.ggml_type.name, 0) + lay.weights
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
    top = max(counts, key=lambda k: counts[k]) if counts else "F32"
    return gguf.LlamaFileType[names.get(top, f"MOSTLY_{top}")], counts


def gguf_tensor(
    hf_name: str,
    tensor: torch.Tensor | None,
    ternary: Ternary | None,
    config: Mapping[str, Any],
    qtype: str = "tq2_0",
) -> tuple[str, np.ndarray, Any]:
    """One GGUF tensor ``(name, array, GGMLQuantizationType)`` for the llama architecture.

    Give ``ternary`` for a ternarised weight (written as ``qtype``), else ``tensor`` (high precision).
    q/k rows are permuted to llama.cpp's RoPE order.
    """
    arch = gguf_architecture(config)
    name = gguf_tensor_name(hf_name, int(config["num_hidden_layers"]), arch)
    heads = _rope_heads(hf_name, config)
    if ternary is not None:
        codes = ternary.codes if heads is None else rope_permute(ternary.codes, heads)
        return name, quantize_ternary(Ternary(codes, ternary.scale), qtype), ggml_type(qtype)
    assert tensor is not None
    if heads is not None:
        tensor = rope_permute(tensor, heads)
    array, kind = float_array(tensor)
    return name, array, kind
