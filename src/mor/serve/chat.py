"""Chat templates: the Jinja template a tokenizer's config ships, rendered as Hugging Face ``transformers`` does
(a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` for a template's own
checks), so a chat model served here sees the prompts it was tuned on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``) or could not render it."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            self.template = environment.from_string(source)
        except TemplateError as error:
            raise ValueError(f"the tokenizer's chat template does not parse ({error}); fix it in {CONFIG_FILE} "
                             f"or {TEMPLATE_FILE}") from error
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages`` (``role``, ``content``), ending where the assistant's reply begins."""
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template cannot render these messages: {error}") from error


def load_chat_template(folder: Path) -> ChatTemplate | None:
    """The template in ``folder``: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a
    string, or a list of named templates of which the one named "default" is used); None without one."""
    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    source = (folder / TEMPLATE_FILE).read_text() if (folder / TEMPLATE_FILE).is_file() else config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source:
        return None
    special = {name: _token_text(config[name]) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
               if config.get(name)}
    return ChatTemplate(source, special)


def end_of_turn_token(folder: Path) -> str | None:
    """The tokenizer config's ``eos_token`` (e.g. ``<|im_end|>``, which ends a chat turn), if it names one."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    token = json.loads((folder / CONFIG_FILE).read_text()).get("eos_token")
    return _token_text(token) if token else None


def _token_text(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)
