"""`klotski serve` under load, through the official `openai` client: every answer is the one its request
gets alone through LLM.generate, streamed or not, whatever shares the group."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import openai
import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.entrypoints.openai_protocol import sample_seed
from tests.entrypoints.server_utils import ServerProcess

PROMPTS = [
    "The library opened at nine in the morning",
    "Numbers matter: 1, 2, 3, 10, 42",
    "She asked the librarian where the maps were kept",
    "Good plans are simple to explain",
    "We measured the time it took to read each file",
    "Questions end with a question mark?",
]


@dataclass(frozen=True)
class Spec:
    """One distinct request; the 200 requests are these, streamed or not."""

    chat: bool
    prompt: str
    max_tokens: int
    seed: int | None  # None: greedy
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    n: int = 1

    def params(self, sample: int = 0) -> SamplingParams:
        seed = None if self.seed is None else (self.seed if sample == 0 else sample_seed(self.seed, sample))
        top = 2 if self.logprobs else None
        if self.seed is None:
            return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, stop=list(self.stop), logprobs=top)
        return SamplingParams(
            temperature=0.8, top_p=0.9, seed=seed, max_tokens=self.max_tokens, stop=list(self.stop), logprobs=top
        )

    def body(self) -> dict:
        b: dict = {"model": "tiny", "max_tokens": self.max_tokens, "n": self.n}
        if self.seed is None:
            b["temperature"] = 0.0
        else:
            b |= {"temperature": 0.8, "top_p": 0.9, "seed": self.seed}
        if self.stop:
            b["stop"] = list(self.stop)
        if self.logprobs:
            b |= {"logprobs": True, "top_logprobs": 2} if self.chat else {"logprobs": 2}
        if self.chat:
            b["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            b["prompt"] = self.prompt
        return b


def _specs() -> list[Spec]:
    out = []
    for i in range(24):
        out.append(
            Spec(
                chat=i % 3 == 2,
                prompt=f"{PROMPTS[i % len(PROMPTS)]} {i}",
                max_tokens=2 + i % 6,
                seed=None if i % 2 == 0 else 1000 + i,
                stop=("e",) if i % 5 == 0 else (),
                logprobs=i % 7 == 1,
                n=2 if i % 8 == 3 else 1,
            )
        )
    return out


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    """Each distinct request run alone through LLM.generate: (texts, token ids, finish reasons, logprobs,
    prompt len)."""
    llm = LLM(str(tiny_mixtral))
    answers = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the server process on 2 shared cores (see server_utils)
    for spec in _specs():
        if spec.chat:
            prompt = llm.chat_prompt([{"role": "user", "content": spec.prompt}])
        else:
            prompt = {"prompt": spec.prompt, "prompt_token_ids": llm.tokenizer.encode(spec.prompt)}
        outs = [llm.generate([prompt], spec.params(j))[0].outputs[0] for j in range(spec.n)]
        answers[spec] = (outs, len(prompt["prompt_token_ids"]))
    torch.set_num_threads(threads)
    return answers


@pytest.fixture(scope="module")
def server(tiny_mixtral, tmp_path_factory):
    # bs 8 x n 4: at most 32 sequences run, so most requests wait and join as others leave.
    proc = ServerProcess(
        tiny_mixtral,
        "--batch-size",
        "8",
        "--num-batches",
        "4",
        "--max-wait-ms",
        "20",
        home=str(tmp_path_factory.mktemp("serve-home")),
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


async def _one(client: openai.AsyncOpenAI, spec: Spec, stream: bool, usage: bool):
    """(texts per choice, finish reasons, usage, logprobs per choice) of one request."""
    body = spec.body()
    create = client.chat.completions.create if spec.chat else client.completions.create
    if not stream:
        r = await create(**body)
        texts = [c.message.content if spec.chat else c.text for c in r.choices]
        lps = [_logprobs(spec, c) for c in r.choices]
        return texts, [c.finish_reason for c in r.choices], r.usage, lps
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    texts, reasons, lps, got_usage = [""] * spec.n, [None] * spec.n, [[] for _ in range(spec.n)], None
    async for chunk in await create(stream=True, **body, **extra):
        if chunk.usage is not None:
            got_usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if spec.chat else c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
            lps[c.index] += _logprobs(spec, c) or []
    return texts, reasons, got_usage, lps


def _logprobs(spec: Spec, choice) -> list[float] | None:
    if choice.logprobs is None:
        return None
    if spec.chat:
        return [t.logprob for t in choice.logprobs.content or []]
    return list(choice.logprobs.token_logprobs)


def test_200_concurrent_requests_get_their_alone_answers(server, reference):
    specs = _specs()
    jobs = [(specs[r % len(specs)], (r // len(specs)) % 2 == 1, r % 3 == 0) for r in range(200)]

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(_one(client, spec, stream, usage) for spec, stream, usage in jobs))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    streamed = {}
    for (spec, stream, usage), (texts, reasons, got_usage, lps) in zip(jobs, results):
        outs, prompt_len = reference[spec]
        assert texts == [o.text for o in outs], (spec, stream)
        assert reasons == [o.finish_reason for o in outs]
        if not stream or usage:
            assert got_usage.prompt_tokens == prompt_len
            assert got_usage.completion_tokens == sum(len(o.token_ids) for o in outs)
            assert got_usage.total_tokens == prompt_len + got_usage.completion_tokens
        else:
            assert got_usage is None
        if spec.logprobs:
            for got, o in zip(lps, outs):
                want = [lp[t] for lp, t in zip(o.logprobs, o.token_ids)]
                assert got == pytest.approx(want, abs=1e-4)
        streamed.setdefault(spec, {})[stream] = texts
    assert all(v[True] == v[False] for v in streamed.values())  # streamed text == whole text
    m = server.metrics()
    assert m["klotski_running_sequences"] == 0 and m["klotski_queue_depth"] == 0
    assert m["klotski_generated_tokens_total"] >= sum(len(o.token_ids) for s, _, _ in jobs for o in reference[s][0])
    assert m["klotski_engine_steps_total"] > 0
    assert (m["klotski_group_batch_size"], m["klotski_group_num_batches"]) == (8, 4)


def test_echo_with_logprobs_scores_the_prompt(server, tiny_mixtral):
    llm = LLM(str(tiny_mixtral))
    prompt = "Good plans are simple to explain"
    ids = llm.tokenizer.encode(prompt)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0)
    alone = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    choice = r.choices[0]
    assert choice.text == prompt + alone.text
    assert len(choice.logprobs.tokens) == len(ids) + len(alone.token_ids)
    expect = torch.log_softmax(llm.prompt_logits([prompt])[0].float(), dim=-1)
    for j in range(1, len(ids)):
        assert choice.logprobs.token_logprobs[j] == pytest.approx(float(expect[j - 1, ids[j]]), abs=1e-4)
    # max_tokens 0 with echo only scores the prompt (what harnesses do for multiple choice)
    score = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    assert score.choices[0].text == prompt and score.usage.completion_tokens == 0
    assert score.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        choice.logprobs.token_logprobs[1 : len(ids)], abs=1e-5
    )
    stream = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == prompt + alone.text
