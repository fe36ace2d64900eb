"""Chat templates the ``chat_template`` key can name, and resolution of that key."""

from __future__ import annotations

from collections import Counter

from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.core.model import ModelSource, read_json_file

BUILTIN = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
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
        return tpl if isinstance(tpl, str) else None
    return None


def resolve_chat_template(value: str, models: list[ModelSource]) -> str | None:
    """``auto`` (the template most inputs use), a built-in name, or a literal Jinja template."""
    if value == "auto":
        found = [t for t in (model_chat_template(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN:
        return BUILTIN[value]
    if "{" in value and len(value) >= 20:
        return value
    names = ", ".join(["auto", *BUILTIN])
    raise ConfigError(f"chat_template: {value!r} is neither a known name ({names}) nor a Jinja template")
