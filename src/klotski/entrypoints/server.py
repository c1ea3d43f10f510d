"""The OpenAI-compatible HTTP server (`klotski serve`): FastAPI in front of the step loop.

Request bodies are validated and mapped to SamplingParams by openai_protocol (the same code run-batch
uses); the Scheduler gathers concurrent requests into the engine's batch groups. Endpoints:
GET /health, GET /metrics, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(streaming as server-sent events). Errors come in OpenAI's shape {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from klotski.entrypoints import openai_protocol as proto
from klotski.entrypoints.scheduler import NotAccepting, QueueFull, Scheduler, Update
from klotski.errors import KlotskiError
from klotski.outputs import RequestOutput

DISCONNECT_POLL_S = 0.25  # a waiting (not streaming) request checks this often whether its client is gone


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 1024
    max_wait_ms: float = 50.0
    max_num_seqs: int = 256
    shutdown_timeout: float = 30.0


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type,
            param,
            code,
            headers,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            _error_body(self.message, self.type, self.param, self.code), self.status, headers=self.headers
        )


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class EngineState:
    """The engine while it loads (503 meanwhile), then its scheduler; shared by every request."""

    def __init__(self, load: Callable[[], Any], config: ServerConfig):
        self._load = load
        self.config = config
        self.llm = None
        self.scheduler: Scheduler | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.loaded = threading.Event()  # set once loading ended, well or not
        self.shutdown_started: float | None = None
        self.on_load_error: Callable[[str], None] | None = None
        self.started = time.time()

    def start_loading(self) -> None:
        threading.Thread(target=self._load_engine, name="klotski-load", daemon=True).start()

    def _load_engine(self) -> None:
        try:
            llm = self._load()
            cfg = self.config
            scheduler = Scheduler(
                llm, max_queue=cfg.max_queue, max_wait_ms=cfg.max_wait_ms, max_num_seqs=cfg.max_num_seqs
            )
            scheduler.start()
            self.llm, self.scheduler = llm, scheduler
            self.ready.set()
        except Exception as exc:  # noqa: BLE001  (reported on /health and by the serve command)
            self.error = str(exc) if isinstance(exc, KlotskiError) else f"{type(exc).__name__}: {exc}"
            if self.on_load_error is not None:
                self.on_load_error(self.error)
        finally:
            self.loaded.set()

    def begin_shutdown(self) -> None:
        """Stop admitting: new requests get 503 while the running ones finish."""
        if self.shutdown_started is None:
            self.shutdown_started = time.monotonic()
        if self.scheduler is not None:
            self.scheduler.stop_accepting()

    def shutdown(self) -> None:
        self.begin_shutdown()
        if self.scheduler is not None:
            left = self.shutdown_started + self.config.shutdown_timeout - time.monotonic()
            self.scheduler.shutdown(max(left, 0.0))

    def require_ready(self) -> tuple[Any, Scheduler]:
        if self.shutdown_started is not None:
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}", "service_unavailable", code="load_failed")
        if not self.ready.is_set():
            raise ApiError(
                503,
                "the model is still loading; retry shortly",
                "service_unavailable",
                code="model_loading",
                headers={"Retry-After": "1"},
            )
        return self.llm, self.scheduler


def create_app(state: EngineState) -> FastAPI:
    """The ASGI app for one engine; `klotski serve` runs it under uvicorn."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="klotski", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    from klotski.entrypoints.metrics import Metrics

    metrics = Metrics(state)
    app.state.engine = state
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            _error_body(message, "invalid_request_error", code=_http_code(exc.status_code)),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(_error_body(f"invalid request: {exc.errors()[0].get('msg')}", "invalid_request_error"), 400)

    def check_key(request: Request) -> None:
        key = state.config.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {key}":
            given = "no API key was given" if not auth else "the API key is wrong"
            raise ApiError(
                401, f"{given}: send 'Authorization: Bearer <key>' with the server's --api-key", code="invalid_api_key"
            )

    @app.get("/health")
    async def health():
        state.require_ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        state.require_ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": state.config.served_model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "klotski",
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        return await _generate(state, metrics, request, proto.COMPLETIONS_URL)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        return await _generate(state, metrics, request, proto.CHAT_URL)

    return app


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, str(status))


# -- one generation request -----------------------------------------------------------------------------
@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


async def _generate(state: EngineState, metrics, request: Request, url: str):
    endpoint = "chat" if url == proto.CHAT_URL else "completions"
    try:
        llm, scheduler = state.require_ready()
        body = await _json_body(request)
        req = _parse(url, body, state.config.served_model_name)
        prompts = _prompts(llm, req)
        try:
            settings = proto.sampling_settings(req, [len(p.ids) for p in prompts], llm.max_model_len, allow_stream=True)
        except KlotskiError as exc:
            raise _protocol(exc) from None
        items = _items(prompts, settings)
        try:
            for _, params, _ in items:
                params.validate(llm.spec.vocab_size)  # what LLM.generate checks too (stop_token_ids, logprobs)
        except KlotskiError as exc:
            raise _protocol(exc) from None
        events: asyncio.Queue = asyncio.Queue()
        relay = _relay(asyncio.get_running_loop())
        try:
            handles = scheduler.submit(items, lambda handle, update: relay.put(events, (handle, update)))
        except QueueFull as exc:
            raise ApiError(
                429,
                f"{exc}: the server's queue (--max-queue {scheduler.max_queue}) is full",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(round(exc.retry_after))},
            ) from None
        except NotAccepting as exc:
            raise ApiError(503, str(exc), "service_unavailable", code="shutting_down") from None
    except ApiError as exc:
        metrics.request_done(endpoint, exc.status)
        raise
    job = _Job(state, metrics, req, settings, prompts, handles, events, endpoint)
    if req.stream:
        return StreamingResponse(
            job.stream(request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await job.whole(request)


class _Relay:
    """Carries updates from the engine thread into the event loop: one wake-up per batch of updates
    (a step emits one per running sequence), not one per update."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # a drain is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (the server is stopping): nobody is listening
            pass

    def _drain(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


_relays: dict[int, _Relay] = {}


def _relay(loop: asyncio.AbstractEventLoop) -> _Relay:
    if id(loop) not in _relays or _relays[id(loop)].loop is not loop:
        _relays[id(loop)] = _Relay(loop)
    return _relays[id(loop)]


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", code="invalid_json"
        ) from None


def _protocol(exc: KlotskiError) -> ApiError:
    err = proto.as_protocol_error(exc)
    return ApiError(err.status_code, err.message, err.type, err.param, err.code)


def _parse(url: str, body: Any, served: str):
    try:
        req = proto.parse_request(url, body)
    except KlotskiError as exc:
        raise _protocol(exc) from None
    if req.model is not None and req.model != served:
        raise ApiError(
            400,
            f"the model {req.model!r} is not served here; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )
    return req


def _prompts(llm, req) -> list[_Prompt]:
    """Token ids of every prompt of the request (chat: rendered with the checkpoint's template)."""
    out = []
    try:
        for i, prompt in enumerate(proto.request_prompts(req)):
            if "messages" in prompt:
                prompt = llm.chat_prompt(prompt["messages"], prompt.get("add_generation_prompt", True))
            text, ids = llm.prompts.tokenize(prompt, "prompt" if i == 0 else f"prompt[{i}]")
            out.append(_Prompt(text, ids))
    except KlotskiError as exc:
        raise _protocol(exc) from None
    return out


def _items(prompts: list[_Prompt], settings) -> list[tuple]:
    """One scheduler sequence per (prompt, sample); the first of each prompt carries its echo scoring."""
    from klotski.sampling import SamplingParams

    items = []
    params = settings.sample_params(None) or [SamplingParams(temperature=0.0, max_tokens=1)]
    for p in prompts:
        for j, sp in enumerate(params):
            items.append((p.ids, sp, settings.prompt_logprobs if j == 0 else None))
    return items


class _Job:
    """One HTTP request's sequences: gathered into one body, or streamed as chunks."""

    def __init__(self, state, metrics, req, settings, prompts, handles, events, endpoint):
        self.state, self.metrics, self.req, self.settings = state, metrics, req, settings
        self.prompts, self.handles, self.events, self.endpoint = prompts, handles, events, endpoint
        self.chat = isinstance(req, proto.ChatCompletionRequest)
        self.score_only = settings.params is None
        self.per_prompt = 1 if self.score_only else settings.n
        self.id = proto.response_id(req, uuid.uuid4().hex)
        self.created = int(time.time())
        self.model = state.config.served_model_name
        tokenizer = state.llm.tokenizer
        self.token_text = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else str
        self.start = time.monotonic()
        self.first_token: float | None = None

    def _cancel_unfinished(self) -> None:
        left = [h for h in self.handles if not h.done.is_set()]
        if left:
            self.state.scheduler.cancel(left)

    def _error(self) -> str | None:
        return next((h.error for h in self.handles if h.error), None)

    def _saw(self, update: Update) -> None:
        if self.first_token is None and update.token_ids:
            self.first_token = time.monotonic()
            self.metrics.first_token(self.endpoint, self.first_token - self.start)

    async def whole(self, request: Request):
        """Wait for every sequence (cancelling them if the client goes away), then one response body."""
        remaining = set(self.handles)
        checked = time.monotonic()
        try:
            while remaining:
                try:
                    handle, update = await asyncio.wait_for(self.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    handle, update = None, None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.metrics.request_done(self.endpoint, 499)
                        return JSONResponse(_error_body("client disconnected", "invalid_request_error"), 499)
                if update is None:
                    continue
                self._saw(update)
                if update.finished:
                    remaining.discard(handle)
        finally:
            self._cancel_unfinished()
        error = self._error()
        if error is not None:
            self.metrics.request_done(self.endpoint, 500)
            return JSONResponse(_error_body(error, "server_error", code="engine_error"), 500)
        body = proto.response_body(
            self.req,
            self._outputs(),
            self.settings,
            model=self.model,
            id=self.id,
            created=self.created,
            token_text=self.token_text,
        )
        self.metrics.request_done(self.endpoint, 200, time.monotonic() - self.start)
        return JSONResponse(body)

    def _outputs(self) -> list[RequestOutput]:
        outputs = []
        for k, p in enumerate(self.prompts):
            handles = self.handles[k * self.per_prompt : (k + 1) * self.per_prompt]
            if self.score_only:
                samples = proto.score_only_outputs(self.settings)
            else:
                samples = [replace(h.seq.output(), index=j) for j, h in enumerate(handles)]
            outputs.append(
                RequestOutput(
                    request_id=self.id,
                    prompt=p.text,
                    prompt_token_ids=p.ids,
                    outputs=samples,
                    finished=True,
                    prompt_logprobs=handles[0].prompt_logprob_entries,
                )
            )
        return outputs

    async def stream(self, request: Request):
        """Server-sent events: one chunk per sequence per step, usage if asked, then [DONE]."""
        index = {id(h): i for i, h in enumerate(self.handles)}
        remaining = set(self.handles)
        include_usage = bool((self.req.stream_options or {}).get("include_usage"))
        chunks = proto.StreamChunks(
            self.req, self.settings, model=self.model, id=self.id, created=self.created, token_text=self.token_text
        )
        status = 200
        try:
            for i in range(len(self.handles)):
                first = chunks.start(i)
                if first is not None:
                    yield _sse(first)
            while remaining:
                handle, update = await self.events.get()
                self._saw(update)
                if update.finished:
                    remaining.discard(handle)
                if update.error is not None:
                    status = 500
                    yield _sse(_error_body(update.error, "server_error", code="engine_error"))
                    break
                i = index[id(handle)]
                prompt = self.prompts[i // self.per_prompt]
                if self.score_only:  # the one greedy token that carried the prefill is not an answer
                    update = replace(update, text="", token_ids=[], logprobs=None, finish_reason="length")
                chunk = chunks.update(
                    i,
                    update.text,
                    update.token_ids,
                    update.logprobs,
                    update.finish_reason,
                    prompt_text=prompt.text,
                    prompt_ids=prompt.ids,
                    prompt_logprobs=handle.prompt_logprob_entries,
                )
                if chunk is not None:
                    yield _sse(chunk)
            if include_usage and status == 200:
                generated = 0 if self.score_only else sum(len(h.seq.stopper.token_ids) for h in self.handles)
                yield _sse(chunks.usage(sum(len(p.ids) for p in self.prompts), generated))
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away ends here too (the generator is closed): its sequences leave the group.
            cancelled = any(not h.done.is_set() for h in self.handles)
            self._cancel_unfinished()
            self.metrics.request_done(
                self.endpoint, 499 if cancelled and status == 200 else status, time.monotonic() - self.start
            )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
