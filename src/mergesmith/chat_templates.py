"""Chat templates the ``chat_template`` key can name, and resolution of that key."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergesmith.errors import ConfigError

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


def model_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tpl = json.loads(cfg.read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError):
            return None
        return tpl if isinstance(tpl, str) else None
    return None


def resolve_chat_template(value: str, model_folders: list[Path]) -> str | None:
    """``auto`` (the template most inputs use), a built-in name, or a literal Jinja template."""
    if value == "auto":
        found = [t for t in (model_chat_template(f) for f in model_folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN:
        return BUILTIN[value]
    if "{" in value and len(value) >= 20:
        return value
    names = ", ".join(["auto", *BUILTIN])
    raise ConfigError(f"chat_template: {value!r} is neither a known name ({names}) nor a Jinja template")
