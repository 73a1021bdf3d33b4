"""Token ids and loss masks against the model's own tokenizer in transformers: ids equal
`apply_chat_template(tokenize=True)`, masks equal `assistant_masks` of the same template
with `{% generation %}` around each response and its end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL
from hypothesis import given
from strategies import conversations, random_conversations

from mmrecipe.encode import ChatEncoder

SMOL_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}"
)

# A Llama-3-style family: header tokens, `| trim` on content, <|eot_id|> ends a turn.
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_model(folder: Path, template: str, specials: list[str] = (), bos: str | None = None) -> Path:
    """A tokenizer folder: the bundled SmolLM2 vocabulary, extra special tokens, a template."""
    from tokenizers import AddedToken, Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    if specials:
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tk.save(str(folder / "tokenizer.json"))
    config = json.loads((MODEL / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    if bos:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = json.loads((MODEL / "special_tokens_map.json").read_text())
    if bos:
        special_map["bos_token"] = bos
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


@pytest.fixture(scope="module")
def smol_gen(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("smolgen"), SMOL_GENERATION)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama3"), LLAMA3_GENERATION, LLAMA3_SPECIALS, bos="<|begin_of_text|>")


def hf(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def hf_encode(tok, msgs, masks: bool = False):
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=masks)
    return list(out["input_ids"]), (list(out["assistant_masks"]) if masks else None)


CORPUS = random_conversations(300, seed=7)

#: Every parity test runs on both tokenizer engines (the bundled tokenizer is one the fast
#: engine serves, so "fast" is really the fast engine: `encoder` checks it).
ENGINES = ["hf", "fast"]


def encoder(folder, engine: str, **kw) -> ChatEncoder:
    enc = ChatEncoder(folder, tokenizer_engine=engine, **kw)
    assert enc.tokenizer_engine[0] == engine, enc.tokenizer_engine
    return enc


def test_corpus_has_the_promised_variety():
    turns = [sum(m["role"] == "user" for m in c) for c in CORPUS]
    assert len(CORPUS) >= 300 and min(turns) == 1 and max(turns) == 12
    assert any(c[0]["role"] == "system" for c in CORPUS) and any(c[0]["role"] != "system" for c in CORPUS)
    assert any(m["content"] == "" for c in CORPUS for m in c if m["role"] == "assistant")
    text = "".join(m["content"] for c in CORPUS for m in c)
    for probe in ("日本語", "🙂", "café", "\n"):
        assert probe in text


@pytest.mark.parametrize("engine", ENGINES)
def test_ids_equal_apply_chat_template_with_the_models_template(hf_tokenizer, engine):
    enc = encoder(MODEL, engine)
    ours = enc.encode(CORPUS)
    for msgs, got in zip(CORPUS, ours):
        want, _ = hf_encode(hf_tokenizer, msgs)
        assert got.input_ids.tolist() == want, msgs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", ["smol_gen", "llama3"])
def test_ids_and_masks_equal_transformers(family, engine, request):
    folder = request.getfixturevalue(family)
    tok = hf(folder)
    ours = encoder(folder, engine).encode(CORPUS)
    for msgs, got in zip(CORPUS, ours):
        want_ids, want_mask = hf_encode(tok, msgs, masks=True)
        assert got.input_ids.tolist() == want_ids, msgs
        assert got.loss_mask.tolist() == want_mask, msgs


@pytest.mark.parametrize("engine", ENGINES)
@given(msgs=conversations())
def test_masks_equal_transformers_property(smol_gen, engine, msgs):
    tok = _cached_hf(smol_gen)
    got = _cached_encoder(smol_gen, tokenizer_engine=engine).encode([msgs])[0]
    want_ids, want_mask = hf_encode(tok, msgs, masks=True)
    assert got.input_ids.tolist() == want_ids
    assert got.loss_mask.tolist() == want_mask


_CACHE: dict = {}


def _cached_hf(folder):
    return _CACHE.setdefault(("hf", folder), hf(folder))


def _cached_encoder(folder, tokenizer_engine: str, **kw):
    key = ("enc", folder, tokenizer_engine, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = encoder(folder, tokenizer_engine, **kw)
    return _CACHE[key]


@pytest.mark.parametrize("engine", ENGINES)
def test_special_token_text_in_data_stays_text(hf_tokenizer, engine):
    """Deliberate difference from apply_chat_template: data never becomes a control token."""
    data = "what does <|im_end|> mean? and <|im_start|>system?"
    msgs = [{"role": "user", "content": data}, {"role": "assistant", "content": "It ends a turn."}]
    got = encoder(MODEL, engine).encode([msgs])[0]
    im_end, im_start = hf_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = got.input_ids.tolist()
    # The template's own control tokens only: system + user + assistant turns.
    assert ids.count(im_end) == 3 and ids.count(im_start) == 3
    hf_ids, _ = hf_encode(hf_tokenizer, msgs)
    assert hf_ids.count(im_end) == 4  # transformers parses the data's text as a control token
    # The data's part is exactly the plain-text tokenization of the data.
    plain = hf_tokenizer(data, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert any(ids[i : i + len(plain)] == plain for i in range(len(ids)))
    assert hf_tokenizer.decode(ids) == got.text


@pytest.mark.parametrize("engine", ENGINES)
def test_train_on_variants(smol_gen, engine):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    full = _cached_encoder(smol_gen, tokenizer_engine=engine).encode([msgs])[0]
    last = _cached_encoder(smol_gen, train_on="last_assistant", tokenizer_engine=engine).encode([msgs])[0]
    every = _cached_encoder(smol_gen, train_on="all", tokenizer_engine=engine).encode([msgs])[0]
    no_eos = _cached_encoder(smol_gen, train_on_eos=False, tokenizer_engine=engine).encode([msgs])[0]
    assert full.loss_mask.sum() == 4  # b, <|im_end|>, d, <|im_end|>
    assert last.loss_mask.sum() == 2 and last.loss_mask[-3:].tolist() == [1, 1, 0]
    assert every.loss_mask.all()
    assert no_eos.loss_mask.sum() == 2
    assert np.array_equal(full.input_ids, last.input_ids)
