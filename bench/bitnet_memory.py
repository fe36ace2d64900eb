"""Peak memory of running a BitNet export with mergesmith's packed reference kernel, against the float model.

Creates (once, in a cache folder) a random Llama of hidden 1024, intermediate 4096, 8 layers, vocab
4096 (134 M parameters in ternarisable matrices), saved in float32 and bfloat16, and the bf16 model's
BitNet export (``mergesmith bitnet``, autobitlinear). Then, each in a fresh process, loads one variant
and runs one forward pass over a batch of tokens, and reports the process's resident memory over its
baseline (Python, torch and transformers imported) at its peak (``VmHWM``, reset after the imports
through ``/proc/self/clear_refs``) and after the forward. transformers maps float safetensors files
into memory, so their pages count once the forward has touched them, not at load:

* ``float32`` / ``bfloat16``: ``AutoModelForCausalLM.from_pretrained`` of the float checkpoints;
* ``transformers autobitlinear``: the packed export loaded by transformers (it unpacks once, at load);
* ``transformers bitlinear``: the same model exported with ``--linear-class bitlinear``, which
  transformers keeps packed and unpacks whole on every forward;
* ``mergesmith reference``: :func:`mergesmith.bitnet.reference.load_reference_model` of the packed
  export: packed bytes stay packed, each matmul unpacks one tile at a time (int8 x ternary, int32).

    PYTHONPATH=src python bench/bitnet_memory.py [--cache .bench-cache/bitnet_memory] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=4096,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
VARIANTS = (
    "float32",
    "bfloat16",
    "transformers autobitlinear",
    "transformers bitlinear",
    "mergesmith reference",
)


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def build(cache: Path) -> dict[str, Path]:
    """The float32 and bfloat16 checkpoints and the bf16 model's packed BitNet export."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesmith import cli

    paths = {
        "float32": cache / "float32",
        "bfloat16": cache / "bfloat16",
        "packed": cache / "bitnet",
        "bitlinear": cache / "bitnet-bitlinear",
    }
    if not paths["float32"].exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
        model.save_pretrained(paths["float32"])
        model.to(torch.bfloat16).save_pretrained(paths["bfloat16"])
        del model
    if not paths["packed"].exists():
        assert cli.main(["bitnet", str(paths["bfloat16"]), str(paths["packed"])]) == 0
    if not paths["bitlinear"].exists():
        out = str(paths["bitlinear"])
        assert cli.main(["bitnet", str(paths["bfloat16"]), out, "--linear-class", "bitlinear"]) == 0
    return paths


def child(variant: str, folder: Path, tokens: int) -> None:
    """Load one variant, run one forward pass, print memory figures as JSON (runs in its own process)."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline is taken)
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    from mergesmith.bitnet.reference import load_reference_model

    torch.set_num_threads(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status("VmRSS")
    start = time.perf_counter()
    if variant == "mergesmith reference":
        model = load_reference_model(folder)
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(variant, "auto")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids).logits
    forward_s = time.perf_counter() - start
    result = {
        "variant": variant,
        "after": _status("VmRSS") - base,
        "peak": _status("VmHWM") - base,
        "load_s": load_s,
        "forward_s": forward_s,
        "finite": bool(torch.isfinite(logits).all()),
    }
    print(json.dumps(result))


def run_child(variant: str, folder: Path, tokens: int) -> dict:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, __file__, "--child", variant, "--folder", str(folder), "--tokens", str(tokens)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / ".bench-cache" / "bitnet_memory")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.folder, args.tokens)
        return
    sys.path.insert(0, str(ROOT / "src"))
    paths = build(args.cache)
    folders = {
        "float32": paths["float32"],
        "bfloat16": paths["bfloat16"],
        "transformers autobitlinear": paths["packed"],
        "transformers bitlinear": paths["bitlinear"],
        "mergesmith reference": paths["packed"],
    }
    sizes = {k: sum(f.stat().st_size for f in v.glob("*.safetensors")) for k, v in folders.items()}
    print(
        f"| variant | weights on disk | peak RSS, load + {args.tokens}-token forward | RSS after | forward |"
    )
    print("| --- | --- | --- | --- | --- |")
    for variant, folder in folders.items():
        r = run_child(variant, folder, args.tokens)
        assert r["finite"]
        mib = 2**20
        print(
            f"| {variant} | {sizes[variant] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
            f"{r['after'] / mib:.0f} MiB | {r['forward_s']:.2f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
