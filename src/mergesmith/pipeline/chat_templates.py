"""Chat templates the ``chat_template`` key can name, and resolution of that key.

The named templates are mergekit 0.1.5's names and render mergekit's prompts (tests/test_chat_templates.py
compares them), except where mergekit's template files render stray whitespace that the model family's own
format does not have (llama3, exaone, alpaca): there they render the family's format. docs/config.md lists
each difference. Each template is one line with no whitespace outside its strings, so it renders the same
with or without Jinja's trim_blocks/lstrip_blocks (transformers uses both; other engines may not).
"""

from __future__ import annotations

from collections import Counter

from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.core.model import ModelSource, read_json_file

_ALPACA_TURNS = "['user', 'assistant', 'user_context']"

BUILTIN = {
    # <|im_start|>ROLE\nCONTENT<|im_end|>\n per message
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    # Meta's Llama 3 Instruct format: no newline between turns (mergekit's file renders one after each)
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # the last system message, then Instruction/Input/Response blocks separated by a blank line; no eos
    # after responses (as mergekit); a blank line before the generation prompt too, as in Alpaca's format
    # (mergekit's runs it into the last message), and no blank lines when there is no system message
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% set turns = messages | selectattr('role', 'in', " + _ALPACA_TURNS + ") | list %}"
        "{% if system %}{{ system[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
        "{% for message in turns %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' }}"
        "{% else %}{{ '### Input:\\n' }}{% endif %}{{ message['content'] | trim }}{% endfor %}"
        "{% if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' %}"
        "{% if turns %}{{ '\\n\\n' }}{% endif %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Mistral's v1 instruct format (Mixtral-8x7B-Instruct-v0.1's template): an optional first system
    # message goes into the first [INST], roles alternate user/assistant, no generation prompt
    "mistral": (
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('mistral chat template: after an optional system message, roles must alternate "
        "user, assistant, user, ...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' [INST] ' }}"
        "{% if loop.first and system is not none %}{{ system + '\\n\\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    # LG's EXAONE 3.x format: an empty system turn when there is none, user turns end with a newline
    # (mergekit's file renders its indentation and line breaks as well)
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def model_chat_template(model: ModelSource) -> str | None:
    """The model's own chat template (chat_template.jinja, else tokenizer_config.json's), read from files
    checked to lie inside its folder; a template file that is not UTF-8 or JSON is an error naming it."""
    jinja = model.optional_file("chat_template.jinja")
    if jinja is not None:
        try:
            return jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise MergeError(f"model {model.ref!r}: chat_template.jinja is not UTF-8 text") from None
    cfg = model.optional_file("tokenizer_config.json")
    if cfg is not None:
        data = read_json_file(cfg, f"model {model.ref!r}: tokenizer_config.json")
        tpl = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(tpl, list):  # named templates, [{name, template}]: the default one, as mergekit takes
            tpl = next(
                (t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None
            )
        return tpl if isinstance(tpl, str) else None
    return None


def resolve_chat_template(value: str, models: list[ModelSource]) -> str | None:
    """``auto`` (the template most inputs use), a built-in name, or a literal Jinja template."""
    if value == "auto":
        # compared without surrounding whitespace, as mergekit compares them (a trailing newline is no vote)
        found = [t.strip() for t in (model_chat_template(m) for m in models) if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN:
        return BUILTIN[value]
    if "{" in value and len(value) >= 20:
        return value
    names = ", ".join(["auto", *BUILTIN])
    raise ConfigError(f"chat_template: {value!r} is neither a known name ({names}) nor a Jinja template")
