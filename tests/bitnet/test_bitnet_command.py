"""`mergesmith bitnet` through its own module (register + func), on tiny models saved to disk."""

from __future__ import annotations

import argparse
import io
import re

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from _cli import run_command
from mergesmith.bitnet import command
from mergesmith.core.errors import MergeError
from mergesmith.core.sources import open_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesmith")
    command.register(parser.add_subparsers(dest="command"))
    return parser


def _run(*argv):
    args = _parser().parse_args(["bitnet", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    code = run_command(args, out, err)
    return code, out.getvalue(), err.getvalue()


def _save(tmp_path, tiny, **dims):
    model, _ = tiny(**dims)
    path = tmp_path / "model"
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def saved(tmp_path, tiny):
    return _save(tmp_path, tiny)


@pytest.fixture
def saved256(tmp_path, tiny):
    return _save(tmp_path, tiny, hidden_size=256, intermediate_size=512)


def test_help_and_registration():
    parser = _parser()
    help_text = parser.format_help()
    assert "bitnet" in help_text
    args = parser.parse_args(["bitnet", "m", "o"])
    assert args.func is command.run and args.format == "hf" and args.linear_class == "autobitlinear"


def test_hf_export_end_to_end(saved, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = _run(saved, out_dir)
    assert code == 0
    assert err.count("\n") == 1 and "destroys its quality" in err
    assert "14 weights ternarised" in out and "zeros 3" in out and "size:" in out
    assert (out_dir / "tokenizer_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert loaded.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    assert (out_dir / "model.safetensors").stat().st_size < (saved / "model.safetensors").stat().st_size / 2

    with pytest.raises(MergeError, match="already exists"):
        _run(saved, out_dir)
    code, _, _ = _run(
        saved, out_dir, "--overwrite", "--linear-class", "bitlinear", "--exclude", r"layers\.1\."
    )
    assert code == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(reloaded.model.layers[1].mlp.down_proj) is torch.nn.Linear

    # a packed checkpoint as input: already ternary, no warning, same codes
    code, out, err = _run(out_dir, tmp_path / "again")
    assert code == 0 and err == "" and "already ternary" in out


def test_gguf_export(saved256, tmp_path):
    code, out, err = _run(saved256, tmp_path / "g", "--format", "gguf", "--gguf-type", "tq1_0")
    assert code == 0 and "no tokenizer.json" in err
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.TQ1_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32


def test_expected_failures_leave_nothing_behind(saved, tmp_path):
    with pytest.raises(MergeError, match="folder not found"):
        _run(tmp_path / "missing", tmp_path / "o1")
    with pytest.raises(MergeError, match="no weight"):
        _run(saved, tmp_path / "o2", "--include", "nothing-matches")
    with pytest.raises(MergeError, match="invalid tensor pattern"):
        _run(saved, tmp_path / "o3", "--exclude", "(")
    before = sorted(p.name for p in saved.iterdir())
    with pytest.raises(MergeError, match="is inside the input"):
        _run(saved, saved / "inside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in saved.iterdir()) == before


def _word_tokenizer(path, vocab_size=100):
    """A word-level tokenizer built locally (no hub), saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - 1)]
    tok = Tokenizer(
        models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return words


def test_heal_option(tmp_path, tiny):
    path = _save(tmp_path, tiny, initializer_range=0.1)
    words = _word_tokenizer(path)
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (400,), generator=g).tolist())
    (tmp_path / "data.txt").write_text(text)
    code, out, err = _run(
        path,
        tmp_path / "healed",
        "--heal",
        "30",
        "--heal-data",
        tmp_path / "data.txt",
        "--heal-seq",
        "16",
        "--heal-lr",
        "3e-3",
    )
    assert code == 0
    # the bar moves one step at a time, each frame with the loss of the step just taken
    frames = [f for f in err.replace("\n", "\r").split("\r") if f.startswith("healing:")]
    done = [int(m.group(1)) for f in frames if (m := re.search(r"\| *(\d+)/30 ", f))]
    assert done[0] == 0 and done[-1] == 30 and sorted(set(done)) == list(range(31))
    assert all("loss " in f and "lambda " in f for f in frames if "0/30 " not in f)
    line = next(ln for ln in out.splitlines() if ln.startswith("heal:"))
    assert re.fullmatch(
        r"heal: 30 steps in \d+\.\d s, held-out distillation loss \(ternary\) \S+ -> \S+", line
    )
    before, after = (float(v) for v in line.rsplit(" ", 3)[1::2])
    assert after < 0.8 * before
    code, out, err = _run(path, tmp_path / "quiet", "--heal", "3", "--heal-data", tmp_path / "data.txt", "-q")
    assert code == 0 and out == "" and err == "" and (tmp_path / "quiet" / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert loaded.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    with pytest.raises(MergeError, match="packed BitNet"):
        _run(tmp_path / "healed", tmp_path / "again", "--heal", "2")


def test_through_the_cli_dispatcher(saved, tmp_path, monkeypatch, capsys):
    """mergesmith.cli.main runs the command and turns MergeError into one line and exit code 2.
    (COMMAND_MODULES is narrowed to this module: the merge command is not on this branch.)"""
    from mergesmith import cli

    assert "mergesmith.bitnet.command" in cli.COMMAND_MODULES
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["mergesmith.bitnet.command"])
    assert cli.main(["bitnet", str(saved), str(tmp_path / "cli-out")]) == 0
    assert cli.main(["bitnet", str(saved), str(tmp_path / "cli-out")]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith("mergesmith: error: ") and "already exists" in err


def test_streamed_export_equals_in_memory_export(saved, tmp_path):
    """The command streams tensors into shards laid out up front; the shards hold exactly the tensors
    of the in-memory export, and a many-shard output loads with the same logits."""
    import json

    from safetensors.torch import load_file

    from mergesmith.bitnet.convert import export_hf

    reference = export_hf(open_checkpoint(str(saved)))
    one, many = tmp_path / "one", tmp_path / "many"
    assert _run(saved, one)[0] == 0
    assert _run(saved, many, "--out-shard-size", "10K")[0] == 0
    shards = sorted(many.glob("*.safetensors"))
    assert len(shards) > 1 and (many / "model.safetensors.index.json").is_file()
    written = load_file(one / "model.safetensors")
    assert list(written) == sorted(reference.tensors)
    for name, tensor in reference.tensors.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert json.loads((one / "config.json").read_text()) == reference.config
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(one)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(many)(ids).logits
    assert torch.equal(a, b)


def test_command_module_imports_without_torch():
    """`mergesmith --help` builds every parser: the bitnet command's module must not pull in torch
    (checked alone: some other commands still import torch when registered)."""
    import subprocess
    import sys

    code = (
        "import sys; from mergesmith import cli; cli.COMMAND_MODULES = ['mergesmith.bitnet.command']; "
        "cli.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_api_writes_what_the_command_writes(saved, tmp_path):
    import mergesmith.bitnet

    code, _, _ = _run(saved, tmp_path / "cli", "--include", "mlp")
    assert code == 0
    out = io.StringIO()
    path = mergesmith.bitnet.convert_model(
        saved, tmp_path / "api", include=["mlp"], out=out, err=io.StringIO()
    )
    assert path == tmp_path / "api" and "weights ternarised" in out.getvalue()
    for f in (tmp_path / "cli").iterdir():
        assert (tmp_path / "api" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heal", "2", "--heal-lr", "nan"], "--heal-lr must be a positive number"),
        (["--heal", "2", "--heal-lr", "-1"], "--heal-lr must be a positive number"),
        (["--heal", "2", "--heal-seq", "0"], "--heal-seq must be at least 2"),  # was a reshape traceback
        (["--heal", "2", "--heal-seq", "100000"], "longer than MODEL's context"),  # was a hang
        (["--heal", "-1"], "--heal needs a number of steps of at least 0"),
        (["--out-shard-size", "0"], "--out-shard-size must be at least 1 byte"),
    ],
)
def test_bad_options_are_refused_before_any_warning(tmp_path, tiny, args, message):
    path = _save(tmp_path, tiny)
    args = _parser().parse_args(["bitnet", str(path), str(tmp_path / "out"), *args])
    err = io.StringIO()
    with pytest.raises(MergeError, match=re.escape(message)):
        run_command(args, io.StringIO(), err)
    assert err.getvalue() == ""  # the float-weights warning would come after
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_nan_weight_is_refused(tmp_path, tiny, fmt):
    """Its absmean scale was NaN, written with exit 0."""
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path, tiny, hidden_size=256, intermediate_size=256)  # rows that TQ blocks fit
    tensors = load_file(path / "model.safetensors")
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    args = _parser().parse_args(["bitnet", str(path), str(tmp_path / "out"), "--format", fmt])
    with pytest.raises(MergeError, match=re.escape(f"tensor {name!r} of MODEL holds NaN or Inf")):
        run_command(args)
    assert not (tmp_path / "out").exists()
