"""Hostile inputs, by class: files outside the model, remote code, pickles, and parse errors.

Every refusal is one line on stderr, exit code 2, nothing written; the file outside the model is never
opened (opens are recorded), the remote code never runs (its marker file never appears).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesmith.cli import main

SKILLS_TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "skills" / "models" / "base"


# --- helpers ---------------------------------------------------------------------------------------------


def run(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def linear_config(tmp_path: Path, *models: Path, **extra) -> Path:
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    cfg.update(extra)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_line_failure(code: int, err: str, *patterns: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergesmith: error: "), err
    for p in patterns:
        assert p in lines[0], lines[0]
    return lines[0]


def merge_fails(tmp_path: Path, capsys, cfg: Path, *patterns: str) -> str:
    out = tmp_path / "out"
    code, err = run(["merge", str(cfg), str(out), "--quiet"], capsys)
    line = assert_one_line_failure(code, err, *patterns)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return line


@pytest.fixture
def model_copy(llama_trio, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(llama_trio[1], dest)
    return dest


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path opened in this process (builtins.open, io.open, os.open), resolved."""
    paths: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def record(file) -> None:
        if isinstance(file, str | bytes | os.PathLike):
            paths.append(os.path.realpath(os.fsdecode(file)))

    def b_open(file, *a, **k):
        record(file)
        return real_open(file, *a, **k)

    def i_open(file, *a, **k):
        record(file)
        return real_io_open(file, *a, **k)

    def o_open(file, *a, **k):
        record(file)
        return real_os_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", b_open)
    monkeypatch.setattr(io, "open", i_open)
    monkeypatch.setattr(os, "open", o_open)
    return paths


def write_index(folder: Path, entry: str) -> None:
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: entry for n in names}})
    )


# --- stay inside the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "etc-passwd", "proc-environ", "folder-symlink"])
def test_index_entries_outside_the_model_are_refused_before_opening(
    kind, llama_trio, model_copy, tmp_path, capsys, opened
):
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    shutil.copy(llama_trio[2] / "model.safetensors", outside)
    (model_copy / "sub").symlink_to(outside.parent)  # a folder inside that leads outside
    entry = {
        "folder-symlink": "sub/model.safetensors",
        "dotdot": "../elsewhere/model.safetensors",
        "absolute": str(outside),
        "etc-passwd": "/etc/passwd",
        "proc-environ": "/proc/self/environ",
    }[kind]
    write_index(model_copy, entry)
    opened.clear()  # what the test itself opened to set up
    line = merge_fails(
        tmp_path, capsys, linear_config(tmp_path, llama_trio[0], model_copy), "outside the model"
    )
    assert str(model_copy) in line and entry in line
    target = os.path.realpath(entry if entry.startswith("/") else model_copy / entry)
    assert target not in opened


@pytest.mark.parametrize(
    "name", ["model.safetensors", "config.json", "tokenizer_config.json", "generation_config.json"]
)
def test_symlinks_out_of_the_model_are_refused(name, llama_trio, model_copy, tmp_path, capsys, opened):
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    source = model_copy / name
    if source.exists():
        shutil.move(source, outside)
    else:
        outside.write_text("{}")
    (model_copy / name).symlink_to(outside)
    opened.clear()
    # the copy comes first: its config, tokenizer and generation config are the ones the output takes
    line = merge_fails(
        tmp_path, capsys, linear_config(tmp_path, model_copy, llama_trio[0]), "outside the model"
    )
    assert name in line
    assert str(outside) not in opened


def test_a_glob_shard_symlinked_out_is_refused(llama_trio, model_copy, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model_copy / "model.safetensors", outside)
    (model_copy / "model-00001-of-00001.safetensors").symlink_to(outside)
    merge_fails(tmp_path, capsys, linear_config(tmp_path, llama_trio[0], model_copy), "outside the model")


def test_symlinks_inside_the_model_are_followed(llama_trio, model_copy, tmp_path, capsys):
    (model_copy / "weights").mkdir()
    shutil.move(model_copy / "model.safetensors", model_copy / "weights" / "real.safetensors")
    (model_copy / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    code, err = run(
        ["merge", str(linear_config(tmp_path, model_copy)), str(tmp_path / "out"), "--quiet"], capsys
    )
    assert code == 0, err
    assert torch.equal(
        load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"],
        load_file(llama_trio[1] / "model.safetensors")["model.norm.weight"],
    )


def hub_snapshot(root: Path, repo: str, source: Path, blobs_repo: str | None = None) -> Path:
    """``source`` laid out as the Hugging Face cache stores it: snapshot files are relative symlinks into
    ``blobs/`` of the repository (``blobs_repo``, by default the same one)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    blobs = root / f"models--{(blobs_repo or repo).replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = blobs / f"{repo.replace('/', '')}{i:040d}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_cache_layout_is_accepted(llama_trio, tmp_path, capsys):
    snap = hub_snapshot(tmp_path / "hub", "org/tiny", llama_trio[1])
    code, err = run(["merge", str(linear_config(tmp_path, snap)), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_hub_snapshot_into_another_repos_blobs_is_refused(llama_trio, tmp_path, capsys):
    snap = hub_snapshot(tmp_path / "hub", "org/tiny", llama_trio[1], blobs_repo="evil/other")
    merge_fails(tmp_path, capsys, linear_config(tmp_path, snap), "outside the model")


# --- no remote code, no pickles ---------------------------------------------------------------------------

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
"""


def remote_code_model(model_factory, folder: Path, marker: Path, model_type: str | None = None) -> Path:
    """A tiny Llama with the skills tokenizer whose config names Python files that write ``marker``."""
    model_factory(folder, "llama", vocab=46)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SKILLS_TOKENIZER / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    if model_type:
        cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    return folder


@pytest.mark.parametrize("model_type", [None, "evil_arch"])
def test_eval_never_runs_remote_code_and_never_asks(model_factory, tmp_path, model_type):
    marker = tmp_path / "MARKER"
    model = remote_code_model(model_factory, tmp_path / "m", marker, model_type)
    text = tmp_path / "t.txt"
    text.write_text("12 + 3 = 15\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mergesmith", "eval", str(model), "--ppl", str(text), "--quiet"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert not marker.exists()
    if model_type is None:  # a known architecture: loaded with transformers' own classes
        assert proc.returncode == 0, proc.stderr
    else:
        assert_one_line_failure(proc.returncode, proc.stderr, "transformers cannot load it")
    assert "trust_remote_code" not in proc.stdout  # no question was put


def test_auto_map_is_not_copied_into_merge_outputs(model_factory, llama_trio, tmp_path, capsys, caplog):
    marker = tmp_path / "MARKER"
    model = remote_code_model(model_factory, tmp_path / "m", marker)
    with caplog.at_level("WARNING"):
        code, err = run(
            ["merge", str(linear_config(tmp_path, model)), str(tmp_path / "out"), "--quiet"], capsys
        )
    assert code == 0, err
    shown = err + caplog.text  # printed, or logged as "mergesmith: WARNING: ..."
    assert "auto_map" in shown and "not copied into the output" in shown
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not list((tmp_path / "out").glob("*.py")) and not marker.exists()


def test_auto_map_is_not_copied_into_bitnet_outputs(model_factory, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    model = remote_code_model(model_factory, tmp_path / "m", marker)
    code, err = run(["bitnet", str(model), str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "auto_map" in err
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not list((tmp_path / "out").glob("*.py")) and not marker.exists()


@pytest.fixture
def pickled_model(llama_trio, tmp_path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama_trio[0] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    return folder


@pytest.mark.parametrize("command", ["merge", "eval", "bitnet", "extract-lora"])
def test_pickles_are_refused_by_every_command(command, pickled_model, llama_trio, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {
        "merge": ["merge", str(linear_config(tmp_path, pickled_model)), str(out)],
        "eval": ["eval", str(pickled_model), "--ppl", str(Path(__file__))],
        "bitnet": ["bitnet", str(pickled_model), str(out)],
        "extract-lora": [
            "extract-lora",
            str(out),
            "--base",
            str(llama_trio[0]),
            "--model",
            str(pickled_model),
            "--rank",
            "2",
        ],
    }[command]
    code, err = run(argv, capsys)
    assert_one_line_failure(code, err, "pytorch_model.bin", "convert them to safetensors")
    assert not out.exists()


# --- every parse error is one line ------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("config.json", '{"a": ' + DEEP + "}", "nested too deeply"),
        ("config.json", b'{"model_type": "llama\xff"}', "not UTF-8"),
        ("config.json", "[1, 2]", "not a JSON object"),
        ("model.safetensors.index.json", '{"weight_map": ' + DEEP + "}", "nested too deeply"),
        ("model.safetensors.index.json", '{"weight_map": ["model.safetensors"]}', "weight_map"),
        ("model.safetensors.index.json", '{"weight_map": {"model.norm.weight": 1}}', "weight_map"),
        ("model.safetensors.index.json", '{"metadata": {}}', "weight_map"),
    ],
)
def test_malformed_json_files(name, content, pattern, llama_trio, model_copy, tmp_path, capsys):
    path = model_copy / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    merge_fails(tmp_path, capsys, linear_config(tmp_path, llama_trio[0], model_copy), pattern)


def test_malformed_tokenizer_config_for_chat_template(llama_trio, model_copy, tmp_path, capsys):
    (model_copy / "tokenizer_config.json").write_text('{"chat_template": ' + DEEP + "}")
    cfg = linear_config(tmp_path, model_copy, llama_trio[0], chat_template="auto")
    merge_fails(tmp_path, capsys, cfg, "tokenizer_config.json", "nested too deeply")


def test_truncated_shard(llama_trio, model_copy, tmp_path, capsys):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    merge_fails(tmp_path, capsys, linear_config(tmp_path, llama_trio[0], model_copy), "truncated")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        (
            "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
            "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\n",
            "more than",
        ),
    ],
)
def test_hostile_yaml(text, pattern, tmp_path, capsys):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(text)
    merge_fails(tmp_path, capsys, cfg, pattern)


def test_non_utf8_yaml(tmp_path, capsys):
    cfg = tmp_path / "cfg.yml"
    cfg.write_bytes(b"merge_method: linear\nname: caf\xe9\n")
    merge_fails(tmp_path, capsys, cfg, "not UTF-8")


def test_slerp_with_non_finite_inputs_names_the_tensor(llama_trio, model_copy, tmp_path, capsys):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": str(llama_trio[0]),
                "models": [{"model": str(model_copy)}],
                "parameters": {"t": 0.5},
            }
        )
    )
    merge_fails(tmp_path, capsys, cfg, "model.layers.0.mlp.up_proj.weight", "NaN or Inf")


@pytest.mark.parametrize("method", ["ties", "slerp", "task_arithmetic", "linear"])
def test_a_model_listed_twice(method, llama_trio, tmp_path, capsys):
    base, ft, _ = llama_trio
    twice = str(base) if method != "linear" else str(ft)
    cfg = {
        "merge_method": method,
        "models": [{"model": twice}, {"model": twice}],
        "parameters": {"slerp": {"t": 0.5}, "ties": {"weight": 1.0, "density": 0.5}}.get(
            method, {"weight": 1.0}
        ),
    }
    if method != "linear":
        cfg["base_model"] = str(base)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    merge_fails(tmp_path, capsys, path, "listed 2 times")


def test_extract_lora_with_nan_input(llama_trio, model_copy, tmp_path, capsys):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "adapter"
    code, err = run(
        [
            "extract-lora",
            str(out),
            "--base",
            str(llama_trio[0]),
            "--model",
            str(model_copy),
            "--rank",
            "2",
            "-q",
        ],
        capsys,
    )
    assert_one_line_failure(code, err, "model.layers.1.self_attn.q_proj.weight", "NaN or Inf")
    assert not out.exists()


# --- LoRA adapters written by hand: their config is untrusted too -----------------------------------------


def make_adapter(folder: Path, **config) -> Path:
    folder.mkdir()
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{module}.lora_A.weight": torch.ones(2, 32), f"{module}.lora_B.weight": torch.full((32, 2), 0.01)},
        folder / "adapter_model.safetensors",
    )
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_a_hand_made_adapter_applies(llama_trio, tmp_path, capsys):
    adapter = make_adapter(tmp_path / "ad", rank_pattern={"q_proj": 2}, alpha_pattern={"layers\\.0\\..*": 4})
    cfg = linear_config(tmp_path, Path(f"{llama_trio[0]}+{adapter}"))
    code, err = run(["merge", str(cfg), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    name = "model.layers.0.self_attn.q_proj.weight"
    got = load_file(tmp_path / "out" / "model.safetensors")[name]
    want = load_file(llama_trio[0] / "model.safetensors")[name] + 2.0 * torch.full(
        (32, 2), 0.01
    ) @ torch.ones(2, 32)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "config, pattern",
    [
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"alpha_pattern": {"q_proj[": 2}}, "not a valid regular expression"),
        ({"rank_pattern": {"q_proj": "two"}}, "not a positive integer"),
        ({"rank_pattern": {"q_proj": 1.5}}, "not a positive integer"),
        ({"alpha_pattern": {"q_proj": None}}, "not a positive number"),
        ({"rank_pattern": ["q_proj"]}, "not a mapping"),
        ({"r": 0}, "not a positive integer"),
        ({"r": True}, "not a positive integer"),
        ({"lora_alpha": "x"}, "not a number"),
    ],
)
def test_malformed_adapter_configs(config, pattern, llama_trio, tmp_path, capsys):
    adapter = make_adapter(tmp_path / "ad", **config)
    merge_fails(tmp_path, capsys, linear_config(tmp_path, Path(f"{llama_trio[0]}+{adapter}")), pattern)


def test_deeply_nested_adapter_config(llama_trio, tmp_path, capsys):
    adapter = make_adapter(tmp_path / "ad")
    (adapter / "adapter_config.json").write_text('{"r": ' + DEEP + "}")
    merge_fails(
        tmp_path, capsys, linear_config(tmp_path, Path(f"{llama_trio[0]}+{adapter}")), "nested too deeply"
    )


def test_adapter_file_symlinked_out(llama_trio, tmp_path, capsys):
    adapter = make_adapter(tmp_path / "ad")
    outside = tmp_path / "outside.safetensors"
    shutil.move(adapter / "adapter_model.safetensors", outside)
    (adapter / "adapter_model.safetensors").symlink_to(outside)
    merge_fails(
        tmp_path, capsys, linear_config(tmp_path, Path(f"{llama_trio[0]}+{adapter}")), "outside the model"
    )


def test_a_pattern_that_backtracks_too_long_is_refused(llama_trio, tmp_path, capsys, monkeypatch):
    """The timeout, made tiny here, stands for a pattern that would take hours on a long module name."""
    monkeypatch.setattr("mergesmith.core.lora.adapter.PATTERN_TIMEOUT_S", 1e-12)
    adapter = make_adapter(tmp_path / "ad", rank_pattern={"(?:.*_)*.*q(?:_?.*)*proj": 2})
    line = merge_fails(
        tmp_path, capsys, linear_config(tmp_path, Path(f"{llama_trio[0]}+{adapter}")), "simplify it"
    )
    assert "takes more than" in line


def test_safetensors_header_length_lies(llama_trio, model_copy, tmp_path, capsys):
    path = model_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(data))
    merge_fails(tmp_path, capsys, linear_config(tmp_path, llama_trio[0], model_copy), "header length")


def test_every_transformers_load_in_the_package_refuses_remote_code():
    """Static guard: each from_pretrained / from_config call under src/ passes trust_remote_code=False
    (or **NO_REMOTE_CODE), and each model from_pretrained passes use_safetensors=True."""
    import ast

    import mergesmith

    root = Path(mergesmith.__file__).parent
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("from_pretrained", "from_config"):
                    calls.append((path.name, node))
    assert len(calls) >= 6
    for name, call in calls:
        keywords = {k.arg: k.value for k in call.keywords}
        spread = [k.value for k in call.keywords if k.arg is None]
        explicit = (
            "trust_remote_code" in keywords and getattr(keywords["trust_remote_code"], "value", None) is False
        )
        via_policy = any(isinstance(v, ast.Name) and v.id == "NO_REMOTE_CODE" for v in spread)
        assert explicit or via_policy, f"{name}:{call.lineno} does not refuse remote code"
        if call.func.attr == "from_pretrained" and "Tokenizer" not in ast.unparse(call.func):
            assert getattr(keywords.get("use_safetensors"), "value", None) is True, f"{name}:{call.lineno}"
