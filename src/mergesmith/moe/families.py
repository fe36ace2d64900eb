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
    """One MoE output: its names, the dense families it accepts, and how its experts are named."""

    name: str  # as in mergekit's `architecture:` ("Mixtral", "Qwen MoE", "Qwen3 MoE")
    model_type: str
    architecture: str
    inputs: tuple[str, ...]  # model_type of the dense base and experts
    shared_expert: bool  # whether the class has a (single) shared expert
    block: str  # the per-expert layout's name of the sparse block ("block_sparse_moe" / "mlp")
    expert_names: tuple[str, str, str]  # per-expert names of gate, up, down projections
    count_key: str  # config key of the number of experts
    settings: tuple[tuple[str, Any], ...] = ()  # fixed config keys
    expert_size_key: str | None = (
        None  # config key of the experts' intermediate size, if not intermediate_size
    )
    bias_key: str | None = None  # config key saying whether q/k/v have biases, if the class can have them

    def matches(self, wanted: str) -> bool:
        """mergekit's rule: ``architecture`` is a case-insensitive prefix of the name; the model_type
        (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``flex_olmo``) also works."""
        w = wanted.strip().lower()
        return self.name.lower().startswith(w) or self.model_type == w

    def expert_tensor(self, layer_prefix: str, expert: int, proj: str) -> str:
        name = self.expert_names[PROJECTIONS.index(proj)]
        return f"{layer_prefix}.{self.block}.experts.{expert}.{name}.weight"

    def router_tensor(self, layer_prefix: str, fused: bool) -> str:
        return f"{layer_prefix}.{'mlp' if fused else self.block}.gate.weight"

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
        if self.shared_expert:
            cfg["shared_expert_intermediate_size"] = shared_intermediate
        return cfg


FAMILIES: tuple[Family, ...] = (
    Family(
        "Mixtral",
        "mixtral",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        shared_expert=False,
        block="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
        count_key="num_local_experts",
        settings=(("router_jitter_noise", 0.0),),
    ),
    Family(
        "Qwen MoE",
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("qwen2", "llama", "mistral"),
        shared_expert=True,
        block="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        count_key="num_experts",
        settings=SPARSE_EVERYWHERE,
        expert_size_key="moe_intermediate_size",
        bias_key="qkv_bias",
    ),
    Family(
        "Qwen3 MoE",
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        shared_expert=False,
        block="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
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
        shared_expert=False,
        block="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        count_key="num_experts",
        settings=(("norm_topk_prob", True),),
        bias_key="attention_bias",
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
            "architecture: qwen (Qwen MoE)"
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

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
