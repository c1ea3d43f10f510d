"""The generation loop for one batch group: prefill, then decode steps until every sequence stops.

Sequences are split into n batches of up to bs; each batch keeps its own KV cache per layer.
Every forward step goes through the pipeline, which shares each loaded layer across the batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from klotski.errors import NumericalError
from klotski.layers.attention import StepInfo
from klotski.outputs import CompletionOutput, FinishReason
from klotski.runtime.pipeline import BatchStep, Pipeline
from klotski.runtime.transients import charged_transient_bytes
from klotski.sampling import Sampler, SamplingParams
from klotski.tokenizer import StopChecker

# B = sequences in a batch, S = new tokens per sequence this step (padded)


@dataclass
class Sequence:
    """One request's generation state."""

    index: int  # position in the caller's request list
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stopper: StopChecker
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    text: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.stopper.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(self.stopper.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class GroupBatch:
    """A batch of the group: its sequences and its KV cache."""

    index: int
    seqs: list[Sequence]
    kv: list = field(default_factory=list)


def run_group(
    pipeline: Pipeline, sampler: Sampler, batches: list[GroupBatch], max_len: int, pad_id: int = 0
) -> tuple[int, float]:
    """Generate until every sequence of the group stops; returns (forward steps, prefill seconds)."""
    runner, store = pipeline.runner, pipeline.store
    capacity = 0  # the longest KV capacity: the keys a decode step attends to at most
    for b in batches:
        cap = min(max_len, max(len(s.prompt_ids) + s.params.max_tokens for s in b.seqs))
        b.kv = [runner.new_kv(len(b.seqs), cap) for _ in range(runner.spec.num_layers)]
        capacity = max(capacity, cap)
    # The prefill's transients are counted with the KV cache: a budget that left them out would not
    # be a hard one (under a memory cap the run would be killed rather than told).
    # A decode step's figure too (its attention scores grow with the context), as the planner counts.
    longest = max(len(s.prompt_ids) for b in batches for s in b.seqs)
    rows = max(len(b.seqs) for b in batches)
    sequences = sum(len(b.seqs) for b in batches)
    transients = charged_transient_bytes(
        runner.spec,
        runner.dtype,
        sequences * longest,
        sequences,
        rows,
        longest,
        longest,
        capacity,
        runner.prefill_expert_dtype,
    )
    charged = sum(kv.nbytes for b in batches for kv in b.kv) + transients
    store.charge_kv(charged, settle=True)
    try:
        return _generate(pipeline, sampler, batches, max_len, pad_id)
    finally:
        pipeline.drain()
        store.uncharge_kv(charged)
        for b in batches:
            b.kv = []


def _generate(
    pipeline: Pipeline, sampler: Sampler, batches: list[GroupBatch], max_len: int, pad_id: int
) -> tuple[int, float]:
    steps, prefill, t0, prefill_s = 0, True, time.perf_counter(), 0.0
    while True:
        live = [b for b in batches if not all(s.finished for s in b.seqs)]
        if not live:
            return steps, prefill_s
        inputs = [prefill_step(b, pad_id) if prefill else decode_step(b, pad_id) for b in live]
        pipeline.timeline.phase = "prefill" if prefill else "decode"
        # When every live sequence reaches max_tokens with this step, none follows: nothing is prefetched for it.
        final = all(
            s.params.max_tokens is not None and len(s.stopper.token_ids) + 1 >= s.params.max_tokens
            for b in live
            for s in b.seqs
            if not s.finished
        )
        logits = pipeline.forward(inputs, final=final)
        for b, lg in zip(live, logits):
            with pipeline.timeline.span("compute", "sample", batch=b.index):
                sample_batch(sampler, b, lg, max_len)
        if prefill:
            prefill_s = time.perf_counter() - t0
        steps, prefill = steps + 1, False


def _step_info(positions: torch.Tensor, total: torch.Tensor) -> StepInfo:
    return StepInfo(positions=positions, total=total, max_total=int(total.max()), mask_cache={})


def prefill_step(b: GroupBatch, pad_id: int) -> BatchStep:
    """Every prompt token at once, right-padded to the longest prompt of the batch."""
    lengths = torch.tensor([len(s.prompt_ids) for s in b.seqs])  # [B]
    width = int(lengths.max())
    tokens = torch.full((len(b.seqs), width), pad_id, dtype=torch.long)  # [B, S]
    for i, s in enumerate(b.seqs):
        tokens[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
    positions = torch.arange(width).expand(len(b.seqs), width)
    valid = positions < lengths[:, None]
    return BatchStep(
        b.index,
        tokens,
        valid,
        _step_info(positions, lengths),
        b.kv,
        lengths - 1,
        torch.tensor([s.index for s in b.seqs]),
        prefill=True,
    )


def decode_step(b: GroupBatch, pad_id: int) -> BatchStep:
    """One new token per sequence; finished sequences ride along as padding."""
    tokens, positions, valid = [], [], []
    for s in b.seqs:
        last = s.stopper.token_ids[-1] if s.stopper.token_ids else pad_id
        tokens.append(pad_id if s.finished else last)
        positions.append(s.length - 1)
        valid.append(not s.finished)
    positions_t = torch.tensor(positions)[:, None]  # [B, 1]
    step = _step_info(positions_t, positions_t[:, 0] + 1)
    return BatchStep(
        b.index,
        torch.tensor(tokens)[:, None],
        torch.tensor(valid)[:, None],
        step,
        b.kv,
        torch.zeros(len(b.seqs), dtype=torch.long),
        torch.tensor([s.index for s in b.seqs]),
    )


def sample_batch(sampler: Sampler, b: GroupBatch, logits: torch.Tensor, max_len: int) -> None:
    """Pick each live sequence's next token and apply its stop rules."""
    rows = [i for i, s in enumerate(b.seqs) if not s.finished]
    seqs = [b.seqs[i] for i in rows]
    suppress = [
        sorted(s.stopper.eos_token_ids | set(s.params.stop_token_ids or ()))
        if len(s.stopper.token_ids) < s.params.min_tokens
        else []
        for s in seqs
    ]
    rows_logits = logits[rows].cpu()
    check_finite_logits(rows_logits, seqs)
    # Sampling runs on the CPU: each request's generator lives there, whatever the compute device.
    result = sampler.sample(rows_logits, [s.params for s in seqs], [s.generator for s in seqs], suppress)
    for j, s in enumerate(seqs):
        token = int(result.token_ids[j])
        entry = result.logprob_dict(j)
        if entry is not None:
            s.logprobs = (s.logprobs or []) + [entry]
            s.cumulative_logprob += entry[token]  # the sampled token's logprob
        state = s.stopper.append(token)
        s.text = state.text
        if state.finished:
            s.finish_reason, s.stop_reason = state.finish_reason, state.stop_reason
        elif s.length >= max_len:
            s.finish_reason = "length"


def check_finite_logits(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Stop the run when a row's logits hold NaN or inf: a token drawn from them is garbage, and
    greedy argmax over NaN silently returns token 0. One pass over [B, V] per step."""
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    if bool(finite.all()):
        return
    row = int((~finite).nonzero()[0])
    s = seqs[row]
    raise NumericalError(
        f"the model produced non-finite logits (NaN or inf) for request {s.index} after "
        f"{len(s.stopper.token_ids)} generated tokens; the weights may hold NaN/inf (run with --check-weights "
        "to find them) or a low-precision dtype overflowed (try --dtype float32)"
    )
