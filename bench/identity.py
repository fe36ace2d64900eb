"""Byte-identity of every command's output, before and after a change that must not change behaviour.

Runs a fixed set of jobs on the shipped skill models (examples/skills/models): the five merges of
bench/speed.py on both backends, the demo's merges, a multi-stage file, a passthrough, `--out-format
bitnet`, `moe` (docs/moe.md's calibrated example), `bitnet` to transformers and to GGUF, and
`extract-lora`; then prints one sha256 per output file. Save the figures before the change and compare
after it:

    python bench/identity.py --save /tmp/before.json
    python bench/identity.py --compare /tmp/before.json     # exit 1 and the differing files if any

Each job runs through the command line (in this process) into a fresh folder under --work; the outputs
are also identical from one run to the next, which `--compare` against a second run of unchanged code
shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "skills" / "models"

SPEED_METHODS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.4}}\n  - model: {f1}\n    parameters: {{weight: 0.3}}\n  - model: {f2}\n    parameters: {{weight: 0.3}}\ndtype: bfloat16\n",
    "slerp": "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\nparameters:\n  t: [0, 0.5, 1]\ndtype: bfloat16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
}

VOLATILE = {"mergesmith_stage.json"}  # a stage's marker records its files' mtimes

OTHER_CONFIGS = {
    "della": "merge_method: della\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.6, epsilon: 0.1}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.6, epsilon: 0.1}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n  - model: {f3}\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources: [{{model: {f1}, layer_range: [0, 2]}}]\n  - sources: [{{model: {f2}, layer_range: [1, 3]}}]\n",
    "stages": "name: first\nmerge_method: linear\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5}}\n---\nmerge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: first\n    parameters: {{weight: 1.0}}\n  - model: {f3}\n    parameters: {{weight: 0.5}}\n",
}

MOE = """base_model: {b}
gate_mode: calibrated
experts_per_token: 2
dtype: bfloat16
experts:
  - source_model: {f1}
    positive_prompts: ["count a: abcab=", "count e: cdbea=", "count d: deb=", "count b: deea="]
  - source_model: {f2}
    positive_prompts: ["rev: mlbfzv=", "rev: ashg=", "rev: lakwgi=", "rev: ougjkmd="]
"""


def jobs(work: Path) -> dict[str, list[str]]:
    """Job name -> mergesmith command line (its output folder is work/<name>)."""
    rel = MODELS.relative_to(ROOT)  # relative: cards and saved configs then read the same in any checkout
    names = {"b": rel / "base", "f1": rel / "count", "f2": rel / "rev", "f3": rel / "sort"}
    out: dict[str, list[str]] = {}

    def config(name: str, text: str) -> str:
        path = work / "configs" / f"{name}.yml"
        path.write_text(text.format(**names))
        return str(path)

    for method, text in SPEED_METHODS.items():
        cfg = config(method, text)
        for backend in ("native", "torch"):
            out[f"{method}-{backend}"] = ["merge", cfg, "--backend", backend, "-q"]
    for name, text in OTHER_CONFIGS.items():
        out[name] = ["merge", config(name, text), "-q"]
    out["ties-bitnet"] = ["merge", config("ties", SPEED_METHODS["ties"]), "--out-format", "bitnet", "-q"]
    out["moe"] = ["moe", config("moe", MOE), "--quiet"]
    out["bitnet-hf"] = ["bitnet", str(names["f1"])]
    out["bitnet-gguf"] = ["bitnet", str(names["f1"]), "--format", "gguf", "--include", r"mlp\.down_proj"]
    out["extract-lora"] = ["extract-lora", "--base", str(names["b"]), "--model", str(names["f1"])]
    out["extract-lora"] += ["--rank", "8", "--quiet"]
    return out


def run_all(work: Path) -> dict[str, str]:
    """Run every job; returns "job/relative/file" -> sha256 of its bytes."""
    from mergesmith.cli import main

    (work / "configs").mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    for name, argv in jobs(work).items():
        dest = work / name
        # OUT is the positional after CONFIG / MODEL (extract-lora: its only positional)
        argv = [*argv[:2], str(dest), *argv[2:]] if argv[0] != "extract-lora" else [*argv, str(dest)]
        code = main(argv)
        if code != 0:
            raise SystemExit(f"job {name} failed with exit code {code}: mergesmith {' '.join(argv)}")
        for f in sorted(p for p in dest.rglob("*") if p.is_file() and p.name not in VOLATILE):
            digests[f"{name}/{f.relative_to(dest)}"] = hashlib.sha256(f.read_bytes()).hexdigest()
        print(f"{name}: {sum(1 for k in digests if k.startswith(name + '/'))} files", file=sys.stderr)
    return digests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", type=Path, help="write the digests to this JSON file")
    ap.add_argument("--compare", type=Path, help="compare with digests saved earlier; exit 1 on a difference")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mergesmith-identity",
        help="where the outputs go; the same folder each run (a multi-stage output names its stages' "
        "folder), emptied first and removed after (default: %(default)s)",
    )
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work.resolve()
    os.chdir(ROOT)
    if work.exists():
        shutil.rmtree(work)
    try:
        digests = run_all(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(digests)} output files")
    if args.save:
        args.save.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = sorted(k for k in before.keys() | digests.keys() if before.get(k) != digests.get(k))
        for k in differ:
            print(
                f"differs: {k} ({'missing now' if k not in digests else 'new' if k not in before else 'bytes'})"
            )
        print(f"{len(before) - len(differ)} identical, {len(differ)} differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
