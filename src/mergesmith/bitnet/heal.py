"""Heal a ternarised model: a short quantisation-aware fine-tune distilled from the float model.

Ternarising a float model after training loses most of its quality (BitNet b1.58, arXiv 2402.17764,
is trained ternary from the start). The usual repair is quantisation-aware training (QAT):

* forward with absmean-ternary weights ``gamma * W~`` (exactly :func:`mergesmith.core.bitnet.quant.ternarize`)
  and per-token absmax int8 activations, backward through the **straight-through estimator** (STE):
  ``q_ste(w) = w + (q(w) - w).detach()``, so the gradient reaches the latent float weights as if
  quantisation were the identity;
* a **warm-up that phases quantisation in** (Hugging Face, "Fine-tuning LLMs to 1.58bit", 2024):
  ``w' = w + lambda * (q(w) - w).detach()`` with ``lambda = min(step / warmup, 1)``, and the same for the
  activations, so training starts from the float model and ends fully quantised;
* **distillation** from the float model's logits (the teacher):
  ``L = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))``.

At the end the latent weights are put back into plain ``nn.Linear`` modules. Exporting them with
``mergesmith bitnet`` ternarises them with the same absmean rule, so the exported model computes
what the fully quantised (lambda = 1) student computed.

This is for tiny models and demos on a CPU; at LLM scale QAT needs billions of tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.bitnet.reference import fake_quantize_activations
from mergesmith.core.bitnet.quant import EPS, TensorSelector


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``gamma * clamp(round(W / gamma), -1, 1)`` with ``gamma = max(mean|W|, eps)``, computed in
    float32 like :func:`mergesmith.core.bitnet.quant.ternarize`, returned in ``weight.dtype``."""
    w = weight.to(torch.float32)
    gamma = w.abs().mean().clamp(min=EPS)
    return ((w * (1.0 / gamma)).round().clamp(-1, 1) * gamma).to(weight.dtype)


class QATLinear(nn.Module):
    """``nn.Linear`` with STE fake quantisation (W1.58A8) of strength ``lam`` in [0, 1]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.register_buffer("lam", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w + self.lam * (fake_quantize_weight(w) - w).detach()
        x = x + self.lam * (fake_quantize_activations(x).to(x.dtype) - x).detach()
        return F.linear(x, w, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the latent weights."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def prepare_qat(model: nn.Module, selector: TensorSelector | None = None) -> list[str]:
    """Swap the selected ``nn.Linear`` modules of ``model`` (in place) for :class:`QATLinear`;
    returns their names."""
    selector = selector or TensorSelector()
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and selector.selects(f"{name}.weight", tuple(mod.weight.shape))
    ]
    for name in names:
        model.set_submodule(name, QATLinear(model.get_submodule(name)))
    return names


def set_strength(model: nn.Module, lam: float) -> None:
    """Set the quantisation strength of every :class:`QATLinear` in ``model``."""
    for mod in model.modules():
        if isinstance(mod, QATLinear):
            mod.lam.fill_(lam)


def finish_qat(model: nn.Module) -> nn.Module:
    """Replace each :class:`QATLinear` by a plain ``nn.Linear`` with the latent weights (in place)."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, QATLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return model


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` over the vocabulary, mean over tokens."""
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


@dataclass
class HealConfig:
    steps: int = 200
    lr: float = 1e-3
    warmup: int | None = None
    """Steps over which lambda goes 0 -> 1; default a quarter of ``steps``."""
    temperature: float = 1.0
    weight_decay: float = 0.0


@dataclass
class HealResult:
    losses: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate(
    student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], temperature: float = 1.0
) -> float:
    """Mean distillation loss of the fully quantised student (lambda = 1) on ``batches``."""
    set_strength(student, 1.0)
    losses = [
        float(distillation_loss(_logits(student, b), _logits(teacher, b), temperature)) for b in batches
    ]
    return sum(losses) / max(len(losses), 1)


def quantised_loss(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[torch.Tensor],
    selector: TensorSelector | None = None,
    temperature: float = 1.0,
) -> float:
    """Distillation loss of a ternarised copy of float ``model`` (lambda = 1) against ``teacher``."""
    probe = copy.deepcopy(model)
    prepare_qat(probe, selector)
    return evaluate(probe, teacher, batches, temperature)


def heal(
    student: nn.Module,
    teacher: nn.Module,
    batch: Callable[[int], torch.Tensor],
    config: HealConfig | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> HealResult:
    """Distil ``teacher`` into ``student`` (already :func:`prepare_qat`-ed) for ``config.steps`` AdamW
    steps; ``batch(step)`` returns token ids. ``on_step(step, loss, lambda)`` is called after each step
    (a progress bar). Leaves the student at lambda = 1."""
    config = config or HealConfig()
    warmup = config.warmup if config.warmup is not None else max(config.steps // 4, 1)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    result = HealResult()
    for step in range(config.steps):
        lam = min(step / warmup, 1.0) if warmup > 0 else 1.0
        set_strength(student, lam)
        ids = batch(step)
        with torch.no_grad():
            target = _logits(teacher, ids)
        loss = distillation_loss(_logits(student, ids), target, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        result.lambdas.append(lam)
        if on_step is not None:
            on_step(step, result.losses[-1], lam)
    set_strength(student, 1.0)
    student.eval()
    return result


def heal_copy(
    model: nn.Module,
    batch: Callable[[int], torch.Tensor],
    config: HealConfig | None = None,
    selector: TensorSelector | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> tuple[nn.Module, HealResult]:
    """Heal a copy of float ``model`` (the teacher stays untouched); returns the student with plain
    ``nn.Linear`` latent weights, ready for export, and the training record."""
    student = copy.deepcopy(model)
    prepare_qat(student, selector)
    result = heal(student, model, batch, config, on_step)
    return finish_qat(student), result


def token_batches(
    ids: torch.Tensor | None, vocab_size: int, batch_size: int = 4, seq_len: int = 64, seed: int = 0
) -> Callable[[int], torch.Tensor]:
    """``batch(step)``: random windows of ``seq_len`` tokens from the 1-D ``ids`` (a tokenised text),
    or, when ``ids`` is None, uniformly random token ids (enough for a demo, not for a real repair).
    Deterministic in ``seed`` and ``step``."""

    def batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if ids is None:
            return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
        n = ids.numel()
        if n <= seq_len:
            return ids[:seq_len].reshape(1, -1).repeat(batch_size, 1)
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=g)
        return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

    return batch
