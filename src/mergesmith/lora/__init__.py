"""``mergesmith extract-lora``: a PEFT LoRA adapter from the difference between two models
(:func:`mergesmith.lora.extract.extract_lora`). Reading adapters (``model+adapter`` references) is the bottom layer's
(:mod:`mergesmith.core.lora`), since every command reads such references.
"""
