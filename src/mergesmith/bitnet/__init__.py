"""``mergesmith bitnet``: export a model as BitNet b1.58 to a transformers ``quant_method: bitnet``
checkpoint or a GGUF file (export.py, convert.py, io.py, gguf_export.py, gguf_tokenizer.py), optionally
after a short quantisation-aware healing (heal.py), and a reference ternary forward (reference.py). The
format itself (quantisation, packing, layout, reading packed checkpoints) is the bottom layer's
(:mod:`mergesmith.core.bitnet`).

``convert_model(model, out_dir, format="hf", ...)`` is the Python API of the command; imported on first
use (it loads torch).
"""

from mergesmith.core.lazy import lazy_exports

__all__ = ["BitnetOptions", "convert_model"]
__getattr__ = lazy_exports(
    __name__, {"BitnetOptions": "mergesmith.bitnet.export", "convert_model": "mergesmith.bitnet.export"}
)
