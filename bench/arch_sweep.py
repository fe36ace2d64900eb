"""Which transformers families mergesmith merges: every causal-LM and image-text-to-text family of the
installed transformers, built tiny from its config class (nothing is downloaded), then three checks:

- linear: a linear merge (weights 0.5) of two fine-tunes equals their mean, tensor by tensor;
- ties: a TIES merge of the two onto the base runs and its output loads with transformers;
- passthrough: a self-merge of layers [0, 2) + [1, 2) loads with transformers with no missing or unexpected
  keys and gives finite logits.

A family whose tiny config or model cannot be built is "not built" (a transformers constraint this script's
generic shrinking does not meet); a check that mergesmith refuses with a one-line MergeError is "refused"
with its message; anything else is "fail". Prints a Markdown table and a summary:

    python bench/arch_sweep.py [--only llama,jamba] [--work /tmp/sweep]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from mergesmith.core.layer_config import VALUE_KEYS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# config keys shrunk wherever they occur (the top level and every sub-config)
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "n_group": 1,
    "topk_group": 1,
    "max_position_embeddings": 128,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
}
# layer-placement fields brought within the tiny depth
PERIODS = {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}
TEXT_LAYERS = 3
TOWER_LAYERS = 2
VOCAB = 512


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    d = cls().to_dict()

    def shrink(node: dict, top: bool) -> dict:
        out = {}
        for k, v in node.items():
            if isinstance(v, dict) and "model_type" in v:
                out[k] = shrink(v, False)
            elif k in SMALL and isinstance(v, int) and not isinstance(v, bool) and v > SMALL[k]:
                out[k] = SMALL[k]
            elif k in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "depth"):
                out[k] = TEXT_LAYERS if (top or "text" in node.get("model_type", "")) else TOWER_LAYERS
            elif k == "vocab_size" and isinstance(v, int) and v > VOCAB:
                out[k] = VOCAB
            elif k.endswith(("_token_id", "_token_index")) and isinstance(v, int) and v >= VOCAB:
                out[k] = VOCAB - 1 - (hash(k) % 64)
            elif k in VALUE_KEYS and isinstance(v, list):
                out[k] = None  # the family's default for the tiny depth
            elif k in PERIODS and isinstance(v, int):
                out[k] = PERIODS[k]
            elif k == "first_k_dense_replace" and isinstance(v, int):
                out[k] = 1
            else:
                out[k] = v
        return out

    small = shrink(d, True)
    for node in [small] + [v for v in small.values() if isinstance(v, dict) and "model_type" in v]:
        if "qk_rope_head_dim" in node and "head_dim" in node:
            node["head_dim"] = node["qk_rope_head_dim"]
        rope = node.get("rope_parameters") or node.get("rope_scaling")
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
            rope["mrope_section"] = [1, 1, 2]
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(small.get(key), dict):
            for k in ("num_hidden_layers", "num_layers", "n_layer"):
                if k in small[key]:
                    small[key][k] = TEXT_LAYERS
    return cls(**{k: v for k, v in small.items() if v is not None or k not in VALUE_KEYS})


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("timed out")


def one(model_type: str, auto: str, work: Path) -> dict:
    import transformers

    import mergesmith
    from mergesmith.core.errors import MergeError
    from tiny_models import perturb

    row = {"family": model_type, "class": auto.replace("AutoModelFor", "")}
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(config)
        base = work / "base"
        model.save_pretrained(base)
        del model
    except Exception as e:  # noqa: BLE001 - a family this generic shrinking cannot build
        row["built"] = f"not built: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
        return row
    try:
        loads_base = getattr(transformers, auto).from_pretrained(base)
        with torch.no_grad():
            loads_base(input_ids=torch.tensor([[3, 5, 7, 9]]))
        del loads_base
    except Exception as e:  # noqa: BLE001 - the tiny model itself does not run: not a merge result
        row["built"] = f"not runnable: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
        return row
    row["built"] = "ok"
    ft1 = perturb(base, work / "ft1", 0.1, seed=1)
    ft2 = perturb(base, work / "ft2", 0.1, seed=2)

    def check(name, fn):
        try:
            fn()
            row[name] = "ok"
        except MergeError as e:
            row[name] = f"refused: {str(e)[:140]}"
        except Exception as e:  # noqa: BLE001
            row[name] = f"fail: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    def loads(folder: Path):
        m, info = getattr(transformers, auto).from_pretrained(folder, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise AssertionError(
                f"missing {sorted(info['missing_keys'])[:2]} unexpected {sorted(info['unexpected_keys'])[:2]}"
            )
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([[3, 5, 7, 9]])).logits
        if not torch.isfinite(logits).all():
            raise AssertionError("non-finite logits")

    def linear():
        from safetensors.torch import load_file

        cfg = {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (ft1, ft2)],
            "dtype": "float32",
        }
        out = mergesmith.merge(cfg, work / "linear", quiet=True)
        got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        a = {k: v for f in ft1.glob("*.safetensors") for k, v in load_file(f).items()}
        b = {k: v for f in ft2.glob("*.safetensors") for k, v in load_file(f).items()}
        assert got.keys() == a.keys(), "different tensor names"
        for k, v in got.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, (a[k].float() + b[k].float()) / 2, rtol=1e-5, atol=1e-5)

    def ties():
        cfg = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in (ft1, ft2)],
        }
        loads(mergesmith.merge(cfg, work / "ties", quiet=True))

    def passthrough():
        cfg = {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(base), "layer_range": r}]} for r in ([0, 2], [1, 2])],
        }
        loads(mergesmith.merge(cfg, work / "pt", quiet=True))

    check("linear", linear)
    check("ties", ties)
    check("passthrough", passthrough)
    return row


def families(only: set[str] | None) -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    out = [(t, "AutoModelForCausalLM") for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    out += [(t, "AutoModelForImageTextToText") for t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES]
    return [(t, a) for t, a in out if only is None or t in only]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per family")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--max-memory-gib",
        type=float,
        default=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.7 / 2**30,
        help="address-space limit of this process (default 70%% of RAM): a family whose tiny build still "
        "asks for more (inkling_mm_model) fails to allocate and is 'not built', instead of the kernel's "
        "out-of-memory killer ending the sweep",
    )
    args = ap.parse_args()
    limit = int(args.max_memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = args.work or Path(tempfile.mkdtemp(prefix="arch-sweep-"))
    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    todo = families(set(args.only.split(",")) if args.only else None)
    for i, (model_type, auto) in enumerate(todo):
        work = root / f"{model_type}-{auto}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        signal.alarm(args.timeout)
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                row = one(model_type, auto, work)
        except Timeout:
            row = {"family": model_type, "class": auto.replace("AutoModelFor", ""), "built": "timed out"}
        finally:
            signal.alarm(0)
            shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        print(f"[{i + 1}/{len(todo)}] {row}", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("| family | class | linear | ties | passthrough |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["built"] != "ok":
            print(f"| {r['family']} | {r['class']} | {r['built']} | | |")
        else:
            cells = [r[k].replace("|", "/") for k in ("linear", "ties", "passthrough")]
            print(f"| {r['family']} | {r['class']} | " + " | ".join(cells) + " |")
    built = [r for r in rows if r["built"] == "ok"]
    print(
        f"\n{sum(r['built'].startswith('not runnable') for r in rows)} built but not runnable (as built)",
        end="",
    )
    full = [r for r in built if all(r[k] == "ok" for k in ("linear", "ties", "passthrough"))]
    refused = [r for r in built if any(r[k].startswith("refused") for k in ("linear", "ties", "passthrough"))]
    print(
        f"\n{len(rows)} families, {len(built)} built, {len(full)} pass all three checks, "
        f"{len(refused)} with a check refused (one-line error), "
        f"{len(built) - len(full) - len(refused)} with a check failing otherwise"
    )


if __name__ == "__main__":
    main()
