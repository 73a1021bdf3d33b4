"""Hypothesis strategies for conversations that stress tokenization: unicode, emoji, CJK,
whitespace at both ends, empty responses, 1-12 turns, optional system prompts."""

from __future__ import annotations

import random

from hypothesis import strategies as st

PIECES = [
    "Hello", "world", "the cat", "café", "naïve", "°C", "42", "3.14159", "x = f(y)", "def f():\n    return 1",
    "日本語のテキスト", "中文句子", "한국어", "🙂", "👍🏽", "🚀 launch", "tabs\there", "a\n\nb", "  ", "\n", " ", "—", "«quote»",
    "https://example.com/a?b=c", "<b>html</b>", "{json: 1}", "$$x^2$$", "don't", "I'm", "1234567890",
]

text = st.lists(st.sampled_from(PIECES), min_size=0, max_size=8).map(lambda xs: "".join(xs))
padded = st.tuples(st.sampled_from(["", " ", "\n", "  ", " \n"]), text, st.sampled_from(["", " ", "\n", "\n\n"])).map(
    lambda t: t[0] + t[1] + t[2]
)


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(padded)})
    turns = draw(st.integers(1, 6))
    for _ in range(turns):
        msgs.append({"role": "user", "content": draw(padded)})
        msgs.append({"role": "assistant", "content": draw(padded)})
    return msgs


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` conversations drawn with a seeded generator (a fixed corpus, unlike hypothesis)."""
    rnd = random.Random(seed)

    def txt() -> str:
        lead = rnd.choice(["", "", " ", "\n", "  "])
        trail = rnd.choice(["", "", " ", "\n", "\n\n"])
        return lead + "".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, 10))) + trail

    out = []
    for i in range(n):
        msgs = []
        if rnd.random() < 0.4:
            msgs.append({"role": "system", "content": txt()})
        turns = rnd.randint(1, 12)
        for t in range(turns):
            msgs.append({"role": "user", "content": txt()})
            msgs.append({"role": "assistant", "content": "" if rnd.random() < 0.08 else txt()})
        out.append(msgs)
    return out
