"""Sizes as printed: binary units everywhere, and "smaller"/"larger" the right way round."""

from __future__ import annotations

import argparse
import io
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from _cli import run_command
from mergesmith.cli import main
from mergesmith.core.sizes import human_size, size_change
from mergesmith.pipeline.config import load_config
from mergesmith.pipeline.plan import build_plan

HUMAN = r"\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)"


def test_human_size_golden():
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1024) == "1.0 KiB"
    assert human_size(3_500_000) == "3.3 MiB"
    assert human_size(377_487) == "368.6 KiB"
    assert human_size(3 * 2**30 // 2) == "1.50 GiB"
    assert human_size(2 * 2**40) == "2.00 TiB"


def test_size_change_golden():
    assert size_change(2**20, 2**18) == "1.0 MiB -> 256.0 KiB (4.00x smaller)"
    # the "0.36 MiB -> 2.00 MiB (0.18x smaller)": an output larger than its input says so
    assert size_change(377_487, 2_097_152) == "368.6 KiB -> 2.0 MiB (5.56x larger)"
    assert size_change(5000, 5000) == "4.9 KiB -> 4.9 KiB"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**45), st.integers(1, 2**45))
def test_size_change_reads_the_right_way(before, after):
    text = size_change(before, after)
    assert text.startswith(f"{human_size(before)} -> {human_size(after)}")
    assert ("smaller" in text) == (after < before)
    assert ("larger" in text) == (after > before)
    ratio = re.search(r"\((\d+\.\d+)x", text)
    if ratio:
        assert float(ratio.group(1)) >= 1.0


def _ties(tmp_path, trio):
    b, f1, f2 = trio
    cfg = tmp_path / "ties.yml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {b}\nmodels:\n"
        f"  - model: {f1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {f2}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    return cfg


def test_plan_and_merge_print_human_sizes(llama_trio, tmp_path, capsys):
    cfg = _ties(tmp_path, llama_trio)
    plan = build_plan(load_config(cfg))
    total = human_size(plan.total_bytes)
    plan.close()
    assert main(["plan", str(cfg), "--summary"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"layers, {total} of output; estimated peak memory " in line
    assert re.search(rf"estimated peak memory {HUMAN} with \d+ workers", line), line
    assert "GB" not in line

    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"mergesmith: wrote \d+ tensors \({re.escape(total)}\) to .* in \d+\.\d s", last), (
        last
    )


def test_moe_summary_prints_a_human_size(llama_trio, tmp_path, capsys):
    b, f1, f2 = llama_trio
    cfg = tmp_path / "moe.yml"
    cfg.write_text(
        f"base_model: {b}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {f1}\n  - source_model: {f2}\n"
    )
    from mergesmith.moe import build_moe

    build_moe(cfg, tmp_path / "moe")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"mergesmith: wrote a Mixtral model with 2 experts \({HUMAN}\) to .* in \d+\.\d s", last
    )


def test_bitnet_size_line(llama_trio, tmp_path):
    from mergesmith.bitnet import command

    parser = argparse.ArgumentParser(prog="mergesmith")
    command.register(parser.add_subparsers(dest="command"))
    b, _, _ = llama_trio
    out_dir = tmp_path / "bitnet"
    args = parser.parse_args(["bitnet", str(b), str(out_dir)])
    out, err = io.StringIO(), io.StringIO()
    assert run_command(args, out, err) == 0
    before = sum(p.stat().st_size for p in b.glob("*.safetensors"))
    after = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    assert out.getvalue().splitlines()[-1] == f"size: {size_change(before, after)}, written to {out_dir}"
