"""The named chat templates against mergekit 0.1.5's: the same prompts, or (llama3, exaone, alpaca) the
model family's own format where mergekit's template files render stray whitespace; docs/config.md lists the
differences. Rendered as transformers renders chat templates (a sandboxed Jinja environment with
trim_blocks and lstrip_blocks) and, since the templates are written without whitespace outside their
strings, the same without those options."""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mergesmith.core.errors import ConfigError
from mergesmith.pipeline.chat_templates import BUILTIN, resolve_chat_template

CONVERSATIONS = {
    "sys_user_asst_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ],
    "user_asst": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
    ],
}

# Rendered from mergekit 0.1.5's template files (mergekit/_data/chat_templates/*.jinja in its wheel) with
# transformers' chat-template environment, bos_token "<BOS>", eos_token "<EOS>"; key: name/conversation/gen.
MERGEKIT = {
    "alpaca/sys_user_asst_user/gen=False": "You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello.\n\n### Instruction:\n2+2?",
    "alpaca/sys_user_asst_user/gen=True": "You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello.\n\n### Instruction:\n2+2?### Response:\n",
    "alpaca/user_asst/gen=False": "\n\n### Instruction:\nHi there\n\n### Response:\nHello.",
    "alpaca/user_asst/gen=True": "\n\n### Instruction:\nHi there\n\n### Response:\nHello.",
    "chatml/sys_user_asst_user/gen=False": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n",
    "chatml/sys_user_asst_user/gen=True": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "chatml/user_asst/gen=False": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
    "chatml/user_asst/gen=True": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n",
    "exaone/sys_user_asst_user/gen=False": "    [|system|]You are terse.\n        [|endofturn|]\n\n    [|user|]Hi there\n        \n\n    [|assistant|]Hello.\n        [|endofturn|]\n\n    [|user|]2+2?\n        \n\n",
    "exaone/sys_user_asst_user/gen=True": "    [|system|]You are terse.\n        [|endofturn|]\n\n    [|user|]Hi there\n        \n\n    [|assistant|]Hello.\n        [|endofturn|]\n\n    [|user|]2+2?\n        \n\n    [|assistant|]\n",
    "exaone/user_asst/gen=False": "        [|system|][|endofturn|]\n\n    [|user|]Hi there\n        \n\n    [|assistant|]Hello.\n        [|endofturn|]\n\n",
    "exaone/user_asst/gen=True": "        [|system|][|endofturn|]\n\n    [|user|]Hi there\n        \n\n    [|assistant|]Hello.\n        [|endofturn|]\n\n    [|assistant|]\n",
    "llama3/sys_user_asst_user/gen=False": "<BOS><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\n",
    "llama3/sys_user_asst_user/gen=True": "<BOS><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama3/user_asst/gen=False": "<BOS><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\n",
    "llama3/user_asst/gen=True": "<BOS><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral/sys_user_asst_user/gen=False": "<BOS> [INST] You are terse.\n\nHi there [/INST] Hello.<EOS> [INST] 2+2? [/INST]",
    "mistral/sys_user_asst_user/gen=True": "<BOS> [INST] You are terse.\n\nHi there [/INST] Hello.<EOS> [INST] 2+2? [/INST]",
    "mistral/user_asst/gen=False": "<BOS> [INST] Hi there [/INST] Hello.<EOS>",
    "mistral/user_asst/gen=True": "<BOS> [INST] Hi there [/INST] Hello.<EOS>",
}

# What mergesmith renders where it differs from the above (the whitespace only; see docs/config.md):
# llama3 has no newline after <|eot_id|> (Meta's format), exaone no indentation or extra line breaks (LG's
# EXAONE 3.x format), alpaca no blank lines before the first block and a blank line before the generation
# prompt (Alpaca's format).
OURS_DIFFERENT = {
    "llama3/sys_user_asst_user/gen=False": "<BOS><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>",
    "llama3/sys_user_asst_user/gen=True": "<BOS><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama3/user_asst/gen=False": "<BOS><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>",
    "llama3/user_asst/gen=True": "<BOS><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca/sys_user_asst_user/gen=True": "You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello.\n\n### Instruction:\n2+2?\n\n### Response:\n",
    "alpaca/user_asst/gen=False": "### Instruction:\nHi there\n\n### Response:\nHello.",
    "alpaca/user_asst/gen=True": "### Instruction:\nHi there\n\n### Response:\nHello.",
    "exaone/sys_user_asst_user/gen=False": "[|system|]You are terse.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello.[|endofturn|]\n[|user|]2+2?\n",
    "exaone/sys_user_asst_user/gen=True": "[|system|]You are terse.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello.[|endofturn|]\n[|user|]2+2?\n[|assistant|]",
    "exaone/user_asst/gen=False": "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello.[|endofturn|]\n",
    "exaone/user_asst/gen=True": "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello.[|endofturn|]\n[|assistant|]",
}


def _env(trim: bool) -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env


def render(template: str, messages, gen: bool, trim: bool = True) -> str:
    return (
        _env(trim)
        .from_string(template)
        .render(messages=messages, add_generation_prompt=gen, bos_token="<BOS>", eos_token="<EOS>")
    )


def test_every_mergekit_template_name_is_known():
    assert {key.split("/")[0] for key in MERGEKIT} == set(BUILTIN)


@pytest.mark.parametrize("key", sorted(MERGEKIT))
@pytest.mark.parametrize("trim", [True, False])
def test_named_templates_render_mergekits_prompts(key, trim):
    name, conversation, gen = key.split("/")
    out = render(BUILTIN[name], CONVERSATIONS[conversation], gen == "gen=True", trim)
    assert out == OURS_DIFFERENT.get(key, MERGEKIT[key])
    if name in ("chatml", "mistral"):
        assert key not in OURS_DIFFERENT
    # where they differ, only in whitespace
    assert "".join(out.split()) == "".join(MERGEKIT[key].split())


def test_alpaca_renders_input_blocks_and_no_generation_prompt_after_a_response():
    messages = [
        {"role": "user", "content": " Sum these. "},
        {"role": "user_context", "content": "1, 2"},
        {"role": "assistant", "content": "3"},
    ]
    out = render(BUILTIN["alpaca"], messages, gen=True)
    assert out == "### Instruction:\nSum these.\n\n### Input:\n1, 2\n\n### Response:\n3"


def test_mistral_refuses_roles_that_do_not_alternate():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        render(BUILTIN["mistral"], messages, gen=False)


def test_resolution_names_literals_and_errors():
    assert resolve_chat_template("exaone", []) == BUILTIN["exaone"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(literal, []) == literal
    with pytest.raises(ConfigError, match="exaone"):
        resolve_chat_template("vicuna", [])
