"""klotski.prompts: every entry point's prompt -> (text, ids), with the same checks and messages."""

from __future__ import annotations

import pytest

from klotski.errors import KlotskiError
from klotski.prompts import PromptParser, TokenizedPrompt
from klotski.tokenizer import Tokenizer, write_tokenizer


@pytest.fixture(scope="module")
def parser(tmp_path_factory) -> PromptParser:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, 400)
    return PromptParser(Tokenizer.from_dir(path), vocab_size=400, max_model_len=64, model="tiny")


def test_text_and_ids_forms_agree(parser):
    text = parser.parse("the river", "p")
    assert isinstance(text, TokenizedPrompt) and text.text == "the river" and text.token_ids
    assert parser.parse({"prompt": "the river"}, "p") == text
    ids = parser.parse({"prompt_token_ids": text.token_ids}, "p")
    assert ids == (None, text.token_ids)
    assert parser.parse({"prompt": "shown", "prompt_token_ids": [3, 4]}, "p") == ("shown", [3, 4])


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"prompt_token_ids": []}, "p: the prompt is empty"),
        ({"prompt_token_ids": [1] * 64}, "p: the prompt has 64 tokens but the model's context is 64"),
        ({"prompt_token_ids": [400]}, "p: token id 400 is outside the vocabulary (0..399)"),
        ({"prompt_token_ids": ["a"]}, "p: prompt_token_ids must be a list of integers"),
        ({"text": "x"}, "p: a prompt dict needs 'prompt' or 'prompt_token_ids'"),
        (3, "p: a prompt must be a string or a dict, got int"),
    ],
)
def test_bad_prompts_name_the_problem(parser, prompt, message):
    with pytest.raises(KlotskiError) as err:
        parser.parse(prompt, "p")
    assert str(err.value).startswith(message)


def test_tokenize_leaves_the_length_check_to_check_length(parser):
    text, ids = parser.tokenize({"prompt_token_ids": [1] * 64}, "p")
    assert text is None and ids == [1] * 64
    with pytest.raises(KlotskiError, match="context is 64"):
        parser.check_length(ids, "p")


def test_chat_records_render_without_adding_bos_twice(parser):
    prompt = parser.chat([{"role": "user", "content": "hi"}])
    assert prompt["prompt"].startswith("<s>[INST] hi")
    assert prompt["prompt_token_ids"] == parser.tokenizer.encode(prompt["prompt"], add_special_tokens=False)
    record = parser.record({"messages": [{"role": "user", "content": "hi"}]}, "line 1")
    assert record == (prompt["prompt"], prompt["prompt_token_ids"])
    with pytest.raises(KlotskiError, match="messages must be a list"):
        parser.chat("hi")  # type: ignore[arg-type]


def test_without_a_tokenizer_only_ids_work():
    parser = PromptParser(None, vocab_size=10, max_model_len=4, model="ids-only")
    assert parser.parse({"prompt_token_ids": [1, 2]}, "p") == (None, [1, 2])
    with pytest.raises(KlotskiError, match="ids-only has no tokenizer.json"):
        parser.parse("text", "p")
    with pytest.raises(KlotskiError, match="chat templates are unavailable"):
        parser.chat([{"role": "user", "content": "hi"}])
