"""Writes recipes/models/smollm2-audio: the bundled SmolLM2 tokenizer with one more
special token, <|AUDIO|> (id 49153, Qwen2-Audio's name for it), the audio placeholder's
token. The JSON is edited, not re-saved through a library, so the files stay byte-stable;
tests/test_audio.py rebuilds them into a temporary folder and checks they are current.

    python recipes/models/make_smollm2_audio.py [DEST]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parent
BASE = MODELS / "smollm2"
AUDIO_TOKEN = "<|AUDIO|>"
NOTICE = """SmolLM2-135M-Instruct tokenizer and chat template, by HuggingFaceTB, licensed under Apache-2.0:
recipes/models/smollm2 (see its NOTICE) with one special token added, <|AUDIO|> (id 49153), the
audio placeholder's token as in Qwen2-Audio. Written by recipes/models/make_smollm2_audio.py.
"""


def dump(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def write(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    tok = json.loads((BASE / "tokenizer.json").read_text("utf-8"))
    next_id = max([t["id"] for t in tok["added_tokens"]] + list(tok["model"]["vocab"].values())) + 1
    tok["added_tokens"].append({"id": next_id, "content": AUDIO_TOKEN, "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (dest / "tokenizer.json").write_text(dump(tok), "utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((BASE / name).read_text("utf-8"))
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(config.get(key), list):
                config[key] = [*config[key], AUDIO_TOKEN]
        (dest / name).write_text(dump(config), "utf-8")
    shutil.copyfile(BASE / "chat_template.jinja", dest / "chat_template.jinja")
    (dest / "NOTICE").write_text(NOTICE, "utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else MODELS / "smollm2-audio")
