"""``model+adapter``: a model with a PEFT LoRA adapter applied tensor by tensor, as it is read.

The planner and executor see an ordinary model source: the same tensor names, shapes and dtypes as the
base model. Reading a targeted weight returns ``W + scale * B @ A`` (or its transpose for Conv1D weights and
embeddings); a row range reads only those rows of W and of B. No merged copy is written to disk, which
mergekit needs (``--lora-merge-cache``) and which costs a full model of disk and time per adapter.

Arithmetic: W and the delta are added in float32 and rounded to W's dtype once. PEFT's merge_and_unload
rounds the delta to W's dtype first, so float16/bfloat16 results can differ from PEFT's by one unit in the
last place; float32 results match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from mergesmith.core.arch import tie_word_embeddings
from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.core.lora.adapter import Adapter, LoraFactors
from mergesmith.core.lora.modules import ModuleKind, module_kinds
from mergesmith.core.model import ModelSource, TensorInfo, read_tensor, resolve_model_dir


def split_lora_ref(ref: str) -> tuple[str, str | None]:
    """``model+adapter`` -> (model, adapter); a reference without ``+`` (or an existing path) -> (ref, None)."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, None
    model, _, adapter = ref.partition("+")
    if not model or not adapter:
        raise ConfigError(f"model {ref!r}: a LoRA reference is MODEL+ADAPTER, with both parts given")
    return model, adapter


def resolve_adapter_dir(ref: str) -> Path:
    """A local adapter folder, or a Hub adapter through the same cache/download path as models."""
    try:
        return resolve_model_dir(ref)
    except MergeError as exc:
        raise MergeError(f"LoRA adapter: {exc}") from None


@dataclass(frozen=True)
class Patch:
    """How to produce one patched tensor: a whole replacement, a low-rank delta, or both."""

    replacement: TensorInfo | None = None
    factors: LoraFactors | None = None
    scale: float = 1.0
    transposed: bool = False  # the weight is stored (in, out): delta = (B @ A).T


class LoraModelSource(ModelSource):
    """A model source whose reads apply a LoRA adapter. Same interface as :class:`ModelSource`."""

    def __init__(self, ref: str, base: ModelSource, adapter: Adapter):
        super().__init__(ref, base.path)
        self.base = base
        self.adapter = adapter
        self.patches = _plan_patches(ref, base, adapter)

    @classmethod
    def open(  # type: ignore[override]
        cls,
        ref: str,
        base: ModelSource | None = None,
        open_model: Callable[[str], ModelSource] = ModelSource.open,
    ) -> LoraModelSource:
        """Open ``model+adapter``; ``base`` may be given already opened (a planned stage's output), else
        ``open_model`` opens it (:func:`mergesmith.core.sources.open_source` passes its own, which knows
        packed BitNet checkpoints)."""
        model_ref, adapter_ref = split_lora_ref(ref)
        if adapter_ref is None:
            raise ConfigError(f"model {ref!r}: not a MODEL+ADAPTER reference")
        adapter = Adapter.open(adapter_ref, resolve_adapter_dir(adapter_ref))
        return cls(ref, base if base is not None else open_model(model_ref), adapter)

    def __repr__(self) -> str:
        return f"LoraModelSource({self.ref!r})"

    @cached_property
    def config(self) -> dict:
        return self.base.config

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The base tensor (rows [r0, r1) if given), with the adapter's replacement and delta applied."""
        patch = self.patches.get(name)
        if patch is None:
            return self.base.read(name, rows)
        info = self.base.tensors[name]
        if patch.replacement is not None:
            w = self._read_adapter(patch.replacement, rows)
        else:
            w = self.base.read(name, rows)
        if patch.factors is None:
            return w.to(info.dtype)
        delta = self._delta(patch, rows, torch.float64 if w.dtype == torch.float64 else torch.float32)
        # summed into the delta's buffer (addition commutes exactly): one float32 copy of the rows, not two
        return delta.add_(w).to(info.dtype)

    def _delta(self, patch: Patch, rows: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
        """scale * B @ A for the requested rows of the weight (PEFT's order of operations)."""
        f = patch.factors
        assert f is not None
        if patch.transposed:  # rows of (B @ A).T are columns of B @ A, so only those columns of A are read
            a = self._read_columns(f.a, rows) if rows is not None else self._read_adapter(f.a)
            delta = (self._read_adapter(f.b).to(dtype) @ a.to(dtype)).T
        else:
            delta = self._read_adapter(f.b, rows).to(dtype) @ self._read_adapter(f.a).to(dtype)
        return delta.mul_(patch.scale)

    def _read_adapter(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return read_tensor(info, rows, self._fd(info.file))

    def _read_columns(self, info: TensorInfo, cols: tuple[int, int]) -> torch.Tensor:
        """Columns [c0, c1) of a 2-D adapter tensor: one small read per row (r rows of a vocabulary-wide A)."""
        (c0, c1), (n_rows, n_cols) = cols, info.shape
        size = info.itemsize
        parts = [
            read_tensor(
                TensorInfo(
                    info.name, info.code, (c1 - c0,), info.file, info.offset + (i * n_cols + c0) * size
                ),
                None,
                self._fd(info.file),
            )
            for i in range(n_rows)
        ]
        return torch.stack(parts)

    def wrapped(self) -> list[ModelSource]:
        return [self.base]

    def close(self) -> None:
        super().close()
        self.base.close()

    def tokenizer_files(self) -> list[Path]:
        return self.base.tokenizer_files()


def _plan_patches(ref: str, base: ModelSource, adapter: Adapter) -> dict[str, Patch]:
    """Map every adapter module and whole tensor to a model tensor, checking shapes before any data."""
    tensors = base.tensors
    kinds = module_kinds(base.config) or {}
    conv_model = any(k == "conv1d" for k in kinds.values())
    replacements: dict[str, TensorInfo] = {}
    for key, info in adapter.full.items():
        name = _tensor_name(ref, base, key, "")
        if tensors[name].shape != info.shape:
            raise MergeError(
                f"model {ref!r}: adapter tensor {key!r} has shape {list(info.shape)} but the model's "
                f"{name!r} has {list(tensors[name].shape)} (a resized vocabulary is not supported)"
            )
        replacements[name] = info
    patches: dict[str, Patch] = {}
    for module, f in adapter.factors.items():
        name = _tensor_name(ref, base, module, ".weight")
        transposed = _orientation(ref, name, tensors[name].shape, f, kinds.get(module), conv_model, adapter)
        scale = adapter.settings.scale(module)
        patches[name] = Patch(replacements.pop(name, None), f, scale, transposed)
    for name, info in replacements.items():
        patches[name] = Patch(replacement=info)
    return patches


def _tensor_name(ref: str, base: ModelSource, module: str, suffix: str) -> str:
    """The model's tensor for a PEFT module path: exact, else the one tensor ending with it."""
    tensors = base.tensors
    name = module + suffix
    if name in tensors:
        return name
    matches = [n for n in tensors if n.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if name.endswith("lm_head.weight") and tie_word_embeddings(base.config):
        raise MergeError(
            f"model {ref!r}: the adapter changes {name!r}, which this model ties to its input embeddings; "
            "a LoRA on a tied lm_head is not supported"
        )
    raise MergeError(
        f"model {ref!r}: the adapter has {'tensor' if not suffix else 'module'} {module!r} but the model has no "
        f"tensor {name!r}; is the adapter for another architecture?"
    )


def _orientation(
    ref: str,
    name: str,
    shape: tuple[int, ...],
    f: LoraFactors,
    kind: ModuleKind | None,
    conv_model: bool,
    adapter: Adapter,
) -> bool:
    """Whether delta = (B @ A).T for this weight: embeddings and Conv1D (fan_in_fan_out) weights are.

    For square weights the shape cannot tell, so the module's kind decides (as PEFT's layer classes do),
    or, for an architecture transformers cannot build, the adapter's ``fan_in_fan_out``.
    """
    out_dim, in_dim = f.b.shape[0], f.a.shape[1]
    normal, transposed = (out_dim, in_dim), (in_dim, out_dim)
    if f.embedding or kind == "embedding":
        want = True
    elif kind == "conv1d":
        want = True
    elif kind == "linear":
        want = False
    elif normal != transposed:
        want = shape == transposed
    else:
        want = adapter.settings.fan_in_fan_out or conv_model
    if shape != (transposed if want else normal):
        expected = list(transposed if want else normal)
        raise MergeError(
            f"model {ref!r}: tensor {name!r} has shape {list(shape)} but adapter module {f.module!r} makes a "
            f"delta of shape {expected}; is the adapter for another model size?"
        )
    return want
