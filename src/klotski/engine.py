"""LLM: the public engine (vLLM's shape). Tokenize -> plan -> run batch groups -> detokenize.

This is the one place that wires the parts together: checkpoint, store, runner, pipeline,
sampler and tokenizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from klotski.checkpoint.reader import Checkpoint
from klotski.config import EngineConfig, Policy
from klotski.errors import KlotskiError, NumericalError, ParameterError
from klotski.outputs import RequestOutput
from klotski.prefetch.replay import make_replay
from klotski.prefetch.runtime import RoutingRecording, make_predictor
from klotski.prefetch.table import CorrelationTable, find_model_table
from klotski.progress import Progress
from klotski.prompts import Prompt, PromptParser
from klotski.runtime.compute_dtype import prefill_expert_dtype, resolve_dtype
from klotski.runtime.generate import GroupBatch, Sequence, run_group
from klotski.runtime.model import ModelRunner
from klotski.runtime.pipeline import Pipeline, RoutingHook
from klotski.runtime.schedule import get_schedule
from klotski.sampling import Sampler, SamplingParams, derive_seed, make_generator
from klotski.store.base import WeightStore
from klotski.store.factory import open_store
from klotski.store.heap import return_freed_memory
from klotski.store.tiers import DEVICE
from klotski.timeline import Timeline
from klotski.tokenizer import StopChecker, Tokenizer, collect_eos_ids


class LLM:
    """Generate for many prompts with a MoE checkpoint that may not fit in device memory."""

    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto", seed: int = 0, **options: Any):
        """options: the other EngineConfig fields (config.py), e.g. device_memory="20GiB", schedule="klotski",
        batch_size, num_batches, num_hot, offload_dir, prefetch_table, max_model_len, record_timeline, check_weights."""
        if model is None:
            from klotski.default_model import ensure_default_model

            model = str(ensure_default_model())
        self.config = EngineConfig.create(model=str(model), dtype=dtype, seed=seed, **options)
        cfg = self.config
        self.schedule = get_schedule(cfg.schedule)
        # Under a budget, activations freed each layer go back to the OS instead of piling up in the heap.
        self.heap_returns_freed = self.config.budgeted and return_freed_memory()
        self.checkpoint = Checkpoint.open(self.config.model)
        # Weights repacked into the offload dir are always checked for NaN / inf (they are read anyway);
        # resident loads only when asked, since that is one more pass over every weight.
        self.checkpoint.check_weights = bool(cfg.check_weights)
        self.spec = self.checkpoint.spec
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        self.dtype = resolve_dtype(cfg.dtype, self.checkpoint.dtype, self.device)
        path = Path(self.config.model)
        self.tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        self.eos_token_ids = collect_eos_ids(path, self.spec.eos_token_ids, self.tokenizer)
        self.max_model_len = min(
            cfg.max_model_len or self.spec.max_position_embeddings, self.spec.max_position_embeddings
        )
        self.prompts = PromptParser(self.tokenizer, self.spec.vocab_size, self.max_model_len, self.config.model)
        self.runner = ModelRunner(self.spec, self.dtype, self.device)
        if cfg.dtype == "auto" and self.device.type == "cpu" and self.spec.num_experts:
            self.runner.prefill_expert_dtype = prefill_expert_dtype(
                self.checkpoint.dtype, self.dtype, self.spec.hidden_size, self.spec.moe_intermediate_size
            )
        self.store = self._make_store()
        self.prefetch_table = self._find_table(cfg.prefetch_table)
        self.predictor = make_predictor(self.spec, self.prefetch_table)
        self.routing: RoutingRecording | None = None  # set by record_routing()
        # Benchmarks only: a real model's routing replaces the router's choices (never on by default).
        self.replay = make_replay(self.spec, cfg.routing_replay, seed)
        self.record_timeline = cfg.record_timeline
        self.sampler = Sampler()
        self.last_stats: dict[str, Any] = {}
        self.plan_stats: dict[str, Any] = {}  # the planner's prediction for the last run
        self.last_timeline: Timeline | None = None
        self._requests_seen = 0

    # -- setup --------------------------------------------------------------------------
    def _make_store(self) -> WeightStore:
        """The store for the budgets (store/factory.py); the planner places the units when it plans the run."""
        placement = None
        if self._planned():
            from klotski.planner.engine_glue import load_placement

            placement = load_placement(self.checkpoint, self.config, self.device, self.dtype, self.schedule.name)
        return open_store(self.checkpoint, self.config, self.device, placement)

    def _find_table(self, override: str | None) -> CorrelationTable | None:
        """--prefetch-table, else a table saved beside the model or in its offload dir."""
        table = find_model_table(self.config.model, override)
        if table is None and self.store.offload is not None:
            table = find_model_table(self.store.offload.path)
        return table

    def record_routing(self) -> RoutingRecording:
        """Record every token's experts from now on (`generate --record-routing`, calibration)."""
        self.routing = RoutingRecording(self.spec)
        return self.routing

    def _routing_hooks(self) -> list[RoutingHook]:
        """Replay first (when on), so a recording sees the routing that actually ran."""
        return [h for h in (self.replay, self.routing) if h is not None]

    def _planned(self) -> bool:
        """The planner picks bs / n (and the placement) when a budget is set and a flag is missing."""
        cfg = self.config
        return cfg.budgeted and (cfg.batch_size is None or cfg.num_batches is None)

    def policy(self, num_requests: int, prompt_len: int | None = None, gen_len: int | None = None) -> Policy:
        """bs, n and K for this many requests: the planner's under a budget (flags override), else simple rules."""
        self.plan_stats = {}
        if self._planned() and prompt_len is not None:
            from klotski.planner.engine_glue import routing_table, run_policy

            policy, self.plan_stats = run_policy(
                self.checkpoint,
                self.config,
                self.device,
                self.dtype,
                self.schedule.name,
                self.store.placement,
                num_requests,
                prompt_len,
                gen_len or 1,
                routing_table(self.prefetch_table, self.replay, self.spec.top_k),
            )
            return policy
        cfg, multibatch = self.config, self.schedule.multibatch
        bs = cfg.batch_size or max(1, min(num_requests, 64))
        n = (cfg.num_batches or max(1, math.ceil(num_requests / bs))) if multibatch else 1
        k = self.spec.top_k if cfg.num_hot is None else cfg.num_hot
        placement = {"weights": DEVICE, "kv_cache": DEVICE}
        return Policy(batch_size=bs, num_batches=n, num_hot=k, schedule=self.schedule.name, placement=placement)

    # -- requests ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate a completion for every prompt; outputs come back in the prompts' order."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            text, ids = self.prompts.parse(prompt, f"prompt {i}")
            requests.append((text, ids, p))
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, rendered with the checkpoint's chat template."""
        conversations = cast(list[list[dict]], [messages] if messages and isinstance(messages[0], dict) else messages)
        prompts: list[Prompt] = [self.chat_prompt(conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict[str, Any]:
        """A conversation rendered with the chat template, as a prompt dict for generate()."""
        return self.prompts.chat(messages, add_generation_prompt)

    def _params_per_prompt(self, sampling_params, count: int) -> list[SamplingParams]:
        """One SamplingParams per prompt, each checked again against this model's vocabulary."""
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            sampling_params.validate(self.spec.vocab_size)
            return [sampling_params] * count
        if isinstance(sampling_params, (str, bytes, dict)) or not hasattr(sampling_params, "__len__"):
            raise ParameterError(
                f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}"
            )
        if len(sampling_params) != count:
            raise KlotskiError(f"got {len(sampling_params)} SamplingParams for {count} prompts; give one or one each")
        for i, p in enumerate(sampling_params):
            if not isinstance(p, SamplingParams):
                raise ParameterError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
            p.validate(self.spec.vocab_size)
        return list(sampling_params)

    def prompt_logits(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        """Logits [len, V] (fp32) at every position of each prompt: scoring and reference checks."""
        from klotski.runtime.generate import prefill_step

        policy = self.policy(len(prompts))
        # A predictor of its own, learning online: scoring leaves the generation runs' predictor as it was.
        pipeline = Pipeline(
            self.runner,
            self.store,
            self.schedule,
            Timeline(enabled=False),
            policy.num_hot,
            make_predictor(self.spec, None),
            self._routing_hooks(),
            adaptive_hot=self.config.num_hot is None,
        )
        seqs = []
        for i, prompt in enumerate(prompts):
            _, ids = self.prompts.parse(prompt, f"prompt {i}")
            seqs.append(self._sequence(i, ids, SamplingParams(max_tokens=1)))
        out: list[torch.Tensor] = []
        for g in range(0, len(seqs), policy.batch_size):
            batch = GroupBatch(0, seqs[g : g + policy.batch_size])
            cap = max(len(s.prompt_ids) for s in batch.seqs)
            batch.kv = [self.runner.new_kv(len(batch.seqs), cap) for _ in range(self.spec.num_layers)]
            step = prefill_step(batch, 0)
            step.last = None
            final = g + policy.batch_size >= len(seqs)
            logits = pipeline.forward([step], final=final)[0].cpu()  # [T, V], rows in (sequence, position) order
            if not bool(torch.isfinite(logits).all()):  # a score from NaN is no score: say so
                raise NumericalError(
                    "the model produced non-finite logits (NaN or inf) while scoring prompts "
                    f"{g}..{g + len(batch.seqs) - 1}; the weights may hold NaN/inf (run with "
                    "--check-weights to find them) or a low-precision dtype overflowed "
                    "(try --dtype float32)"
                )
            out += list(logits.split([len(s.prompt_ids) for s in batch.seqs]))
        pipeline.drain()
        return out

    # -- running ---------------------------------------------------------------------------
    def _sequence(self, index: int, ids: list[int], params: SamplingParams) -> Sequence:
        seed = derive_seed(self.config.seed, self._requests_seen + index)
        stopper = StopChecker(params, frozenset() if params.ignore_eos else self.eos_token_ids, self.tokenizer, ids)
        return Sequence(
            index,
            ids,
            params,
            make_generator(params.seed, seed),
            stopper,
            logprobs=[] if params.logprobs is not None else None,
        )

    def make_sequence(self, ids: list[int], params: SamplingParams) -> Sequence:
        """One request's generation state, numbered after every request this engine has seen: its
        unseeded sampling seed follows from that number exactly as in generate() (the server's step loop)."""
        seq = self._sequence(0, ids, params)
        seq.index = self._requests_seen
        self._requests_seen += 1
        return seq

    def _run(
        self, requests: list[tuple[str | None, list[int], SamplingParams]], use_tqdm: bool = False
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        progress = Progress(len(requests), enabled=use_tqdm) if use_tqdm else None
        for group in self.run_groups(requests):
            outputs += group
            if progress is not None:
                progress.advance(len(group), tokens=sum(len(c.token_ids) for o in group for c in o.outputs))
        if progress is not None:
            progress.close()
        return outputs

    def run_groups(
        self, requests: list[tuple[str | None, list[int], SamplingParams]], policy: Policy | None = None
    ) -> Iterator[list[RequestOutput]]:
        """Run (text, ids, params) requests group by group (bs x n sequences each, in the order given),
        yielding each group's outputs as soon as the group finishes: what a durable job writes before
        the next group starts. policy fixes bs / n / K; else it is chosen for this many requests.
        last_stats covers the whole call once the iterator is exhausted."""
        if policy is None:
            policy = self.policy(
                len(requests),
                max((len(ids) for _, ids, _ in requests), default=1),
                max((p.max_tokens for _, _, p in requests), default=1),
            )
        seqs = [self._sequence(i, ids, p) for i, (_, ids, p) in enumerate(requests)]
        for s in seqs:  # routing traces number sequences across calls
            s.index += self._requests_seen
        self._requests_seen += len(requests)
        timeline = Timeline(enabled=self.record_timeline)
        self.store.timeline = timeline
        pipeline = Pipeline(
            self.runner,
            self.store,
            self.schedule,
            timeline,
            policy.num_hot,
            self.predictor,
            self._routing_hooks(),
            adaptive_hot=self.config.num_hot is None,
        )
        group_size = policy.batch_size * policy.num_batches
        start, steps, prefill_s = time.perf_counter(), 0, 0.0
        for g in range(0, len(seqs), group_size):
            group = seqs[g : g + group_size]
            batches = [
                GroupBatch(i, group[j : j + policy.batch_size])
                for i, j in enumerate(range(0, len(group), policy.batch_size))
            ]
            group_steps, group_prefill = run_group(pipeline, self.sampler, batches, self.max_model_len)
            steps, prefill_s = steps + group_steps, prefill_s + group_prefill
            yield [
                RequestOutput(
                    request_id=str(s.index), prompt=text, prompt_token_ids=ids, outputs=[s.output()], finished=True
                )
                for (text, ids, _), s in zip(requests[g : g + group_size], group)
            ]
        wall = time.perf_counter() - start
        self.last_timeline = timeline
        self.last_stats = self._stats(seqs, wall, timeline, policy, prefill_s) | {"forward_steps": steps}

    def _stats(self, seqs: list[Sequence], wall: float, timeline: Timeline, policy: Policy, prefill: float) -> dict:
        generated = sum(len(s.stopper.token_ids) for s in seqs)
        stats = {
            "requests": len(seqs),
            "prompt_tokens": sum(len(s.prompt_ids) for s in seqs),
            "generated_tokens": generated,
            "wall_s": wall,
            "tokens_per_s": generated / wall if wall > 0 else 0.0,
            "prefill_s": prefill,
            "decode_s": max(wall - prefill, 0.0),
            "policy": policy.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "routing_replay": self.replay.describe() if self.replay is not None else None,
            "heap_returns_freed": self.heap_returns_freed,  # malloc's thresholds fixed (store/heap.py)
        }
        stats |= timeline.summary(wall)
        stats |= self.plan_stats  # the planner's prediction next to the measured figures
        if self.plan_stats:
            from klotski.planner.engine_glue import prediction_error

            stats["prediction_error"] = prediction_error(stats)
        stats |= self.store.stats()
        return stats
