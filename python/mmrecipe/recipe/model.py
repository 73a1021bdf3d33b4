"""The model side of a recipe: the tokenizer files and the chat template to render with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from .. import _core
from ..errors import TokenizerError


class ModelFiles(msgspec.Struct, frozen=True):
    tokenizer_json: Path
    chat_template: str
    template_name: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    files: list[Path]
    # `[model] added_tokens`: special tokens the core appends to the tokenizer as it loads it.
    added_tokens: tuple[str, ...] = ()


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _model_template(config: dict[str, Any], folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{name, template}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def load_model(folder: Path, chat_template: str = "model", added_tokens: tuple[str, ...] = ()) -> ModelFiles:
    """A tokenizer folder (or tokenizer.json) and the chat template to render with:
    "model" for the tokenizer's own, or a built-in's name; `added_tokens` appended to it as
    special tokens (HF `add_special_tokens`, in the core)."""
    tok = folder / "tokenizer.json" if folder.is_dir() else folder
    if not tok.is_file():
        raise TokenizerError(f"model.tokenizer: no tokenizer.json at {folder}")
    folder = tok.parent
    config_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    files = [tok]
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text("utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"model.tokenizer: {config_path} is not valid JSON: {e}") from None
        files.append(config_path)
    map_path = folder / "special_tokens_map.json"
    if map_path.is_file():
        try:
            special_map = json.loads(map_path.read_text("utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"model.tokenizer: {map_path} is not valid JSON: {e}") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            config.setdefault(key, special_map.get(key))
    name = chat_template
    if name == "model":
        template = _model_template(config, folder)
        if template is None:
            raise TokenizerError(
                f"model.chat_template: the tokenizer at {folder} has no chat template; "
                f"choose a built-in: {', '.join(_core.BUILTIN_TEMPLATES)}"
            )
        if (folder / "chat_template.jinja").is_file():
            files.append(folder / "chat_template.jinja")
    else:
        builtin = _core.builtin_template(name)
        if builtin is None:
            raise TokenizerError(
                f"model.chat_template: '{name}' is neither \"model\" nor a built-in ({', '.join(_core.BUILTIN_TEMPLATES)})"
            )
        template = builtin
    return ModelFiles(
        tokenizer_json=tok,
        chat_template=template,
        template_name=name,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        pad_token=_token_text(config.get("pad_token")) or _token_text(config.get("eos_token")),
        files=files,
        added_tokens=tuple(added_tokens),
    )
