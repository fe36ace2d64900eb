"""All file I/O of the BitNet exporter, in one place.

Temporary: the core engine's streaming reader (``mergesmith.model``) and sharded atomic writer
(``mergesmith.write``) will replace :class:`SafetensorsFolder`, :func:`write_hf_folder` and
:func:`atomic_output_dir`; the rest of :mod:`mergesmith.bitnet` only sees tensors and dicts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import MergeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
"""Files of the input folder that are not copied to the output (weights and their indexes)."""


class SafetensorsFolder:
    """A local model folder: ``config.json`` plus ``*.safetensors`` (single file or sharded with
    ``model.safetensors.index.json``). Tensors are read one at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"{self.path}: not a model folder (only local folders are supported)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise MergeError(f"{self.path}: no config.json")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise MergeError(f"{config_path}: invalid JSON ({exc})") from exc
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MergeError(f"{self.path}: no .safetensors weights (convert .bin checkpoints first)")
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        sl = f.get_slice(name)
                        self._where[name] = file
                        self._shapes[name] = tuple(sl.get_shape())
                        self._dtypes[name] = _dtype_from_safetensors(sl.get_dtype())
            except Exception as exc:  # safetensors raises its own error types
                raise MergeError(f"{file}: cannot read safetensors header ({exc})") from exc
        self._open: dict[Path, Any] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._where[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_tensor(name)

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in set(self._where.values()))

    def extra_files(self) -> list[Path]:
        """Files to copy beside the converted weights: tokenizer, generation config, README..."""
        return [
            p
            for p in sorted(self.path.iterdir())
            if p.is_file()
            and p.name != "config.json"
            and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json")
        ]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype_from_safetensors(name: str) -> torch.dtype:
    return _SAFETENSORS_DTYPES.get(name, torch.float32)


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; when the block ends without error it becomes
    ``out_dir`` by rename (replacing an existing one only with ``overwrite``). On error the temporary
    folder is removed and ``out_dir`` is untouched."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise MergeError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_hf_folder(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_files: Iterable[Path] = (),
) -> None:
    """Write ``model.safetensors``, ``config.json`` and copies of ``extra_files`` into ``folder``."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    for src in extra_files:
        shutil.copy2(src, folder / src.name)


def write_gguf_file(
    path: Path,
    arch: str,
    metadata: Iterable[tuple[str, Any, Any]],
    tensors: Iterable[tuple[str, Any, Any]],
) -> None:
    """Write a GGUF file: ``metadata`` is (key, value, GGUFValueType) and ``tensors`` is
    (name, numpy array, GGMLQuantizationType) where quantised arrays hold the raw block bytes."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value, vtype in metadata:
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for name, array, qtype in tensors:
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_json(path: Path) -> Any:
    """Parse a JSON file, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None
