"""Every layer's router (and the shared expert's gate) for a config: activations in, matrices out.

This is the only step of an MoE build that runs a model: the prompt-based modes load the base model
once (cheap_embed only its tokenizer and embedding matrix) and turn activations into router rows with
the pure maths of :mod:`mergesmith.moe.router`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource
from mergesmith.core.threads import threads_for
from mergesmith.moe.activations import BaseRunner, PromptStates
from mergesmith.moe.config import Calibration, Expert, MoEConfig
from mergesmith.moe.router import (
    PARALLEL_COSINE,
    CalibratedLayer,
    calibrated_router,
    cheap_embed_vector,
    parallel_pairs,
    prompt_vectors,
    random_router,
    unit,
)

log = logging.getLogger("mergesmith.moe")


@dataclass(frozen=True)
class LayerReport:
    """What one layer's router looks like: its experts' largest pairwise cosine and, when calibrated,
    the fit's figures."""

    layer: int
    max_cosine: float | None = None
    calibrated: CalibratedLayer | None = None
    prompt_accuracy: float | None = None  # calibrated: routing accuracy on the prompts' own tokens
    answer_accuracy: float | None = None  # ... and on the experts' continuations (None without any)


@dataclass
class Routers:
    """Router weights [L, E, d] (float32), the shared expert's gate rows [L, 1, d] (or None), reports."""

    weights: Tensor
    shared_gate: Tensor | None
    reports: list[LayerReport] = field(default_factory=list)


def build_routers(
    cfg: MoEConfig,
    base: ModelSource,
    num_layers: int,
    hidden: int,
    *,
    seed: int = 0,
    runner: Callable[[], BaseRunner] | None = None,
    router_name: Callable[[int], str] = str,
    expert_mlps: Callable[[int], Mapping[str, Tensor]] | None = None,
) -> Routers:
    """Dispatch on ``cfg.mode``. ``runner`` loads the base model lazily (only prompt modes call it);
    ``router_name(layer)`` names the output tensor, which seeds the random modes; ``expert_mlps(e)``
    gives expert e's feed-forward tensors under the base model's parameter names (for the calibrated
    mode's expert trunk)."""
    n = len(cfg.experts)
    shared = cfg.shared_expert
    if cfg.mode in ("random", "uniform_random"):
        weights = torch.stack(
            [random_router((n, hidden), seed, router_name(i), cfg.mode) for i in range(num_layers)]
        )
        gate = None
        if shared is not None:
            gate = torch.stack(
                [
                    random_router((1, hidden), seed, router_name(i) + ":shared", cfg.mode)
                    for i in range(num_layers)
                ]
            )
        return Routers(weights, gate, [LayerReport(i) for i in range(num_layers)])
    if runner is None:
        raise MergeError(f"gate_mode {cfg.gate_mode} needs the base model's tokenizer")
    if cfg.mode == "cheap_embed":
        return _cheap_embed(cfg, base, runner(), num_layers)
    run = runner()
    if run.num_layers != num_layers:
        raise MergeError(
            f"base model {base.ref!r}: transformers built {run.num_layers} layers, expected {num_layers}"
        )
    with threads_for(run.model):  # small models: one torch thread (the build's generation and passes)
        if cfg.mode == "calibrated":
            return _calibrated(cfg.experts, shared, run, cfg.calibration or Calibration(), expert_mlps)
        return _hidden(cfg.experts, shared, run, last=cfg.mode == "hidden")


def _states(run: BaseRunner, prompts: Sequence[str] | None, router_inputs: bool) -> PromptStates | None:
    return run.states(list(prompts), router_inputs=router_inputs) if prompts else None


def _hidden(experts: Sequence[Expert], shared: Expert | None, run: BaseRunner, last: bool) -> Routers:
    """mergekit's hidden modes: row e of layer l = unit(mean h_l(positive) - mean h_l(negative)), with h_l
    the input of layer l at the last prompt token (``hidden``) or averaged over the tokens (``hidden_avg``)."""

    def vectors(e: Expert) -> Tensor:
        pos = _states(run, e.positive_prompts, False)
        neg = _states(run, e.negative_prompts, False)
        pick = (lambda s: s.layer_last) if last else (lambda s: s.layer_mean)
        return prompt_vectors(pick(pos), pick(neg) if neg is not None else None)  # type: ignore[arg-type]

    rows = torch.stack([vectors(e) for e in experts], dim=1)  # [L, E, d]
    gate = vectors(shared)[:, None, :] if shared is not None and shared.positive_prompts else None
    return Routers(rows, _shared_or_zero(gate, shared, rows), _cosine_reports(rows, experts))


def chance_accuracy(counts: Sequence[int]) -> float:
    """What a router that routes nothing gets on calibration samples of these class sizes: sending every
    token to the largest class (at least 1/E)."""
    return max(max(counts) / sum(counts), 1 / len(counts))


def _warn_chance(
    reports: Sequence[LayerReport],
    pos: Sequence[Tensor],
    neg: Sequence[Tensor | None],
    experts: Sequence[Expert],
    opts: Calibration,
    folds: Sequence[Tensor] | None = None,
) -> None:
    """One warning naming the layers whose calibrated router routes its own calibration prompts no better
    than chance, and what to do. When negative prompts are given, it says whether the fit without them
    would route (a cause seen in practice: the negatives' mean moves the expert's class mean along
    directions in which the calibration tokens hardly vary, and the whitened discriminant magnifies it)."""
    chance = chance_accuracy([int(s.shape[1]) for s in pos])
    bad = [r for r in reports if r.calibrated is not None and r.calibrated.train_accuracy <= chance + 1e-9]
    if not bad:
        return
    layers = ", ".join(f"{r.layer} ({r.calibrated.train_accuracy:.3f})" for r in bad)  # type: ignore[union-attr]
    advice = (
        "give each expert more prompts of its own kind, in text the base model's tokenizer knows "
        "(characters it lacks all become the same unknown token)"
    )
    if any(n is not None for n in neg):
        without = [
            calibrated_router(
                [s[r.layer] for s in pos],
                [None] * len(pos),
                opts.target_top1,
                None if opts.shrinkage == "ledoit_wolf" else opts.shrinkage,
                None if opts.shrinkage == "ledoit_wolf" else folds,
            )
            for r in bad
        ]
        if all(f.train_accuracy > chance + 1e-9 for f in without):
            accs = ", ".join(f"{f.train_accuracy:.3f}" for f in without)
            advice = f"without negative_prompts these layers would route {accs}, so drop or change them"
    log.warning(
        "the calibrated router routes its own calibration prompts no better than chance (%.3f, every token "
        "to one expert) in layer(s) %s, so the MoE will not send tokens to the right expert (%s) there; %s",
        chance,
        layers,
        ", ".join(str(e.source_model) for e in experts),
        advice,
    )


def _calibrated(
    experts: Sequence[Expert],
    shared: Expert | None,
    run: BaseRunner,
    opts: Calibration,
    expert_mlps: Callable[[int], Mapping[str, Tensor]] | None = None,
) -> Routers:
    """mergesmith's calibrated mode, layer by layer on the router's real input (see router.calibrated_router).

    With ``trunk: expert`` each expert's positive prompts run through the base with that expert's
    feed-forward blocks in every layer: the MoE computes exactly that on those prompts once its routing
    is right, so deeper layers' routers are fitted on the activations they will see, not on the base's.
    Negative prompts (whose expert is not known) run through the base.

    With ``max_new_tokens`` > 0 each expert also answers its prompts (greedy, through the same trunk), and
    the tokens of its answers are calibration samples as well: the MoE routes every token it generates,
    and at an answer token the router input must still say which expert the prompt asked for.
    """
    last_only = opts.tokens == "last"
    answers = 0 if last_only else opts.max_new_tokens

    own_mlps = opts.trunk == "expert" and expert_mlps is not None

    def trunk(i: int):
        return run.swapped(expert_mlps(i)) if own_mlps else contextlib.nullcontext()  # type: ignore[misc]

    def positive(i: int, e: Expert) -> PromptStates | None:
        with trunk(i):
            prompts = list(e.positive_prompts or ())
            # the expert's own answers, generated through the trunk it runs in (see the docstring)
            gen = run.continuations(prompts, answers) if answers else [[] for _ in prompts]
            return run.states(prompts, router_inputs=True, continuations=[g[:-1] for g in gen])

    pos = [positive(i, e) for i, e in enumerate(experts)]
    neg = [_states(run, e.negative_prompts, True) for e in experts]
    pos_samples = [p.router_samples(last_only) for p in pos]  # type: ignore[union-attr]
    kinds = [p.sample_kinds(last_only) for p in pos]  # type: ignore[union-attr]
    folds = [index % 2 for index, _ in kinds]  # cross-validation folds, by prompt
    is_answer = torch.cat([answer for _, answer in kinds])
    neg_samples = [n.router_samples(last_only) if n is not None else None for n in neg]
    if opts.target_top1 <= 1 / len(experts):
        raise MergeError(
            f"calibration.target_top1 {opts.target_top1} is not above 1/{len(experts)} (a flat router); raise it"
        )
    layers = pos_samples[0].shape[0]
    shrinkage = None if opts.shrinkage == "ledoit_wolf" else opts.shrinkage
    weights, reports = [], []
    means = torch.stack([s.mean(1) for s in pos_samples], dim=1)  # [L, E, d] raw means, for the warning
    for layer in range(layers):
        fit = calibrated_router(
            [s[layer] for s in pos_samples],
            [None if s is None else s[layer] for s in neg_samples],
            target_top1=opts.target_top1,
            shrinkage=shrinkage,
            folds=None if opts.shrinkage == "ledoit_wolf" else folds,
        )
        weights.append(fit.weight)
        assert fit.correct is not None
        prompt_acc = float(fit.correct[~is_answer].double().mean())
        answer_acc = float(fit.correct[is_answer].double().mean()) if bool(is_answer.any()) else None
        reports.append(LayerReport(layer, _max_cos(means[layer]), fit, prompt_acc, answer_acc))
    _warn_parallel(means, experts)
    _warn_chance(reports, pos_samples, neg_samples, experts, opts, folds)
    gate = None
    if shared is not None and shared.positive_prompts:
        s = _states(run, shared.positive_prompts, True)
        gate = unit(s.router_samples(last_only).mean(1))[:, None, :]  # type: ignore[union-attr]
    rows = torch.stack(weights)
    return Routers(rows, _shared_or_zero(gate, shared, rows), reports)


#: Where a sigmoid-gated family's calibrated logits put each token's largest one (see shift_for_sigmoid).
SIGMOID_TOP = -6.0


def shift_for_sigmoid(routers: Routers) -> Routers:
    """Calibrated routers for families that weigh the top-k by sigmoid(z_e) / sum instead of by softmax
    (DeepSeek-V3, GLM4-MoE).

    The top-k is the same either way (sigmoid is increasing), but the weights are not: sigmoid saturates
    for large logits, so two confident ones would share a token about equally, and underflows for very
    negative ones (transformers adds 1e-20 to the sum). Subtracting the same amount from every logit of a
    token changes no softmax; once a token's top logits lie around SIGMOID_TOP, sigmoid(z) ~ e^z and the
    renormalised sigmoid weights are the softmax ones (relative error ~ e^-6). The router is linear and has
    no bias, so the amount is linear too: v.x + SIGMOID_TOP q.x, where v.x fits the token's largest
    logit (least squares on the calibration samples) and q.x ~ 1 (the fit's bias direction):
    W' = W - 1 (v - SIGMOID_TOP q)'. Other modes are left alone: their top-k is kept and their weights
    are the renormalised sigmoids of their logits.
    """
    weights = routers.weights.clone()
    for r in routers.reports:
        c = r.calibrated
        if c is None or c.bias_dir is None or c.max_dir is None:
            continue
        weights[r.layer] -= (c.max_dir - SIGMOID_TOP * c.bias_dir)[None, :]
    return Routers(weights, routers.shared_gate, routers.reports)


def _cheap_embed(cfg: MoEConfig, base: ModelSource, run: BaseRunner, num_layers: int) -> Routers:
    """cheap_embed: one vector per expert from the input embeddings of its prompts' tokens, every layer."""
    names = [n for n in base.tensors if n.endswith("embed_tokens.weight")]
    if len(names) != 1:
        raise MergeError(f"base model {base.ref!r}: cannot find its input embedding ('embed_tokens.weight')")
    embed = base.read(names[0]).float()

    def token_sum(prompts: Sequence[str] | None) -> Tensor | None:
        if not prompts:
            return None
        rows = [torch.as_tensor(ids)[run.ordinary_mask(ids)] for ids in run.tokenize(prompts)]
        return embed[torch.cat(rows)].sum(0)

    def vector(e: Expert) -> Tensor:
        return cheap_embed_vector(token_sum(e.positive_prompts), token_sum(e.negative_prompts))  # type: ignore[arg-type]

    rows = torch.stack([vector(e) for e in cfg.experts])[None].expand(num_layers, -1, -1).contiguous()
    shared = cfg.shared_expert
    gate = None
    if shared is not None and shared.positive_prompts:
        gate = vector(shared)[None, None, :].expand(num_layers, 1, -1).contiguous()
    return Routers(rows, _shared_or_zero(gate, shared, rows), _cosine_reports(rows, cfg.experts))


def _shared_or_zero(gate: Tensor | None, shared: Expert | None, rows: Tensor) -> Tensor | None:
    """A shared expert without prompts gets a zero gate: sigmoid(0) = 1/2 for every token."""
    if shared is None or gate is not None:
        return gate
    return torch.zeros(rows.shape[0], 1, rows.shape[2])


def _max_cos(rows: Tensor) -> float | None:
    if len(rows) < 2:
        return None
    u = unit(rows.float())
    cos = u @ u.T
    return float(cos[torch.triu_indices(len(u), len(u), offset=1).unbind()].max())


def _cosine_reports(rows: Tensor, experts: Sequence[Expert]) -> list[LayerReport]:
    _warn_parallel(rows, experts)
    return [LayerReport(layer, _max_cos(rows[layer])) for layer in range(rows.shape[0])]


def _warn_parallel(vectors: Tensor, experts: Sequence[Expert]) -> None:
    """One warning line naming, layer by layer, the experts whose prompt vectors are nearly parallel."""
    n = len(experts)
    parts, worst = [], 0.0
    for layer in range(vectors.shape[0]):
        pairs = parallel_pairs(vectors[layer])
        if not pairs:
            continue
        worst = max(worst, *(c for _, _, c in pairs))
        if n > 2 and len(pairs) == n * (n - 1) // 2:
            parts.append(f"layer {layer}: all {n} experts")
        else:
            named = [
                f"experts {e} ({experts[e].source_model}) and {f} ({experts[f].source_model})"
                for e, f, _ in pairs
            ]
            parts.append(f"layer {layer}: " + ", ".join(named))
    if parts:
        log.warning(
            "nearly parallel prompt vectors (cosine up to %.4f, above %.2f), so the prompts do not separate "
            "these experts there: %s; use more distinct prompts or negative_prompts",
            worst,
            PARALLEL_COSINE,
            "; ".join(parts),
        )
