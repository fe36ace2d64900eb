"""Building a sparse mixture of experts from dense fine-tunes; router initialisation without training.

``build_moe(config, out_dir)`` is the Python API of ``mergesmith moe``; see docs/moe.md.
"""

from mergesmith.moe.build import MoEResult, build_moe, make_moe_plan
from mergesmith.moe.config import MoEConfig, load_moe_config

__all__ = ["MoEConfig", "MoEResult", "build_moe", "load_moe_config", "make_moe_plan"]
