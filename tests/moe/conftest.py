"""Tiny dense models with a character-level tokenizer, built at test time; nothing is downloaded.

Every model is saved with a tokenizer (so prompt-based gate modes can run) and "fine-tunes" differ from
their base only in their feed-forward blocks, as the experts of an MoE do.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

CHARS = string.ascii_lowercase + string.digits + " :=+,-"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = len(SPECIALS) + len(CHARS)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three experts that differ from it in their MLPs."""
    root = tmp_path_factory.mktemp("moe-llama")
    base = make_dense(root / "base")
    return {"base": base, **{f"e{i}": make_expert(base, root / f"e{i}", seed=10 + i) for i in range(3)}}


@pytest.fixture(scope="session")
def dense_factory():
    return make_dense


@pytest.fixture(scope="session")
def expert_factory():
    return make_expert
