"""``mergesmith moe CONFIG.yml OUT_DIR``: build a mixture of experts from dense fine-tunes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mergesmith.core.cliargs import add_device, add_output_folder, add_verbosity, add_workers
from mergesmith.core.defaults import DEFAULT_SHARD_SIZE

if TYPE_CHECKING:  # the builder pulls in torch; `mergesmith --help` should not
    from mergesmith.moe.gates import LayerReport

DESCRIPTION = """\
Build a sparse mixture-of-experts model from dense fine-tunes of one base model, as CONFIG (mergekit-moe's
YAML format) describes: the experts' feed-forward blocks become the experts; attention, norms,
embeddings and lm_head come from base_model; each layer's router is initialised without training
(gate_mode: hidden, hidden_avg, cheap_embed, calibrated, random or uniform_random; see docs/moe.md).
The output (Mixtral, Qwen MoE, Qwen3 MoE or FlexOlmo) is written to a temporary folder beside
OUT_DIR and renamed when complete."""


def register(subparsers: Any) -> None:
    """Add the ``moe`` sub-command."""
    p = subparsers.add_parser(
        "moe",
        help="build a mixture of experts from dense fine-tunes (mergekit-moe configs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG.yml")
    p.add_argument("out_dir", metavar="OUT_DIR")
    add_output_folder(p)
    p.add_argument(
        "--out-shard-size",
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest output shard (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--random-seed", type=int, default=0, metavar="N", help="seed of random routers and noise (default 0)"
    )
    add_device(p, "where the base model runs for the prompt pass")
    p.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="prompts per forward pass (default 16)"
    )
    p.add_argument(
        "--fused-experts",
        action="store_true",
        help="write transformers 5's fused expert tensors (experts.gate_up_proj/down_proj) instead of one "
        "tensor per expert and projection",
    )
    add_workers(p, "tensors copied")
    add_verbosity(p, "no progress bar, summary or router report")
    p.add_argument("--no-copy-tokenizer", action="store_true", help="do not copy the base model's tokenizer")
    p.add_argument(
        "--no-model-card", action="store_true", help="do not write README.md and mergesmith_moe_config.yml"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns 0. Expected failures raise MergeError."""
    from mergesmith.moe.build import build_moe

    result = build_moe(
        args.config,
        args.out_dir,
        overwrite=args.overwrite,
        force=args.force,
        random_seed=args.random_seed,
        out_shard_size=args.out_shard_size,
        device=args.device,
        batch_size=args.batch_size,
        fused_experts=args.fused_experts,
        workers=args.workers,
        quiet=args.quiet,
        copy_tokenizer=not args.no_copy_tokenizer,
        write_model_card=not args.no_model_card,
    )
    if not args.quiet:
        for line in report_lines(result.reports):
            print(line, file=sys.stderr)
    return 0


def report_lines(reports: list[LayerReport]) -> list[str]:
    """One line per layer: the experts' largest prompt-vector cosine, and the calibrated fit if any."""
    lines = []
    for r in reports:
        parts = [f"layer {r.layer:3d}"]
        if r.max_cosine is not None:
            parts.append(f"max cosine {r.max_cosine:.3f}")
        c = r.calibrated
        if c is not None:
            prompt = c.train_accuracy if r.prompt_accuracy is None else r.prompt_accuracy
            routing = f"routing accuracy on prompt tokens {prompt:.3f}"
            if r.answer_accuracy is not None:
                routing += f", on answer tokens {r.answer_accuracy:.3f}"
            parts.append(
                f"{routing}, mean top-1 probability {c.mean_top1:.3f}, scale {c.scale:.3g}, shrinkage {c.shrinkage:.3g}"
            )
        if len(parts) > 1:
            lines.append("mergesmith: router " + ", ".join(parts))
    return lines
