"""The bottom layer: reading models (safetensors folders, sources, adapters), writing output folders,
dtypes, architecture facts, randomness, sizes, devices, errors and the numba-compiled loops. It imports
nothing from the layers above (methods, pipeline, features)."""
