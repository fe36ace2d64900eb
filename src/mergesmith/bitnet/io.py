"""The BitNet exporter's own file helpers: what to copy beside the weights, and the GGUF file writer.

Model folders are read with :mod:`mergesmith.core.model` and safetensors output is written with
:mod:`mergesmith.core.write` (sharded, into an atomic temporary folder), like every other mergesmith output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.core.dtypes import code_of
from mergesmith.core.errors import MergeError
from mergesmith.core.model import model_file, read_json_file, regular_file

if TYPE_CHECKING:
    from mergesmith.bitnet.convert import HfPlan, LayerStat, TensorSource

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
"""Files of the input folder that are not copied to the output (weights and their indexes)."""


def extra_files(folder: Path, ref: str) -> list[Path]:
    """Files to copy beside the converted weights: tokenizer, generation config, README... Each is checked
    to lie inside the model folder (a symlink out is refused); Python files (remote code that the
    output's config no longer names) are not copied."""
    names = [
        p.name
        for p in sorted(folder.iterdir())
        if p.name != "config.json"
        and not p.name.endswith((*WEIGHT_SUFFIXES, ".py"))
        and not p.name.endswith(".index.json")
    ]
    return [f for f in (model_file(folder, n, ref) for n in names) if regular_file(f)]


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(folder: Path, name: str, ref: str) -> Any:
    """Parse JSON file ``name`` of a model folder (checked to lie inside it), or None when it does not
    exist; an unreadable or malformed file is a one-line error."""
    path = model_file(folder, name, ref)
    return read_json_file(path, f"model {ref!r}: {name}") if regular_file(path) else None


def write_gguf_stream(
    path: Path,
    arch: str,
    metadata: Iterable[tuple[str, Any, Any]],
    layouts: Sequence[Any],
    tensors: Iterable[tuple[str, Any, Any]],
) -> None:
    """Write a GGUF file without holding its tensors: the header and tensor infos come from
    ``layouts`` (:class:`mergesmith.bitnet.gguf_export.GgufLayout`, in order), then each tensor of
    ``tensors`` (``(name, numpy array, GGMLQuantizationType)``, same order) is written as it arrives.

    ``metadata`` is ``(key, value, GGUFValueType)``; quantised arrays hold the raw block bytes.
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        for key, value, vtype in metadata:
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_array(key, value)
            else:
                writer.add_key_value(key, value, vtype)
        for lay in layouts:
            writer.add_tensor_info(lay.name, lay.shape, lay.np_dtype, lay.nbytes, raw_dtype=lay.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        count = 0
        for lay, (name, array, qtype) in zip(layouts, tensors, strict=False):
            if (name, tuple(array.shape), array.dtype, qtype) != (
                lay.name,
                lay.shape,
                lay.np_dtype,
                lay.ggml_type,
            ):
                raise MergeError(f"internal error: GGUF tensor {name} does not match its planned layout")
            writer.write_tensor_data(array)
            count += 1
        if count != len(layouts):
            raise MergeError(f"internal error: {count} GGUF tensors written, {len(layouts)} planned")
    finally:
        writer.close()


def write_hf_stream(folder: Path, source: TensorSource, plan: HfPlan, shard_bytes: int) -> list[LayerStat]:
    """Write the safetensors shards of a planned transformers export into ``folder``: the shards are
    laid out from ``plan.specs`` and each converted tensor is written at its offset as soon as it
    exists (one input tensor in memory at a time). Returns the ternarised layers' statistics."""
    from mergesmith.bitnet.convert import iter_hf_tensors
    from mergesmith.core.write import ShardedWriter

    specs = {s.name: s for s in plan.specs}
    stats: list[LayerStat] = []
    writer = ShardedWriter(folder, plan.specs, shard_bytes)
    try:
        for tensors, stat, _ in iter_hf_tensors(source, plan):
            for name, tensor in tensors.items():
                spec = specs[name]
                if (code_of(tensor.dtype), tuple(tensor.shape)) != (spec.code, spec.shape):
                    raise MergeError(f"internal error: {name} does not match its planned dtype and shape")
                writer.write(name, tensor)
            if stat is not None:
                stats.append(stat)
        writer.finish()
    finally:
        writer.close()
    return stats
