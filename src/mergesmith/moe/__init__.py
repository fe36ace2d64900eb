"""Building a sparse mixture of experts from dense fine-tunes; router initialisation without training.

``build_moe(config, out_dir)`` is the Python API of ``mergesmith moe``; see docs/moe.md. The names are
imported on first use, so that registering the command (``mergesmith --help``) does not load torch.
"""

from mergesmith.core.lazy import lazy_exports

__all__ = ["MoEConfig", "MoEResult", "build_moe", "load_moe_config", "make_moe_plan"]
__getattr__ = lazy_exports(
    __name__,
    {
        "MoEConfig": "mergesmith.moe.config",
        "load_moe_config": "mergesmith.moe.config",
        "MoEResult": "mergesmith.moe.build",
        "build_moe": "mergesmith.moe.build",
        "make_moe_plan": "mergesmith.moe.build",
    },
)
