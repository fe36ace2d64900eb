"""Tiny models for the tests, built at test time from transformers config classes (nothing is downloaded).

One module for every test folder: a config (:func:`tiny_config`), a randomly initialised model
(:func:`build`), a model folder (:func:`save`, optionally with the character tokenizer), and a
"fine-tune" of a folder (:func:`perturb`: Gaussian noise on all or some of its weights). The folders' own
fixtures (conftest.py files) only choose sizes.
"""

from __future__ import annotations

import json
import shutil
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# family -> settings that differ from the common ones (head_dim: the family has no default that fits)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"tie_word_embeddings": True},
    "gemma": {"head_dim": 8},
    "phi3": {"pad_token_id": 0},
}
#: MoE tests only. The dense DeepSeek-V3 and GLM4-MoE models have every layer dense (first_k_dense_replace
#: above the layer count); Granite's multipliers are set away from 1 so that tests see them.
MORE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 8},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.3,
        "logits_scaling": 3.0,
    },
    "deepseek_v3": {
        "num_key_value_heads": 4,  # multi-head latent attention: no grouped key-value heads
        "first_k_dense_replace": 64,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "moe_intermediate_size": 64,
        "n_routed_experts": 4,
        "n_group": 1,
        "topk_group": 1,
    },
    "glm4_moe": {
        "first_k_dense_replace": 64,
        "head_dim": 8,
        "moe_intermediate_size": 64,
        "n_routed_experts": 4,
        "n_group": 1,
        "topk_group": 1,
    },
}
_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "olmo2": "Olmo2Config",
    "granite": "GraniteConfig",
    "deepseek_v3": "DeepseekV3Config",
    "glm4_moe": "Glm4MoeConfig",
    "gemma": "GemmaConfig",
    "phi3": "Phi3Config",
}

CHARS = string.ascii_lowercase + string.digits + " :=+,-"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = len(SPECIALS) + len(CHARS)  # the character tokenizer's, also the shipped skill models'
CHAR_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_config(family: str = "llama", *, layers: int = 3, vocab: int = 96, **overrides: Any):
    """A config of ``family`` with hidden size 32 (GPT-2: n_embd 32), 4 heads, 2 key-value heads and 64
    positions unless ``overrides`` (config keyword arguments) say otherwise."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64)
    kwargs: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    kwargs.update({**FAMILIES, **MORE_FAMILIES}[family])
    kwargs.update(overrides)
    return getattr(transformers, _CONFIG_CLASSES[family])(**kwargs)


def build(config, seed: int = 0, lively: bool = False):
    """A randomly initialised causal LM of ``config`` (fp32, training mode); ``lively``: biases made
    non-zero and norm weights spread around 1, so that tests see them."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if lively:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.05)
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    return model


def char_tokenizer():
    """A character-level fast tokenizer that prepends <bos> (the skill models' vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def save(model, folder: Path, tokenizer: Any = None) -> Path:
    """``model`` saved as a safetensors model folder, with ``tokenizer`` (an object with
    ``save_pretrained``, or a list of tokenizer files to copy) if given."""
    model.save_pretrained(folder, safe_serialization=True)
    if isinstance(tokenizer, list):
        for path in tokenizer:
            shutil.copy(path, folder / Path(path).name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def perturb(
    base: Path, folder: Path, scale: float, seed: int, only: Callable[[str], bool] | None = None
) -> Path:
    """A copy of the model folder ``base`` whose floating-point weights (those ``only`` selects) get
    Gaussian noise of ``scale`` times their own standard deviation."""
    shutil.copytree(base, folder)
    g = torch.Generator().manual_seed(seed)
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        out = {}
        for k, v in tensors.items():
            if only is not None and not only(k):
                out[k] = v
                continue
            noise = torch.randn(v.shape, generator=g) * scale * (v.float().std() if v.numel() > 1 else 1.0)
            out[k] = (v.float() + noise).to(v.dtype) if v.is_floating_point() else v
        save_file(out, f, metadata={"format": "pt"})
    return folder


# The shapes the test folders use


def make_model(folder: Path, family: str = "llama", layers: int = 3, vocab: int = 96, seed: int = 0) -> Path:
    """A tiny random model of ``family`` (merge tests), with a tokenizer_config.json and no tokenizer."""
    save(build(tiny_config(family, layers=layers, vocab=vocab), seed), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def make_finetune(base: Path, folder: Path, scale: float = 0.01, seed: int = 1) -> Path:
    """A 'fine-tune' of ``base``: its weights plus small Gaussian noise."""
    return perturb(base, folder, scale, seed)


def make_dense(
    folder: Path,
    family: str = "llama",
    layers: int = 2,
    seed: int = 0,
    tied: bool = False,
    intermediate: int = 64,
) -> Path:
    """A tiny random dense model with the character tokenizer (MoE tests: prompt-based gates run on it)."""
    cfg = tiny_config(
        family,
        layers=layers,
        vocab=VOCAB,
        intermediate_size=intermediate,
        tie_word_embeddings=tied,
        **CHAR_IDS,
    )
    return save(build(cfg, seed, lively=True), folder, char_tokenizer())


def make_expert(base: Path, folder: Path, seed: int, scale: float = 0.5) -> Path:
    """A copy of ``base`` whose feed-forward weights get Gaussian noise (an MoE expert)."""
    return perturb(base, folder, scale, seed, only=lambda name: ".mlp." in name)


def tiny_llama(seed: int = 0, **overrides: Any):
    """A random Llama of hidden size 64 (BitNet tests: one TQ block fits 256-wide rows once it is raised),
    fp32 in eval mode, lively, and its config dict."""
    kwargs = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 100, **overrides}
    model = build(
        tiny_config("llama", layers=kwargs.pop("num_hidden_layers", 2), **kwargs), seed, lively=True
    )
    return model.eval(), model.config.to_dict()


def make_char_llama(
    folder: Path, tokenizer_files: list[Path], *, max_positions: int = 64, seed: int = 0
) -> Path:
    """A random two-layer Llama with the skill models' character tokenizer files (eval tests)."""
    cfg = tiny_config(
        "llama",
        layers=2,
        vocab=VOCAB,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **CHAR_IDS,
    )
    return save(build(cfg, seed), folder, tokenizer_files)


# Models whose layers are not all alike, or that hold more than one layer stack (tests/test_layer_kinds.py)

_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=96,
    max_position_embeddings=64,
)
_TOWER = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=16, patch_size=8)


def layer_kinds_config(family: str):
    """``(config, auto class name)`` of a tiny model of ``family``: ``deepseek_v3`` (a dense first layer, then
    MoE layers), ``jamba`` (attention every other layer, placed by period/offset fields), ``bamba``
    (attention at the layers ``attn_layer_indices`` lists), ``qwen3_next`` (``layer_types``), ``falcon_h1``
    (2 layers and lists of length 2 that are not per layer), ``gemma4`` (``per_layer_config``), ``llava``
    (a vision tower deeper than the text stack), ``smolvlm`` (a shallower one)."""
    import transformers as T

    text = {**_TEXT, "num_hidden_layers": 3}
    lm = "AutoModelForCausalLM"
    vlm = "AutoModelForImageTextToText"
    if family == "deepseek_v3":
        kv = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
        moe = dict(
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=16
        )
        return T.DeepseekV3Config(
            **{**text, "num_key_value_heads": 4, "head_dim": 4}, **kv, **moe, first_k_dense_replace=1
        ), lm
    if family == "jamba":
        return T.JambaConfig(
            **{**text, "num_hidden_layers": 4},
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=4,
            mamba_dt_rank=4,
        ), lm
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16)
    if family == "bamba":
        return T.BambaConfig(**text, attn_layer_indices=[1], **mamba2), lm
    if family == "qwen3_next":
        return T.Qwen3NextConfig(
            **{**text, "num_hidden_layers": 4},
            layer_types=["linear_attention", "full_attention"] * 2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ), lm
    if family == "falcon_h1":
        return T.FalconH1Config(
            **{**text, "num_hidden_layers": 2}, **mamba2, mamba_d_ssm=64, mlp_multipliers=[0.5, 2.0]
        ), lm
    if family == "gemma4":
        return T.Gemma4TextConfig(
            **text,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            sliding_window=16,
            global_head_dim=16,
            hidden_size_per_layer_input=0,
        ), lm
    if family == "llava":
        vision = dict(model_type="clip_vision_model", **_TOWER, num_hidden_layers=3, projection_dim=16)
        return T.LlavaConfig(
            text_config=dict(model_type="llama", **{**text, "num_hidden_layers": 2}),
            vision_config=vision,
            image_token_id=95,
        ), vlm
    if family == "smolvlm":
        return T.SmolVLMConfig(
            text_config=dict(model_type="llama", **text),
            vision_config=dict(**_TOWER, num_hidden_layers=1),
            scale_factor=1,
            image_token_id=95,
        ), vlm
    raise ValueError(family)


def layer_kinds_model(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny random model of :func:`layer_kinds_config`'s ``family`` saved in ``folder``."""
    import transformers

    config, auto = layer_kinds_config(family)
    torch.manual_seed(seed)
    return save(getattr(transformers, auto).from_config(config), folder)


# MoE models as inputs: transformers 5 keeps experts fused (``mlp.experts.gate_up_proj``, every expert in one
# tensor) and writes the per-expert layout of published checkpoints (``block_sparse_moe.experts.N.w1``) when
# it saves; both are on the hub
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 24, "head_dim": 8}),
}


def make_moe_input(
    folder: Path, family: str = "mixtral", fused: bool = False, seed: int = 0, tune: int | None = None
) -> Path:
    """A tiny random MoE model (2 layers, 4 experts, 2 per token) saved with its experts fused (the tensors
    transformers 5 holds in memory) or per expert (what ``save_pretrained`` writes, as published). ``tune``:
    a "fine-tune", every weight plus 0.3 of its standard deviation of noise drawn with that seed (the same
    values in either layout)."""
    import transformers

    cls, extra = MOE_FAMILIES[family]
    config = getattr(transformers, cls)(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        **extra,
    )
    model = build(config, seed)
    if tune is not None:
        g = torch.Generator().manual_seed(tune)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    save(model, folder)
    if fused:
        for f in folder.glob("*.safetensors"):
            f.unlink()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# Models whose tokenizers differ (tests/test_vocab.py, tests/tokens/)


def _rows_of(config: dict) -> int:
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


def renumber_tokens(tok: dict, perm: list[int]) -> None:
    """In tokenizer.json data ``tok``, token id ``i`` becomes ``perm[i]``: the model's vocabulary (when it
    is a dict), the added tokens and the post-processor's special-token ids."""
    vocab = tok["model"]["vocab"]
    if isinstance(vocab, dict):
        tok["model"]["vocab"] = {t: perm[i] for t, i in vocab.items()}
    for a in tok.get("added_tokens") or []:
        a["id"] = perm[a["id"]]
    post = tok.get("post_processor") or {}
    for spec in (post.get("special_tokens") or {}).values():
        spec["ids"] = [perm[i] for i in spec["ids"]]


def renumber_configs(folder: Path, perm: list[int], vocab_size: int) -> None:
    """The special-token ids of ``folder``'s config.json and generation_config.json (if any) mapped
    through ``perm``, and config.json's vocab_size set."""
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(data.get(key), int):
                data[key] = perm[data[key]]
        if name == "config.json":
            data["vocab_size"] = vocab_size
        path.write_text(json.dumps(data))


def retokenize(
    src: Path,
    dst: Path,
    perm: list[int] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Path:
    """A copy of model folder ``src`` (with a tokenizer.json) whose token ``i`` has id ``perm[i]`` (rows of
    the embedding and lm_head moved with it, config ids too), plus ``extra`` tokens appended to the
    tokenizer's vocabulary with the given rows (or random ones for a ``None`` value) in both tensors."""
    shutil.copytree(src, dst)
    n = _rows_of(json.loads((dst / "config.json").read_text()))
    perm = list(range(n)) if perm is None else perm
    extra = extra or {}
    tok = json.loads((dst / "tokenizer.json").read_text())
    renumber_tokens(tok, perm)
    vocab = tok["model"]["vocab"]
    if isinstance(vocab, dict):
        for j, t in enumerate(extra):
            vocab[t] = n + j
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    renumber_configs(dst, perm, n + len(extra))
    gen_rows = torch.Generator().manual_seed(seed)
    index = torch.tensor(perm)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        for k, v in tensors.items():
            if ("embed_tokens" in k or k.endswith("lm_head.weight")) and v.shape[0] == n:
                out = torch.empty_like(v)
                out[index] = v
                add = [
                    (
                        r if r is not None else torch.randn(v.shape[1:], generator=gen_rows) * v.float().std()
                    ).to(v.dtype)
                    for r in extra.values()
                ]
                tensors[k] = torch.cat([out, torch.stack(add)]) if add else out
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def reshard(folder: Path, parts: int = 3) -> Path:
    """``folder``'s weights split into ``parts`` shards with an index (sharded inputs)."""
    files = list(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
        f.unlink()
    names = sorted(tensors)
    weight_map = {}
    for p in range(parts):
        chunk = names[p::parts]
        fname = f"model-{p + 1:05d}-of-{parts:05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in chunk})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder
