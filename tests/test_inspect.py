"""``mergesmith inspect``: its figures against a direct numpy computation on tiny models, the compatibility
verdicts (exit 0, no traceback), unreadable inputs (exit 2), the JSON keys, --merged, and its outputs."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from _cli import run_command
from mergesmith.cli import build_parser, main
from mergesmith.inspection import analyse
from mergesmith.inspection.analyse import inspect_models
from mergesmith.methods.sparsify import keep_count
from tiny_models import build, make_finetune, make_model, save, tiny_config

DENSITY = (0.3, 0.6)
WEIGHTS = (1.0, 0.5)


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return out


def _ties_config(tmp_path: Path, base: Path, ft1: Path, ft2: Path) -> Path:
    models = [
        {"model": str(m), "parameters": {"weight": w, "density": d}}
        for m, w, d in zip((ft1, ft2), WEIGHTS, DENSITY)
    ]
    cfg = {"merge_method": "ties", "base_model": str(base), "models": models, "parameters": {"lambda": 1.0}}
    path = tmp_path / "ties.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _numpy_ties(taus: list[np.ndarray]) -> tuple[list[int], list[int], list[int]]:
    """Entries each task vector's trim zeroes, entries it keeps (nonzero) and of those the ones whose sign
    loses the election, computed with a sort (the k largest magnitudes; values here have no ties)."""
    trimmed, kept, lost = [], [], []
    cut = []
    for tau, d in zip(taus, DENSITY):
        k = keep_count(d, tau.size)
        out = np.zeros_like(tau)
        top = np.argsort(np.abs(tau), kind="stable")[tau.size - k :]
        out[top] = tau[top]
        cut.append(out)
        trimmed.append(int(np.count_nonzero((tau != 0) & (out == 0))))
    total = sum(np.float32(w) * t for w, t in zip(WEIGHTS, cut))
    negative = total < 0
    for w, t in zip(WEIGHTS, cut):
        wt = np.float32(w) * t
        kept.append(int(np.count_nonzero(t)))
        lost.append(int(np.count_nonzero((wt != 0) & ((wt < 0) != negative))))
    return trimmed, kept, lost


@pytest.mark.parametrize("chunk", [None, 40])
def test_figures_match_numpy(llama_trio, tmp_path, monkeypatch, chunk):
    """Norms, cosines, sign conflicts and the TIES trim and election per tensor, whole and in row chunks
    (a chunk of 40 values splits every matrix into many: the three-pass TIES route)."""
    if chunk is not None:
        monkeypatch.setattr(analyse, "CHUNK_ELEMENTS", chunk)
    base, ft1, ft2 = llama_trio
    report = inspect_models([str(_ties_config(tmp_path, base, ft1, ft2))])
    wb, w1, w2 = _weights(base), _weights(ft1), _weights(ft2)
    assert len(report["tensors"]) == len(wb)
    for t in report["tensors"]:
        b = wb[t["name"]].reshape(-1)
        taus = [(w1[t["name"]].reshape(-1) - b), (w2[t["name"]].reshape(-1) - b)]
        b64, t64 = b.astype(np.float64), [x.astype(np.float64) for x in taus]
        norms = [np.linalg.norm(x) for x in t64]
        assert t["norm"] == pytest.approx(norms, rel=1e-5)
        assert t["relative_norm"] == pytest.approx([n / np.linalg.norm(b64) for n in norms], rel=1e-5)
        if min(norms) == 0:  # norm weights of ones: the noise of perturb() is scaled by their std, 0
            assert t["cosine"][0][1] is None and t["sign_conflict"][0][1] is None
            continue
        assert t["cosine"][0][1] == pytest.approx(float(t64[0] @ t64[1]) / (norms[0] * norms[1]), abs=1e-5)
        both = (taus[0] != 0) & (taus[1] != 0)
        conflict = np.count_nonzero(both & ((taus[0] < 0) != (taus[1] < 0))) / np.count_nonzero(both)
        assert t["sign_conflict"][0][1] == pytest.approx(conflict, abs=1e-6)
        trimmed, kept, lost = _numpy_ties(taus)
        ties = t["method"]
        assert ties["ties_trimmed"] == pytest.approx([x / b.size for x in trimmed], abs=1e-6)
        assert ties["ties_sign_lost"] == pytest.approx([lo / k for lo, k in zip(lost, kept)], abs=1e-6)
    # a layer's figures are those of its tensors together
    mlp = [t for t in report["tensors"] if t["layer"] == "L1" and t["module"] == "mlp"]
    group = next(g for g in report["groups"] if g["layer"] == "L1" and g["module"] == "mlp")
    assert group["norm"][0] == pytest.approx(math.sqrt(sum(t["norm"][0] ** 2 for t in mlp)), rel=1e-6)


def test_trim_is_what_the_merge_trims(llama_trio, tmp_path):
    """With one model of weight 1 and lambda 1, the TIES merge writes base + trimmed task vector: the
    entries it leaves at the base are the ones inspect counts as trimmed."""
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.4}}],
        "dtype": "float32",
    }
    path = tmp_path / "one.yml"
    path.write_text(json.dumps(cfg))
    from mergesmith import merge

    merge(str(path), tmp_path / "out", quiet=True)
    report = inspect_models([str(path)])
    wb, w1, wo = _weights(base), _weights(ft1), _weights(tmp_path / "out")
    for t in report["tensors"]:
        tau = w1[t["name"]] - wb[t["name"]]
        changed = wo[t["name"]] != wb[t["name"]]
        trimmed = np.count_nonzero((tau != 0) & ~changed) / tau.size
        assert t["method"]["ties_trimmed"][0] == pytest.approx(trimmed, rel=1e-5), t[
            "name"
        ]  # 6 digits in the JSON


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(argv)
    return run_command(args, out, err), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """A base and a fine-tune, a random model of the same shape (not a fine-tune), a model with another
    vocabulary, and one with another MLP width."""
    root = tmp_path_factory.mktemp("odd")
    base = make_model(root / "base")
    return {
        "base": base,
        "ft": make_finetune(base, root / "ft", seed=5),
        "stranger": make_model(root / "stranger", seed=7),
        "vocab": make_model(root / "vocab", vocab=100),
        "shape": save(build(tiny_config("llama", layers=3, vocab=96, intermediate_size=48)), root / "shape"),
    }


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("stranger", "is not a fine-tune of the base"),
        ("vocab", "has another vocabulary (vocab_size 100 against the base's 96"),
        ("shape", "differ in shape from the base"),
    ],
)
def test_incompatible_models_are_named_with_exit_0(odd_models, which, words):
    m = odd_models
    code, out, err = _cli(["inspect", str(m["ft"]), str(m[which]), "--base", str(m["base"]), "-q"])
    assert code == 0, err
    assert "Traceback" not in out + err
    assert out.startswith("compatibility: ")
    assert words in out
    assert "verdict: incompatible" in out
    assert f"error: model {str(m[which])!r}" in out


def test_a_finetune_passes_the_shared_base_check(odd_models):
    m = odd_models
    report = inspect_models([str(m["ft"])], base=str(m["base"]))
    assert report["compatibility"]["verdict"] == "compatible"
    (shared,) = report["compatibility"]["shared_base"]
    assert shared["verdict"] == "fine-tune" and 0 < shared["relative_distance"] < 0.05


def test_unreadable_inputs_exit_2(odd_models, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere"), "--base", str(odd_models["base"]), "-q"]) == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((odd_models["base"] / "config.json").read_text())
    data = (odd_models["base"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(broken), "--base", str(odd_models["base"]), "-q"]) == 2
    err = capsys.readouterr().err
    assert "folder not found" in err and "truncated" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2


TOP_KEYS = {"schema", "base", "models", "merged", "method", "config", "compatibility", "totals", "groups"}
TOP_KEYS |= {"tensors", "pca", "worst", "verdict"}
FIGURE_KEYS = {"numel", "base_norm", "norm", "relative_norm", "nonzero", "cosine", "sign_conflict", "method"}
FIGURE_KEYS |= {"merged"}


def test_json_keys_are_stable(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    out = tmp_path / "r.json"
    code, _, err = _cli(["inspect", str(_ties_config(tmp_path, base, ft1, ft2)), "--json", str(out), "-q"])
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report) == TOP_KEYS and report["schema"] == 1
    assert set(report["compatibility"]) == {
        "verdict",
        "problems",
        "shared_base",
        "thresholds",
        "tensors_not_inspected",
    }
    assert set(report["totals"]) == FIGURE_KEYS
    assert all(set(g) == FIGURE_KEYS | {"layer", "module", "tensors"} for g in report["groups"])
    assert all(set(t) == FIGURE_KEYS | {"name", "layer", "module"} for t in report["tensors"])
    assert set(report["totals"]["method"]) == {
        "ties_trimmed",
        "ties_trimmed_mass",
        "ties_sign_lost",
        "ties_sign_lost_mass",
    }
    assert [g["layer"] for g in report["groups"]][:2] == ["pre", "L0"]
    # the existing file is refused without --overwrite, before any work
    before = out.read_text()
    assert main(["inspect", str(tmp_path / "ties.yml"), "--json", str(out), "-q"]) == 2
    assert out.read_text() == before


def test_merged_figures(llama_trio, tmp_path):
    """Task arithmetic (weights 1, lambda 1) writes base + tau_1 + tau_2: the survival of tau_i is
    <tau_1 + tau_2, tau_i> / ||tau_i||^2, and its distance to model 1 is ||tau_2||, both checked in numpy.
    A merged folder that is model 1 itself gives survival 1 and distance 0 to it."""
    base, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": 1.0}},
            {"model": str(ft2), "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "ta.yml"
    path.write_text(json.dumps(cfg))
    from mergesmith import merge

    merge(str(path), tmp_path / "out", quiet=True)
    report = inspect_models([str(path)], merged=str(tmp_path / "out"))
    wb, w1, w2, wo = (_weights(p) for p in (base, ft1, ft2, tmp_path / "out"))
    name = "model.layers.1.mlp.down_proj.weight"
    t = next(t for t in report["tensors"] if t["name"] == name)
    b = wb[name].astype(np.float64)
    tau1, tau2 = w1[name] - wb[name], w2[name] - wb[name]
    d = wo[name].astype(np.float64) - b
    assert t["merged"]["survival"] == pytest.approx(
        [
            float((d * tau1).sum() / (tau1.astype(np.float64) ** 2).sum()),
            float((d * tau2).sum() / (tau2.astype(np.float64) ** 2).sum()),
        ],
        rel=1e-5,
    )
    assert t["merged"]["distance_to_base"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(b), rel=1e-5)
    dist1 = np.linalg.norm(wo[name].astype(np.float64) - w1[name]) / np.linalg.norm(b)
    assert t["merged"]["distance_to_model"][0] == pytest.approx(dist1, rel=1e-4)
    assert report["totals"]["merged"]["survival"][0] == pytest.approx(1.0, abs=0.1)

    itself = inspect_models([str(ft1), str(ft2)], base=str(base), merged=str(ft1))
    assert itself["totals"]["merged"]["survival"][0] == pytest.approx(1.0, abs=1e-9)
    assert itself["totals"]["merged"]["distance_to_model"][0] == pytest.approx(0.0, abs=1e-9)
    assert "survival" in itself["verdict"]


def test_report_is_self_contained_html(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    out = tmp_path / "r.html"
    code, stdout, err = _cli(
        ["inspect", str(_ties_config(tmp_path, base, ft1, ft2)), "--report", str(out), "-q"]
    )
    assert code == 0, err
    page = out.read_text()
    assert page.count("<img ") >= 5 and page.count("src='data:image/png;base64,") == page.count("<img ")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "merge_method" in page  # the config is shown
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_report_without_matplotlib_names_the_extra(llama_trio, tmp_path, monkeypatch, capsys):
    """The terminal table and --json still come out; --report gives one line and exit code 2."""
    base, ft1, ft2 = llama_trio
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out_json = tmp_path / "r.json"
    code = main(
        [
            "inspect",
            str(_ties_config(tmp_path, base, ft1, ft2)),
            "--report",
            str(tmp_path / "r.html"),
            "--json",
            str(out_json),
            "-q",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "pip install 'mergesmith[inspect]'" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "verdict:" in captured.out and out_json.exists() and not (tmp_path / "r.html").exists()


def test_slerp_angle_and_dare_kept_mass(llama_trio, tmp_path):
    """SLERP: the angle between the flattened endpoints of each tensor, as numpy gives it; DARE: the
    expected kept mass is the density (a group's is the mass-weighted mean of its tensors')."""
    base, ft1, ft2 = llama_trio
    slerp = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(ft1)}],
    }
    (tmp_path / "s.yml").write_text(json.dumps({**slerp, "parameters": {"t": 0.5}}))
    report = inspect_models([str(tmp_path / "s.yml")])
    wb, w1 = _weights(base), _weights(ft1)
    name = "model.layers.0.self_attn.q_proj.weight"
    t = next(t for t in report["tensors"] if t["name"] == name)
    a, b = wb[name].astype(np.float64).reshape(-1), w1[name].astype(np.float64).reshape(-1)
    angle = math.degrees(math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    assert t["method"]["slerp_angle_degrees"] == pytest.approx(angle, rel=1e-4)
    assert report["models"] == [str(ft1)]

    dare = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": str(ft2), "parameters": {"weight": 1.0, "density": 0.8}},
        ],
    }
    (tmp_path / "d.yml").write_text(json.dumps(dare))
    report = inspect_models([str(tmp_path / "d.yml")])
    assert report["totals"]["method"]["dare_expected_kept_mass"] == pytest.approx([0.3, 0.8])


def test_a_lora_reference_is_read_with_its_adapter_applied(llama_trio, tmp_path):
    """MODEL+ADAPTER is inspected as the merge reads it: the adapter's change is the task vector, in the
    modules it targets only, and its norm is that of PEFT's own merge minus the base."""
    import peft
    import torch
    import transformers

    base = llama_trio[0]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(init_lora_weights=False, r=4, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    ).merge_and_unload()
    report = inspect_models([f"{base}+{tmp_path / 'adapter'}"], base=str(base))
    wb = _weights(base)
    changed = {t["name"] for t in report["tensors"] if t["norm"][0]}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    name = "model.layers.1.self_attn.q_proj.weight"
    want = np.linalg.norm(merged.state_dict()[name].detach().numpy().astype(np.float64) - wb[name])
    assert next(t for t in report["tensors"] if t["name"] == name)["norm"][0] == pytest.approx(want, rel=1e-4)


SKILL_TOKENIZER = Path(__file__).resolve().parent.parent / "examples/skills/models/base/tokenizer.json"


def test_tokenizer_and_config_differences_are_named(odd_models, tmp_path):
    """Tokens moved to other ids or missing are an error, added ones a warning; other rope settings and
    tied embeddings are warnings; each names the model."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(odd_models["base"], base)
    shutil.copy(SKILL_TOKENIZER, base / "tokenizer.json")
    ft = tmp_path / "ft"
    shutil.copytree(odd_models["ft"], ft)
    tok = json.loads(SKILL_TOKENIZER.read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    vocab["zz"] = len(vocab)
    (ft / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((ft / "config.json").read_text())
    cfg["rope_theta"] = 123.0
    cfg["tie_word_embeddings"] = not cfg.get("tie_word_embeddings", False)
    (ft / "config.json").write_text(json.dumps(cfg))
    report = inspect_models([str(ft)], base=str(base))
    problems = {p["check"]: p for p in report["compatibility"]["problems"]}
    assert problems["tokenizer"]["severity"] == "error"
    assert "1 token(s) added ('zz')" in problems["tokenizer"]["message"]
    assert "2 moved to other ids ('a', 'b')" in problems["tokenizer"]["message"]
    assert problems["rope"]["severity"] == "warning" and "rope_theta 123.0" in problems["rope"]["message"]
    assert problems["tied_embeddings"]["severity"] == "warning"
    assert all(p["model"] == str(ft) for p in problems.values())
    assert report["compatibility"]["verdict"] == "incompatible"


@pytest.mark.parametrize(
    ("name", "layer", "module"),
    [
        ("model.embed_tokens.weight", "pre", "embedding"),
        ("lm_head.weight", "post", "embedding"),
        ("model.norm.weight", "post", "norm"),
        ("model.layers.3.post_attention_layernorm.weight", "L3", "norm"),
        ("model.layers.0.self_attn.q_proj.weight", "L0", "attention"),
        ("model.layers.11.mlp.down_proj.weight", "L11", "mlp"),
        ("transformer.h.2.ln_1.weight", "L2", "norm"),
        ("transformer.h.2.attn.c_attn.weight", "L2", "attention"),
        ("transformer.h.2.mlp.c_fc.weight", "L2", "mlp"),
        ("model.layers.1.block_sparse_moe.experts.0.w1.weight", "L1", "mlp"),
    ],
)
def test_layer_and_module_of_a_tensor(name, layer, module):
    assert (analyse.layer_label(name), analyse.module_of(name)) == (layer, module)


def test_output_file_mistakes_and_an_unrelated_merged_model_exit_2(odd_models, tmp_path, capsys, monkeypatch):
    """--report - wrote a file named '-'; --json naming the config replaced it with --overwrite; --merged
    naming a model of another size printed '-' for every survival figure."""
    m = odd_models
    monkeypatch.chdir(tmp_path)  # where a file named '-' would land
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {m['base']}\nmodels:\n"
        f"  - model: {m['ft']}\n    parameters: {{weight: 1.0}}\n"
    )
    wide = save(build(tiny_config("llama", layers=3, vocab=96, hidden_size=48)), tmp_path / "wide")
    text = cfg.read_text()
    capsys.readouterr()  # save()'s progress bar
    for extra, words in [
        (["--report", "-"], "--report -"),
        (["--json", str(cfg), "--overwrite"], f"is the input {cfg} of this run"),
        # a file inside a model the config names: it replaced the model's own config.json
        (["--json", str(m["ft"] / "config.json"), "--overwrite"], f"is inside the input {m['ft']}"),
        (["--report", str(m["base"] / "r.html")], f"is inside the input {m['base']}"),
        (["--merged", str(wide)], "none of its tensors"),
    ]:
        assert main(["inspect", str(cfg), "-q", *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err
    assert cfg.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml", "wide"]
    assert (
        json.loads((m["ft"] / "config.json").read_text())["model_type"]
        and not (m["base"] / "r.html").exists()
    )


def test_progress_bar_counts_every_byte_read(llama_trio, tmp_path, monkeypatch):
    """The bar's total is what the passes read: base and models in each of TIES's three chunked passes,
    the merged model once (it is read in the first pass only), so the bar ends at its total."""
    import contextlib

    monkeypatch.setattr(analyse, "CHUNK_ELEMENTS", 40)
    base, ft1, ft2 = llama_trio
    path = _ties_config(tmp_path, base, ft1, ft2)
    from mergesmith import merge

    merge(str(path), tmp_path / "out", quiet=True)
    seen: dict[str, int] = {"total": 0, "done": 0, "calls": 0}

    class Bar:
        def update(self, n: int) -> None:
            seen["done"] += n
            seen["calls"] += 1

    @contextlib.contextmanager
    def fake_progress(total, *args, **kwargs):
        seen["total"] = total
        yield Bar()

    monkeypatch.setattr("mergesmith.core.write.byte_progress", fake_progress)
    inspect_models([str(path)], merged=str(tmp_path / "out"))
    # each update rounds its chunk's share down by less than one byte
    assert 0 <= seen["total"] - seen["done"] < seen["calls"]


@pytest.mark.parametrize("where", ["ft", "base"])
def test_a_nan_weight_is_an_error_not_a_clean_bill(odd_models, tmp_path, where):
    """A NaN made the tensor's group read as 'no model changes' and the verdict 'compatible'."""
    import shutil

    from safetensors.numpy import save_file

    m = odd_models
    copy = {k: tmp_path / k for k in ("base", "ft")}
    for k, dest in copy.items():
        shutil.copytree(m[k], dest)
    tensors = load_file(str(copy[where] / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    save_file(tensors, str(copy[where] / "model.safetensors"))
    report = inspect_models([str(copy["ft"])], base=str(copy["base"]))
    c = report["compatibility"]
    assert c["verdict"] == "incompatible"
    assert any(p["check"] == "non_finite" and name in p["message"] for p in c["problems"]), c["problems"]


def test_a_config_json_layer_count_the_weights_do_not_have_is_an_error(odd_models, tmp_path):
    """It read as 'compatible', though merge refuses the model."""
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(odd_models["ft"], ft)
    config = json.loads((ft / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (ft / "config.json").write_text(json.dumps(config))
    report = inspect_models([str(ft)], base=str(odd_models["base"]))
    c = report["compatibility"]
    assert c["verdict"] == "incompatible"
    assert any(p["check"] == "layers" and "no layer stack" in p["message"] for p in c["problems"]), c
