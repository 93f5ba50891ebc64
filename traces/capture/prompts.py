"""Prompt files for ``moesim capture``: plain text (one prompt a line) or JSON lines.

- **Text** (any name not ending in ``.jsonl``/``.json``/``.ndjson``): each non-blank line is one
  prompt, taken as it is (without its line break).
- **JSON lines** (``.jsonl``, ``.json``, ``.ndjson``): each non-blank line is a JSON string
  (the prompt text) or an object with one of ``"prompt"``/``"text"`` (a string),
  ``"messages"`` (a chat: a list of ``{"role", "content"}``, formatted with the tokenizer's
  chat template) or ``"input_ids"``/``"token_ids"`` (a list of token ids, used as they are).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from traces.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class Prompt:
    """One prompt: exactly one of ``text``, ``messages``, ``token_ids`` is set."""

    line: int
    text: str | None = None
    messages: list | None = None
    token_ids: list[int] | None = None


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of ``path`` in file order; ConfigError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such prompt file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read as UTF-8 text ({exc})") from None
    jsonl = p.name.lower().endswith(JSONL_SUFFIXES)
    prompts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        prompts.append(_parse_json(p, n, line) if jsonl else Prompt(n, text=line))
    if not prompts:
        raise ConfigError(f"{p}: no prompts (expected one prompt per non-blank line)")
    return prompts


def _parse_json(path: Path, n: int, line: str) -> Prompt:
    where = f"{path} line {n}"
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected a JSON string or object ({exc})") from None
    if isinstance(value, str):
        return Prompt(n, text=value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON string or object, got {type(value).__name__}")
    for key in ("prompt", "text"):
        if key in value:
            if not isinstance(value[key], str):
                raise ConfigError(f"{where}: key '{key}': expected a string")
            return Prompt(n, text=value[key])
    if "messages" in value:
        msgs = value["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs
        ):
            raise ConfigError(
                f'{where}: key \'messages\': expected a list of {{"role", "content"}} objects'
            )
        return Prompt(n, messages=msgs)
    for key in ("input_ids", "token_ids"):
        if key in value:
            ids = value[key]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise ConfigError(f"{where}: key '{key}': expected a list of token ids (ints >= 0)")
            return Prompt(n, token_ids=ids)
    raise ConfigError(
        f"{where}: expected one of the keys 'prompt', 'text', 'messages', 'input_ids', "
        f"'token_ids', got {', '.join(sorted(value)) or 'none'}"
    )


def needs_tokenizer(prompts: list[Prompt]) -> bool:
    """True when some prompt is text or a chat (not token ids)."""
    return any(p.token_ids is None for p in prompts)


def tokenize(
    prompts: list[Prompt],
    tokenizer,
    *,
    chat: bool,
    vocab_size: int,
    max_tokens: int | None,
    where: str,
) -> list[list[int]]:
    """Token-id lists of ``prompts`` (text through ``tokenizer``, chats and ``chat=True`` text
    through its chat template), cut to ``max_tokens``; ConfigError naming the line."""
    out = []
    for p in prompts:
        at = f"{where} line {p.line}"
        if p.token_ids is not None:
            ids = list(p.token_ids)
        elif p.messages is not None or chat:
            msgs = p.messages or [{"role": "user", "content": p.text}]
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(f"{at}: the tokenizer has no chat template (drop --chat)")
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(p.text, add_special_tokens=True)["input_ids"]
        ids = [int(i) for i in ids][: max_tokens or None]
        if not ids:
            raise ConfigError(f"{at}: the prompt has no tokens")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ConfigError(
                f"{at}: token id {bad[0]} is outside the model's vocabulary (0..{vocab_size - 1})"
            )
        out.append(ids)
    return out
