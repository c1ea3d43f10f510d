"""The server's step loop: concurrent requests share the engine's batch groups, joining and leaving
at decode-step boundaries.

One background thread owns the engine. Requests wait in a bounded queue. The running group is
planned like LLM.generate's (LLM.policy: bs x n, for `max_num_seqs` sequences); at every step
boundary
  1. finished and cancelled sequences leave: their KV rows are dropped, an emptied batch leaves;
  2. when the group holds more than n batches, the two smallest merge if they fit in bs (their KV
     caches padded to one capacity and concatenated: rows never see each other, masks keep them apart);
  3. waiting requests join as a new batch (up to bs sequences, while the group holds at most
     bs x n sequences and n + 1 batches) whose prefill runs in this very step, beside the others'
     decode step: the pipeline takes one step per batch, prefill or decode.
When the group is empty, the first waiting request waits up to `max_wait_ms` for company.

A sequence's tokens depend only on its own prompt, parameters and generator (masks make padding
and neighbours invisible; each sequence samples from its own torch.Generator), so a greedy or
seeded request gets the tokens it gets alone through LLM.generate, whatever shares the group.
An unseeded sampled sequence is numbered by the engine in admission order and seeded from that
number as LLM.generate seeds its k-th request (LLM.make_sequence).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from klotski.errors import KlotskiError
from klotski.layers.attention import KVBlock
from klotski.runtime.generate import GroupBatch, Sequence, decode_step, prefill_step, sample_batch
from klotski.runtime.pipeline import Pipeline
from klotski.runtime.transients import charged_transient_bytes
from klotski.sampling import SamplingParams
from klotski.timeline import Timeline

# B = sequences in a batch, L = KV capacity (positions), T = a prefill's valid tokens, V = vocab

KV_CHUNK = 256  # KV positions allocated ahead of need: a long max_tokens does not reserve its whole cache up front
RATE_WINDOW_S = 10.0  # tokens/s over this many recent seconds (metrics)
YIELD_S = 0.001  # the engine thread's pause between steps (at most a tenth of the step)


class QueueFull(Exception):
    """The waiting queue has no room for the request: answer 429 with Retry-After."""

    def __init__(self, retry_after: float):
        super().__init__(f"the request queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The scheduler is shutting down (or failed to start): answer 503."""


@dataclass
class Update:
    """What one sequence produced since its previous update."""

    text: str  # new text; while a stop string could still cut it, the last len(stop) - 1 chars wait
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # one entry per new token, when asked
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None


@dataclass(eq=False)
class SeqHandle:
    """A submitted sequence: updates go to on_update (from the engine thread); cancel() frees its slot."""

    seq: Sequence
    on_update: Callable[[SeqHandle, Update], None] | None
    prompt_logprobs: int | None = None  # echo scoring: top-N at every prompt position
    submitted: float = 0.0
    first_token: float | None = None  # clock time of the first emitted token
    finished: float | None = None
    # Per prompt position, {token: logprob} (None for the first position), set by the prefill.
    prompt_logprob_entries: list[dict[int, float] | None] | None = None
    cancelled: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _chars: int = 0  # text already emitted
    _tokens: int = 0  # tokens already emitted

    @property
    def text(self) -> str:
        return self.seq.text

    @property
    def token_ids(self) -> list[int]:
        return list(self.seq.stopper.token_ids)


class LiveBatch(GroupBatch):
    """A batch of the running group with its KV capacity and charged bytes."""

    def __init__(self, index: int, seqs: list[Sequence], handles: list[SeqHandle]):
        super().__init__(index, seqs)
        self.handles = handles
        self.cap = 0
        self.kv_bytes = 0
        self.prefill = True


class Scheduler:
    """Owns the engine from one thread and runs the running group step by step."""

    def __init__(
        self,
        llm,
        max_queue: int = 1024,
        max_wait_ms: float = 50.0,
        max_num_seqs: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_queue < 1 or max_num_seqs < 1 or max_wait_ms < 0:
            raise KlotskiError("max_queue and max_num_seqs must be at least 1 and max_wait_ms not negative")
        self.llm = llm
        self.max_queue = max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.max_num_seqs = max_num_seqs
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: deque[SeqHandle] = deque()
        self._batches: list[LiveBatch] = []
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._policies: dict[tuple, object] = {}
        self.policy = None  # the running (or the last) group's Policy
        self._capacity = max_num_seqs
        self.pipeline = Pipeline(
            llm.runner,
            llm.store,
            llm.schedule,
            Timeline(enabled=False),
            llm.spec.top_k,
            llm.predictor,
            llm._routing_hooks(),
            adaptive_hot=llm.config.num_hot is None,
        )
        self._batch_ids = 0
        # Counters for /metrics (read under the lock).
        self.counters = {
            "generated_tokens": 0,
            "prompt_tokens": 0,
            "steps": 0,
            "step_s": 0.0,
            "bubble_s": 0.0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "admitted": 0,
        }
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.last_error: str | None = None

    # -- the server's side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="klotski-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        items: list[tuple[list[int], SamplingParams, int | None]],
        on_update: Callable[[SeqHandle, Update], None] | None = None,
    ) -> list[SeqHandle]:
        """Queue a request's sequences (prompt ids, params, prompt top-N logprobs or None), all of them or
        none: raises QueueFull / NotAccepting."""
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self._waiting) + len(items) > self.max_queue:
                raise QueueFull(self._retry_after())
            now = self.clock()
            handles = [
                SeqHandle(self.llm.make_sequence(list(ids), p), on_update, top, submitted=now) for ids, p, top in items
            ]
            self._waiting.extend(handles)
            self._cond.notify_all()
        return handles

    def cancel(self, handles: list[SeqHandle]) -> None:
        """The client went away: its sequences leave at the next step boundary (or the queue now)."""
        with self._cond:
            for h in handles:
                if h.done.is_set():
                    continue
                h.cancelled = True
                if h in self._waiting:
                    self._waiting.remove(h)
                    self._finish(h, cancelled=True)
            self._cond.notify_all()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def shutdown(self, timeout: float) -> bool:
        """Stop admitting, let queued and running sequences finish for up to timeout seconds, cancel the
        rest, stop the thread. True when nothing had to be cancelled."""
        self.stop_accepting()
        deadline = self.clock() + timeout
        with self._cond:
            while (self._waiting or self._batches) and self.clock() < deadline and self._alive():
                self._cond.wait(min(0.05, max(deadline - self.clock(), 0.0)))
            clean = not (self._waiting or self._batches)
            for h in list(self._waiting) + [h for b in self._batches for h in b.handles]:
                h.cancelled = True
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return clean

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        """A snapshot for /metrics."""
        with self._cond:
            now = self.clock()
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            tokens = sum(t for _, t in self._recent)
            span = now - self._recent[0][0] if self._recent else 0.0
            out = dict(self.counters)
            out |= {
                "waiting": len(self._waiting),
                "running": sum(len(b.handles) for b in self._batches),
                "batches": len(self._batches),
                "tokens_per_s": tokens / max(span, 1.0) if self._recent else 0.0,
                "bubble_ratio": out["bubble_s"] / out["step_s"] if out["step_s"] > 0 else 0.0,
                "policy": self.policy.to_dict() if self.policy is not None else None,
            }
        try:
            out["store"] = self.llm.store.stats()
        except RuntimeError:  # a dict the engine thread grew mid-copy: the next scrape reads it
            out["store"] = {}
        return out

    def _retry_after(self) -> float:
        """Seconds until the queue likely has room: the queue's length over the recent finish rate."""
        rate = self.counters["finished"] / self.counters["step_s"] if self.counters["step_s"] > 0 else 0.0
        return min(60.0, max(1.0, len(self._waiting) / rate)) if rate > 0 else 1.0

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._batches:
                    self._cond.wait()
                if self._stop:
                    self._abort_all("the server stopped before this request finished")
                    return
                if not self._batches:
                    self._gather_company()
            try:
                wall = self._step()
                if wall:
                    # Let go of the GIL for a moment, so the HTTP thread can hand over what arrived during the
                    # step before the next boundary (steps back to back leave it only the switch interval).
                    time.sleep(min(YIELD_S, wall / 10))
            except Exception as exc:  # noqa: BLE001  (one failed step must not take the server down)
                self._fail_group(exc)

    def _gather_company(self) -> None:
        """Idle group: the first waiting request waits up to max_wait for others (called under the lock)."""
        first = self._waiting[0].submitted
        want = self._capacity  # the last group's bs x n (max_num_seqs before the first)
        while not self._stop and len(self._waiting) < want and self.clock() < first + self.max_wait:
            self._cond.wait(max(first + self.max_wait - self.clock(), 0.0))

    def _plan_key(self) -> tuple[int, int]:
        """The waiting requests' longest prompt and max_tokens, as powers of two: the planner runs once
        per shape class, not once per group (called under the lock)."""
        prompt = max((len(h.seq.prompt_ids) for h in self._waiting), default=1)
        gen = max((h.seq.params.max_tokens for h in self._waiting), default=1)
        return 1 << (prompt - 1).bit_length(), 1 << (gen - 1).bit_length()

    def _policy(self, key: tuple[int, int]):
        """bs x n for a group, as LLM.generate would plan max_num_seqs requests of this shape (outside the
        lock: the planner may take a while, and submit() must not wait for it)."""
        if key not in self._policies:
            self._policies[key] = self.llm.policy(self.max_num_seqs, key[0], key[1])
        return self._policies[key]

    def _step(self) -> float | None:
        """One step boundary and one forward step of the running group; the step's seconds (None: no step)."""
        with self._cond:
            self._leave()
            key = None
            if not self._batches:
                self.pipeline.drain()
                if not self._waiting:
                    return None
                key = self._plan_key()
        if key is not None:  # a new group: plan it
            try:
                policy = self._policy(key)
            except KlotskiError as exc:  # e.g. no group of this shape fits the budget: the waiting ones learn why
                with self._cond:
                    while self._waiting:
                        self._finish(self._waiting.popleft(), error=str(exc))
                return None
            with self._cond:
                self.policy, self._capacity = policy, policy.batch_size * policy.num_batches
                self.pipeline.num_hot = policy.num_hot
        with self._cond:
            self._merge()
            joined = self._admit()
            batches = list(self._batches)
            final = not self._waiting
            if not batches:
                return None
        start = self.clock()
        timeline = Timeline(enabled=True)
        self.pipeline.timeline = timeline
        self.llm.store.timeline = timeline
        timeline.phase = "prefill" if joined else "decode"
        steps = []
        for b in batches:
            if b.prefill:
                step = prefill_step(b, 0)
                if any(h.prompt_logprobs is not None for h in b.handles):
                    step.last = None  # every prompt position's logits: echo scoring
                steps.append(step)
            else:
                self._ensure_cap(b, max(s.length for s in b.seqs))
                steps.append(decode_step(b, 0))
        # No step follows when nothing waits and every sequence reaches max_tokens now: prefetch nothing.
        final = final and all(len(s.stopper.token_ids) + 1 >= s.params.max_tokens for b in batches for s in b.seqs)
        # The step's transients count against the budget beside the KV caches, as generate's do (a
        # budget that left them out would not be a hard one); a KlotskiError fails the group's step.
        transients = self._transient_bytes(batches, steps)
        self.llm.store.charge_kv(transients)
        try:
            logits = self.pipeline.forward(steps, final=final)
        finally:
            self.llm.store.uncharge_kv(transients)
        tokens = 0
        for b, step, lg in zip(batches, steps, logits):
            if b.prefill and step.last is None:
                lg = self._prompt_scores(b, lg)
            before = sum(len(s.stopper.token_ids) for s in b.seqs)
            sample_batch(self.llm.sampler, b, lg, self.llm.max_model_len)
            tokens += sum(len(s.stopper.token_ids) for s in b.seqs) - before
            b.prefill = False
        wall = self.clock() - start
        with self._cond:
            now = self.clock()
            c = self.counters
            c["steps"] += 1
            c["step_s"] += wall
            c["bubble_s"] += timeline.busy("compute", {"wait"})
            c["generated_tokens"] += tokens
            self._recent.append((now, tokens))
            for b in batches:
                for h in b.handles:
                    self._emit(h, now)
            self._cond.notify_all()
        return wall

    def _transient_bytes(self, batches: list[LiveBatch], steps) -> int:
        """runtime/transients.py's figure for this step: every batch's new tokens, the largest batch,
        the longest KV capacity (the experts' upcast tile when a prefill computes them in another
        dtype); at least a decode step's, whose attention scores grow with the capacity."""
        runner = self.llm.runner
        widths = [int(step.token_ids.shape[1]) for step in steps]
        rows, cap = max(len(b.seqs) for b in batches), max(b.cap for b in batches)
        upcast = runner.prefill_expert_dtype if any(b.prefill for b in batches) else None
        tokens = sum(len(b.seqs) * w for b, w in zip(batches, widths))
        sequences = sum(len(b.seqs) for b in batches)
        return charged_transient_bytes(
            runner.spec, runner.dtype, tokens, sequences, rows, max(widths), cap, cap, upcast
        )

    # -- boundary -------------------------------------------------------------------------------
    def _leave(self) -> None:
        """Finished and cancelled sequences leave; their KV rows go; an emptied batch leaves."""
        kept = []
        for b in self._batches:
            stay = [i for i, h in enumerate(b.handles) if not (h.cancelled or h.seq.finished)]
            for h in b.handles:
                if h.cancelled:  # (a sequence cancelled in the step it finished got no update either)
                    self._finish(h, cancelled=True)
            if not stay:
                self._free_kv(b)
                continue
            if len(stay) < len(b.handles):
                self._compact(b, stay)
            kept.append(b)
        self._batches = kept

    def _merge(self) -> None:
        """More than n batches: the two smallest become one when they fit in bs (frees a batch slot)."""
        bs, n = self.policy.batch_size, self.policy.num_batches
        while len(self._batches) > n:
            a, b = sorted(self._batches, key=lambda x: len(x.seqs))[:2]
            if len(a.seqs) + len(b.seqs) > bs or not self._concat(a, b):
                return
            self._batches.remove(b)

    def _admit(self) -> bool:
        """Waiting requests join as new batches, prefilled in this step. True if any joined."""
        bs, n = self.policy.batch_size, self.policy.num_batches
        joined = False
        while self._waiting and len(self._batches) < n + 1:
            room = min(bs, bs * n - sum(len(b.seqs) for b in self._batches), len(self._waiting))
            if room <= 0:
                break
            handles = [self._waiting.popleft() for _ in range(room)]
            batch = LiveBatch(self._batch_ids, [h.seq for h in handles], handles)
            self._batch_ids += 1
            want = self._wanted_cap(batch.seqs, max(len(s.prompt_ids) for s in batch.seqs))
            try:
                self._alloc(batch, want)
            except KlotskiError as exc:
                if self._batches:  # room frees as the running sequences finish: wait for it
                    self._waiting.extendleft(reversed(handles))
                    break
                for h in handles:  # nothing else holds memory: this request cannot run here
                    self._finish(h, error=str(exc))
                continue
            self.counters["admitted"] += len(handles)
            self.counters["prompt_tokens"] += sum(len(s.prompt_ids) for s in batch.seqs)
            self._batches.append(batch)
            joined = True
        return joined

    # -- KV cache -----------------------------------------------------------------------------------
    def _wanted_cap(self, seqs: list[Sequence], need: int) -> int:
        """KV positions for these rows: what they need now plus KV_CHUNK, never more than they can use."""
        most = max(len(s.prompt_ids) + s.params.max_tokens for s in seqs)
        return min(self.llm.max_model_len, most, need + KV_CHUNK)

    def _kv_bytes(self, rows: int, cap: int) -> int:
        return self.llm.runner.kv_bytes_per_token() * rows * cap * self.llm.spec.num_layers

    def _alloc(self, b: LiveBatch, cap: int) -> None:
        nbytes = self._kv_bytes(len(b.seqs), cap)
        self.llm.store.charge_kv(nbytes)
        b.kv = [self.llm.runner.new_kv(len(b.seqs), cap) for _ in range(self.llm.spec.num_layers)]
        b.cap, b.kv_bytes = cap, nbytes

    def _free_kv(self, b: LiveBatch) -> None:
        self.llm.store.uncharge_kv(b.kv_bytes)
        b.kv, b.kv_bytes, b.cap = [], 0, 0

    def _ensure_cap(self, b: LiveBatch, need: int) -> None:
        """Grow the batch's cache before a step would write past it."""
        if need <= b.cap:
            return
        cap = self._wanted_cap(b.seqs, need)
        extra = self._kv_bytes(len(b.seqs), cap) - b.kv_bytes
        self.llm.store.charge_kv(extra)  # a KlotskiError fails the group's step: reported to its requests
        b.kv = [KVBlock(_pad(kv.k, cap), _pad(kv.v, cap)) for kv in b.kv]
        b.cap, b.kv_bytes = cap, b.kv_bytes + extra

    def _compact(self, b: LiveBatch, rows: list[int]) -> None:
        index = torch.tensor(rows, device=b.kv[0].k.device)
        b.kv = [KVBlock(kv.k.index_select(0, index), kv.v.index_select(0, index)) for kv in b.kv]
        b.seqs = [b.seqs[i] for i in rows]
        b.handles = [b.handles[i] for i in rows]
        nbytes = self._kv_bytes(len(rows), b.cap)
        self.llm.store.uncharge_kv(b.kv_bytes - nbytes)
        b.kv_bytes = nbytes

    def _concat(self, a: LiveBatch, b: LiveBatch) -> bool:
        """b's rows join a's (one capacity for both); False when the padded cache does not fit."""
        cap = max(a.cap, b.cap)
        nbytes = self._kv_bytes(len(a.seqs) + len(b.seqs), cap)
        extra = nbytes - a.kv_bytes - b.kv_bytes
        try:
            if extra > 0:
                self.llm.store.charge_kv(extra)
        except KlotskiError:
            return False
        if extra < 0:
            self.llm.store.uncharge_kv(-extra)
        a.kv = [
            KVBlock(torch.cat([_pad(x.k, cap), _pad(y.k, cap)]), torch.cat([_pad(x.v, cap), _pad(y.v, cap)]))
            for x, y in zip(a.kv, b.kv)
        ]
        a.seqs, a.handles, a.cap, a.kv_bytes = a.seqs + b.seqs, a.handles + b.handles, cap, nbytes
        b.kv, b.kv_bytes = [], 0
        return True

    # -- results ------------------------------------------------------------------------------------
    def _prompt_scores(self, b: LiveBatch, logits: torch.Tensor) -> torch.Tensor:
        """logits [T, V] of every prompt position: each echo sequence's prompt logprobs; returns [B, V]
        of the last positions for sampling."""
        lengths = [len(s.prompt_ids) for s in b.seqs]
        ends = torch.tensor(lengths).cumsum(0) - 1
        for h, rows in zip(b.handles, logits.split(lengths)):
            if h.prompt_logprobs is None:
                continue
            ids = h.seq.prompt_ids
            logprobs = torch.log_softmax(rows[:-1].float(), dim=-1)  # position j predicts token j + 1
            chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
            top = logprobs.topk(h.prompt_logprobs, dim=-1) if h.prompt_logprobs else None
            entries: list[dict[int, float] | None] = [None]
            for j, token in enumerate(ids[1:]):
                entry = dict(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else {}
                entry[token] = chosen[j]
                entries.append(entry)
            h.prompt_logprob_entries = entries
        return logits[ends.to(logits.device)]

    def _emit(self, h: SeqHandle, now: float) -> None:
        """Send the handle what its sequence produced since the last update (under the lock)."""
        s = h.seq
        if h.cancelled:
            return
        new_tokens = s.stopper.token_ids[h._tokens :]
        if s.finished:
            safe = len(s.text)
        else:
            hold = max((len(x) for x in s.params.stop), default=1) - 1
            safe = max(len(s.text) - hold, h._chars)
        text = s.text[h._chars : safe]
        if not new_tokens and not text and not s.finished:
            return
        if h.first_token is None and new_tokens:
            h.first_token = now
        logprobs = s.logprobs[h._tokens :] if s.logprobs is not None else None
        h._tokens, h._chars = len(s.stopper.token_ids), safe
        update = Update(text, list(new_tokens), logprobs, s.finished, s.finish_reason, s.stop_reason)
        if s.finished:
            h.finished = now
            self.counters["finished"] += 1
            h.done.set()
        if h.on_update is not None:
            h.on_update(h, update)

    def _finish(self, h: SeqHandle, cancelled: bool = False, error: str | None = None) -> None:
        """End a sequence that will produce nothing more (cancelled or failed)."""
        if h.done.is_set():
            return
        h.finished = self.clock()
        if cancelled:
            self.counters["cancelled"] += 1
        else:
            self.counters["failed"] += 1
            h.error = error
        h.done.set()
        if h.on_update is not None:
            h.on_update(h, Update("", [], None, True, "abort" if cancelled else None, None, error))

    def _fail_group(self, exc: Exception) -> None:
        """A step raised: every running sequence gets the error; the queue goes on with a fresh group."""
        message = str(exc) if isinstance(exc, KlotskiError) else f"internal error: {type(exc).__name__}: {exc}"
        self.last_error = message
        with self._cond:
            for b in self._batches:
                for h in b.handles:
                    self._finish(h, error=message)
                self._free_kv(b)
            self._batches = []
            self._cond.notify_all()
        try:
            self.pipeline.drain()
        except Exception:  # noqa: BLE001  (the store may be what failed; the next step reports it)
            pass

    def _abort_all(self, message: str) -> None:
        """Thread exit (under the lock): whatever is still queued or running is cancelled."""
        for h in list(self._waiting):
            self._finish(h, cancelled=True)
        self._waiting.clear()
        for b in self._batches:
            for h in b.handles:
                self._finish(h, cancelled=True)
            self._free_kv(b)
        self._batches = []
        self._cond.notify_all()


def _pad(t: torch.Tensor, cap: int) -> torch.Tensor:
    """A KV tensor [B, H, L, d] with its positions axis grown to cap (new positions zero, masked anyway)."""
    if t.shape[2] >= cap:
        return t
    out = t.new_zeros(t.shape[0], t.shape[1], cap, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out
