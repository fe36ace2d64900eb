"""The native backend (numpy + compiled loops, no torch): the same bytes as the torch backend."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith.core.errors import MergeError
from mergesmith.core.loops import dare_norms, dare_rows, row_abs_sums
from mergesmith.core.rng import RandomStream
from mergesmith.methods.stats import RowL1
from mergesmith.pipeline.api import merge
from mergesmith.pipeline.backends.convert import from_float32, to_float32

CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
    "  - model: {f1}\n    parameters: {{weight: 0.35}}\n  - model: {f2}\n    parameters: {{weight: 0.25}}\n",
    "slerp": "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\n"
    "parameters:\n  t: [0, 0.3, 0.8]\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f1}\n"
    "    parameters: {{weight: 0.7}}\n  - model: {f2}\n    parameters: {{weight: 0.4}}\nparameters:\n"
    "  lambda: 1.3\n",
    "ties": "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n"
    "    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.7}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n"
    "    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.7}}\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {b}\nmodels:\n  - model: {f1}\n"
    "    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
    "parameters:\n  normalize: true\n",
}


@pytest.fixture(scope="module")
def trios(llama_trio, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """The tiny Llama trio stored as float32 (as made), bfloat16 and float16."""
    out = {"float32": llama_trio}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        root = tmp_path_factory.mktemp(name)
        folders = []
        for src in llama_trio:
            dst = root / src.name
            dst.mkdir()
            for f in src.iterdir():
                if f.suffix == ".safetensors":
                    save_file({k: v.to(dtype) for k, v in load_file(f).items()}, dst / f.name)
                else:
                    dst.joinpath(f.name).write_bytes(f.read_bytes())
            folders.append(dst)
        out[name] = tuple(folders)
    return out


def _write_config(tmp_path: Path, method: str, trio, extra: str = "") -> Path:
    b, f1, f2 = trio
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(CONFIGS[method].format(b=b, f1=f1, f2=f2) + extra)
    return cfg


def _tensor_bytes(folder: Path) -> dict[str, bytes]:
    return {
        k: v.view(torch.uint8).numpy().tobytes() for k, v in load_file(folder / "model.safetensors").items()
    }


def _both(tmp_path: Path, cfg: Path, **kw) -> tuple[dict, dict]:
    native = merge(cfg, tmp_path / "native", backend="native", quiet=True, **kw)
    reference = merge(cfg, tmp_path / "torch", backend="torch", quiet=True, **kw)
    return _tensor_bytes(native), _tensor_bytes(reference)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_native_writes_the_same_bytes_as_torch(trios, tmp_path, method, dtype):
    native, reference = _both(tmp_path, _write_config(tmp_path, method, trios[dtype]))
    assert native.keys() == reference.keys()
    differ = [k for k in native if native[k] != reference[k]]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_native_chunked_writes_the_same_bytes_as_torch(trios, tmp_path, method, fixed_baseline):
    """Row chunks with statistic passes (a memory limit far below a whole embedding)."""
    cfg = _write_config(tmp_path, method, trios["bfloat16"])
    native, reference = _both(tmp_path, cfg, memory_limit=fixed_baseline + 60_000, workers=1)
    whole = _tensor_bytes(merge(cfg, tmp_path / "whole", backend="native", quiet=True))
    assert native == reference
    if method not in ("linear", "task_arithmetic"):  # no passes: chunking cannot matter at all
        assert native == whole


@pytest.mark.parametrize(
    ("cast", "out"), [("bfloat16", "float16"), ("float16", "float32"), ("float32", "bfloat16")]
)
def test_native_casts_like_torch(trios, tmp_path, cast, out):
    """A config ``dtype`` that rounds the inputs, and an ``out_dtype``."""
    cfg = _write_config(tmp_path, "task_arithmetic", trios["float32"], f"dtype: {cast}\nout_dtype: {out}\n")
    native, reference = _both(tmp_path, cfg)
    assert native == reference


def test_native_merge_does_not_import_torch(trios, tmp_path):
    cfg = _write_config(tmp_path, "dare_ties", trios["bfloat16"])
    code = (
        "import sys\n"
        "from mergesmith.cli import main\n"
        f"main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--quiet'])\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_backend_native_refuses_what_it_cannot_run(trios, tmp_path):
    b, f1, f2 = trios["bfloat16"]
    cfg = tmp_path / "della.yml"
    cfg.write_text(
        f"merge_method: della\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 1.0}}\n"
    )
    with pytest.raises(MergeError, match="della' has no native kernel"):
        merge(cfg, tmp_path / "out", backend="native", quiet=True)
    assert not (tmp_path / "out").exists()
    merge(cfg, tmp_path / "out", quiet=True)  # auto: torch runs it


def test_cli_backend_errors_are_one_line(trios, tmp_path):
    b, f1, _ = trios["float32"]
    della = tmp_path / "della.yml"
    della.write_text(
        f"merge_method: della\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 1.0}}\n"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "mergesmith", "merge", str(della), str(tmp_path / "o"), "--backend", "native"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and not (tmp_path / "o").exists()
    assert bad.stderr.strip().count("\n") == 0 and "--backend native cannot run this merge" in bad.stderr
    cfg = _write_config(tmp_path, "ties", trios["float32"])
    plan = subprocess.run(
        [sys.executable, "-m", "mergesmith", "plan", str(cfg), "--summary"], capture_output=True, text=True
    )
    assert plan.returncode == 0 and "native backend" in plan.stdout


# --- the compiled pieces -----------------------------------------------------------------------------


def test_bfloat16_rounding_golden_values():
    bits = np.array(
        [
            0x3F800000,  # 1.0 -> 0x3F80
            0x3F808000,  # halfway, even below -> stays 0x3F80
            0x3F818000,  # halfway, odd below -> rounds up to 0x3F82
            0x3F80C000,  # above halfway -> 0x3F81
            0xBF807FFF,  # just below halfway, negative -> 0xBF80
            0x7F7FFFFF,  # largest float32 -> rounds to infinity 0x7F80
            0x7FC00001,  # NaN -> torch's vectorised NaN 0xFFFF
            0x00000001,  # smallest subnormal -> 0
        ],
        dtype=np.uint32,
    )
    out, finite = from_float32(bits.view(np.float32), "BF16")
    assert out.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xBF80, 0x7F80, 0xFFFF, 0x0000]
    assert not finite
    assert from_float32(np.array([1.5, -2.0], np.float32), "BF16")[1]
    widened = to_float32(np.array([0x3F80, 0xC040, 0x0001], np.uint16), "BF16")
    assert widened.tolist() == [1.0, -3.0, float(np.array([0x00010000], np.uint32).view(np.float32)[0])]


def test_float32_to_bfloat16_matches_torch_on_random_bits():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    ours, _ = from_float32(x, "BF16")
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_fused_dare_rows_equal_the_separate_steps():
    """One pass per row (difference, L1, mask, L1) gives what the steps give one by one: a float32
    subtraction, RowL1, RandomStream.mask, RowL1; dare_norms gives the same norms without an output."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((37, 53), dtype=np.float32)
    model = base + rng.standard_normal((37, 53), dtype=np.float32)
    stream = RandomStream(7, "w", 1)
    start, threshold = 53 * 5, np.uint64(round(0.3 * 2**32))
    args = (model.reshape(-1), base.reshape(-1), 53, np.uint64(start), stream.k0, stream.k1, threshold)
    out, full, kept = np.empty(37 * 53, np.float32), np.empty(37), np.empty(37)
    dare_rows(*args, out, full, kept)
    ref = model - base
    ref_full, ref_kept = RowL1(), RowL1()
    ref_full.add(ref)
    stream.mask(ref, start, 0.3)
    ref_kept.add(ref)
    assert np.array_equal(out.reshape(37, 53), ref)
    assert math.fsum(full) == ref_full.value and math.fsum(kept) == ref_kept.value
    assert ref_kept.value < ref_full.value
    full2, kept2 = np.empty(37), np.empty(37)
    dare_norms(*args, full2, kept2)
    assert np.array_equal(full2, full) and np.array_equal(kept2, kept)


def test_row_abs_sums_golden():
    x = np.array([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0], [0.5] * 9], dtype=np.float32)
    out = np.empty(2)
    row_abs_sums(x.reshape(-1), 9, out)
    assert out.tolist() == [45.0, 4.5]


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [[0.5], [0.7, 0.3], [0.7, -0.3, 1.0]])
@pytest.mark.parametrize("lam", [1.0, 1.3])
def test_compiled_combine_equals_the_torch_steps(monkeypatch, consensus, normalize, weights, lam):
    """The one-pass combine (weights, sign election or sum, lambda, base) against the step-by-step
    torch operations it replaces, on task vectors with many exact zeros (DARE's)."""
    from mergesmith.methods import Chunk, arrays
    from mergesmith.methods.task_arithmetic import DareLinearKernel, DareTiesKernel

    rng = np.random.default_rng(len(weights) + 10 * normalize)
    n = 1 << 16
    deltas = [rng.standard_normal(n, dtype=np.float32) * (rng.random(n) < 0.5) for _ in weights]
    base = rng.standard_normal(n, dtype=np.float32)
    kernel_cls = DareTiesKernel if consensus else DareLinearKernel
    params = {
        "weight": tuple(weights),
        "density": (1.0,) * len(weights),
        "lambda": lam,
        "normalize": normalize,
        "rescale": False,
    }

    def combine():
        chunk = Chunk(torch.from_numpy(base.copy()), [], 0, None, torch.float32)
        return kernel_cls(params, n)._combine(chunk, [torch.from_numpy(d.copy()) for d in deltas]).numpy()

    fused = combine()
    monkeypatch.setattr(arrays, "host_stored", lambda x: None)  # force the torch operations
    stepwise = combine()
    assert np.array_equal(fused.view(np.uint32), stepwise.view(np.uint32))


@pytest.mark.parametrize("n", [1, 2047, 2049, 5001])
@pytest.mark.parametrize("consensus", [False, True])
def test_compiled_combine_blocks_and_signed_zeros(monkeypatch, n, consensus):
    """The combine's block loop at lengths around its block size, on task vectors with -0.0, exact
    opposite values (sums of exactly 0) and NaN: the same bits as the torch steps."""
    from mergesmith.methods import Chunk, arrays
    from mergesmith.methods.task_arithmetic import DareLinearKernel, DareTiesKernel

    rng = np.random.default_rng(n)
    a = rng.standard_normal(n, dtype=np.float32) * (rng.random(n) < 0.5)
    a[rng.random(n) < 0.1] = -0.0
    b = np.where(rng.random(n) < 0.3, -a, rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
    b[rng.random(n) < 0.01] = np.nan
    base = rng.standard_normal(n, dtype=np.float32)
    base[rng.random(n) < 0.2] = -0.0
    params = {"weight": (1.0, 1.0), "density": (1.0, 1.0), "lambda": 1.0, "normalize": True, "rescale": False}
    kernel_cls = DareTiesKernel if consensus else DareLinearKernel

    def combine():
        chunk = Chunk(torch.from_numpy(base.copy()), [], 0, None, torch.float32)
        deltas = [torch.from_numpy(a.copy()), torch.from_numpy(b.copy())]
        return kernel_cls(params, n)._combine(chunk, deltas).numpy()

    fused = combine()
    monkeypatch.setattr(arrays, "host_stored", lambda x: None)  # force the torch operations
    assert np.array_equal(fused.view(np.uint32), combine().view(np.uint32))


def _kernel_output(
    method: str, params: dict, base, models, chunks: int, seed: int = 3, passes: list | None = None
) -> np.ndarray:
    """A kernel's output for one tensor, its rows in ``chunks`` chunks (statistic passes over all of them,
    then apply), or whole (chunks=1: run_whole), as the executor runs it; the statistic passes made are
    appended to ``passes``."""
    from mergesmith.methods import Chunk, get_method

    method_ = get_method(method)
    numel = base.numel()
    kernel = method_.kernel(params, numel)
    rows = base.shape[0]
    step = -(-rows // chunks)
    spans = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    rng = [RandomStream(seed, "t", i) for i in range(len(models))] if method_.random else None

    def chunk(span):
        lo, hi = span
        cols = base.shape[1]
        return Chunk(base[lo:hi].clone(), [m[lo:hi].clone() for m in models], lo * cols, rng, torch.float32)

    if len(spans) == 1:
        return kernel.run_whole(chunk(spans[0])).reshape(-1).numpy().copy()
    kernel.observe_all(lambda: (chunk(span) for span in spans))
    if passes is not None:
        passes.append(kernel.passes)
    return np.concatenate([np.asarray(kernel.apply(chunk(span))).reshape(-1) for span in spans])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"weight": (0.7, -0.4, 1.0), "normalize": True},
        {"density": (0.0, 1.0, 0.35), "rescale": True, "lambda": 1.4},
    ],
)
def test_one_pass_sparse_task_vectors_equal_the_torch_steps(monkeypatch, method, dtype, chunks, extra):
    """On stored CPU inputs, DARE makes, masks and combines each task vector block by block
    (loops.dare_combine) and TIES's threshold passes count each task vector as it is made. Against the
    torch operations, one whole task vector at a time: the same bits, with many tied magnitudes (bf16
    task vectors on a coarse grid, where the threshold's ties are split across chunks), signed zeros and
    blocks around the loops' block sizes."""
    from mergesmith.methods import arrays, sparsify

    rng = np.random.default_rng(5)
    rows, cols = 41, 263  # 10783 elements: several blocks of 2048 and 4096, chunks of 14 rows
    base = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)).to(dtype)
    models = []
    for _ in range(3):
        step = torch.from_numpy(rng.integers(-3, 4, (rows, cols)).astype(np.float32) / 64)
        models.append((base.float() + step).to(dtype))
    models[1][5, :7] = -0.0
    params = {
        "weight": (0.5, 0.3, 0.6),
        "density": (0.4, 0.7, 0.5),
        "lambda": 1.0,
        "normalize": method != "dare_linear",
        "rescale": method != "ties",
        "int8_mask": False,
    }
    params.update(extra)
    fused = _kernel_output(method, params, base, models, chunks)
    monkeypatch.setattr(arrays, "host_stored", lambda x: None)  # force the torch operations
    monkeypatch.setattr(arrays, "host_numpy", lambda x: None)
    monkeypatch.setattr(sparsify.arrays, "host_numpy", lambda x: None)
    stepwise = _kernel_output(method, params, base, models, chunks)
    assert np.array_equal(fused.view(np.uint32), stepwise.view(np.uint32))
    assert np.count_nonzero(fused != base.float().numpy().reshape(-1)) > 0


@pytest.mark.parametrize("first_rows_scale", [1.0, 1e-3, 1e3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_threshold_settled_in_the_first_pass(monkeypatch, first_rows_scale, dtype):
    """Chunked TIES on stored inputs keeps low-bit histograms of the bins around the first chunk's
    estimate of the threshold while it counts the first pass: where the whole tensor's threshold falls in
    that window, the second pass is skipped; where the first chunk is unlike the rest (its task vectors
    1000x smaller or larger), the window misses and the second pass runs. The same bits either way as
    the torch steps, which always make both passes."""
    from mergesmith.methods import arrays, sparsify

    rng = np.random.default_rng(11)
    rows, cols = 120, 2500  # 300000 values in four chunks of 30 rows (75000 values, more than SMALL)
    base = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)).to(dtype)
    models = []
    for _ in range(3):
        step = rng.standard_normal((rows, cols), dtype=np.float32) * 0.01
        step[:30] *= first_rows_scale
        models.append((base.float() + torch.from_numpy(step)).to(dtype))
    params = {
        "weight": (0.5, 0.3, 0.6),
        "density": (0.4, 0.7, 0.2),
        "lambda": 1.0,
        "normalize": True,
        "rescale": False,
        "int8_mask": False,
    }
    passes: list[int] = []
    fused = _kernel_output("ties", params, base, models, 4, passes=passes)
    assert passes == [1 if first_rows_scale == 1.0 else 2]
    monkeypatch.setattr(arrays, "host_stored", lambda x: None)
    monkeypatch.setattr(arrays, "host_numpy", lambda x: None)
    monkeypatch.setattr(sparsify.arrays, "host_numpy", lambda x: None)
    stepwise_passes: list[int] = []
    stepwise = _kernel_output("ties", params, base, models, 4, passes=stepwise_passes)
    assert stepwise_passes == [2]
    assert np.array_equal(fused.view(np.uint32), stepwise.view(np.uint32))
