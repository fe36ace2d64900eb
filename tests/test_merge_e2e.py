"""YAML in, a model folder out that transformers loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import mergesmith
from mergesmith.methods import merge_tensors
from mergesmith.pipeline.execute import BASELINE_RSS

TINY_LIMIT = BASELINE_RSS + 8192  # a few KiB in flight: every matrix is processed in row chunks


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_config(tmp_path: Path, cfg: dict, name: str = "cfg.yml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_model(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)
    return logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"])
def test_families_merge_and_load(family, family_models, tmp_path):
    base, ft = family_models[family]
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    out = mergesmith.merge(cfg, tmp_path / "out", quiet=True)
    run_model(out)
    merged, b = load_tensors(out), load_tensors(base)
    assert set(merged) == set(b)
    assert (
        json.loads((out / "config.json").read_text())["model_type"]
        == json.loads((base / "config.json").read_text())["model_type"]
    )


def test_tied_embeddings_stay_tied(family_models, tmp_path):
    base, ft = family_models["qwen2"]
    assert "lm_head.weight" not in load_tensors(base)
    out = mergesmith.merge(
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(ft)}],
            "parameters": {"t": 0.5},
        },
        tmp_path / "out",
        quiet=True,
    )
    assert "lm_head.weight" not in load_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    run_model(out)


def test_executor_matches_the_pure_kernels(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.4, "density": [0.8, 0.2]}},
        ],
    }
    out = load_tensors(mergesmith.merge(cfg, tmp_path / "out", quiet=True))
    b, f1, f2 = load_tensors(base), load_tensors(ft1), load_tensors(ft2)
    name = "model.layers.2.mlp.up_proj.weight"  # last of 3 layers: density gradient at position 1 -> 0.2
    expected = merge_tensors("ties", [f1[name], f2[name]], b[name], weight=[0.6, 0.4], density=[0.5, 0.2])
    assert torch.equal(out[name], expected)
    name = "model.embed_tokens.weight"  # embeddings take position 0 -> density 0.8
    expected = merge_tensors("ties", [f1[name], f2[name]], b[name], weight=[0.6, 0.4], density=[0.5, 0.8])
    assert torch.equal(out[name], expected)


def test_passthrough_frankenmerge_layer_and_parameter_count(llama_trio, tmp_path):
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(ft1), "layer_range": [1, 3]}]},
        ],
    }
    out = mergesmith.merge(cfg, tmp_path / "out", quiet=True)
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_hidden_layers"] == 5
    merged, b, f1 = load_tensors(out), load_tensors(base), load_tensors(ft1)
    per_layer = sum(v.numel() for k, v in b.items() if ".layers.0." in k)
    assert sum(v.numel() for v in merged.values()) == sum(v.numel() for v in b.values()) + 2 * per_layer
    assert torch.equal(
        merged["model.layers.3.self_attn.q_proj.weight"], f1["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # first slice
    assert torch.equal(merged["lm_head.weight"], f1["lm_head.weight"])  # last slice
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in merged.values())


def test_self_merge_with_repeated_layers_and_scale(llama_trio, tmp_path):
    base = llama_trio[0]
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": str(base),
                        "layer_range": [1, 3],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
                    }
                ]
            },
        ],
    }
    out = mergesmith.merge(cfg, tmp_path / "out", quiet=True)
    merged, b = load_tensors(out), load_tensors(base)
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.count_nonzero(merged["model.layers.2.self_attn.o_proj.weight"]) == 0
    assert torch.count_nonzero(merged["lm_head.weight"]) > 0
    run_model(out)


def test_output_files_and_card(llama_trio, tmp_path):
    base, ft1, _ = llama_trio
    cfg_path = write_config(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(base), "parameters": {"weight": 1}},
                {"model": str(ft1), "parameters": {"weight": 1}},
            ],
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "chat_template": "chatml",
        },
    )
    out = mergesmith.merge(cfg_path, tmp_path / "out", quiet=True)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "README.md",
        "mergesmith_config.yml",
        "chat_template.jinja",
        "model.safetensors",
    } <= names
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "mergesmith"] and front["library_name"] == "transformers"
    assert "base_model" not in front  # local folders are named in the text, not in the Hub metadata
    assert str(base) not in card and f"`{base.name}` (a local folder)" in card and "# out\n" in card
    assert (out / "mergesmith_config.yml").read_text() == cfg_path.read_text()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(out).values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_sharded_output_loads(llama_trio, tmp_path):
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(base), "parameters": {"weight": 1}},
            {"model": str(ft1), "parameters": {"weight": 2}},
        ],
    }
    out = mergesmith.merge(cfg, tmp_path / "out", quiet=True, out_shard_size="20K")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_tensors(out).values()
    )
    run_model(out)


def test_reproducible_for_any_workers_and_chunking(llama_trio, tmp_path, fixed_baseline):
    base, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.3}},
        ],
    }
    a = mergesmith.merge(cfg, tmp_path / "a", quiet=True, workers=1, random_seed=5)
    b = mergesmith.merge(cfg, tmp_path / "b", quiet=True, workers=4, random_seed=5)
    # a tiny memory limit forces row chunks of every matrix
    c = mergesmith.merge(cfg, tmp_path / "c", quiet=True, workers=1, random_seed=5, memory_limit=TINY_LIMIT)
    d = mergesmith.merge(cfg, tmp_path / "d", quiet=True, workers=1, random_seed=6)
    ta, tb, tc, td = (load_tensors(x) for x in (a, b, c, d))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    for k in ta:
        assert torch.equal(ta[k], tc[k]), k
    assert any(not torch.equal(ta[k], td[k]) for k in ta)


def test_chunked_ties_equals_whole(llama_trio, tmp_path, fixed_baseline):
    base, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.3}} for m in (ft1, ft2)],
    }
    a = load_tensors(mergesmith.merge(cfg, tmp_path / "a", quiet=True))
    c = load_tensors(mergesmith.merge(cfg, tmp_path / "c", quiet=True, workers=1, memory_limit=TINY_LIMIT))
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_overwrite_rules(llama_trio, tmp_path):
    base = llama_trio[0]
    cfg = {"merge_method": "passthrough", "models": [{"model": str(base)}]}
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(mergesmith.MergeError, match="already exists"):
        mergesmith.merge(cfg, dest, quiet=True)
    assert (dest / "keep.txt").read_text() == "precious"
    with pytest.raises(mergesmith.MergeError, match="does not hold a model.*--force"):
        mergesmith.merge(cfg, dest, quiet=True, overwrite=True)
    assert (dest / "keep.txt").read_text() == "precious"
    mergesmith.merge(cfg, dest, quiet=True, overwrite=True, force=True)
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
def test_bf16_inputs_are_computed_in_float32(llama_trio, tmp_path, method):
    """Kernels that read bf16 inputs directly (raw_inputs) give what float32 maths on the same values gives."""
    from safetensors.torch import save_file

    bf16 = []
    for m in llama_trio:
        folder = tmp_path / f"{m.name}-bf16"
        folder.mkdir()
        for f in ("config.json", "tokenizer_config.json"):
            (folder / f).write_bytes((m / f).read_bytes())
        save_file({k: v.to(torch.bfloat16) for k, v in load_tensors(m).items()}, folder / "model.safetensors")
        bf16.append(folder)
    base, ft1, ft2 = bf16
    if method == "slerp":
        cfg = {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(ft1)}],
            "parameters": {"t": 0.3},
        }
    elif method == "linear":
        cfg = {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(bf16, (0.5, 0.3, 0.2))],
        }
    else:
        cfg = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.4}} for m in (ft1, ft2)],
        }
    out = load_tensors(mergesmith.merge(cfg, tmp_path / "out", quiet=True, random_seed=3))
    tb, t1, t2 = (load_tensors(m) for m in bf16)
    for name, merged in out.items():
        assert merged.dtype == torch.bfloat16
        if method == "slerp":
            expected = merge_tensors("slerp", [t1[name]], tb[name], t=0.3)
        elif method == "linear":
            expected = merge_tensors("linear", [tb[name], t1[name], t2[name]], weight=[0.5, 0.3, 0.2])
        else:
            expected = merge_tensors(
                method,
                [t1[name], t2[name]],
                tb[name],
                weight=[0.5, 0.5],
                density=[0.4, 0.4],
                seed=3,
                name=name,
            )
        assert torch.equal(merged, expected.to(torch.bfloat16)), name
