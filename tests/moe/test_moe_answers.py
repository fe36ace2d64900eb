"""Calibration on answer tokens: each expert's own greedy continuation of its prompts, generated at build
time, and the router inputs of its tokens; the shrinkage chosen by cross-validation over prompts."""

from __future__ import annotations

import torch

from mergesmith.moe import build_moe
from mergesmith.moe.activations import BaseRunner
from mergesmith.moe.router import SHRINKAGE_GRID, calibrated_router, cross_validated_shrinkage, ledoit_wolf

PROMPTS = ["abcdef", "ghij", "klmnopq", "rs"]


def test_continuations_are_greedy_generation_through_the_first_end_token(llama_models):
    run = BaseRunner.load(llama_models["e0"], "e0", batch_size=3)  # batches of unequal prompt lengths
    got = run.continuations(PROMPTS, 6)
    for prompt, gen in zip(PROMPTS, got):
        ids = run.tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = run.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
        want = want[0, ids.shape[1] :].tolist()
        if 2 in want:
            want = want[: want.index(2) + 1]  # through the end token, nothing after it
        assert gen == want
        assert 1 <= len(gen) <= 6 and all(t != 2 for t in gen[:-1])
    assert run.continuations(PROMPTS, 0) == [[], [], [], []]


def test_states_with_continuations_keep_the_prompt_states(llama_models):
    run = BaseRunner.load(llama_models["e1"], "e1", batch_size=2)
    extra = [[8, 9, 10], [], [11], [12, 13]]
    plain = run.states(PROMPTS, router_inputs=True)
    longer = run.states(PROMPTS, router_inputs=True, continuations=extra)
    assert longer.prompt_tokens == tuple(len(p) for p in PROMPTS)  # BOS is not an ordinary token
    for p, (a, b) in enumerate(zip(plain.router_tokens, longer.router_tokens)):
        n = len(PROMPTS[p])
        assert b.shape[1] == n + len(extra[p])
        torch.testing.assert_close(b[:, :n], a, atol=1e-5, rtol=1e-5)  # causal: later tokens change nothing
    torch.testing.assert_close(longer.layer_last, plain.layer_last)
    index, answer = longer.sample_kinds()
    assert int(answer.sum()) == sum(map(len, extra)) and index.tolist()[:6] == [0] * 6
    last_index, last_answer = longer.sample_kinds(last_only=True)
    assert last_index.tolist() == [0, 1, 2, 3] and not last_answer.any()
    torch.testing.assert_close(longer.router_samples(last_only=True), plain.router_samples(last_only=True))


def _config(llama_models, **calibration) -> dict:
    letters = ["abcdefgh", "ijklmnop", "qrstuvwx"]
    return {
        "base_model": str(llama_models["base"]),
        "gate_mode": "calibrated",
        "dtype": "float32",
        "calibration": calibration,
        "experts": [
            {"source_model": str(llama_models[f"e{i}"]), "positive_prompts": [s[:5], s[2:], s[::-1], s[1:6]]}
            for i, s in enumerate(letters)
        ],
    }


def test_build_reports_prompt_and_answer_routing(llama_models, tmp_path):
    with_answers = build_moe(_config(llama_models, max_new_tokens=4), tmp_path / "a", quiet=True)
    prompts_only = build_moe(_config(llama_models, max_new_tokens=0), tmp_path / "p", quiet=True)
    for r in with_answers.reports:
        assert r.answer_accuracy is not None and 0 <= r.answer_accuracy <= 1
        assert r.prompt_accuracy is not None and r.calibrated is not None
        assert r.calibrated.correct is not None and r.calibrated.correct.dtype == torch.bool
    assert all(r.answer_accuracy is None for r in prompts_only.reports)
    # the answers are calibration samples: the routers differ
    assert not torch.allclose(
        with_answers.reports[1].calibrated.weight, prompts_only.reports[1].calibrated.weight
    )


def test_ledoit_wolf_shrinkage_skips_cross_validation(llama_models, tmp_path, monkeypatch):
    import mergesmith.moe.router as router

    calls = []
    real = router.cross_validated_shrinkage
    monkeypatch.setattr(router, "cross_validated_shrinkage", lambda *a, **k: calls.append(1) or real(*a, **k))
    build_moe(_config(llama_models, max_new_tokens=0, shrinkage="ledoit_wolf"), tmp_path / "lw", quiet=True)
    assert not calls
    build_moe(_config(llama_models, max_new_tokens=0), tmp_path / "cv", quiet=True)
    assert len(calls) >= 2  # once per layer


def _classes(n: int, d: int, seed: int, quiet_signal: bool) -> list[torch.Tensor]:
    """Two classes that differ along one direction. With ``quiet_signal`` that direction has a tiny
    within-class variance and the others a large one: shrinkage toward mu*I drowns the signal."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d, dtype=torch.float64) * (10.0 if quiet_signal else 1.0)
    scale[0] = 0.01 if quiet_signal else 1.0
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 0.05 if quiet_signal else 0.5
    return [torch.randn(n, d, generator=g, dtype=torch.float64) * scale + e * shift for e in range(2)]


def test_cross_validation_keeps_a_quiet_discriminating_direction():
    train = _classes(400, 16, 0, quiet_signal=True)
    folds = [torch.arange(400) % 2] * 2
    _, lw = ledoit_wolf(torch.cat([x - x.mean(0) for x in train]))
    chosen = cross_validated_shrinkage(train, [None, None], folds)
    assert chosen in {max(a, 1e-6) for a in (lw, *SHRINKAGE_GRID)}
    assert chosen < lw  # the smaller shrinkage routes held-out prompts better here
    test = _classes(400, 16, 1, quiet_signal=True)
    y = torch.arange(2).repeat_interleave(400)

    def accuracy(fit) -> float:
        return float(((torch.cat(test).float() @ fit.weight.T).argmax(-1) == y).float().mean())

    cv = calibrated_router(train, [None, None], folds=folds)
    plain = calibrated_router(train, [None, None])  # Ledoit-Wolf
    assert cv.shrinkage == chosen and accuracy(cv) > accuracy(plain) + 0.05, (accuracy(cv), accuracy(plain))


def test_cross_validation_is_deterministic_and_skips_empty_folds():
    train = _classes(30, 8, 2, quiet_signal=False)
    folds = [torch.zeros(30, dtype=torch.long), torch.arange(30) % 2]  # class 0 has no fold-1 samples
    a = cross_validated_shrinkage(train, [None, None], folds)
    assert a == cross_validated_shrinkage(train, [None, None], folds)
    assert 0 < a <= 1
