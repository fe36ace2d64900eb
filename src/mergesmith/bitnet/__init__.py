"""``mergesmith bitnet``: export a model as BitNet b1.58 to a transformers ``quant_method: bitnet``
checkpoint or a GGUF file (convert.py, io.py, gguf_export.py, gguf_tokenizer.py), optionally after a
short quantisation-aware healing (heal.py), and a reference ternary forward (reference.py). The format
itself (quantisation, packing, layout, reading packed checkpoints) is the bottom layer's
(:mod:`mergesmith.core.bitnet`).
"""
