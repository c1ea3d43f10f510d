"""`klotski serve` at its limits: invalid bodies, a full queue, a wrong key, clients that go away, SIGTERM,
a model still loading."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from klotski import LLM, SamplingParams
from tests.entrypoints.server_utils import ServerProcess

KEY = "sk-test-123"
LONG = {"model": "tiny", "prompt": "We measured the time", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_mixtral, tmp_path_factory):
    # One sequence runs at a time and two may wait: the queue fills at once.
    proc = ServerProcess(
        tiny_mixtral,
        "--batch-size",
        "1",
        "--num-batches",
        "1",
        "--max-queue",
        "2",
        "--max-wait-ms",
        "0",
        "--api-key",
        KEY,
        home=str(tmp_path_factory.mktemp("serve-home")),
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def _post(server, path, body, key=KEY, raw: bytes | None = None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(
            server.url + path, content=raw, headers=headers | {"content-type": "application/json"}, timeout=60, **kw
        )
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def _wait_idle(server, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["klotski_running_sequences"] == 0 and m["klotski_queue_depth"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError("the server did not become idle")


C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
INVALID = [  # (path, body or raw bytes, status, param or None, words the message must contain)
    (C, {"model": "gpt-4", "prompt": "x"}, 400, "model", "not served"),
    (C, {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature", "negative"),
    (C, {"model": "tiny", "prompt": "x", "top_p": 2.0}, 400, "top_p", "top_p"),
    (C, {"model": "tiny", "prompt": "x", "top_k": -5}, 400, "top_k", "top_k"),
    (C, {"model": "tiny", "prompt": "x", "min_p": 1.5}, 400, "min_p", "min_p"),
    (C, {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "n=0"),
    (C, {"model": "tiny", "prompt": "x", "n": 100000}, 400, "n", "n=100000"),
    (C, {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "at least one"),
    (C, {"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens", "max_tokens"),
    (C, {"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens", "context"),
    (C, {"model": "tiny", "prompt": "hello " * 5000}, 400, "prompt", "context"),
    (C, {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs", "logprobs"),
    (C, {"model": "tiny", "prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens", "min_tokens"),
    (C, {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    (C, {"model": "tiny", "prompt": "x", "seed": "abc"}, 400, "seed", "seed"),
    (C, {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop", "stop"),
    (C, {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "stream"),
    (C, {"model": "tiny", "prompt": "x", "frequency_penalty": 1.0}, 400, "frequency_penalty", "not supported"),
    (C, {"model": "tiny", "prompt": "x", "bogus_field": 1}, 400, "bogus_field", "unknown field"),
    (C, {"model": "tiny"}, 400, "prompt", "required"),
    (C, {"model": "tiny", "prompt": ""}, 400, None, "empty"),
    (C, {"model": "tiny", "prompt": [999999]}, 400, None, "vocabulary"),
    (C, {"model": "tiny", "prompt": "x", "stop_token_ids": [999999]}, 400, None, "vocabulary"),
    (C, [1, 2, 3], 400, None, "object"),
    (C, b'{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    (C, b"\xff\xfe\x00", 400, None, "not valid"),
    (CHAT, {"model": "tiny"}, 400, "messages", "required"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages", "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "role"),
    (CHAT, {"model": "tiny", "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least"),
    ("/v1/nothing", {"model": "tiny"}, 404, None, "no such endpoint"),
]


def test_invalid_requests_get_their_4xx_with_a_clear_message(server):
    assert len(INVALID) >= 30
    for path, body, status, param, words in INVALID:
        raw = body if isinstance(body, bytes) else None
        r = _post(server, path, None if raw else body, raw=raw)
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert words.lower() in error["message"].lower(), (body, error)
        if param is not None:
            assert error["param"] == param, (body, error)
    r = httpx.get(server.url + C, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    # The official client sees the same errors as its own exception types; the server is unharmed.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="negative"):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.post("/nothing", body={}, cast_to=object)
    ok = client.completions.create(model="tiny", prompt="Good plans", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_api_key_is_required_on_v1(server):
    for key in (None, "sk-wrong"):
        r = _post(server, C, {"model": "tiny", "prompt": "x", "max_tokens": 1}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_full_queue_answers_429_and_loses_no_accepted_request(server, tiny_mixtral):
    _wait_idle(server)
    body = {
        "model": "tiny",
        "prompt": "She asked the librarian",
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    alone = LLM(str(tiny_mixtral)).generate(
        ["She asked the librarian"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )[0]

    async def burst():
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as client:
            return await asyncio.gather(*(client.post(C, json=body) for _ in range(24)))

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    for r in replies:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        else:  # every accepted request got its whole, right answer
            assert r.json()["choices"][0]["text"] == alone.outputs[0].text
            assert r.json()["usage"]["completion_tokens"] == 12
    m = _wait_idle(server)
    assert m["klotski_sequences_failed_total"] == 0


def test_a_disconnecting_client_frees_its_slot(server):
    before = _wait_idle(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    # Streaming: read the first chunk, then hang up.
    with httpx.stream("POST", server.url + C, json=LONG | {"stream": True}, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    # Not streaming: the client gives up waiting.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + C, json=LONG, headers=headers, timeout=1.5)
    m = _wait_idle(server, timeout=30)  # both cancelled long before their 3000 tokens
    assert m["klotski_sequences_cancelled_total"] - before["klotski_sequences_cancelled_total"] == 2
    assert m["klotski_generated_tokens_total"] - before["klotski_generated_tokens_total"] < 3000
    # The one slot is free again: a short request runs at once.
    r = _post(server, C, {"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_sigterm_finishes_running_requests_and_exits_0(tiny_mixtral, tmp_path):
    proc = ServerProcess(tiny_mixtral, "--shutdown-timeout", "20", home=str(tmp_path)).wait_ready()
    try:
        got: dict = {}

        def stream():
            body = {
                "model": "tiny",
                "prompt": "Good plans",
                "max_tokens": 200,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
            text, done = "", False
            with httpx.stream("POST", proc.url + C, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])["choices"][0]
                        text += chunk["text"]
                        got["reason"] = chunk["finish_reason"] or got.get("reason")
                        got.setdefault("first", time.monotonic())
            got["done"] = done

        t = threading.Thread(target=stream)
        t.start()
        while "first" not in got and t.is_alive():
            time.sleep(0.01)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        t.join(30)
        assert got.get("done") and got.get("reason") == "length"  # the running request finished whole
        with pytest.raises(httpx.ConnectError):  # and nothing new is admitted
            httpx.get(proc.url + "/health", timeout=2)
    finally:
        proc.stop()


def test_503_while_the_model_loads(tiny_mixtral):
    from fastapi.testclient import TestClient

    from klotski.entrypoints.server import EngineState, ServerConfig, create_app

    release = threading.Event()

    def load():
        release.wait(30)
        return LLM(str(tiny_mixtral))

    state = EngineState(load, ServerConfig(served_model_name="tiny", max_wait_ms=0))
    with TestClient(create_app(state)) as client:
        for r in (client.get("/health"), client.post(C, json={"model": "tiny", "prompt": "x"})):
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        assert state.loaded.wait(30) and state.ready.is_set()
        assert client.get("/health").status_code == 200
        r = client.post(C, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
