"""Merges larger than memory: TIES and DARE-TIES of four Llama-3.2-3B-shaped models, cold from disk.

Creates (once, in --work) a bf16 base and three fine-tunes of the Llama-3.2-3B shape (vocab 128256, hidden
3072, intermediate 8192, 28 layers, untied embeddings; random weights, the fine-tunes are the base plus
small noise): about 6.4 GB each, 25.7 GB of inputs, more than this machine's page cache can hold. Then,
with every input file dropped from the page cache before each run (posix_fadvise DONTNEED after a sync; the
resident bytes left are printed), it measures in one run, in ``--repeat`` rounds (default 3; the medians
are printed at the end, each merge against the floor of its own round, as the disk's speed drifts):

- the cold floor: reading every input file once, sequentially in large blocks, and writing the output's
  bytes to a new file, each the faster of through the page cache and past it (O_DIRECT), both printed;
- mergesmith TIES and DARE-TIES (wall time, peak RSS of the process);
- mergesmith TIES under ``--memory-limit`` (peak RSS, and whether its bytes equal the unlimited run's);
- optionally mergekit on the TIES merge, once, with a timeout.

    python bench/speed_large.py [--work /work/bench-large] [--layers 28] [--mergekit mergekit-yaml]
    python bench/speed_large.py --layers 4 --methods ties      # a small shape, to try the script
    python bench/speed_large.py --delete                       # remove the generated models

Each measured command runs under a small launcher so that its peak RSS is its own (see bench/speed.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(vocab=128256, hidden=3072, inter=8192, heads=24, kv_heads=8)
MODELS = ("base", "ft1", "ft2", "ft3")
SHARD_BYTES = 2 << 30  # bytes per safetensors shard of a generated model
BLOCK_ELEMS = 1 << 24  # elements generated at once (64 MiB of float32)

CONFIGS = {
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
    + "".join(f"  - model: {{{m}}}\n    parameters: {{{{weight: 0.4, density: 0.5}}}}\n" for m in MODELS[1:])
    + "dtype: bfloat16\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
    + "".join(f"  - model: {{{m}}}\n    parameters: {{{{weight: 0.4, density: 0.5}}}}\n" for m in MODELS[1:])
    + "dtype: bfloat16\n",
}


def llama_config(layers: int, s: dict = SHAPE) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["hidden"] // s["heads"],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def llama_shapes(layers: int, s: dict = SHAPE) -> dict[str, tuple[int, ...]]:
    h, i = s["hidden"], s["inter"]
    kv = s["kv_heads"] * (h // s["heads"])
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (s["vocab"], h)
    return out


def model_bytes(layers: int, s: dict = SHAPE) -> int:
    return sum(2 * int(np.prod(shape)) for shape in llama_shapes(layers, s).values())


def human(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# --- generating the models -----------------------------------------------------------------------


def _shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        entries[name] = {
            "dtype": "BF16",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _block(seed: tuple[int, ...], n: int, k: int, norm: bool) -> np.ndarray:
    """Block ``seed`` of model k (0: the base) as bfloat16 bits. The base's magnitudes are log-uniform
    between 2**-12 and 2**-4 with random signs and mantissas; a fine-tune moves each value of the base
    by -1, 0, +1 or +2 units in the last place, as small fine-tuning updates do in bfloat16. Built from
    random bytes in a few integer passes: about 1 ns an element (normal samples took 10-20 times more
    on this 2-core machine, and four 7 GB models are 14 billion elements)."""
    if norm:
        return np.full(n, 0x3F80, dtype=np.uint16)  # 1.0
    r = np.frombuffer(np.random.default_rng(seed).bytes(2 * n), dtype=np.uint16)
    base = (r & np.uint16(0x807F)) | ((np.uint16(115) + ((r >> np.uint16(7)) & np.uint16(7))) << np.uint16(7))
    if k == 0:
        return base
    step = np.frombuffer(np.random.default_rng((*seed, k)).bytes(n), dtype=np.uint8) & np.uint8(3)
    return base + step.astype(np.uint16) - np.uint16(1)


def generate(work: Path, layers: int, s: dict = SHAPE, models: tuple[str, ...] = MODELS) -> None:
    """Write the four models tensor by tensor, block by block (memory: a few blocks of 32 MiB); seeded,
    so the same models every time."""
    shapes = llama_shapes(layers, s)
    shards = _shards(shapes)
    folders = [work / m for m in models]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    # one pool of random blocks per model, each block of the models a slice of it at a random offset:
    # writing is then the only cost (the content only has to look like weights to the merge)
    spare = 1 << 20
    pools = [_block((0,), BLOCK_ELEMS + spare, k, False) for k in range(len(models))]
    ones = _block((0,), BLOCK_ELEMS, 0, True)
    t0 = time.perf_counter()
    for si, names in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header = _header(names, shapes)
        files = [open(folder / fname, "wb") for folder in folders]  # noqa: SIM115 - closed below
        try:
            for f in files:
                f.write(len(header).to_bytes(8, "little") + header)
            for ti, name in enumerate(names):
                numel = int(np.prod(shapes[name]))
                for b, start in enumerate(range(0, numel, BLOCK_ELEMS)):
                    n = min(BLOCK_ELEMS, numel - start)
                    off = int(np.random.default_rng((si, ti, b)).integers(0, spare))
                    for pool, f in zip(pools, files):
                        f.write(memoryview(ones[:n] if name.endswith("norm.weight") else pool[off : off + n]))
        finally:
            for f in files:
                f.close()
        print(f"  shard {si + 1}/{len(shards)} written ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    weight_map = {
        name: f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        for si, ns in enumerate(shards)
        for name in ns
    }
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (folder / "config.json").write_text(json.dumps(llama_config(layers, s)))
        (folder / "done").write_text(f"{layers}\n")


def ensure_models(work: Path, layers: int) -> None:
    if all((work / m / "done").exists() for m in MODELS):
        if (work / MODELS[0] / "done").read_text().strip() != str(layers):
            raise SystemExit(
                f"{work} holds models of another depth; use another --work or --delete them first"
            )
        return
    need = (len(MODELS) + 1) * model_bytes(layers) + (1 << 30)  # the inputs, one output, 1 GiB to spare
    have = shutil.disk_usage(work).free + sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    if have < need:
        raise SystemExit(
            f"not enough disk space in {work}: the four models and one output need {human(need)}, "
            f"{human(have)} are free there; free some space or pass --work on another disk"
        )
    print(
        f"creating four {layers}-layer models of {human(model_bytes(layers))} in {work} (once)...",
        file=sys.stderr,
    )
    generate(work, layers)


# --- measuring -----------------------------------------------------------------------------------


LAUNCHER = """
import os, resource, subprocess, sys, time
timeout, max_anon = float(sys.argv[1]), int(sys.argv[2])
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[3:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err, why = [], ""
import threading
reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
reader.start()
while p.poll() is None:
    time.sleep(0.5)
    if timeout and time.perf_counter() - t0 > timeout:
        why = "timed out"
    try:
        with open(f"/proc/{p.pid}/status") as f:
            anon = next((int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:")), 0)
    except OSError:
        anon = 0
    if max_anon and anon > max_anon:
        why = f"stopped at {anon / 2**30:.1f} GiB of anonymous memory"
    if why:
        p.kill()
        p.wait()
        break
wall = time.perf_counter() - t0
reader.join(5)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stderr.buffer.write(b"".join(err)[-3000:])
print(wall, usage.ru_maxrss, p.returncode, why.replace(" ", "_") or "-", usage.ru_utime + usage.ru_stime)
"""


LAST_CPU = [0.0]  # CPU seconds of the last command measured


def run_measured(cmd: list[str], timeout: float = 0, max_anon: int = 0) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MiB), exit code of ``cmd`` and why it was stopped ('' if it was not)
    (its CPU seconds, user and system, go to ``LAST_CPU``):
    after ``timeout`` seconds, or when its anonymous memory passes ``max_anon`` bytes (0: no limit),
    so that a tool that needs more memory than the machine has is stopped before the kernel's
    out-of-memory killer picks a process."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(timeout), str(max_anon), *cmd],
        capture_output=True,
        text=True,
        errors="replace",  # a tool's stderr cut at 3000 bytes may end inside a UTF-8 character
    )
    try:
        wall, maxrss_kb, rc, why, cpu = done.stdout.split()
    except ValueError:
        raise SystemExit(f"launcher failed: {done.stderr[-2000:]}") from None
    why = "" if why == "-" else why.replace("_", " ")
    LAST_CPU[0] = float(cpu)
    if int(rc) != 0 and not why:
        print(f"command failed ({rc}): {' '.join(cmd)}\n{done.stderr[-2000:]}", file=sys.stderr)
    return float(wall), int(maxrss_kb) / 1024, int(rc), why


def input_files(work: Path) -> list[Path]:
    return [f for m in MODELS for f in sorted((work / m).glob("*.safetensors"))]


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of ``files`` in the page cache (util-linux fincore), or None without it."""
    if not shutil.which("fincore"):
        return None
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
        capture_output=True,
        text=True,
    )
    try:
        return sum(int(x) for x in done.stdout.split())
    except ValueError:
        return None


def drop_cache(files: list[Path]) -> int | None:
    """Flush dirty data (the last run's output) and drop ``files`` from the page cache; returns the
    bytes of them still resident afterwards."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_bytes(files)


def _read_all(files: list[Path], direct: bool) -> float:
    """Seconds to read ``files`` once, in order, 64 MiB at a time: through the page cache, or past it
    (O_DIRECT, into a page-aligned buffer)."""
    buf = mmap.mmap(-1, 64 << 20)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, flags)
        try:
            pos = 0
            while n := os.preadv(fd, [buf], pos):
                pos += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _write_new(path: Path, nbytes: int, direct: bool) -> float:
    """Seconds to write ``nbytes`` to a new preallocated file (as the merge's writer does), through the
    page cache or past it; the file is removed and the page cache flushed afterwards."""
    buf = mmap.mmap(-1, 64 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        out = os.open(path, os.O_WRONLY | os.O_DIRECT) if direct else fd
        t0 = time.perf_counter()
        pos = 0
        while pos < nbytes:
            n = min(len(buf), nbytes - pos)
            if direct and n % 4096:
                os.close(out)
                out = fd  # the last partial block: through the page cache
            pos += os.pwrite(out, memoryview(buf)[:n], pos)
        seconds = time.perf_counter() - t0
        if out != fd:
            os.close(out)
    finally:
        os.close(fd)
    path.unlink()
    os.sync()
    return seconds


def cold_floor(files: list[Path], out_bytes: int, scratch: Path) -> tuple[float, float, str]:
    """(seconds to read ``files`` once from disk, seconds to write ``out_bytes`` to a new file, how): each
    the faster of a read through the page cache and one past it (O_DIRECT), the files dropped from the
    page cache before each. On a VM, a cold read through the page cache can be CPU-bound (a fresh page per
    4 KiB) and slower than the disk; the floor is what the disk can do."""
    times = {}
    for direct in (False, True):
        drop_cache(files)
        times["read", direct] = _read_all(files, direct)
        times["write", direct] = _write_new(scratch, out_bytes, direct)
    how = ", ".join(
        f"{what} {times[what, False]:.1f} s buffered / {times[what, True]:.1f} s direct"
        for what in ("read", "write")
    )
    return (
        min(times["read", False], times["read", True]),
        min(times["write", False], times["write", True]),
        how,
    )


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--work", type=Path, default=Path("/work/bench-large"), help="where the models and outputs go"
    )
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--methods", nargs="*", default=list(CONFIGS))
    ap.add_argument("--mergesmith", default=f"{sys.executable} -m mergesmith", help="the mergesmith command")
    ap.add_argument("--extra", default="", help="extra mergesmith arguments")
    ap.add_argument(
        "--memory-limit", default="1G", help="also run TIES under this --memory-limit ('' to skip)"
    )
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml to run once on the TIES merge")
    ap.add_argument("--mergekit-timeout", type=float, default=1200, help="seconds before mergekit is stopped")
    ap.add_argument(
        "--mergekit-max-gib", type=float, default=14, help="stop mergekit past this much anonymous memory"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="rounds of (cold floor, each method); medians are printed"
    )
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument(
        "--delete", action="store_true", help="delete the generated models and outputs, then exit"
    )
    args = ap.parse_args()
    work = args.work.resolve()
    if args.delete:
        for name in (*MODELS, "out", "configs"):
            shutil.rmtree(work / name, ignore_errors=True)
        print(f"deleted the models and outputs in {work}")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    ensure_models(work, args.layers)
    if args.generate_only:
        return 0
    files = input_files(work)
    in_bytes = sum(f.stat().st_size for f in files)
    out_bytes = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    print(
        f"{args.layers} layers: inputs {human(in_bytes)} in {len(files)} files, output {human(out_bytes)}; "
        f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores",
        flush=True,
    )
    left = drop_cache(files)
    print(
        f"cold runs: posix_fadvise(POSIX_FADV_DONTNEED) on every input after a sync; resident after it: "
        f"{'unknown (no fincore)' if left is None else human(left)}",
        flush=True,
    )
    floors: list[float] = []

    def measure_floor() -> float:
        read_s, write_s, how = cold_floor(files, out_bytes, work / "floor.tmp")
        floors.append(read_s + write_s)
        print(
            f"cold floor {read_s + write_s:.1f} s: read {read_s:.1f} s ({in_bytes / read_s / 1e6:.0f} MB/s), "
            f"write {write_s:.1f} s ({how})",
            flush=True,
        )
        return read_s + write_s

    floor = measure_floor()
    cfg_dir = work / "configs"
    cfg_dir.mkdir(exist_ok=True)
    out = work / "out"
    models = {m: str(work / m) for m in MODELS}
    ms = args.mergesmith.split()
    rows = []
    digests = {}

    ratios: dict[str, list[tuple[float, float, float, float]]] = {}  # label -> (x floor, wall, CPU, RSS)

    def ours(method: str, extra: list[str], label: str) -> None:
        cfg = cfg_dir / f"{method}.yml"
        cfg.write_text(CONFIGS[method].format(**models))
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(files)
        load = os.getloadavg()[0]
        wall, rss, rc, _ = run_measured(
            [*ms, "merge", str(cfg), str(out), "--quiet", *args.extra.split(), *extra]
        )
        digests[label] = digest(out) if rc == 0 else "failed"
        rows.append((label, wall, rss, rc, load))
        ratios.setdefault(label, []).append((wall / floor, wall, LAST_CPU[0], rss))
        print(
            f"{label:28s} {wall:7.1f} s  x{wall / floor:.2f} floor  CPU {LAST_CPU[0]:5.0f} s  peak RSS {rss:6.0f} MiB  "
            f"(load {load:.1f}) {'' if rc == 0 else f'exit {rc}'}",
            flush=True,
        )

    for rep in range(args.repeat):
        if rep:
            floor = measure_floor()  # the disk's speed drifts: each round against its own floor
        for method in args.methods:
            ours(method, [], f"mergesmith {method}")
    if args.repeat > 1:
        print(f"median of {args.repeat} rounds, each run against the floor measured just before its round:")
        for label, runs in ratios.items():
            x, wall, cpu, rss = (statistics.median(r[i] for r in runs) for i in range(4))
            spread = f"{min(r[0] for r in runs):.2f}-{max(r[0] for r in runs):.2f}"
            print(
                f"{label:28s} {wall:7.1f} s  x{x:.2f} floor ({spread})  CPU {cpu:5.0f} s  peak RSS {rss:6.0f} MiB",
                flush=True,
            )
        print(
            f"floor: median {statistics.median(floors):.1f} s ({min(floors):.1f}-{max(floors):.1f})",
            flush=True,
        )
    if args.memory_limit and "ties" in args.methods:
        ours("ties", ["--memory-limit", args.memory_limit], f"mergesmith ties {args.memory_limit}")
        same = digests[f"mergesmith ties {args.memory_limit}"] == digests["mergesmith ties"]
        print(
            f"  --memory-limit {args.memory_limit}: {'the same bytes' if same else 'DIFFERENT BYTES'}",
            flush=True,
        )
    shutil.rmtree(out, ignore_errors=True)
    if args.mergekit:
        cfg = cfg_dir / "ties.yml"
        cfg.write_text(CONFIGS["ties"].format(**models))
        theirs = work / "out-mergekit"
        shutil.rmtree(theirs, ignore_errors=True)
        drop_cache(files)
        load = os.getloadavg()[0]
        wall, rss, rc, why = run_measured(
            [args.mergekit, str(cfg), str(theirs), "--out-shard-size", "5B"],
            timeout=args.mergekit_timeout,
            max_anon=int(args.mergekit_max_gib * 2**30),
        )
        shown = (
            f"{wall:.1f} s"
            if not why
            else f"> {wall / 60:.0f} min ({why})"
            if why == "timed out"
            else f"{wall:.0f} s, {why}"
        )
        print(
            f"{'mergekit ties':28s} {shown}  x{wall / floor:.2f} floor  peak RSS {rss:6.0f} MiB  (load {load:.1f})"
            f"{'' if rc == 0 or why else f' exit {rc}'}",
            flush=True,
        )
        shutil.rmtree(theirs, ignore_errors=True)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
