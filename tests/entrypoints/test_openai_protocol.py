"""The OpenAI wire format: bodies validate strictly, map onto SamplingParams, and responses parse with
openai's types."""

from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from klotski.entrypoints import openai_protocol as op
from klotski.entrypoints.openai_protocol import CHAT_URL, COMPLETIONS_URL, ProtocolError


def error_of(fn, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value


# -- request bodies ------------------------------------------------------------------------------------
def test_completion_body_fields_parse():
    req = op.parse_request(
        COMPLETIONS_URL,
        {
            "model": "m",
            "prompt": "Hi",
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 4,
            "min_p": 0.1,
            "seed": 3,
            "stop": ["\n"],
            "n": 2,
            "logprobs": 2,
            "echo": True,
            "ignore_eos": True,
            "min_tokens": 1,
            "user": "someone",
            "frequency_penalty": 0,
        },
    )
    assert isinstance(req, op.CompletionRequest) and req.n == 2 and req.echo and req.logprobs == 2
    assert op.request_prompts(req) == [{"prompt": "Hi"}]
    assert op.request_prompts(op.parse_request(COMPLETIONS_URL, {"prompt": [1, 2]})) == [{"prompt_token_ids": [1, 2]}]
    assert op.request_prompts(op.parse_request(COMPLETIONS_URL, {"prompt": ["a", "b"]})) == [
        {"prompt": "a"},
        {"prompt": "b"},
    ]


def test_chat_body_fields_parse():
    req = op.parse_request(
        CHAT_URL,
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 4,
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    assert isinstance(req, op.ChatCompletionRequest)
    [prompt] = op.request_prompts(req)
    assert prompt["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.mark.parametrize(
    "url, body, code, param, words",
    [
        (
            COMPLETIONS_URL,
            {"prompt": "x", "temprature": 1},
            "unknown_field",
            "temprature",
            "unknown field 'temprature'",
        ),
        (
            CHAT_URL,
            {"messages": [{"role": "user", "content": "x", "colour": 1}]},
            "unknown_field",
            "messages[0].colour",
            "unknown field",
        ),
        (COMPLETIONS_URL, {"prompt": "x", "logit_bias": {"5": 3}}, "unsupported_field", "logit_bias", "not supported"),
        (
            COMPLETIONS_URL,
            {"prompt": "x", "presence_penalty": 0.5},
            "unsupported_field",
            "presence_penalty",
            "not supported",
        ),
        (COMPLETIONS_URL, {"max_tokens": 3}, "missing_field", "prompt", "'prompt' is required"),
        (COMPLETIONS_URL, {"prompt": 5}, "invalid_type", "prompt", "a string, a list of token ids"),
        (COMPLETIONS_URL, {"prompt": ["a", [1]]}, "invalid_type", "prompt", "a list of strings"),
        (COMPLETIONS_URL, {"prompt": "x", "temperature": "hot"}, "invalid_type", "temperature", "valid number"),
        (COMPLETIONS_URL, {"prompt": "x", "max_tokens": True}, "invalid_type", "max_tokens", "valid integer"),
        (CHAT_URL, {"messages": []}, "invalid_value", "messages", "at least 1"),
        (CHAT_URL, {"messages": [{"role": "robot", "content": "x"}]}, "invalid_value", "messages[0].role", "role"),
        ("/v1/embeddings", {"input": "x"}, "unknown_url", "url", "not served"),
        (COMPLETIONS_URL, ["not", "an", "object"], "invalid_type", "body", "JSON object"),
    ],
)
def test_bad_bodies_name_the_problem(url, body, code, param, words):
    err = error_of(op.parse_request, url, body)
    assert (err.code, err.param, err.status_code) == (code, param, 400)
    assert words in err.message
    assert err.to_dict() == {"message": err.message, "type": "invalid_request_error", "param": param, "code": code}


def test_neutral_values_of_unsupported_fields_are_accepted():
    req = op.parse_request(
        CHAT_URL,
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [],
            "response_format": {"type": "text"},
            "presence_penalty": 0,
            "metadata": {"a": 1},
        },
    )
    assert isinstance(req, op.ChatCompletionRequest)


def test_batch_lines_parse():
    line = {"custom_id": "r1", "method": "POST", "url": COMPLETIONS_URL, "body": {"prompt": "x"}}
    got = op.parse_batch_request(line)
    assert got.custom_id == "r1" and isinstance(got.request, op.CompletionRequest)
    assert op.batch_custom_id(line) == "r1" and op.batch_custom_id({"custom_id": 3}) is None
    assert error_of(op.parse_batch_request, {**line, "method": "GET"}).code == "unsupported_method"
    assert error_of(op.parse_batch_request, {**line, "extra": 1}).code == "unknown_field"
    assert error_of(op.parse_batch_request, {k: v for k, v in line.items() if k != "custom_id"}).param == "custom_id"
    assert error_of(op.parse_batch_request, {**line, "custom_id": ""}).param == "custom_id"
    assert error_of(op.parse_batch_request, [1]).code == "invalid_line"


# -- sampling settings ---------------------------------------------------------------------------------
def settings(url, body, prompt_lens=(3,), max_model_len=64):
    return op.sampling_settings(op.parse_request(url, body), list(prompt_lens), max_model_len)


def test_sampling_settings_map_every_field():
    s = settings(
        COMPLETIONS_URL,
        {
            "prompt": "x",
            "max_tokens": 5,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 4,
            "min_p": 0.1,
            "seed": 3,
            "stop": "\n",
            "n": 2,
            "logprobs": 2,
            "echo": True,
            "ignore_eos": True,
            "min_tokens": 1,
        },
    )
    p = s.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens, p.min_tokens) == (0.5, 0.9, 4, 0.1, 3, 5, 1)
    assert p.stop == ("\n",) and p.ignore_eos and p.logprobs == 2
    assert (s.n, s.echo, s.logprobs, s.prompt_logprobs, s.max_tokens) == (2, True, 2, 2, 5)
    defaults = settings(COMPLETIONS_URL, {"prompt": "x"})
    assert (defaults.params.temperature, defaults.params.max_tokens, defaults.logprobs, defaults.echo) == (
        1.0,
        16,
        None,
        False,
    )
    chat = settings(CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, prompt_lens=(10,))
    assert chat.max_tokens == 54 and chat.logprobs == 0  # up to the context, as vLLM
    assert (
        settings(
            CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 7}
        ).max_tokens
        == 7
    )


def test_echo_with_zero_tokens_only_scores():
    s = settings(COMPLETIONS_URL, {"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 1})
    assert s.params is None and s.prompt_logprobs == 1 and s.sample_params(7) == []
    assert [o.finish_reason for o in op.score_only_outputs(s)] == ["length"]


@pytest.mark.parametrize(
    "body, prompt_lens, code, param",
    [
        ({"prompt": "x", "n": 0}, (3,), "invalid_value", "n"),
        ({"prompt": "x", "n": 1000}, (3,), "invalid_value", "n"),
        ({"prompt": "x", "logprobs": 21}, (3,), "invalid_value", "logprobs"),
        ({"prompt": "x", "max_tokens": 0}, (3,), "invalid_value", "max_tokens"),
        ({"prompt": "x", "max_tokens": -2, "echo": True}, (3,), "invalid_value", "max_tokens"),
        ({"prompt": "x", "temperature": -1}, (3,), "invalid_value", "temperature"),
        ({"prompt": "x", "top_p": 1.5}, (3,), "invalid_value", "top_p"),
        ({"prompt": "x", "min_tokens": 9, "max_tokens": 4}, (3,), "invalid_value", "min_tokens"),
        ({"prompt": "x", "max_tokens": 60}, (10,), "context_length_exceeded", "max_tokens"),
        ({"prompt": "x"}, (64,), "context_length_exceeded", "prompt"),
        ({"prompt": "x"}, (0,), "invalid_prompt", "prompt"),
        ({"prompt": "x", "stream": True}, (3,), "invalid_value", "stream"),
    ],
)
def test_out_of_range_settings(body, prompt_lens, code, param):
    err = error_of(settings, COMPLETIONS_URL, body, prompt_lens)
    assert (err.code, err.param) == (code, param), err.message


def test_stream_is_refused_unless_the_caller_streams():
    body = {"prompt": "x", "stream": True}
    assert op.sampling_settings(op.parse_request(COMPLETIONS_URL, body), [3], 64, allow_stream=True).n == 1


def test_top_logprobs_needs_logprobs():
    err = error_of(settings, CHAT_URL, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert err.param == "top_logprobs"


def test_sample_seeds_are_derived_deterministically():
    s = settings(COMPLETIONS_URL, {"prompt": "x", "n": 3, "seed": 11})
    seeds = [p.seed for p in s.sample_params()]
    assert seeds[0] == 11 and len(set(seeds)) == 3
    assert seeds == [p.seed for p in s.sample_params(default_seed=99)]  # the request's own seed wins
    unseeded = settings(COMPLETIONS_URL, {"prompt": "x", "n": 2})
    assert [p.seed for p in unseeded.sample_params()] == [None, None]
    assert [p.seed for p in unseeded.sample_params(5)] == [5, op.sample_seed(5, 1)]


# -- response bodies from real engine outputs -----------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_mixtral):
    from klotski.engine import LLM

    return LLM(model=str(tiny_mixtral), dtype="float32")


def token_text(llm):
    return lambda t: llm.tokenizer.decode([t], skip_special_tokens=False)


def run_completion(llm, body):
    req = op.parse_request(COMPLETIONS_URL, body)
    prompts = op.request_prompts(req)
    ids = [llm.tokenizer.encode(p["prompt"]) if "prompt" in p else p["prompt_token_ids"] for p in prompts]
    s = op.sampling_settings(req, [len(i) for i in ids], llm.max_model_len)
    outputs = []
    for p, tokens in zip(prompts, ids):
        if s.params is None:
            samples = op.score_only_outputs(s)
        else:
            samples = [r.outputs[0] for r in llm.generate([{"prompt_token_ids": tokens}] * s.n, s.sample_params(1))]
        from klotski.outputs import RequestOutput

        out = RequestOutput("x", p.get("prompt", llm.tokenizer.decode(tokens)), tokens, samples, True)
        if s.prompt_logprobs is not None:
            [logits] = llm.prompt_logits([{"prompt_token_ids": tokens}])
            out.prompt_logprobs = op.prompt_logprobs_from_logits(logits, tokens, s.prompt_logprobs)
        outputs.append(out)
    return req, s, outputs


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "The river", "max_tokens": 4, "temperature": 0},
        {"prompt": "The river", "max_tokens": 4, "logprobs": 3, "seed": 1, "n": 2},
        {"prompt": "The river ran", "max_tokens": 3, "logprobs": 2, "echo": True, "temperature": 0},
        {"prompt": "The river ran", "max_tokens": 0, "logprobs": 1, "echo": True},
        {"prompt": ["Hello", "The river ran"], "max_tokens": 2, "n": 2, "seed": 4, "logprobs": 0},
    ],
)
def test_completion_bodies_validate_with_openai_types(llm, body):
    req, s, outputs = run_completion(llm, body)
    built = op.completion_body(
        outputs,
        s,
        model="tiny",
        id=op.response_id(req, "k"),
        created=1700000000,
        token_text=token_text(llm),
        system_fingerprint="fp",
    )
    parsed = Completion.model_validate(built)
    n_prompts = len(op.request_prompts(req))
    assert len(parsed.choices) == n_prompts * s.n and [c.index for c in parsed.choices] == list(
        range(len(built["choices"]))
    )
    assert parsed.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in outputs)
    assert parsed.usage.completion_tokens == n_prompts * s.n * s.max_tokens  # random weights rarely hit EOS
    for choice, sample in zip(parsed.choices, [c for o in outputs for c in o.outputs]):
        if s.echo:
            assert choice.text.startswith(outputs[0].prompt)
        if s.logprobs is None:
            assert choice.logprobs is None
            continue
        expected = (len(outputs[0].prompt_token_ids) if s.echo else 0) + len(sample.token_ids)
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == expected
        assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset == sorted(lp.text_offset)
    if s.echo:  # the prompt's own logprobs: the first token is given (0.0), the rest are the model's
        lp = parsed.choices[0].logprobs
        assert lp.token_logprobs[0] == 0.0 and all(
            v < 0 for v in lp.token_logprobs[1 : len(outputs[0].prompt_token_ids)]
        )


def test_chat_body_validates_with_openai_types(llm):
    req = op.parse_request(
        CHAT_URL,
        {
            "messages": [{"role": "user", "content": "Name a river."}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
            "n": 2,
            "seed": 9,
        },
    )
    [prompt] = op.request_prompts(req)
    rendered = llm.chat_prompt(prompt["messages"], prompt["add_generation_prompt"])
    s = op.sampling_settings(req, [len(rendered["prompt_token_ids"])], llm.max_model_len)
    samples = [r.outputs[0] for r in llm.generate([rendered] * s.n, s.sample_params())]
    from klotski.outputs import RequestOutput

    out = RequestOutput("x", rendered["prompt"], rendered["prompt_token_ids"], samples, True)
    built = op.chat_completion_body(
        [out], s, model="tiny", id=op.response_id(req, "k"), created=1, token_text=token_text(llm)
    )
    parsed = ChatCompletion.model_validate(built)
    assert [c.message.role for c in parsed.choices] == ["assistant", "assistant"]
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion"
    for choice, sample in zip(parsed.choices, samples):
        assert choice.message.content == sample.text
        assert len(choice.logprobs.content) == len(sample.token_ids)
        for entry, token, engine_entry in zip(choice.logprobs.content, sample.token_ids, sample.logprobs):
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.logprob == engine_entry[token] and entry.top_logprobs[0].logprob == max(engine_entry.values())
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens


def test_batch_output_lines():
    body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": []}
    ok = op.batch_result_line("r1", body, id="batch_req_1", request_id="req_1")
    assert ok == {
        "id": "batch_req_1",
        "custom_id": "r1",
        "response": {"status_code": 200, "request_id": "req_1", "body": body},
        "error": None,
    }
    err = ProtocolError("bad", code="invalid_json")
    line = op.batch_error_line(None, err, id="batch_req_2", request_id="req_2", line=7)
    assert line["response"]["status_code"] == 400 and line["response"]["body"]["error"]["code"] == "invalid_json"
    assert line["error"] == {"code": "invalid_json", "message": "bad", "line": 7}
