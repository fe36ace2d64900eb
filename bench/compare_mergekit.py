"""Merge the same configs with mergesmith and mergekit (if installed) and compare the outputs tensor by tensor.

Usage: python bench/compare_mergekit.py MODELS_DIR [--mergekit-yaml PATH] [--out DIR]
MODELS_DIR holds base/, ft1/, ft2/ (same architecture). Prints, per method, the largest absolute
difference and the fraction of elements that differ.
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
}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


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
                f"{name:16s} tensor names differ: only ours {sorted(set(a) - set(b))[:3]}, only theirs {sorted(set(b) - set(a))[:3]}"
            )
            continue
        worst, differ, total = 0.0, 0, 0
        for k in a:
            if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
                print(f"{name:16s} {k}: {a[k].shape} {a[k].dtype} vs {b[k].shape} {b[k].dtype}")
                continue
            d = (a[k].double() - b[k].double()).abs()
            worst = max(worst, float(d.max()))
            differ += int((d > 0).sum())
            total += d.numel()
        print(
            f"{name:16s} max |diff| {worst:.3g}  differing elements {differ}/{total} ({differ / total:.2%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
