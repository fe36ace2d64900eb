"""The prompt pass: batched right-padded states equal unpadded runs; router inputs are the MLP's input."""

from __future__ import annotations

import torch
from moe_helpers import load
from safetensors.torch import load_file

from mergesmith.moe import build_moe
from mergesmith.moe.activations import BaseRunner
from tiny_models import char_tokenizer

PROMPTS = ["abc", "hello world", "x", "add: 12+34="]


@torch.no_grad()
def test_batched_states_equal_unpadded_runs(llama_models):
    runner = BaseRunner.load(llama_models["base"], "base", batch_size=3)
    states = runner.states(PROMPTS, router_inputs=True)
    model, tok = load(llama_models["base"]), char_tokenizer()
    captured: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        for layer in model.model.layers
    ]
    for i, prompt in enumerate(PROMPTS):
        captured.clear()
        ids = torch.tensor([tok(prompt)["input_ids"]])
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(2):
            assert torch.allclose(states.layer_last[i, layer], hidden[layer][0, -1], atol=1e-5)
            assert torch.allclose(states.layer_mean[i, layer], hidden[layer][0, 1:].mean(0), atol=1e-5)
            assert torch.allclose(states.router_tokens[i][layer], captured[layer][0, 1:], atol=1e-5)
    for h in hooks:
        h.remove()


def test_hidden_rows_are_the_definition(llama_models, tmp_path):
    """Row e of layer l = unit(mean over e's prompts of the layer-l input at the last token)."""
    prompts = [["abc", "abcdef"], ["xyz", "hello"]]
    cfg = {
        "base_model": str(llama_models["base"]),
        "experts": [
            {"source_model": str(llama_models[f"e{i}"]), "positive_prompts": p} for i, p in enumerate(prompts)
        ],
    }
    out = build_moe(cfg, tmp_path / "moe", quiet=True).path
    written = load_file(out / "model.safetensors")
    model, tok = load(llama_models["base"]), char_tokenizer()
    for layer in range(2):
        for e, texts in enumerate(prompts):
            with torch.no_grad():
                states = [
                    model(
                        input_ids=torch.tensor([tok(t)["input_ids"]]), output_hidden_states=True
                    ).hidden_states[layer][0, -1]
                    for t in texts
                ]
            want = torch.stack(states).mean(0)
            got = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e]
            assert torch.allclose(got, want / want.norm(), atol=1e-5)
