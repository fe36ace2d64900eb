"""``mergesmith tokensurgeon``: give a model another model's tokenizer (``transplant_tokenizer(model,
donor, out_dir, ...)``, surgeon.py). The vocabulary logic (reading tokenizers, row maps, OMP) is the bottom
layer's (:mod:`mergesmith.core.vocab`), shared with merges that take ``tokenizer_source``.
"""

from mergesmith.core.lazy import lazy_exports

__all__ = ["transplant_tokenizer"]
__getattr__ = lazy_exports(__name__, {"transplant_tokenizer": "mergesmith.tokens.surgeon"})
