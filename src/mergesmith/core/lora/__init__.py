"""Reading PEFT LoRA adapters and applying them to a model as it is read (``model+adapter`` references,
opened by :func:`mergesmith.core.sources.open_source`).

The adapter format is PEFT's: ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r), or
``...lora_embedding_A`` (r x vocab) and ``...lora_embedding_B`` (dim x r) for embeddings. It lives at the
bottom because every command reads ``model+adapter`` references; writing adapters (``extract-lora``) is
the ``mergesmith.lora`` feature.
"""
