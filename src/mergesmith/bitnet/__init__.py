"""BitNet b1.58: absmean ternary quantisation, transformers-compatible 2-bit packing, export to a
transformers ``quant_method: bitnet`` checkpoint or a GGUF file, and a reference ternary forward."""
