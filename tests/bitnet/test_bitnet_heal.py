"""Healing (QAT with STE, lambda warm-up, logit distillation) lowers the loss of a ternarised model."""

from __future__ import annotations

import copy

import torch

from mergesmith.bitnet.heal import (
    HealConfig,
    QATLinear,
    fake_quantize_weight,
    heal_copy,
    prepare_qat,
    quantised_loss,
    token_batches,
)
from mergesmith.bitnet.reference import reference_model
from mergesmith.core.bitnet.quant import ternarize, ternarize_tensor


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1000 + step))


def _quantised_loss(student, teacher) -> float:
    eval_batches = [
        torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)
    ]
    return quantised_loss(student, teacher, eval_batches)


def test_fake_quantize_weight_is_the_export_ternarisation():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    codes, gamma = ternarize(w)
    assert torch.equal(fake_quantize_weight(w), codes.float() * gamma)


def test_ste_passes_gradients_to_latent_weights():
    lin = torch.nn.Linear(16, 8)
    q = QATLinear(lin)
    x = torch.randn(3, 16)
    q(x).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_heal_lowers_the_quantised_distillation_loss(tiny):
    teacher, config = tiny(initializer_range=0.1)
    before = _quantised_loss(teacher, teacher)
    student, result = heal_copy(teacher, _batch, HealConfig(steps=40, lr=3e-3, warmup=10))
    after = _quantised_loss(student, teacher)
    assert before > 0.1 and after < 0.75 * before
    # the warm-up phases quantisation in: the student starts equal to the teacher
    assert result.lambdas[0] == 0.0 and result.lambdas[-1] == 1.0 and result.losses[0] < 1e-6
    assert all(type(m) is not QATLinear for m in student.modules())
    # the teacher is untouched, and the healed latent weights export to what QAT trained
    assert torch.equal(
        teacher.model.layers[0].mlp.up_proj.weight,
        tiny(initializer_range=0.1)[0].model.layers[0].mlp.up_proj.weight,
    )
    sd = student.state_dict()
    modules = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ref = reference_model(config, sd, {n: ternarize_tensor(sd[f"{n}.weight"]) for n in modules})
    qat = copy.deepcopy(student)
    prepare_qat(qat)
    ids = _batch(999)
    with torch.no_grad():
        assert (ref(ids).logits - qat(ids).logits).abs().max().item() < 1e-4


def test_token_batches():
    text = torch.arange(50)
    batch = token_batches(text, vocab_size=100, batch_size=3, seq_len=8, seed=0)
    b = batch(0)
    assert b.shape == (3, 8) and torch.equal(b, batch(0))
    assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(3, 7, dtype=torch.long))  # contiguous windows
    rnd = token_batches(None, vocab_size=7, batch_size=2, seq_len=5)(3)
    assert rnd.shape == (2, 5) and int(rnd.max()) < 7
