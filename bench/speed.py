"""Speed and memory of mergesmith against mergekit on models of the Qwen2-0.5B shape.

Creates three bf16 models (vocab 151936, hidden 896, intermediate 4864, 24 layers, tied embeddings; random
weights; the fine-tunes are the base plus small noise) once in a cache folder, then for each method runs
mergesmith and, if installed, mergekit on the same config, alternating, several times. Prints median wall
time and peak RSS of each tool, their ratios, and the I/O floor (reading the inputs from the page cache and
writing the output bytes). Checks that both tools' outputs agree.

    python bench/speed.py [--runs 3] [--methods ties slerp] [--mergekit mergekit-yaml] [--deep]
    python bench/speed.py --shape llama3b --device-args="--device cuda" --mergekit-args=--cuda  # bench/gpu.sh

``--shape llama3b`` uses three models of the Llama-3.2-3B shape instead (bench/speed_large.py makes them;
``llama-tiny`` is a small model of that layout, to try the script). ``--device-args`` adds a second
mergesmith run per method with those arguments and compares its output with the first one's: tensor by
tensor up to float rounding, and for DARE whether the same entries were dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CACHE = Path(
    os.environ.get("MERGESMITH_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench-cache")
)
SHAPE = dict(vocab=151936, hidden=896, inter=4864, layers=24, heads=14, kv_heads=2)
METHODS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.4}}\n  - model: {f1}\n    parameters: {{weight: 0.3}}\n  - model: {f2}\n    parameters: {{weight: 0.3}}\ndtype: bfloat16\n",
    "slerp": "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\nparameters:\n  t: [0, 0.5, 1]\ndtype: bfloat16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
}
DETERMINISTIC = {"linear", "slerp", "task_arithmetic", "ties"}


def qwen2_config(layers: int) -> dict:
    s = SHAPE
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def qwen2_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    s = SHAPE
    h, i, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * hd
    out = {"model.embed_tokens.weight": (s["vocab"], h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    return out


LLAMA_SHAPES = {
    "llama3b": dict(vocab=128256, hidden=3072, inter=8192, heads=24, kv_heads=8, layers=28),
    "llama-tiny": dict(vocab=1024, hidden=256, inter=512, heads=4, kv_heads=2, layers=2),
}


def make_llama_models(shape: str) -> Path:
    """Three models (base, ft1, ft2) of a Llama shape, made once by bench/speed_large.py's generator."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed_large

    s = dict(LLAMA_SHAPES[shape])
    layers = s.pop("layers")
    root = CACHE / f"{shape}-{layers}L"
    if not (root / "ft2" / "done").exists():
        need = 4 * speed_large.model_bytes(layers, s)
        root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(root).free < need:
            raise SystemExit(
                f"{root}: {need / 1e9:.1f} GB of free disk needed for three models and an output"
            )
        print(f"creating three {shape} models in {root} (once)...", file=sys.stderr)
        speed_large.generate(root, layers, s, models=("base", "ft1", "ft2"))
    return root


def make_models(layers: int) -> Path:
    """The cached models, created by a child process (this process must stay small: children inherit
    its peak RSS through fork/exec, which would spoil their measurements)."""
    root = CACHE / f"qwen2-shape-{layers}L"
    if not (root / "ft2" / "done").exists():
        subprocess.run([sys.executable, __file__, "--_make", str(layers)], check=True)
    return root


def _make_models(layers: int) -> None:
    root = CACHE / f"qwen2-shape-{layers}L"
    print(f"creating three {layers}-layer models in {root} (once)...", file=sys.stderr)
    shapes = qwen2_shapes(layers)
    for k, name in enumerate(["base", "ft1", "ft2"]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        shard, shard_bytes, shards = {}, 0, []
        for tname, shape in shapes.items():
            g = torch.Generator().manual_seed(hash((tname,)) % (2**31))
            t = torch.randn(shape, generator=g) * 0.02
            if k:
                t += (
                    torch.randn(shape, generator=torch.Generator().manual_seed(k * 7919 + len(shard))) * 0.002
                )
            shard[tname] = t.to(torch.bfloat16)
            shard_bytes += shard[tname].numel() * 2
            if shard_bytes > 400e6:
                shards.append(shard)
                shard, shard_bytes = {}, 0
        shards.append(shard)
        weight_map = {}
        for si, sh in enumerate(shards):
            fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, folder / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in sh})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (folder / "config.json").write_text(json.dumps(qwen2_config(layers)))
        (folder / "done").write_text("")


# A small launcher process runs each measured command: a child's peak RSS starts from its parent's RSS at
# fork time, so measuring straight from this (larger) process would inflate the figures.
LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, usage = os.wait4(p.pid, 0)
sys.stderr.buffer.write(err[-4000:])
print(time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of ``cmd``.

    The page cache's dirty data (the previous run's output) is flushed first, outside the timing: else
    the kernel makes this run's writes wait for the last run's, whichever tool wrote them.
    """
    os.sync()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    try:
        wall, maxrss_kb, code = done.stdout.split()
    except ValueError:
        raise SystemExit(f"launcher failed: {done.stderr[-2000:]}") from None
    if int(code):
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return float(wall), int(maxrss_kb) / 1024


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read the input files (page cache) and write ``out_bytes`` to a new file."""
    buf = bytearray(64 << 20)
    os.sync()
    t0 = time.perf_counter()
    for folder in inputs:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(memoryview(buf)[: min(len(buf), left)])
    took = time.perf_counter() - t0
    scratch.unlink()
    return took


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def agreement(a: Path, b: Path) -> str:
    """How far two outputs are apart: elements off by more than one bf16 step, and the largest
    difference relative to the tensor's RMS (a near-zero element can differ by many of its own steps
    while the difference is negligible for the tensor)."""
    ta, tb = load_all(a), load_all(b)
    if set(ta) != set(tb):
        return f"tensor names differ ({len(ta)} vs {len(tb)})"
    exact = beyond_step = total = 0
    worst_rel = 0.0
    for k in ta:
        x, y = ta[k].float(), tb[k].float()
        d = (x - y).abs()
        exact += int((d == 0).sum())
        step = torch.maximum(x.abs(), y.abs()) * 2.0**-8  # one bf16 rounding step
        beyond_step += int((d > step).sum())
        total += d.numel()
        worst_rel = max(worst_rel, float(d.max()) / max(float(y.pow(2).mean().sqrt()), 1e-30))
    return (
        f"{exact / total:.3%} identical, {beyond_step / total:.4%} beyond one bf16 step, "
        f"max |diff| {worst_rel:.2g} x RMS"
    )


def dropped_agreement(a: Path, b: Path, base: Path) -> str:
    """For DARE: whether two outputs dropped the same entries, as the entries left equal to the base's
    (a dropped entry in every model leaves the base; the rest may differ by float rounding)."""
    ta, tb, tbase = load_all(a), load_all(b), load_all(base)
    differ = total = 0
    for k in ta:
        if k not in tbase:
            continue
        same_a, same_b = ta[k] == tbase[k], tb[k] == tbase[k]
        differ += int((same_a != same_b).sum())
        total += same_a.numel()
    return f"entries left at the base: {differ} of {total} differ ({'identical masks' if differ == 0 else 'masks differ'})"


def _agreement_in_child(a: Path, b: Path) -> str:
    done = subprocess.run(
        [sys.executable, __file__, "--_agree", str(a), str(b)], capture_output=True, text=True
    )
    return done.stdout.strip() or done.stderr.strip()[-300:]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_make":
        _make_models(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--_agree":
        print(agreement(Path(sys.argv[2]), Path(sys.argv[3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml to compare with")
    ap.add_argument("--mergesmith", default=shutil.which("mergesmith") or "mergesmith")
    ap.add_argument("--deep", action="store_true", help="also run mergesmith TIES on a 48-layer model")
    ap.add_argument(
        "--maths-dtype",
        default="bfloat16",
        help="the configs' dtype; float32 (with out_dtype bfloat16) makes mergekit compute in float32 as mergesmith does",
    )
    ap.add_argument("--extra", default="", help="extra mergesmith arguments, e.g. '--device cuda'")
    ap.add_argument("--shape", choices=["qwen2-0.5b", *LLAMA_SHAPES], default="qwen2-0.5b")
    ap.add_argument(
        "--device-args",
        default="",
        help="run mergesmith a second time per method with these arguments (e.g. '--device cuda') and compare",
    )
    ap.add_argument("--mergekit-args", default="", help="extra mergekit arguments, e.g. '--cuda'")
    args = ap.parse_args()

    root = make_models(SHAPE["layers"]) if args.shape == "qwen2-0.5b" else make_llama_models(args.shape)
    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    out_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    floors = {
        2: statistics.median(
            io_floor([root / "base", root / "ft1"], out_bytes, work / "floor") for _ in range(3)
        ),
        3: statistics.median(
            io_floor([root / n for n in ("base", "ft1", "ft2")], out_bytes, work / "floor") for _ in range(3)
        ),
    }
    # what any run pays before its first tensor: the interpreter and the imports (torch is most of it)
    startup = statistics.median(
        run_measured([sys.executable, "-c", "import mergesmith.pipeline.api, mergesmith.pipeline.execute"])[0]
        for _ in range(3)
    )
    print(f"I/O floor: {floors[2]:.2f} s (2 inputs), {floors[3]:.2f} s (3 inputs); start-up {startup:.2f} s")
    rows = []
    for method in args.methods:
        cfg = work / f"{method}.yml"
        text = METHODS[method].format(b=root / "base", f1=root / "ft1", f2=root / "ft2")
        if args.maths_dtype != "bfloat16":
            text = text.replace("dtype: bfloat16", f"dtype: {args.maths_dtype}\nout_dtype: bfloat16")
        cfg.write_text(text)
        ours_out, theirs_out = work / f"{method}-mergesmith", work / f"{method}-mergekit"
        ours_cmd = [
            *args.mergesmith.split(),
            "merge",
            str(cfg),
            str(ours_out),
            "--overwrite",
            "--quiet",
            *args.extra.split(),
        ]
        theirs_cmd = (
            [
                args.mergekit,
                str(cfg),
                str(theirs_out),
                "--quiet",
                "--out-shard-size",
                "5B",
                *args.mergekit_args.split(),
            ]
            if args.mergekit
            else None
        )
        dev_out = work / f"{method}-mergesmith-device"
        dev_cmd = [*(str(dev_out) if c == str(ours_out) else c for c in ours_cmd), *args.device_args.split()]
        ours, theirs, dev = [], [], []
        for _ in range(args.runs):
            shutil.rmtree(ours_out, ignore_errors=True)  # deleting the last output is not part of a merge
            ours.append(run_measured(ours_cmd))
            if args.device_args:
                shutil.rmtree(dev_out, ignore_errors=True)
                dev.append(run_measured(dev_cmd))
            if theirs_cmd:
                shutil.rmtree(theirs_out, ignore_errors=True)
                theirs.append(run_measured(theirs_cmd))
        n_in = 2 if method == "slerp" else 3
        row = {
            "method": method,
            "ours_s": statistics.median(t for t, _ in ours),
            "ours_mib": statistics.median(m for _, m in ours),
            "floor_s": floors[n_in],
            "startup_s": startup,
        }
        if dev:
            row["device_s"] = statistics.median(t for t, _ in dev)
            row["device_mib"] = statistics.median(m for _, m in dev)
            row["device_agree"] = (
                agreement(ours_out, dev_out)
                if method in DETERMINISTIC
                else dropped_agreement(ours_out, dev_out, root / "base")
            )
        if theirs:
            row["theirs_s"] = statistics.median(t for t, _ in theirs)
            row["theirs_mib"] = statistics.median(m for _, m in theirs)
            row["agree"] = (
                agreement(ours_out, theirs_out)
                if method in DETERMINISTIC
                else "random masks differ by design"
            )
        rows.append(row)
        print_row(row, args.runs)
    if args.deep:
        deep = make_models(2 * SHAPE["layers"])
        cfg = work / "ties-deep.yml"
        cfg.write_text(METHODS["ties"].format(b=deep / "base", f1=deep / "ft1", f2=deep / "ft2"))
        runs = [
            run_measured(
                [args.mergesmith, "merge", str(cfg), str(work / "ties-deep"), "--overwrite", "--quiet"]
            )
            for _ in range(args.runs)
        ]
        print(
            f"ties, 48 layers: mergesmith {statistics.median(t for t, _ in runs):.1f} s, {statistics.median(m for _, m in runs):.0f} MiB peak RSS"
        )
    return 0


def print_row(r: dict, runs: int) -> None:
    work = r["ours_s"] - r["startup_s"]
    line = (
        f"{r['method']:16s} mergesmith {r['ours_s']:6.1f} s {r['ours_mib']:6.0f} MiB | floor {r['floor_s']:4.1f} s "
        f"(x{r['ours_s'] / r['floor_s']:.2f}; after start-up x{work / r['floor_s']:.2f})"
    )
    if "device_s" in r:
        line += f" | with device args {r['device_s']:6.1f} s {r['device_mib']:6.0f} MiB | vs first run: {r['device_agree']}"
    if "theirs_s" in r:
        line += (
            f" | mergekit {r['theirs_s']:6.1f} s {r['theirs_mib']:6.0f} MiB | speed-up x{r['theirs_s'] / r['ours_s']:.1f}, "
            f"memory x{r['ours_mib'] / r['theirs_mib']:.2f} | {r['agree']}"
        )
    print(line + f"  (median of {runs})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
