"""The merges of bench/identity.py on a device against the CPU: every native method and the others.

Runs each merge twice on the shipped skill models (examples/skills/models), on the CPU and with
``--device DEVICE``, and compares the outputs tensor by tensor: deterministic methods must agree up to
float rounding (no element beyond a few bfloat16 steps of the tensor's scale), DARE's must drop the same
entries (the entries left equal to the base). Exit 1 on a disagreement. bench/gpu.sh runs it with
``--device cuda``; ``--device cpu --device-args '--backend torch'`` tries it without a GPU.

    python bench/gpu_check.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from identity import MODELS, OTHER_CONFIGS, SPEED_METHODS  # noqa: E402

RANDOM_MASKS = {"dare_ties"}  # random drops whose masks must be the same on every device


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(cpu: Path, dev: Path, base: Path | None, masks: bool) -> tuple[bool, str]:
    a, b = load_dir(cpu), load_dir(dev)
    if set(a) != set(b):
        return False, f"tensor names differ ({len(a)} vs {len(b)})"
    exact = total = 0
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        d = (x - y).abs()
        exact += int((d == 0).sum())
        total += d.numel()
        scale = max(float(x.pow(2).mean().sqrt()), 1e-30)
        worst = max(worst, float(d.max()) / scale)
    line = f"{exact / total:.4%} identical, max |diff| {worst:.2g} x RMS"
    ok = worst <= 2.0**-6  # a few bfloat16 steps of the tensor's scale: rounding, not a different method
    if masks and base is not None:
        bt = load_dir(base)
        differ = sum(int(((a[k] == bt[k]) != (b[k] == bt[k])).sum()) for k in a if k in bt)
        line += f"; entries left at the base differ at {differ}"
        ok = ok and differ == 0
    return ok, line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--device-args", default="", help="more arguments for the device runs")
    args = ap.parse_args()
    from mergesmith.cli import main as mergesmith

    os.chdir(ROOT)
    rel = MODELS.relative_to(ROOT)
    names = {"b": rel / "base", "f1": rel / "count", "f2": rel / "rev", "f3": rel / "sort"}
    work = Path(tempfile.mkdtemp(prefix="mergesmith-gpu-check-"))
    failed = []
    try:
        configs = {**SPEED_METHODS, **{k: v for k, v in OTHER_CONFIGS.items() if k != "stages"}}
        for name, text in configs.items():
            cfg = work / f"{name}.yml"
            cfg.write_text(text.format(**names))
            cpu, dev = work / f"{name}-cpu", work / f"{name}-dev"
            for out, extra in (
                (cpu, ["--backend", "torch"]),
                (dev, ["--device", args.device, *args.device_args.split()]),
            ):
                code = mergesmith(["merge", str(cfg), str(out), "-q", *extra])
                if code != 0:
                    raise SystemExit(f"{name}: merge failed with exit code {code} ({' '.join(extra)})")
            ok, line = compare(cpu, dev, ROOT / names["b"], name in RANDOM_MASKS)
            print(f"{name:16s} {'ok  ' if ok else 'FAIL'} {line}", flush=True)
            if not ok:
                failed.append(name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(configs) - len(failed)} of {len(configs)} merges agree with the CPU on {args.device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
