"""Tiny dense models with a character tokenizer, and loading and running MoE outputs, for the MoE tests.

Every model is saved with a tokenizer (so prompt-based gate modes can run), and "fine-tunes" differ from
their base only in their feed-forward blocks, as the experts of an MoE do. Nothing is downloaded.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHARS = string.ascii_lowercase + string.digits + " :=+,-"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = len(SPECIALS) + len(CHARS)


def char_tokenizer():
    """A character-level fast tokenizer that prepends <bos>."""
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


def _config(family: str, layers: int, tied: bool, intermediate: int):
    import transformers

    common = dict(
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "olmo2": transformers.Olmo2Config,
    }[family]
    extra = {"head_dim": 8} if family == "qwen3" else {}
    return cls(**common, **extra)


def make_dense(
    folder: Path,
    family: str = "llama",
    layers: int = 2,
    seed: int = 0,
    tied: bool = False,
    intermediate: int = 64,
) -> Path:
    """Save a tiny random dense model of ``family`` and the character tokenizer to ``folder``."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, layers, tied, intermediate))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.05)
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def make_expert(base: Path, folder: Path, seed: int, scale: float = 0.5) -> Path:
    """A copy of ``base`` whose feed-forward weights get Gaussian noise (std ``scale`` x their std)."""
    import shutil

    shutil.copytree(base, folder)
    g = torch.Generator().manual_seed(seed)
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        for k, v in tensors.items():
            if ".mlp." in k:
                tensors[k] = v + torch.randn(v.shape, generator=g) * scale * v.std()
        save_file(tensors, f, metadata={"format": "pt"})
    return folder


IDS = torch.tensor([[1, 8, 9, 10, 11, 4, 5], [1, 20, 21, 22, 30, 31, 32]])


def load(path: Path):
    """A model folder in transformers, fp32, eval mode; fails on any missing or unexpected tensor."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


@torch.no_grad()
def logits(path_or_model, ids: torch.Tensor = IDS) -> torch.Tensor:
    model = load(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    return model(input_ids=ids).logits


def expert_config(base: Path, experts: list[Path], mode: str = "hidden", **extra) -> dict:
    """A config whose expert i is prompted with text made of its own letters."""
    letters = ["abcdef", "ghijkl", "mnopqr", "stuvwx", "yz0123"]
    return {
        "base_model": str(base),
        "gate_mode": mode,
        "dtype": "float32",
        "experts": [
            {"source_model": str(p), "positive_prompts": [letters[i], letters[i][::-1], letters[i][1:4] * 2]}
            for i, p in enumerate(experts)
        ],
        **extra,
    }
