"""Output families: which transformers MoE class an MoE is written as, its config and tensor names.

Only this table knows family names; everything else (which base tensors the output keeps, with which
shapes) is checked against the output class itself, instantiated on the meta device from the config we
are about to write.

Expert tensors are written in the per-expert layout that transformers' own ``save_pretrained`` writes
(and that transformers 4.x, vLLM and llama.cpp's converter read); transformers 5 fuses them at load time.
``fused=True`` writes transformers 5's in-memory layout instead (``mlp.experts.gate_up_proj`` [E, 2I, d]
with gate rows before up rows, ``mlp.experts.down_proj`` [E, d, I]), as mergekit 0.1.5 does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mergesmith.core.errors import MergeError

PROJECTIONS = ("gate", "up", "down")
#: config.json keys that describe a dense model's MLP or identity and have no meaning in the MoE config.
DROPPED_KEYS = ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map")


#: Router settings every family gets where it has the key: top-k weights renormalised to sum to 1 (Mixtral
#: always does), and every layer sparse.
SPARSE_EVERYWHERE = (("norm_topk_prob", True), ("decoder_sparse_step", 1), ("mlp_only_layers", []))


@dataclass(frozen=True)
class Family:
    """One MoE output: its names, the dense families it accepts, and how its tensors are named."""

    name: str  # as in mergekit's `architecture:` ("Mixtral", "Qwen MoE", "Qwen3 MoE")
    model_type: str
    architecture: str
    inputs: tuple[str, ...]  # model_type of the dense base and experts
    block: str  # the per-expert layout's name of the sparse block ("block_sparse_moe" / "mlp")
    expert_names: tuple[str, str, str]  # per-expert names of gate, up, down projections
    count_key: str  # config key of the number of experts
    settings: tuple[tuple[str, Any], ...] = ()  # fixed config keys
    expert_size_key: str | None = (
        None  # config key of the experts' intermediate size, if not intermediate_size
    )
    bias_key: str | None = None  # config key saying whether q/k/v have biases, if the class can have them
    #: the router's name in the checkpoint and in transformers 5's memory, under the layer
    router: str = "mlp.gate.weight"
    memory_router: str = "mlp.gate.weight"
    #: the experts' block in transformers 5's memory (``<it>.gate_up_proj``, ``<it>.down_proj``)
    memory_experts: str = "mlp.experts"
    #: checkpoint names of stacked experts [E, 2I, d] and [E, d, I], for families whose checkpoints hold
    #: them stacked (GraniteMoE); None: one tensor per expert and projection
    stacked: tuple[str, str] | None = None
    #: how the shared expert is written: "qwen" (sigmoid-gated), "deepseek" (always on, a multiple of the
    #: experts' width), "granite" (always on, stacked gate/up)
    shared_style: str | None = None
    #: a zero score-correction bias [E] the router keeps (DeepSeek-V3, GLM4-MoE)
    score_bias: str | None = None
    #: the router weighs the top-k by sigmoid(z) / sum instead of softmax: see gates.shift_for_sigmoid
    sigmoid_gate: bool = False
    #: why the family is refused whatever the inputs (no dense family shares its trunk, ...)
    refusal: str | None = None

    @property
    def shared_expert(self) -> bool:
        """Whether the class has a (single) shared expert: it has a way to write one."""
        return self.shared_style is not None

    def matches(self, wanted: str) -> bool:
        """mergekit's rule: ``architecture`` is a case-insensitive prefix of the name; the model_type
        (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``flex_olmo``, ...) also works."""
        w = wanted.strip().lower()
        return self.name.lower().startswith(w) or self.model_type == w

    def expert_tensor(self, layer_prefix: str, expert: int, proj: str) -> str:
        name = self.expert_names[PROJECTIONS.index(proj)]
        return f"{layer_prefix}.{self.block}.experts.{expert}.{name}.weight"

    def router_tensor(self, layer_prefix: str, fused: bool) -> str:
        return f"{layer_prefix}.{self.memory_router if fused else self.router}"

    def config(
        self,
        base: dict[str, Any],
        *,
        num_experts: int,
        experts_per_token: int,
        expert_intermediate: int,
        shared_intermediate: int | None,
        attention_bias: bool,
        tied: bool,
        dtype: str,
    ) -> dict[str, Any]:
        """The MoE's config.json as keyword arguments of its transformers config class."""
        cfg = {k: v for k, v in base.items() if k not in DROPPED_KEYS}
        for key in ("torch_dtype", "pretraining_tp", "mlp_bias", "attention_bias", "qkv_bias"):
            cfg.pop(key, None)
        cfg.update(
            architectures=[self.architecture],
            num_experts_per_tok=experts_per_token,
            tie_word_embeddings=tied,
            dtype=dtype,
            output_router_logits=False,
        )
        cfg[self.count_key] = num_experts
        cfg.update({key: (list(v) if isinstance(v, list) else v) for key, v in self.settings})
        cfg[self.expert_size_key or "intermediate_size"] = expert_intermediate
        if self.bias_key:
            cfg[self.bias_key] = attention_bias
        if self.shared_style == "qwen":
            cfg["shared_expert_intermediate_size"] = shared_intermediate
        elif self.shared_style == "deepseek":
            cfg["n_shared_experts"] = (shared_intermediate or 0) // expert_intermediate
        elif self.shared_style == "granite":
            cfg["shared_intermediate_size"] = shared_intermediate or 0
        return cfg


#: DeepSeek-V3's router, set so that it routes as mergesmith's routers do: one expert group (so
#: group-limited top-k is plain top-k), a zero score-correction bias, top-k weights renormalised, no scale.
#: Every layer sparse (first_k_dense_replace 0).
DEEPSEEK_ROUTING = (
    ("first_k_dense_replace", 0),
    ("n_group", 1),
    ("topk_group", 1),
    ("norm_topk_prob", True),
    ("routed_scaling_factor", 1.0),
)
PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
# DeepSeek-V3 and GLM4-MoE share their MoE block: a shared expert, a sigmoid gate with a score bias
DEEPSEEK_STYLE: dict[str, Any] = dict(
    block="mlp",
    expert_names=PROJ_NAMES,
    count_key="n_routed_experts",
    settings=DEEPSEEK_ROUTING,
    expert_size_key="moe_intermediate_size",
    bias_key="attention_bias",
    shared_style="deepseek",
    score_bias="mlp.gate.e_score_correction_bias",
    sigmoid_gate=True,
)
# GraniteMoE and GraniteMoeShared share their MoE block: experts stacked in two tensors, a router module
GRANITE_STYLE: dict[str, Any] = dict(
    block="block_sparse_moe",
    expert_names=PROJ_NAMES,
    count_key="num_local_experts",
    bias_key="attention_bias",
    router="block_sparse_moe.router.layer.weight",
    memory_router="block_sparse_moe.router.weight",
    memory_experts="block_sparse_moe.experts",
    stacked=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        "Mixtral",
        "mixtral",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        block="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
        count_key="num_local_experts",
        settings=(("router_jitter_noise", 0.0),),
        router="block_sparse_moe.gate.weight",
    ),
    Family(
        "Qwen MoE",
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("qwen2", "llama", "mistral"),
        block="mlp",
        expert_names=PROJ_NAMES,
        count_key="num_experts",
        settings=SPARSE_EVERYWHERE,
        expert_size_key="moe_intermediate_size",
        bias_key="qkv_bias",
        shared_style="qwen",
    ),
    Family(
        "Qwen3 MoE",
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        block="mlp",
        expert_names=PROJ_NAMES,
        count_key="num_experts",
        settings=SPARSE_EVERYWHERE,
        expert_size_key="moe_intermediate_size",
        bias_key="attention_bias",
    ),
    Family(
        "FlexOlmo",
        "flex_olmo",
        "FlexOlmoForCausalLM",
        ("olmo2",),
        block="mlp",
        expert_names=PROJ_NAMES,
        count_key="num_experts",
        settings=(("norm_topk_prob", True),),
        bias_key="attention_bias",
    ),
    Family("DeepSeek-V3", "deepseek_v3", "DeepseekV3ForCausalLM", ("deepseek_v3",), **DEEPSEEK_STYLE),
    Family("GLM4-MoE", "glm4_moe", "Glm4MoeForCausalLM", ("glm4_moe",), **DEEPSEEK_STYLE),
    Family(
        "GraniteMoE",
        "granitemoe",
        "GraniteMoeForCausalLM",
        ("granite",),
        **GRANITE_STYLE,
    ),
    Family(
        "GraniteMoeShared",
        "granitemoeshared",
        "GraniteMoeSharedForCausalLM",
        ("granite",),
        shared_style="granite",
        **GRANITE_STYLE,
    ),
    Family(
        "OLMoE",
        "olmoe",
        "OlmoeForCausalLM",
        (),
        block="mlp",
        expert_names=PROJ_NAMES,
        count_key="num_experts",
        refusal=(
            "no dense transformers family shares its trunk (pre-norm layers with full-width q/k norms: "
            "OLMo 2's are post-norm, and its MoE is FlexOlmo, architecture: flex_olmo)"
        ),
    ),
    Family(
        "PhiMoE",
        "phimoe",
        "PhimoeForCausalLM",
        (),
        block="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
        count_key="num_local_experts",
        refusal=(
            "its sparsemixer router's top-k weights do not sum to one (identical experts would not give "
            "the dense model back), and no dense transformers family shares its trunk (LayerNorm with "
            "biases)"
        ),
    ),
)


def choose_family(model_type: str, wanted: str | None, has_shared: bool) -> Family:
    """The output family for dense models of ``model_type``.

    With ``architecture`` given, the first family it names that accepts the inputs; otherwise the first
    that accepts them, preferring one whose shared-expert support matches the config (so Llama experts
    become Mixtral, or Qwen MoE when a shared expert is given)."""
    names = ", ".join(f.name for f in FAMILIES)
    candidates = [f for f in FAMILIES if wanted is None or f.matches(wanted)]
    if not candidates:
        raise MergeError(f"architecture {wanted!r} names no MoE output family; choose one of {names}")
    refused = [f for f in candidates if f.refusal]
    if wanted is not None and len(refused) == len(candidates):
        f = refused[0]
        raise MergeError(f"mergesmith does not write {f.name} MoEs: {f.refusal}")
    candidates = [f for f in candidates if not f.refusal]
    accepting = [f for f in candidates if model_type in f.inputs]
    if not accepting:
        which = (
            f"architecture {wanted!r} ({', '.join(f.name for f in candidates)})" if wanted else "mergesmith"
        )
        raise MergeError(
            f"{which} cannot build an MoE from {model_type!r} models; supported inputs: "
            + "; ".join(f"{f.name} from {'/'.join(f.inputs)}" for f in candidates)
        )
    for f in accepting:
        if f.shared_expert == has_shared:
            return f
    family = accepting[0]
    if has_shared and not family.shared_expert:
        raise MergeError(
            f"{family.name} has no shared expert, but shared_experts is given; remove it or choose "
            "an architecture with one (Qwen MoE, DeepSeek-V3, GLM4-MoE, GraniteMoeShared)"
        )
    return family


def transformers_config(family: Family, kwargs: dict[str, Any]) -> Any:
    """The transformers config object for ``kwargs`` (raises MergeError if transformers rejects it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(family.model_type, **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise MergeError(
            f"transformers rejects the {family.name} config built from the base model: {exc}"
        ) from None


def expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the output class's parameters (transformers' in-memory names), built on the
    meta device so that nothing is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        # an output without a shared expert (n_shared_experts 0) has empty Linear layers: torch's warning
        # about initialising them is noise on the user's terminal
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
