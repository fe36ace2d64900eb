"""MoE models as merge inputs: mergesmith against mergekit 0.1.5 on tiny Mixtral and Qwen3-MoE models saved
with their experts fused (``mlp.experts.gate_up_proj``, as transformers 5 holds them) and per expert
(``block_sparse_moe.experts.N.w1.weight``, as ``save_pretrained`` writes them and as published checkpoints
are).

Usage: python bench/moe_inputs.py [--mergekit-yaml PATH] [--out DIR] [--methods NAME ...]

For each family, layout and method, prints whether mergesmith's output has the input's tensor names (and
mergekit's), then the largest absolute difference and the fraction of expert elements that differ from
mergekit's output, for mergesmith's default (experts merged as one fused tensor, as mergekit) and with
``--per-expert``. The outputs are compared in the fused form (per-expert tensors stacked as transformers 5
fuses them), since mergekit writes the fused layout whatever the input's. float32 throughout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mergesmith.core.arch import expert_group  # noqa: E402
from tiny_models import make_moe_input  # noqa: E402

CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {f1}\n    parameters: {{weight: 0.3}}\n  - model: {f2}\n    parameters: {{weight: 0.2}}\n",
    "ties": "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.3}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.9, gamma: 0.01}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.5, gamma: 0.2}}\n",
    "slerp": "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\nparameters:\n  t: 0.3\n",
    "model_stock": "merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n",
    "sce": "merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\nparameters:\n  select_topk: 0.3\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.5}}\n",
}
# random draws differ from mergekit's by design: compared by the fraction of elements changed from the base
RANDOM = {"dare_ties"}


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def canonical(name: str) -> str:
    """One name for a fused tensor and for the group of per-expert tensors it is made of."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    for group, fused in ((".*.w1+w3.weight", ".gate_up_proj"), (".*.w2.weight", ".down_proj")):
        name = name.replace(group, fused)
    return name.replace(".*.gate_up_proj.weight", ".gate_up_proj").replace(
        ".*.down_proj.weight", ".down_proj"
    )


def fused_form(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor as rows under its canonical name; per-expert tensors stacked in transformers' order."""
    groups: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        found = expert_group(name)
        if found is None:
            out[canonical(name)] = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t
        else:
            groups.setdefault(found[0], []).append((found[1], t))
    for key, parts in groups.items():
        out[canonical(key)] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    return out


def compare(ours: dict, theirs: dict, base: dict, random: bool) -> str:
    a, b, z = fused_form(ours), fused_form(theirs), fused_form(base)
    if set(a) != set(b):
        return f"names differ: {sorted(set(a) ^ set(b))[:3]}"
    worst, differ, total, changed = 0.0, 0, 0, [0, 0]
    for k in a:
        if "experts" not in k:
            continue
        d = (a[k].double() - b[k].double()).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
        changed[0] += int((a[k] != z[k]).sum())
        changed[1] += int((b[k] != z[k]).sum())
    line = f"max |diff| {worst:.3g}, experts differing {differ / total:.2%}"
    if random:
        line += f" (changed from base {changed[0] / total:.1%} vs {changed[1] / total:.1%})"
    return line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mergesmith-moe-inputs"))
    ap.add_argument("--methods", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    if not args.mergekit_yaml:
        print("mergekit-yaml not found; install mergekit==0.1.5 to compare", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for family in ("mixtral", "qwen3_moe"):
        for fused in (True, False):
            layout = "fused" if fused else "per-expert"
            m = args.out / f"{family}-{layout}"
            base, ft1, ft2 = (
                make_moe_input(m / name, family, fused=fused, tune=tune)
                for name, tune in (("base", None), ("ft1", 1), ("ft2", 2))
            )
            names_in = set(load(base))
            for method in args.methods:
                cfg = m / f"{method}.yml"
                cfg.write_text(CONFIGS[method].format(b=base, f1=ft1, f2=ft2) + "dtype: float32\n")
                outs = {}
                for label, extra in (("default", []), ("per-expert", ["--per-expert"])):
                    outs[label] = m / f"{method}-mergesmith-{label}"
                    cmd = [sys.executable, "-m", "mergesmith", "merge", str(cfg), str(outs[label]), "-q"]
                    subprocess.run([*cmd, "--overwrite", *extra], check=True, env=env)
                theirs = m / f"{method}-mergekit"
                subprocess.run(
                    [args.mergekit_yaml, str(cfg), str(theirs), "--quiet"], check=True, capture_output=True
                )
                mk = load(theirs)
                ours = {label: load(path) for label, path in outs.items()}
                same = "same names" if set(ours["default"]) == names_in else "NAMES DIFFER"
                mk_same = "same names" if set(mk) == names_in else f"{len(mk)} tensors"
                print(
                    f"{family:9s} {layout:10s} {method:16s} ours: {len(ours['default'])} tensors, {same}; "
                    f"mergekit: {mk_same}",
                    flush=True,
                )
                base_t = load(base)
                for label in ("default", "per-expert"):
                    line = compare(ours[label], mk, base_t, method in RANDOM)
                    print(f"    {label:10s} vs mergekit: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
