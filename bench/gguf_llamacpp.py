"""llama.cpp itself on ``mergesmith bitnet --format gguf`` files: tokens, logits and greedy answers.

Three checks, each printed as a small table:

1. **Tokenizer**: for tokenizers of each kind the exporter handles (byte-level BPE with the GPT-2,
   Llama-3, Qwen2 and StarCoder pre-tokenizers, SentencePiece-style BPE with byte fallback, the skill models'
   character-level WordLevel), trained here on a few standard-library sources, a tiny model is exported to
   GGUF and the sample texts are tokenised by llama.cpp (``Llama.tokenize``, BOS as the file says)
   and by transformers (``AutoTokenizer``, special tokens as its post-processor says). The ids must
   be identical for every text.
2. **Logits**: a random Llama (hidden 256, every decoder matrix ternary) exported as GGUF (TQ2_0)
   and as ``--format hf``; next-token logits on each sample text's ids from llama.cpp, from
   transformers on the hf export (BitNet: int8 activations per token), and from the float model
   carrying the same ``W~ * fp16(gamma)`` weights (transformers' GGUF loader). llama.cpp quantises
   activations to 8 bits per block of 256 values (Q8_K), transformers per token, so the two
   ternary runs differ by a small fraction of the logit range; llama.cpp against the float weights
   shows the same size of difference.
3. **Skill prompts**: shipped skill experts (``examples/skills/models``) exported with
   ``--include 'mlp\\.down_proj'`` in both formats (only ``down_proj`` has rows that fit 256-wide TQ
   blocks, so both files hold the same three ternary matrices); greedy answers to test prompts
   from llama.cpp (prompt tokenised by llama.cpp) and from transformers.

Needs llama-cpp-python (``pip install 'mergesmith[gguf-check]'``, a source build of llama.cpp);
without it the script says so and exits 0.

    PYTHONPATH=src python bench/gguf_llamacpp.py [--skills rev sort] [--prompts 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mergesmith import cli  # noqa: E402

SAMPLES = [
    "Hello world!",
    " 12345 and 678, then 9.",
    "It's a test... isn't it?!  Two  spaces,\ttab and\nnew lines\n\n",
    "def f(x):\n    return x**2 + 1  # comment",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u4e2d\u6587 \u65e5\u672c\u8a9e \U0001f600",
    "rev: xkyogy=",
    "URL: https://example.com/a?b=1&c=2 (v1.2.3)",
]
SKILL_SAMPLES = ["rev: xkyogy=", "sort of cab=", "count: aaba=", "shift: abc+1="]


def run_cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(list(argv))
    if code:
        raise SystemExit(f"mergesmith {' '.join(argv)} failed ({code})")
    return out.getvalue()


def corpus() -> list[str]:
    """Training text for the tokenizers: a few standard-library sources (fixed for a Python version,
    unlike this repository's docs, which quote this script's output) and the samples."""
    import argparse as a
    import json as j
    import textwrap as t

    return [Path(m.__file__).read_text() for m in (a, j, t)] + SAMPLES


# --------------------------------------------------------------------------- tokenizers


def byte_level(regex: str | None) -> object:
    """Byte-level BPE trained on the docs, with the pre-tokenizer of GPT-2 (``None``), Llama-3
    (``"llama3"``, with ``ignore_merges``), Qwen2 (``"qwen2"``, NFC normalizer) or StarCoder
    (``"starcoder"``, single digits first)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    from mergesmith.bitnet.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX

    tok = Tokenizer(models.BPE(ignore_merges=regex == "llama3"))
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if regex in ("llama3", "qwen2"):
        split = pre_tokenizers.Split(
            Regex(LLAMA3_REGEX if regex == "llama3" else QWEN2_REGEX), behavior="isolated"
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, plain])
    elif regex == "starcoder":
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [digits, pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if regex == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def sentencepiece_style() -> object:
    """Llama-2 layout: Prepend + Replace normalizer, byte_fallback, ``<0xNN>`` tokens, merges for
    every split of a token ordered by the token (how SentencePiece vocabularies are converted)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=1500, special_tokens=specials))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = []
    for piece in sorted(vocab, key=vocab.__getitem__):
        if piece not in specials:
            splits = [(piece[:c], piece[c:]) for c in range(1, len(piece))]
            splits = [s for s in splits if s[0] in vocab and s[1] in vocab]
            merges += sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))
    data["model"]["merges"] = [list(m) for m in merges]
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] in specials[:3]]
    data["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(data))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def save_model(
    folder: Path, tok: object | None, vocab: int, seed: int = 0, copy_from: Path | None = None
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    if copy_from is not None:
        for f in copy_from.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "TokenizersBackend"}
    for role, text in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>")):
        if tok.token_to_id(text) is not None:
            cfg[f"{role}_token"] = text
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def llama(path: Path, vocab_only: bool = False) -> object:
    import llama_cpp

    # logits_all: llama-cpp-python then keeps a row of `scores` per evaluated token (without it, the
    # row of the last token read below stays zero)
    return llama_cpp.Llama(
        str(path), n_ctx=256, n_threads=1, n_batch=256, logits_all=True, vocab_only=vocab_only, verbose=False
    )


def check_tokenizers(work: Path) -> bool:
    from transformers import AutoTokenizer

    kinds: list[tuple[str, Callable[[], Path]]] = [
        ("byte-level BPE, GPT-2 regex", lambda: save_model(work / "t-gpt2", byte_level(None), 1536)),
        ("byte-level BPE, Llama-3 regex", lambda: save_model(work / "t-llama3", byte_level("llama3"), 1536)),
        (
            "byte-level BPE, Qwen2 regex + NFC",
            lambda: save_model(work / "t-qwen2", byte_level("qwen2"), 1536),
        ),
        (
            "byte-level BPE, digits + GPT-2 regex",
            lambda: save_model(work / "t-star", byte_level("starcoder"), 1536),
        ),
        ("SentencePiece-style BPE", lambda: save_model(work / "t-spm", sentencepiece_style(), 1536)),
        (
            "character-level WordLevel (skill rev)",
            lambda: save_model(work / "t-chars", None, 0, copy_from=ROOT / "examples/skills/models/rev"),
        ),
    ]
    print("\n1. token ids, llama.cpp vs transformers (all sample texts must agree)")
    print(f"   {'tokenizer':40s} {'GGUF model/pre':22s} {'texts equal':>12s} {'tokens':>7s}  note")
    ok = True
    for label, make in kinds:
        folder = make()
        out = folder.parent / f"{folder.name}.gguf"
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            cli.main(["bitnet", str(folder), str(out), "--format", "gguf"])
        note = next(
            (line.split("note: ", 1)[1] for line in err.getvalue().splitlines() if "note: " in line), ""
        )
        hf = AutoTokenizer.from_pretrained(folder)
        lm = llama(out, vocab_only=True)
        if lm.metadata.get("tokenizer.ggml.model") == "none":  # llama.cpp cannot tokenize text then
            print(f"   {label:40s} {'none':22s} {'-':>12s} {'-':>7s}  {note[:70]}")
            ok = False
            continue
        texts = SKILL_SAMPLES if "skill" in label else SAMPLES
        equal, n_tokens = 0, 0
        for text in texts:
            a = lm.tokenize(text.encode(), add_bos=True, special=True)
            b = hf(text)["input_ids"]
            equal += a == b
            n_tokens += len(b)
            if a != b:
                print(f"   MISMATCH {text!r}: llama.cpp {a[:12]}... transformers {b[:12]}...")
        meta = lm.metadata
        kind = f"{meta.get('tokenizer.ggml.model')}/{meta.get('tokenizer.ggml.pre')}"
        print(f"   {label:40s} {kind:22s} {equal:>5d} of {len(texts):<4d} {n_tokens:>7d}  {note[:70]}")
        ok = ok and equal == len(texts)
        del lm
    return ok


# --------------------------------------------------------------------------- logits


def next_logits_llamacpp(lm: object, ids: Sequence[int]) -> np.ndarray:
    lm.reset()
    lm.eval(list(ids))
    return np.array(lm.scores[lm.n_tokens - 1], dtype=np.float64)


def next_logits_hf(model: object, ids: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].double().numpy()


def check_logits(work: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / "t-gpt2"
    run_cli("bitnet", str(folder), str(work / "logits.gguf"), "--format", "gguf")
    run_cli("bitnet", str(folder), str(work / "logits-hf"))
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(work / "logits-hf").eval()
    float_gguf = AutoModelForCausalLM.from_pretrained(work, gguf_file="logits.gguf").eval()
    lm = llama(work / "logits.gguf")
    print("\n2. next-token logits on each sample text (random Llama, hidden 256, 14 ternary matrices, TQ2_0)")
    print("   max |difference| / (max - min of the reference logits), and whether the argmax agrees")
    print(f"   {'text':34s} {'llama.cpp vs hf':>16s} {'llama.cpp vs float':>19s} {'hf vs float':>12s}")
    for text in SAMPLES:
        ids = tok(text)["input_ids"]
        a, b, c = next_logits_llamacpp(lm, ids), next_logits_hf(hf, ids), next_logits_hf(float_gguf, ids)

        def rel(x: np.ndarray, ref: np.ndarray) -> str:
            same = "=" if x.argmax() == ref.argmax() else "x"
            return f"{np.abs(x - ref).max() / (ref.max() - ref.min()):.4f} {same}"

        print(f"   {text[:32]!r:34s} {rel(a, b):>16s} {rel(a, c):>19s} {rel(b, c):>12s}")


# --------------------------------------------------------------------------- skill prompts


def greedy_llamacpp(lm: object, prompt: str, max_new: int) -> tuple[list[int], str]:
    ids = lm.tokenize(prompt.encode(), add_bos=True, special=True)
    lm.reset()
    lm.eval(ids)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(np.argmax(lm.scores[lm.n_tokens - 1]))
        if nxt == lm.token_eos():
            break
        out.append(nxt)
        lm.eval([nxt])
    return ids, lm.detokenize(out).decode(errors="replace")


def greedy_hf(model: object, tok: object, prompt: str, max_new: int) -> tuple[list[int], str]:
    ids = tok(prompt)["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
    return ids, tok.decode(seq[len(ids) :], skip_special_tokens=True)


def check_skills(work: Path, skills: Sequence[str], n_prompts: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"\n3. greedy answers to {n_prompts} test prompts per skill (down_proj ternary in both files)")
    print(
        f"   {'skill':6s} {'same prompt ids':>16s} {'same answer':>12s} {'llama.cpp right':>16s} {'hf right':>9s}"
    )
    for skill in skills:
        src = ROOT / "examples/skills/models" / skill
        gguf_path, hf_dir = work / f"{skill}.gguf", work / f"{skill}-hf"
        run_cli("bitnet", str(src), str(gguf_path), "--format", "gguf", "--include", r"mlp\.down_proj")
        run_cli("bitnet", str(src), str(hf_dir), "--include", r"mlp\.down_proj")
        tok = AutoTokenizer.from_pretrained(hf_dir)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        lm = llama(gguf_path)
        rows = [json.loads(line) for line in (ROOT / f"examples/skills/data/{skill}/test.jsonl").open()]
        same_ids = same = right_l = right_h = 0
        for row in rows[:n_prompts]:
            max_new = len(row["answer"]) + 2
            ids_l, ans_l = greedy_llamacpp(lm, row["prompt"], max_new)
            ids_h, ans_h = greedy_hf(hf, tok, row["prompt"], max_new)
            same_ids += ids_l == ids_h
            same += ans_l == ans_h
            right_l += ans_l.strip() == row["answer"]
            right_h += ans_h.strip() == row["answer"]
        n = min(n_prompts, len(rows))
        print(
            f"   {skill:6s} {same_ids:>10d} of {n:<3d} {same:>6d} of {n:<3d} {right_l:>10d} of {n:<3d} {right_h:>3d} of {n}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skills", nargs="+", default=["rev", "sort", "count", "shift"])
    parser.add_argument("--prompts", type=int, default=20, help="test prompts per skill")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed (pip install 'mergesmith[gguf-check]'); nothing to check")
        return 0
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True  # transformers' BitNet kernels run eagerly (no 20 s compile)
    print(f"llama-cpp-python {llama_cpp.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ok = check_tokenizers(work)
        check_logits(work)
        check_skills(work, args.skills, args.prompts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
