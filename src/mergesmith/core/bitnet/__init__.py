"""The BitNet b1.58 format: absmean ternary quantisation (quant.py), transformers-compatible 2-bit packing
(pack.py), the transformers ``quant_method: bitnet`` layout (hf.py) and reading packed checkpoints as float
weights (source.py, opened by :func:`mergesmith.core.sources.open_source`). It lives at the bottom because
the merge reads such checkpoints and writes them (``--out-format bitnet``); the ``bitnet`` command (export
to transformers or GGUF, healing) is the ``mergesmith.bitnet`` feature.
"""
