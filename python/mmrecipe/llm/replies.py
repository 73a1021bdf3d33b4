"""Conversations an LLM writes, as text and back: the reply formats of `[[generate]]`
("qa": `Question:` / `Answer:` lines, LLaVA-style; "json": a list of turns) and the
hand-written seed examples shown to the model in the same format. Replies are parsed
and validated in the core (`rust/replies.rs`), a whole column at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .. import _core
from ..buffers import arrow, string_buffers, strings
from ..errors import SourceError

Turn = tuple[Literal["user", "assistant"], str]

# How each row of a column is parsed (`parse_column`).
WHOLE, TRUNCATED, ABSENT = 0, 1, 2
CONVERSATION = pl.List(pl.Struct({"from": pl.String, "value": pl.String}))


class Malformed(ValueError):
    """The reply is not a usable conversation; the message says why."""


def render(turns: list[Turn], fmt: str) -> str:
    """A conversation in the reply format (for seed examples)."""
    if fmt == "json":
        pairs = [{"question": turns[i][1], "answer": turns[i + 1][1]} for i in range(0, len(turns) - 1, 2)]
        return json.dumps(pairs, ensure_ascii=False, indent=1)
    return "\n\n".join(f"{'Question' if role == 'user' else 'Answer'}: {text}" for role, text in turns)


def parse(text: str, fmt: str, min_turns: int, truncated: bool = False) -> list[Turn]:
    """The user/assistant turns of one reply, validated by the core's parser (the one
    `parse_column` runs); raises Malformed. A reply cut at max_tokens (`truncated`)
    loses its last, possibly unfinished, exchange."""
    conversations, reasons = parse_column(pl.Series([text]), np.array([1 if truncated else 0], np.uint8), fmt, min_turns)
    if reasons[0] is not None:
        raise Malformed(reasons[0])
    return [("user" if t["from"] == "human" else "assistant", t["value"]) for t in conversations[0]]


def parse_column(texts: pl.Series, states: np.ndarray, fmt: str, min_turns: int) -> tuple[pl.Series, pl.Series]:
    """Every reply of `texts` parsed in the core, row i handled as `states[i]` says
    (WHOLE, TRUNCATED or ABSENT). Returns the conversations as LLaVA-style
    [{from, value}] lists (null where there is none) and, per row, why the reply is
    not a usable conversation (null where it is, or where there was no reply)."""
    offsets, data = string_buffers(arrow(texts.fill_null("")))
    valid, turn_offsets, roles, content_offsets, content, reason_offsets, reason_data = _core.parse_replies(
        offsets, data, np.ascontiguousarray(states, dtype=np.uint8), fmt, min_turns
    )
    speakers = pa.compute.take(pa.array(["", "human", "gpt"]), pa.array(roles))
    turns = pa.StructArray.from_arrays([speakers, strings(content_offsets, content).cast(pa.string())], names=["from", "value"])
    lists = pa.LargeListArray.from_arrays(pa.array(turn_offsets), turns, mask=pa.array(valid == 0))
    conversations = pl.Series("conversations", lists).cast(CONVERSATION)
    why = pl.Series("reason", strings(reason_offsets, reason_data)).cast(pl.String)
    return conversations, pl.select(pl.when(why != "").then(why)).to_series()


class Seed(msgspec.Struct, forbid_unknown_fields=True):
    context: str
    conversation: list[dict[str, Any]] | None = None
    reply: str | None = None


def load_seeds(path: Path, fmt: str, where: str) -> list[tuple[str, str]]:
    """(context, reply text) of each hand-written example in a JSON Lines file."""
    if not path.is_file():
        raise SourceError(f"{where}.seeds: file not found: {path}")
    decoder = msgspec.json.Decoder(Seed)
    seeds = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            seed = decoder.decode(line)
            if (seed.conversation is None) == (seed.reply is None):
                raise ValueError("give one of conversation (a list of turns) or reply (the reply text)")
            reply = seed.reply if seed.reply is not None else render(parse_seed(seed.conversation or []), fmt)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise SourceError(f"{where}.seeds: {path}, line {number}: {e}") from None
        seeds.append((seed.context, reply))
    if not seeds:
        raise SourceError(f"{where}.seeds: {path} has no examples")
    return seeds


def parse_seed(items: list[dict[str, Any]]) -> list[Turn]:
    """A hand-written conversation ([{from, value}], [{role, content}] or [{question,
    answer}] items), checked as a reply would be."""
    try:
        turns = parse(json.dumps(items, ensure_ascii=False), "json", min_turns=1)
    except Malformed as e:
        raise Malformed(f"a seed conversation alternates user and assistant turns, starting with the user: {e}") from None
    if len(turns) < len(items):  # a last question without its answer
        raise Malformed("a seed conversation alternates user and assistant turns and ends with the assistant")
    return turns
