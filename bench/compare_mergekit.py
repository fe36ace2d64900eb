"""Merge the same configs with mergesmith and mergekit (if installed) and compare the outputs tensor by tensor.

Usage: python bench/compare_mergekit.py MODELS_DIR [--mergekit-yaml PATH] [--out DIR] [--methods NAME ...]
MODELS_DIR holds base/, ft1/, ft2/ (same architecture). Prints, per config, the largest absolute
difference and the fraction of elements that differ; for methods that draw random numbers also the
fraction of entries changed from the base and the ratio of mean absolute changes (ours / mergekit's).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {f1}\n    parameters: {{weight: 0.3}}\n  - model: {f2}\n    parameters: {{weight: 0.2}}\n",
    "slerp": "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.7}}\n  - model: {f2}\n    parameters: {{weight: [0.2, 0.6]}}\nparameters:\n  lambda: 0.9\n",
    "ties": "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.3}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.5}}\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, 2]\n  - sources:\n      - model: {f1}\n        layer_range: [1, 3]\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.5, gamma: 0.1}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.9, gamma: 0.01}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.5, gamma: 0.2}}\nparameters:\n  rescale: true\n",
    "della": "merge_method: della\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.2}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.4, epsilon: 0.1}}\n",
    "della_linear": "merge_method: della_linear\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.2}}\n  - model: {f2}\n    parameters: {{weight: 0.4, density: 0.4, epsilon: 0.1}}\nparameters:\n  lambda: 1.2\n",
    "model_stock": "merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n",
    "model_stock_rows": "merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\nparameters:\n  filter_wise: true\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.3}}\n  - model: {f2}\n    parameters: {{weight: 0.9}}\n",
    "nuslerp_base_rows": "merge_method: nuslerp\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6}}\n  - model: {f2}\n    parameters: {{weight: 0.4}}\nparameters:\n  nuslerp_flatten: false\n",
    "nuslerp_base_cols": "merge_method: nuslerp\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6}}\n  - model: {f2}\n    parameters: {{weight: 0.4}}\nparameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\n",
    "multislerp": "merge_method: multislerp\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.2}}\n  - model: {f1}\n    parameters: {{weight: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 1.3}}\n",
    "multislerp_base": "merge_method: multislerp\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 1.3}}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: {b}\n  - model: {f1}\n  - model: {f2}\nparameters:\n  max_iter: 20\n",
    "sce": "merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\nparameters:\n  select_topk: 0.3\n",
    "ram": "merge_method: ram\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\nparameters:\n  epsilon: 0.001\n",
    "nearswap": "merge_method: nearswap\nbase_model: {b}\nmodels:\n  - model: {f1}\nparameters:\n  t: 0.0005\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {b}\nmodels:\n  - model: {f1}\n",
}
# Methods that draw random numbers: mergekit's draws differ from ours, so the outputs are compared by
# statistics (fraction of entries changed from the base, mean absolute change) as well.
RANDOM = {"dare_ties", "della", "della_linear"}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def random_stats(ours: dict, theirs: dict, base: dict) -> str:
    """Fraction of entries changed from the base and mean |change|, ours vs mergekit's, over all tensors."""
    changed, mean_abs = [0, 0], [0.0, 0.0]
    total = 0
    for k, b in base.items():
        for i, out in enumerate((ours[k], theirs[k])):
            d = (out.double() - b.double()).abs()
            changed[i] += int((d > 0).sum())
            mean_abs[i] += float(d.sum())
        total += b.numel()
    return (
        f"[changed {changed[0] / total:.2%} vs {changed[1] / total:.2%}, "
        f"mean |change| ratio {mean_abs[0] / max(mean_abs[1], 1e-30):.3f}]"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path)
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mergesmith-compare"))
    ap.add_argument("--methods", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    if not args.mergekit_yaml:
        print("mergekit-yaml not found; install mergekit==0.1.5 to compare", file=sys.stderr)
        return 2
    m = args.models
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        cfg = args.out / f"{name}.yml"
        cfg.write_text(CONFIGS[name].format(b=m / "base", f1=m / "ft1", f2=m / "ft2"))
        ours, theirs = args.out / f"{name}-mergesmith", args.out / f"{name}-mergekit"
        subprocess.run(["mergesmith", "merge", str(cfg), str(ours), "--overwrite", "--quiet"], check=True)
        shutil.rmtree(theirs, ignore_errors=True)
        subprocess.run(
            [args.mergekit_yaml, str(cfg), str(theirs), "--quiet"], check=True, capture_output=True
        )
        a, b = load_all(ours), load_all(theirs)
        if set(a) != set(b):
            print(
                f"{name:18s} tensor names differ: only ours {sorted(set(a) - set(b))[:3]}, only theirs {sorted(set(b) - set(a))[:3]}"
            )
            continue
        worst, differ, total = 0.0, 0, 0
        for k in a:
            if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
                print(f"{name:18s} {k}: {a[k].shape} {a[k].dtype} vs {b[k].shape} {b[k].dtype}")
                continue
            d = (a[k].double() - b[k].double()).abs()
            worst = max(worst, float(d.max()))
            differ += int((d > 0).sum())
            total += d.numel()
        line = (
            f"{name:18s} max |diff| {worst:.3g}  differing elements {differ}/{total} ({differ / total:.2%})"
        )
        if name in RANDOM:
            line += "  " + random_stats(a, b, load_all(m / "base"))
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
