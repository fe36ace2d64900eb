"""PEFT LoRA adapters: applied to a model on the fly (``model+adapter`` references) and extracted from the
difference between two models (``mergesmith extract-lora``).

The adapter format is PEFT's: ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r), or
``...lora_embedding_A`` (r x vocab) and ``...lora_embedding_B`` (dim x r) for embeddings.
"""
