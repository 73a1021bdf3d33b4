"""Rendering and tokenizing single conversations outside a build: previews, notebooks,
and checks against other tokenizers. A build never goes through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import msgspec
import numpy as np

from . import _core
from .recipe.model import ModelFiles, load_model
from .compile import check_tokenizer_engine, settings
from .recipe.schema import ImageSpec, OutputSpec


@dataclass
class Encoded:
    text: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_runs: list[tuple[int, int]]


class ChatEncoder:
    """Renders conversations with a model's chat template and tokenizes them exactly as a
    build does: `ChatEncoder("recipes/models/smollm2").encode([[{"role": ..., "content": ...}]])`."""

    def __init__(
        self,
        tokenizer: str | Path,
        chat_template: str = "model",
        image: ImageSpec | None = None,
        train_on: str = "assistant",
        train_on_eos: bool = True,
        tokenizer_engine: str = "auto",
    ):
        self.model: ModelFiles = load_model(Path(tokenizer), chat_template)
        output = OutputSpec(seq_len=1 << 30, train_on=train_on, train_on_eos=train_on_eos)  # type: ignore[arg-type]
        plan = settings(self.model, image, output) | {
            "seed": 0, "mixture": "natural", "sources": [{"name": "encode"}], "tokenizer_engine": tokenizer_engine,
        }
        check_tokenizer_engine(tokenizer_engine)
        self._core = _core.Compiler(msgspec.json.encode(plan), str(self.model.tokenizer_json), 0)
        #: ("fast" or "hf", why).
        self.tokenizer_engine: tuple[str, str] = self._core.tokenizer_engine()

    def token_id(self, token: str) -> int | None:
        return self._core.token_id(token)

    def encode(
        self, conversations: Sequence[Sequence[dict[str, Any]]], image_counts: Sequence[Sequence[int]] | None = None
    ) -> list[Encoded]:
        chats = [
            {"messages": list(m), "image_counts": list(image_counts[i]) if image_counts else []}
            for i, m in enumerate(conversations)
        ]
        out = self._core.encode_chats(msgspec.json.encode(chats).decode())
        return [Encoded(text, ids, mask, list(runs)) for text, ids, mask, runs in out]
