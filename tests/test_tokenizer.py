"""Tokenizer parity with transformers, the tokenizer writer, incremental decoding and stop rules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from klotski.errors import KlotskiError
from klotski.sampling import SamplingParams
from klotski.tokenizer import IncrementalDecoder, StopChecker, Tokenizer, find_stop_string, write_tokenizer

TEXTS = [
    "Hello world! The river ran low that summer.",
    "  leading spaces, trailing spaces  ",
    "<s>special</s> in the middle <unk> and <|reserved_500|>",
    "héllo wörld, 日本語, emoji 🎉🚀 and tabs\tand\nnewlines",
    "",
    "A mixture of experts model keeps many small networks.",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Why?"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok512")
    write_tokenizer(out, 512)
    return out


@pytest.fixture(scope="module")
def bos_dir(tok_dir, tmp_path_factory):
    """Like Mixtral's/Llama's tokenizer.json: a TemplateProcessing post-processor that adds <s>."""
    out = tmp_path_factory.mktemp("tok512_bos")
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    return out


@pytest.fixture(scope="module")
def flag_dir(tok_dir, tmp_path_factory):
    """add_bos_token / add_eos_token in tokenizer_config: ignored beside tokenizer.json (as transformers 5)."""
    out = tmp_path_factory.mktemp("tok512_flags")
    (out / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.mark.parametrize("which", ["tok_dir", "bos_dir", "flag_dir"])
def test_matches_transformers(which, request):
    transformers = pytest.importorskip("transformers")
    directory = request.getfixturevalue(which)
    ours, theirs = Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    for add_prompt in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_prompt) == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_prompt
        )
    assert (ours.encode("hi")[0] == 0) == (which == "bos_dir")


def test_written_tokenizer_has_exact_size_and_every_id_decodes(tok):
    assert tok.vocab_size == 512
    assert all(tok.decode([i], skip_special_tokens=False) for i in range(512))
    assert tok.eos_token_ids == frozenset({1}) and tok.bos_token_id == 0
    assert tok.encode_chat(MESSAGES[1:2]) == tok.encode("<s>[INST] Hi there [/INST]", False)


@pytest.mark.parametrize("vocab_size", [300, 2000, 129280])
def test_write_tokenizer_sizes(vocab_size, tmp_path):
    ids = write_tokenizer(tmp_path, vocab_size)
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.vocab_size == vocab_size
    assert ids == {"bos_token_id": 0, "eos_token_id": 1, "unk_token_id": 2}
    if vocab_size > 1000:  # beyond what the built-in corpus trains: reserved tokens fill the rest
        assert tokenizer.decode([vocab_size - 1]) == f"<|reserved_{vocab_size - 1}|>"
        last = vocab_size - 1
        assert tokenizer.encode(f"a<|reserved_{last}|>") == tokenizer.encode("a") + [last]
    assert tokenizer.decode(tokenizer.encode("The river ran low.")) == "The river ran low."


def test_write_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(KlotskiError, match="vocab_size >= 300"):
        write_tokenizer(tmp_path, 299)


def test_write_tokenizer_is_deterministic_across_processes(tok_dir, tmp_path):
    code = f"from klotski.tokenizer import write_tokenizer; write_tokenizer({str(tmp_path)!r}, 512)"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()


def _env():
    """This environment with the source tree importable, installed or not."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_missing_tokenizer_json_names_the_fix(tmp_path):
    with pytest.raises(KlotskiError, match="prompt_token_ids"):
        Tokenizer.from_dir(tmp_path)


def test_config_variants(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    config = {
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ messages[0]['content'] }}!"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_ids == frozenset({1, 7, 9})
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
    write_tokenizer(tmp_path / "plain", 300, chat_template=None)
    with pytest.raises(KlotskiError, match="chat template"):
        Tokenizer.from_dir(tmp_path / "plain").apply_chat_template(MESSAGES)


def test_incremental_decoder_holds_back_partial_utf8(tok):
    text = "Plain words, then héllo 日本語 🎉🚀 done."
    prompt = tok.encode("The prompt ends here:")
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok, prompt)
    deltas = [decoder.add(i) for i in ids]
    assert "".join(deltas) == text == decoder.text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some byte pieces really were incomplete characters


def test_incremental_decoder_flush_emits_dangling_bytes(tok):
    ids = tok.encode("日")[:-1]  # an incomplete character
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.add(i) for i in ids) == ""
    assert decoder.flush() == tok.decode(ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_straddling_tokens(tok, include):
    ids = tok.encode("alpha beta STOP gamma")
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=include, max_tokens=50)
    checker = StopChecker(params, tok.eos_token_ids, tok)
    states = [checker.append(i) for i in ids]
    done = [s for s in states if s.finished]
    assert done and done[0].finish_reason == "stop" and done[0].stop_reason == "STOP"
    assert done[0].text == ("alpha beta STOP" if include else "alpha beta ")


def test_find_stop_string_only_searches_new_text():
    assert find_stop_string("abc###", 2, ["###"], False) == ("###", 3)
    assert find_stop_string("abc###", 2, ["###"], True) == ("###", -1)
    assert find_stop_string("###abcdef", 2, ["###"], False) is None
    assert find_stop_string("abc##x", 0, ["##"], False) is None


def test_eos_and_stop_token_ids(tok):
    ids = tok.encode("hello there")
    checker = StopChecker(SamplingParams(max_tokens=20), tok.eos_token_ids, tok)
    states = [checker.append(i) for i in ids + [1]]
    assert not any(s.finished for s in states[:-1])
    last = states[-1]
    assert (last.finished, last.finish_reason, last.stop_reason) == (True, "stop", None)
    assert last.text == "hello there"
    assert checker.token_ids == ids + [1]
    checker = StopChecker(SamplingParams(stop_token_ids=[ids[1]]), tok.eos_token_ids, tok)
    checker.append(ids[0])
    state = checker.append(ids[1])
    assert (state.finish_reason, state.stop_reason, state.text) == ("stop", ids[1], tok.decode(ids[:1]))


def test_length_min_tokens_and_ignore_eos(tok):
    checker = StopChecker(SamplingParams(max_tokens=3, min_tokens=2), tok.eos_token_ids, tok)
    assert not checker.append(1).finished  # EOS before min_tokens is ignored
    assert checker.append(1).finish_reason == "stop"
    checker = StopChecker(SamplingParams(max_tokens=2, ignore_eos=True), tok.eos_token_ids, tok)
    assert not checker.append(1).finished
    assert checker.append(1).finish_reason == "length"
    checker = StopChecker(SamplingParams(max_tokens=1), frozenset({1}))  # ids only, no tokenizer
    assert checker.append(5).finish_reason == "length" and checker.text == ""
    with pytest.raises(KlotskiError, match="tokenizer"):
        StopChecker(SamplingParams(stop="x"), frozenset())
