"""``mergesmith extract-lora``: a PEFT LoRA adapter from the difference between two models
(``extract_lora(base, model, out_dir, rank=...)``, extract.py; imported on first use, it loads torch).
Reading adapters (``model+adapter`` references) is the bottom layer's (:mod:`mergesmith.core.lora`),
since every command reads such references.
"""

from mergesmith.core.lazy import lazy_exports

__all__ = ["extract_lora"]
__getattr__ = lazy_exports(__name__, {"extract_lora": "mergesmith.lora.extract"})
