"""The base model's activations on the experts' prompts: the one forward pass that router init needs.

Only the base model is loaded (transformers, CPU by default, in the checkpoint's dtype). Prompts are
tokenised as the model sees them in use (the tokenizer's own special tokens, e.g. a BOS) and run in
batches with *right* padding: under a causal mask a real token never attends to a pad that follows it,
and its position ids are unchanged, so every state equals the one of an unpadded run.

Two activations are captured per decoder layer l:

- the layer input ``h_l`` (the residual stream entering layer l; ``hidden_states[l]`` in transformers),
  which mergekit's ``hidden`` gate uses;
- the router input ``x_l``: what the layer's feed-forward block receives, i.e. the output of the
  layer's attention added to the residual stream and passed through the post-attention norm. The MoE's
  router replaces that block and sees exactly ``x_l``; it is captured with a forward pre-hook on the
  layer's ``mlp`` module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.core import hf_load
from mergesmith.core.errors import MergeError
from mergesmith.core.hf_load import load_causal_lm
from mergesmith.core.model import ModelSource


@dataclass(frozen=True)
class PromptStates:
    """Activations of a set of prompts, float32, on the CPU.

    ``layer_last[p, l]``: layer l's input at prompt p's last token; ``layer_mean[p, l]``: its mean over
    the prompt's ordinary (non-special) tokens. ``router_tokens[p][l, t]``: layer l's router input at
    ordinary token t of prompt p followed by its continuation, if one was given (only when router inputs
    were asked for); the first ``prompt_tokens[p]`` of them are the prompt's.
    """

    layer_last: torch.Tensor  # [P, L, d]
    layer_mean: torch.Tensor  # [P, L, d]
    router_tokens: tuple[torch.Tensor, ...] | None  # P x [L, T_p, d]
    prompt_tokens: tuple[int, ...] = ()  # ordinary prompt tokens per prompt (the rest: its continuation)

    def router_samples(self, last_only: bool = False) -> torch.Tensor:
        """All router-input samples as one [L, N, d] tensor (every ordinary token, or the last prompt
        token of each prompt)."""
        if self.router_tokens is None:
            raise ValueError("router inputs were not captured")
        parts = [t[:, n - 1 : n] if last_only else t for t, n in zip(self.router_tokens, self.prompt_tokens)]
        return torch.cat(parts, dim=1)

    def sample_kinds(self, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sample of ``router_samples``: its prompt's index, and whether it is an answer token
        (a continuation token) rather than a prompt token."""
        assert self.router_tokens is not None
        index, answer = [], []
        for p, (t, n) in enumerate(zip(self.router_tokens, self.prompt_tokens)):
            count = 1 if last_only else t.shape[1]
            index.append(torch.full((count,), p, dtype=torch.long))
            answer.append(torch.arange(count) >= (count if last_only else n))
        return torch.cat(index), torch.cat(answer)


@dataclass
class BaseRunner:
    """A loaded base model and tokenizer that turns prompt lists into PromptStates."""

    model: Any
    tokenizer: Any
    batch_size: int = 16
    device: str = "cpu"

    @classmethod
    def load(
        cls,
        path: Path,
        ref: str,
        batch_size: int = 16,
        device: str = "cpu",
        source: ModelSource | None = None,
    ) -> BaseRunner:
        """The base model (in its checkpoint's dtype) and its tokenizer, loaded under the project's one
        policy for untrusted folders (:mod:`mergesmith.core.hf_load`: no remote code, no pickles). ``source``
        (the opened base, e.g. ``model+adapter`` with its adapter applied) is loaded when given."""
        tokenizer = load_tokenizer(path, ref)
        model = load_causal_lm(source or ModelSource(ref, path), "auto", "for the prompt pass")
        model.to(device).eval()
        return cls(model, tokenizer, batch_size, device)

    @classmethod
    def tokenizer_only(cls, path: Path, ref: str) -> BaseRunner:
        """A runner that can only tokenise (for cheap_embed, which needs no forward pass)."""
        return cls(None, load_tokenizer(path, ref))

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        with hf_load.quiet_transformers():  # a prompt past the context is refused in one line (check_lengths)
            return [list(self.tokenizer(p)["input_ids"]) for p in prompts]

    def ordinary_mask(self, ids: list[int]) -> torch.Tensor:
        """True at the tokens that are not special (BOS, ...); all of them if every token is special."""
        special = set(self.tokenizer.all_special_ids)
        mask = torch.tensor([i not in special for i in ids], dtype=torch.bool)
        return mask if mask.any() else torch.ones(len(ids), dtype=torch.bool)

    @contextlib.contextmanager
    def swapped(self, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Run with some parameters replaced (an expert's feed-forward blocks), then restore them."""
        params = dict(self.model.named_parameters())
        saved = {}
        try:
            with torch.no_grad():
                for name, value in weights.items():
                    if name not in params or params[name].shape != value.shape:
                        raise MergeError(f"the prompt pass cannot place tensor {name!r} into the base model")
                    saved[name] = params[name].detach().clone()
                    params[name].copy_(value)
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def _prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenize(prompts)
        if any(len(x) == 0 for x in ids):
            raise MergeError("a prompt tokenises to no tokens at all; remove it")
        self._check_lengths(prompts, ids)
        return ids

    @torch.no_grad()
    def continuations(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """The model's greedy continuation of each prompt: the tokens it generates, up to and including
        the first end token. Generation feeds all but the last of them back into the model (``fed``).
        Batched with left padding (position ids follow the attention mask)."""
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        ids = self._prompt_ids(prompts)
        context = getattr(self.model.config, "max_position_embeddings", None)
        stops = _stop_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        pad = (min(stops) if stops else 0) if pad is None else pad
        out: list[list[int]] = [[] for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            budget = max_new_tokens
            if isinstance(context, int) and context > 0:
                budget = min(budget, context - width)
            if budget <= 0:
                continue
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                attention[row, width - len(ids[i]) :] = 1
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=budget,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=sorted(stops) or None,
            )
            for row, i in enumerate(batch):
                new = generated[row, width:].tolist()
                end = next((j + 1 for j, t in enumerate(new) if t in stops), len(new))
                out[i] = new[:end]
        return out

    @torch.no_grad()
    def states(
        self,
        prompts: Sequence[str],
        router_inputs: bool = False,
        continuations: Sequence[Sequence[int]] | None = None,
    ) -> PromptStates:
        """Run the prompts (batched, longest first) and gather the activations described above. With
        ``continuations``, each prompt's is appended to it and its tokens' router inputs are kept too."""
        ids = self._prompt_ids(prompts)
        extra = [list(c) for c in continuations] if continuations is not None else [[] for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]) - len(extra[i]))
        last: list[torch.Tensor | None] = [None] * len(ids)
        mean: list[torch.Tensor | None] = [None] * len(ids)
        routed: list[torch.Tensor | None] = [None] * len(ids)
        counts: list[int] = [0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = self._run_batch([ids[i] for i in batch], [extra[i] for i in batch], router_inputs)
            for i, (lst, avg, rt, n) in zip(batch, rows):
                last[i], mean[i], routed[i], counts[i] = lst, avg, rt, n
        return PromptStates(
            layer_last=torch.stack(last),  # type: ignore[arg-type]
            layer_mean=torch.stack(mean),  # type: ignore[arg-type]
            router_tokens=tuple(routed) if router_inputs else None,  # type: ignore[arg-type]
            prompt_tokens=tuple(counts),
        )

    def _check_lengths(self, prompts: Sequence[str], ids: list[list[int]]) -> None:
        """Refuse a prompt longer than the base model's context: transformers would run it anyway, for
        minutes, past the positions the model was trained on (and the states would mean nothing)."""
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not isinstance(context, int) or context <= 0:
            return
        for prompt, x in zip(prompts, ids):
            if len(x) > context:
                start = prompt[:40] + ("..." if len(prompt) > 40 else "")
                raise MergeError(
                    f"a prompt has {len(x)} tokens, more than the base model's context of {context} "
                    f"(max_position_embeddings): {start!r}; shorten it"
                )

    def _run_batch(self, prompts: list[list[int]], extra: list[list[int]], router_inputs: bool):
        batch = [p + e for p, e in zip(prompts, extra)]
        width = max(len(x) for x in batch)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = torch.tensor(x)
            attention[row, : len(x)] = 1
        captured: list[torch.Tensor] = []
        hooks = (
            [m.register_forward_pre_hook(_capture(captured), with_kwargs=True) for m in self._mlps()]
            if router_inputs
            else []
        )
        try:
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                output_hidden_states=True,
                use_cache=False,
            )
        finally:
            for h in hooks:
                h.remove()
        layers = self.num_layers
        hidden = torch.stack([h.float().cpu() for h in out.hidden_states[:layers]], dim=1)  # [B, L, T, d]
        routed = torch.stack([c.float().cpu() for c in captured], dim=1) if router_inputs else None
        for row, (x, p) in enumerate(zip(batch, prompts)):
            keep = self.ordinary_mask(x)
            prompt_keep = keep[: len(p)]
            h = hidden[row, :, : len(p)]
            yield (
                h[:, len(p) - 1].clone(),
                h[:, prompt_keep].mean(dim=1),
                routed[row, :, : len(x)][:, keep].clone() if routed is not None else None,
                int(prompt_keep.sum()),
            )

    @property
    def num_layers(self) -> int:
        return len(self._layers())

    def _layers(self) -> Any:
        base = getattr(self.model, "model", None)
        layers = getattr(base if base is not None else self.model.base_model, "layers", None)
        if layers is None:
            raise MergeError("the base model has no decoder 'layers' list that the prompt pass can hook")
        return layers

    def _mlps(self) -> list[Any]:
        mlps = [getattr(layer, "mlp", None) for layer in self._layers()]
        if any(m is None for m in mlps):
            raise MergeError(
                "the base model's decoder layers have no 'mlp' block whose input can be captured"
            )
        return mlps


def load_tokenizer(path: Path, ref: str) -> Any:
    hint = "; prompt-based gate modes tokenise the prompts with it (or use gate_mode: random)"
    try:
        return hf_load.load_tokenizer(path, ref, hint)
    except MergeError as exc:
        raise MergeError(f"base {exc}") from None


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a generation: the generation config's end tokens and the tokenizer's."""
    stops: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, (list, tuple)):
            stops.update(v for v in value if isinstance(v, int))
    return stops


def _capture(store: list[torch.Tensor]):
    """A pre-hook that keeps the block's input, whether it is passed by position or by keyword."""

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if not isinstance(x, torch.Tensor):
            raise MergeError("cannot capture the feed-forward block's input in the base model")
        store.append(x.detach())

    return hook
