"""GGUF export: gguf's reader gets back gamma * W~ for every ternary matrix, and transformers' GGUF
loader rebuilds the same model (config from the llama metadata, q/k permutation undone)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mergesmith.bitnet.convert import DictSource, iter_gguf_tensors, plan_gguf_export
from mergesmith.bitnet.gguf_export import llama_metadata, rope_permute
from mergesmith.bitnet.gguf_tokenizer import tokenizer_metadata
from mergesmith.bitnet.io import write_gguf_stream
from mergesmith.core.bitnet.quant import TensorSelector, ternarize

GGUF_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _metadata(config, qtype):
    return llama_metadata(config, qtype, "tiny") + tokenizer_metadata(None, None, config["vocab_size"])[0]


def _write(tmp_path, model, config, qtype):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    source = DictSource(sd, config)
    plan = plan_gguf_export(source, TensorSelector(), qtype)
    stats = []

    def tensors():
        for t, stat, _ in iter_gguf_tensors(source, plan):
            if stat:
                stats.append(stat)
            yield t

    path = tmp_path / "model.gguf"
    write_gguf_stream(path, "llama", _metadata(config, qtype), plan.layouts, tensors())
    return sd, plan.kept, stats, path


def _write_in_memory(path, source, config, qtype):
    """The reference: gguf's own writer holding every tensor (``add_tensor``) before writing."""
    plan = plan_gguf_export(source, TensorSelector(), qtype)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value, vtype in _metadata(config, qtype):
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for name, array, kind in (t for t, _, _ in iter_gguf_tensors(source, plan)):
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_streamed_gguf_equals_in_memory_gguf(tmp_path, tiny, dtype):
    """The streaming writer (tensor infos from the plan, then one tensor at a time) writes the same
    bytes as gguf's writer holding all tensors, for every storage type (F32, F16, BF16, TQ)."""
    model, config = tiny(**{**GGUF_DIMS, "intermediate_size": 320})  # down_proj stays high precision
    model = model.to(dtype)
    _, kept, _, streamed = _write(tmp_path, model, config, "tq1_0")
    assert kept
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _write_in_memory(tmp_path / "ref.gguf", DictSource(sd, config), config, "tq1_0")
    assert streamed.read_bytes() == (tmp_path / "ref.gguf").read_bytes()


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_gguf_reader_round_trip(tmp_path, tiny, qtype):
    model, config = tiny(**GGUF_DIMS)
    sd, kept, stats, path = _write(tmp_path, model, config, qtype)
    assert not kept and len(stats) == 14
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert reader.fields["llama.block_count"].parts[-1][0] == 2
    assert reader.fields["llama.attention.head_count_kv"].parts[-1][0] == 2
    by_name = {t.name: t for t in reader.tensors}
    expected_type = gguf.GGMLQuantizationType[qtype.upper()]
    heads = {"q_proj": 4, "k_proj": 2}
    for layer in range(2):
        for hf, g in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("mlp.down_proj", "ffn_down"),
        ]:
            w = sd[f"model.layers.{layer}.{hf}.weight"]
            t = by_name[f"blk.{layer}.{g}.weight"]
            assert t.tensor_type == expected_type
            back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape)
            codes, gamma = ternarize(w)
            n = heads.get(hf.split(".")[1])
            if n:
                codes = rope_permute(codes, n)
            expected = codes.float() * float(np.float16(gamma.item()))
            assert torch.equal(back, expected)
    emb = by_name["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(emb.data).reshape(100, 256), sd["model.embed_tokens.weight"].numpy())


def test_transformers_loads_the_gguf(tmp_path, tiny):
    """transformers' GGUF loader (dequantising TQ2_0 with gguf, undoing the q/k permutation) rebuilds
    a float Llama whose logits equal the float model with gamma * W~ weights (gamma in fp16)."""
    model, config = tiny(**GGUF_DIMS)
    sd, _, stats, path = _write(tmp_path, model, config, "tq2_0")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert loaded.config.num_key_value_heads == 2 and loaded.config.hidden_size == 256
    expected = {k: v.clone() for k, v in sd.items()}
    for s in stats:
        codes, gamma = ternarize(sd[s.name])
        expected[s.name] = codes.float() * float(np.float16(gamma.item()))
    model.load_state_dict(expected)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_rows_not_multiple_of_256_stay_high_precision(tmp_path, tiny):
    model, config = tiny(hidden_size=256, intermediate_size=320, num_attention_heads=4)
    _, kept, stats, path = _write(tmp_path, model, config, "tq2_0")
    assert set(kept) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.TQ2_0


def test_bpe_tokenizer_metadata():
    tj = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
        "added_tokens": [{"id": 3, "content": "<eos>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    }
    kv, note = tokenizer_metadata(tj, {"eos_token": "<eos>"}, vocab_size=5)
    meta = {k: v for k, v, _ in kv}
    assert note is None and meta["tokenizer.ggml.model"] == "gpt2"
    assert (
        meta["tokenizer.ggml.tokens"][:4] == ["a", "b", "ab", "<eos>"]
        and len(meta["tokenizer.ggml.tokens"]) == 5
    )
    assert meta["tokenizer.ggml.merges"] == ["a b"] and meta["tokenizer.ggml.eos_token_id"] == 3
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.add_bos_token"] is False
