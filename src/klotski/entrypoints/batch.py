"""The batch job behind `klotski run-batch`: OpenAI batch files in, OpenAI batch results out, durably.

How it survives (docs/batch.md says the same for users):

- The input is read in windows of W lines, never whole. Each window's requests are sorted by prompt
  length and cut into groups of the planner's bs x n sequences; errors (bad lines) are written first.
- After each group, its finished requests' lines are written, flushed and fsynced before the next
  group starts. A crash at any instant leaves OUT a prefix of whole lines plus at most one torn last
  line; the next run cuts the torn line off and skips every request already in OUT.
- Resumed output equals an uninterrupted run's: windows are fixed line ranges and bs x n is recorded
  in a sidecar (OUT.meta.json) at the first group, so every group is rebuilt exactly as it was; a
  group with any request still missing runs whole (its finished members are not written twice).
  Unseeded sampled requests get a seed derived from --seed and their custom_id, so they resume exactly too.
- The sidecar also records the model's fingerprint and the flags that change results; resuming onto
  an OUT made otherwise is refused.
- SIGINT / SIGTERM stop after the lines being written (a group still computing is dropped, to be redone)
  and say how to resume; a second one aborts at once.

Resume keys: a result line is keyed by its custom_id; a line-level error (bad bytes or JSON, no usable
custom_id, a duplicate custom_id) by its input line number, which its error record carries as "line".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from klotski.entrypoints import openai_protocol as op
from klotski.entrypoints.openai_protocol import ProtocolError
from klotski.errors import KlotskiError
from klotski.outputs import CompletionOutput, RequestOutput
from klotski.progress import Progress

EXIT_OK = 0  # every line of OUT is a 200 result
EXIT_FAILED_LINES = 3  # the job finished, but some lines of OUT are error records
EXIT_JOB = 2  # the job could not run (the CLI's code for every user error)
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = 1
# Errors keyed by input line number (their custom_id is missing, unreadable or not theirs alone).
LINE_KEYED = frozenset(
    {"invalid_utf8", "invalid_json", "invalid_unicode", "invalid_line", "invalid_custom_id", "duplicate_custom_id"}
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


class JobError(KlotskiError):
    """The job itself cannot go on (exit 2)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM: stop after the lines being written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class BatchOptions:
    input: str
    output: str
    model: str | None = None
    dtype: str = "auto"
    seed: int = 0  # engine seed: unseeded sampled requests derive theirs from it and their custom_id
    max_model_len: int | None = None
    routing_replay: str | None = None
    window: int = 1024  # input lines read, sorted and grouped at a time
    progress: bool = True
    progress_interval: float = 30.0
    overwrite: bool = False
    engine: dict[str, Any] = field(default_factory=dict)  # LLM(...) budget / schedule keyword arguments


@dataclass
class Summary:
    total_lines: int = 0
    already_done: int = 0
    ok: int = 0  # this run
    failed: int = 0  # this run
    failed_before: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    bytes_read: int = 0
    repaired_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED_LINES if self.failed + self.failed_before else EXIT_OK


# -- custom_ids seen / done ---------------------------------------------------------------------------
class IdSet:
    """A set of strings kept as 64-bit hashes in a sorted array: 8 bytes per id, so a million-line job
    holds 8 MB here, not a Python set's ~100 MB. A collision (odds ~1e-8 at a million ids) would make
    two different custom_ids look like one."""

    _MERGE_AT = 1 << 15

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    @staticmethod
    def _key(text: str) -> int:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def add(self, text: str) -> None:
        self._recent.add(self._key(text))
        if len(self._recent) >= self._MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        if self._recent:
            fresh = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, fresh)
            self._recent.clear()

    def __contains__(self, text: str) -> bool:
        key = self._key(text)
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.uint64(key)))
        return i < len(self._sorted) and int(self._sorted[i]) == key

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)


# -- model fingerprint and sidecar ---------------------------------------------------------------------
_SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
)
_SAMPLE = 1 << 16


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of what decides a model's outputs, cheap enough for every start: its small files
    whole, and each safetensors file's size, header and three 64 KiB samples of its tensor bytes
    (enough to tell two random-weight checkpoints of one shape apart)."""
    path = Path(model_dir)
    h = hashlib.sha256()
    for name in _SMALL_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + b"\0" + str(size).encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + fh.read(min(header_len, size)))
            start = 8 + header_len
            for offset in (start, start + (size - start) // 2, max(size - _SAMPLE, start)):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def sidecar_path(output: str | Path) -> Path:
    return Path(str(output) + SIDECAR_SUFFIX)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write, fsync, rename, fsync the directory: the sidecar is either the old one or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading OUT back (resume) -------------------------------------------------------------------------
@dataclass
class OutputScan:
    done_ids: IdSet = field(default_factory=IdSet)
    done_lines: set[int] = field(default_factory=set)
    lines: int = 0
    failed: int = 0
    repaired_bytes: int = 0


def scan_output(path: Path) -> OutputScan:
    """Read OUT's result lines (streaming) and cut off a torn tail: what the last run finished.

    A tail that does not parse (a torn last line, or a block of zeros a crash left) is truncated; an
    unparsable line with good lines after it means OUT is not ours, and the job stops."""
    scan = OutputScan()
    if not path.exists():
        return scan
    good_end, bad_at = 0, None
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            record = _result_record(raw) if raw.endswith(b"\n") else None
            if record is None:
                if bad_at is None:
                    bad_at = number
            else:
                if bad_at is not None:
                    raise JobError(
                        f"{path} line {bad_at} is not a run-batch result line, but lines after it are: "
                        "OUT is damaged or not ours; choose another --output"
                    )
                _note_done(scan, record)
                good_end = offset + len(raw)
            offset += len(raw)
    if offset > good_end:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        scan.repaired_bytes = offset - good_end
    return scan


def _result_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or "custom_id" not in record or "response" not in record:
        return None
    return record


def _note_done(scan: OutputScan, record: dict) -> None:
    scan.lines += 1
    error = record.get("error")
    if error is not None:
        scan.failed += 1
    if isinstance(error, dict) and error.get("code") in LINE_KEYED and isinstance(error.get("line"), int):
        scan.done_lines.add(error["line"])
    elif isinstance(record.get("custom_id"), str):
        scan.done_ids.add(record["custom_id"])


# -- reading the input ---------------------------------------------------------------------------------
def count_requests(path: Path) -> int:
    """Non-blank lines, read once in a stream (for the progress total)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def windows(f, size: int) -> Iterator[list[tuple[int, bytes]]]:
    """(line number, raw bytes) in fixed windows of `size` input lines, so a resumed job sees the same windows."""
    window: list[tuple[int, bytes]] = []
    for number, raw in enumerate(f, start=1):
        window.append((number, raw))
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def decode_line(number: int, raw: bytes) -> Any:
    """A raw input line -> parsed JSON, or ProtocolError naming what is wrong with it (line-keyed codes)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"line {number} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}); "
            "write the file as UTF-8",
            code="invalid_utf8",
        ) from None
    try:
        record = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})", code="invalid_json"
        ) from None
    except ProtocolError:
        raise ProtocolError(
            f"line {number} is not valid JSON (NaN and Infinity are not JSON numbers)", code="invalid_json"
        ) from None
    except RecursionError:
        raise ProtocolError(f"line {number} nests too deeply to read", code="invalid_json") from None
    # json accepts "\ud800" escapes; such a string cannot be tokenized or written as UTF-8.
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                f"line {number} has a string with an unpaired surrogate (a lone \\ud800-\\udfff "
                "escape): it is not text; fix the producer",
                code="invalid_unicode",
            ) from None
    return record


def _no_constants(name: str) -> Any:
    raise ProtocolError(name)


# -- one window's requests ------------------------------------------------------------------------------
@dataclass(eq=False)
class Item:
    """One valid request of the window, and its results as they arrive."""

    custom_id: str
    line: int
    request: op.Request
    settings: op.RequestSettings
    prompts: list[tuple[str | None, list[int]]]  # (text, ids) per prompt
    sample_params: list  # SamplingParams per sample (empty: only the prompt is scored)
    done: bool  # already in OUT: runs only if its group must (resume), never written again
    samples: list[list[CompletionOutput | None]] = field(default_factory=list)
    prompt_logprobs: list[list | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = [[None] * self.settings.n for _ in self.prompts]
        self.prompt_logprobs = [None] * len(self.prompts)

    @property
    def complete(self) -> bool:
        scored = self.settings.prompt_logprobs is None or all(p is not None for p in self.prompt_logprobs)
        return scored and all(s is not None for per_prompt in self.samples for s in per_prompt)


@dataclass
class Failure:
    custom_id: str | None
    error: ProtocolError
    line: int | None  # set for line-keyed errors


class BatchJob:
    """One run of `klotski run-batch` (see the module docstring)."""

    def __init__(self, options: BatchOptions, err=None) -> None:
        self.o = options
        self.err_stream = err if err is not None else sys.stderr
        self.input = Path(options.input)
        self.output = Path(options.output)
        self.sidecar = sidecar_path(self.output)
        self.summary = Summary()
        self.signals = _Signals()
        self.hooks = _StallHooks.from_env(self.signals)
        self.policy = None
        self._token_text_cache: dict[int, str] = {}

    # -- before the engine loads --
    def preflight(self) -> None:
        """Everything that makes the job impossible, checked before the model loads: exit 2."""
        if self.o.window < 1:
            raise JobError(f"--window must be at least 1, got {self.o.window}")
        if not self.input.is_file():
            raise JobError(f"--input {self.input} does not exist or is not a file")
        try:
            with open(self.input, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise JobError(f"--input {self.input} cannot be read ({exc.strerror})") from None
        same = self.output.exists() and os.path.samefile(self.output, self.input)
        if same or os.path.realpath(self.output) == os.path.realpath(self.input):
            raise JobError(f"--output {self.output} is the input file; write the results elsewhere")
        if self.output.is_dir():
            raise JobError(f"--output {self.output} is a directory; give a file path")
        try:
            with open(self.output, "ab"):
                pass
        except OSError as exc:
            raise JobError(f"--output {self.output} cannot be written ({exc.strerror}); choose another path") from None

    def _model_dir(self) -> str:
        if self.o.model is not None:
            if not (Path(self.o.model) / "config.json").is_file():
                raise JobError(f"--model {self.o.model} does not exist or has no config.json")
            return self.o.model
        from klotski.default_model import ensure_default_model

        return str(ensure_default_model())

    def _settings(self, model_dir: str) -> dict[str, Any]:
        """What changes results: the model, and the flags whose change would change a request's output."""
        return {
            "model_fingerprint": model_fingerprint(model_dir),
            "seed": self.o.seed,
            "max_model_len": self.o.max_model_len,
            "routing_replay": self.o.routing_replay,
        }

    def _load_sidecar(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The sidecar to continue (checked against settings), or a new one; OUT truncated when starting over."""
        has_results = self.output.exists() and self.output.stat().st_size > 0
        if self.o.overwrite or not has_results:
            if self.o.overwrite and self.output.exists():
                with open(self.output, "r+b") as f:
                    f.truncate(0)
            meta = {
                "format": SIDECAR_FORMAT,
                "input": str(self.input.resolve()),
                "window": self.o.window,
                "settings": settings,
                "grouping": None,
                "started": int(time.time()),
            }
            _write_json_atomic(self.sidecar, meta)
            return meta
        if not self.sidecar.is_file():
            raise JobError(
                f"{self.output} already has lines but no {self.sidecar.name} beside it, so it was not made "
                "by run-batch (or its sidecar was removed): choose another --output, or --overwrite"
            )
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise JobError(f"{self.sidecar} cannot be read ({exc}); restore it, or --overwrite to start over") from None
        if meta.get("format") != SIDECAR_FORMAT:
            raise JobError(f"{self.sidecar} has format {meta.get('format')!r}, not {SIDECAR_FORMAT}; use --overwrite")
        self._check_same(meta.get("settings", {}), settings)
        return meta

    def _check_same(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if key in old and old[key] != value:
                what = "model" if key == "model_fingerprint" else key.replace("_", "-")
                raise JobError(
                    f"{self.output} was made with a different {what} ({old[key]!r}, now {value!r}): "
                    "resuming would mix results; use the same flags, another --output, or --overwrite"
                )

    # -- the run --
    def run(self) -> Summary:
        self.preflight()
        model_dir = self._model_dir()
        settings = self._settings(model_dir)
        meta = self._load_sidecar(settings)
        scan = scan_output(self.output)
        if scan.repaired_bytes:
            print(
                f"klotski: {self.output} ended in a torn line ({scan.repaired_bytes} bytes); cut it off, its request "
                "runs again",
                file=self.err_stream,
            )
        self.summary.already_done, self.summary.failed_before = scan.lines, scan.failed
        self.summary.repaired_bytes = scan.repaired_bytes

        from klotski.engine import LLM

        self.llm = LLM(
            model=model_dir,
            dtype=self.o.dtype,
            seed=self.o.seed,
            max_model_len=self.o.max_model_len,
            routing_replay=self.o.routing_replay,
            **self.o.engine,
        )
        compute = {"compute_dtype": str(self.llm.dtype).removeprefix("torch.")}
        self._check_same(meta["settings"], compute)
        if "compute_dtype" not in meta["settings"]:
            meta["settings"] |= compute
            _write_json_atomic(self.sidecar, meta)
        self.meta, self.model_name = meta, Path(model_dir).name
        self.fingerprint = "klotski-" + settings["model_fingerprint"][:12]
        self.window = int(meta.get("window") or self.o.window)
        if self.window != self.o.window:
            print(
                f"klotski: resuming with the job's --window {self.window} (it fixes how requests were grouped)",
                file=self.err_stream,
            )

        self.summary.total_lines = count_requests(self.input)
        self.progress = Progress(
            self.summary.total_lines,
            initial=scan.lines,
            enabled=self.o.progress,
            desc="run-batch",
            stream=self.err_stream,
            interval=self.o.progress_interval,
        )
        start = time.perf_counter()
        try:
            with self.signals, open(self.input, "rb") as fin, open(self.output, "ab") as fout:
                self.fout = fout
                seen = IdSet()
                for window in windows(fin, self.window):
                    self.summary.bytes_read += sum(len(raw) for _, raw in window)
                    self._run_window(window, seen, scan)
        except Interrupted as stop:
            self.progress.close()
            self.summary.wall_s = time.perf_counter() - start
            name = signal.Signals(stop.signum).name
            print(
                f"klotski: {name}: stopped cleanly; {self.summary.already_done + self.summary.ok + self.summary.failed}"
                f" requests are in {self.output}. Resume with the same command.",
                file=self.err_stream,
            )
            raise
        except (KlotskiError, OSError) as exc:
            self.progress.close()
            if isinstance(exc, JobError):
                raise
            # The engine failed (a vanished offload directory, a weight it cannot read): what is written stays.
            reason = exc if isinstance(exc, KlotskiError) else f"{exc.strerror or exc}: {exc.filename or ''}"
            raise JobError(
                f"{reason}; the requests finished so far are in {self.output}: fix this and run the same "
                "command again to resume"
            ) from None
        self.progress.close()
        self.summary.wall_s = time.perf_counter() - start
        return self.summary

    def _run_window(self, window: list[tuple[int, bytes]], seen: IdSet, scan: OutputScan) -> None:
        items, failures = [], []
        for number, raw in window:
            if not raw.strip():
                continue
            got = self._prepare(number, raw, seen, scan)
            if isinstance(got, Failure):
                failures.append(got)
            elif got is not None:
                items.append(got)
        self.hooks.stall("window")
        if failures:
            self._write([self._error_line(f) for f in failures], failed=len(failures))
        policy = self._policy(items)
        group = policy.batch_size * policy.num_batches if policy is not None else 1
        self._score(items, group)
        self._generate(items, group, policy)

    def _prepare(self, number: int, raw: bytes, seen: IdSet, scan: OutputScan) -> Item | Failure | None:
        """A raw line -> an Item to run, a Failure to write, or None (already in OUT, nothing to run)."""
        custom_id = None
        try:
            record = decode_line(number, raw)
            custom_id = op.batch_custom_id(record)
            if custom_id is None:
                if not isinstance(record, dict):
                    raise ProtocolError(f"line {number} is not a JSON object", code="invalid_line")
                value = record.get("custom_id")
                raise ProtocolError(
                    f"line {number} has no usable custom_id (got {value!r}); give each request a "
                    "unique non-empty string",
                    code="invalid_custom_id",
                    param="custom_id",
                )
            if custom_id in seen:
                raise ProtocolError(
                    f"custom_id {custom_id!r} (line {number}) appeared on an earlier line; each request needs its own",
                    code="duplicate_custom_id",
                    param="custom_id",
                )
        except ProtocolError as exc:
            if number in scan.done_lines:
                return None
            if custom_id is None:
                custom_id = _salvage_custom_id(raw)
            return Failure(custom_id, exc, number)
        seen.add(custom_id)
        done = custom_id in scan.done_ids
        try:
            parsed = op.parse_batch_request(record)
            prompts = [self._tokenize(p) for p in op.request_prompts(parsed.request)]
            settings = op.sampling_settings(
                parsed.request,
                [len(ids) for _, ids in prompts],
                self.llm.max_model_len,
                vocab_size=self.llm.spec.vocab_size,
            )
        except KlotskiError as exc:
            return None if done else Failure(custom_id, op.as_protocol_error(exc, code="invalid_value"), None)
        if settings.echo:
            prompts = [(text if text is not None else self._decode(ids), ids) for text, ids in prompts]
        sample_params = settings.sample_params(default_seed=request_seed(self.o.seed, custom_id))
        return Item(custom_id, number, parsed.request, settings, prompts, sample_params, done)

    def _tokenize(self, prompt: dict[str, Any]) -> tuple[str | None, list[int]]:
        llm = self.llm
        try:
            if "messages" in prompt:
                rendered = llm.chat_prompt(prompt["messages"], prompt["add_generation_prompt"])
                return rendered["prompt"], rendered["prompt_token_ids"]
            return llm.prompts.tokenize(prompt, "prompt")
        except ProtocolError:
            raise
        except KlotskiError as exc:
            raise ProtocolError(
                str(exc).removeprefix("prompt: "),
                code="invalid_prompt",
                param="messages" if "messages" in prompt else "prompt",
            ) from None

    def _decode(self, ids: list[int]) -> str:
        tok = self.llm.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def _token_text(self, token: int) -> str:
        text = self._token_text_cache.get(token)
        if text is None:
            tok = self.llm.tokenizer
            text = tok.decode([token], skip_special_tokens=False) if tok is not None else f"token_id:{token}"
            if len(self._token_text_cache) < 1 << 16:
                self._token_text_cache[token] = text
        return text

    # -- grouping --
    def _policy(self, items: list[Item]):
        """bs x n for every group of the job: chosen at the first window that generates, then fixed (sidecar)."""
        if self.policy is not None:
            return self.policy
        # Scoring-only prompts count as one-token generations.
        seqs = [
            (len(ids), it.settings.max_tokens or 1)
            for it in items
            for _, ids in it.prompts
            for _ in range(it.settings.n)
        ]
        if not seqs:
            return None
        policy = self.llm.policy(len(seqs), max(n for n, _ in seqs), max(t for _, t in seqs))
        grouping = self.meta.get("grouping")
        if grouping:
            asked = (self.o.engine.get("batch_size"), self.o.engine.get("num_batches"))
            if any(a is not None and a != grouping[k] for a, k in zip(asked, ("batch_size", "num_batches"))):
                print(
                    f"klotski: resuming with the job's bs {grouping['batch_size']} x n {grouping['num_batches']} "
                    "(they fix how requests were grouped); --batch-size / --num-batches apply to a new output",
                    file=self.err_stream,
                )
            policy = replace(policy, batch_size=grouping["batch_size"], num_batches=grouping["num_batches"])
        else:
            self.meta["grouping"] = {"batch_size": policy.batch_size, "num_batches": policy.num_batches}
            _write_json_atomic(self.sidecar, self.meta)
        self.policy = policy
        return policy

    def _score(self, items: list[Item], group: int) -> None:
        """Requests that only score their prompt (echo, max_tokens 0): prompt logits in chunks of a group."""
        seqs = sorted(
            (
                (len(ids), it.line, p, it)
                for it in items
                if not it.sample_params
                for p, (_, ids) in enumerate(it.prompts)
            ),
            key=lambda s: s[:3],
        )
        for g in range(0, len(seqs), group):
            chunk = seqs[g : g + group]
            if all(it.done for *_, it in chunk):
                continue
            self.hooks.stall("group")
            self._prompt_logprobs([(it, p) for _, _, p, it in chunk])
            for _, _, p, it in chunk:
                it.samples[p] = op.score_only_outputs(it.settings)
            self.hooks.stall("computed")
            self._write_finished([it for *_, it in chunk])

    def _prompt_logprobs(self, pairs: list[tuple[Item, int]]) -> None:
        """Prompt logprobs of these (request, prompt) pairs that asked for them, in one prompt_logits call."""
        todo = list({(id(it), p): (it, p) for it, p in pairs if it.settings.prompt_logprobs is not None}.values())
        if not todo:
            return
        logits = self.llm.prompt_logits([{"prompt_token_ids": it.prompts[p][1]} for it, p in todo])
        for (it, p), rows in zip(todo, logits):
            it.prompt_logprobs[p] = op.prompt_logprobs_from_logits(rows, it.prompts[p][1], it.settings.prompt_logprobs)

    def _generate(self, items: list[Item], group: int, policy) -> None:
        """Sequences sorted by prompt length (a batch pads little), in groups of bs x n; each group's finished
        requests are written before the next group runs."""
        seqs = sorted(
            (
                (len(ids), it.line, p, j, it)
                for it in items
                for p, (_, ids) in enumerate(it.prompts)
                for j in range(len(it.sample_params))
            ),
            key=lambda s: s[:4],
        )
        groups = [seqs[g : g + group] for g in range(0, len(seqs), group)]
        # A group runs whole when any of its requests is missing from OUT, so it is batched as it was.
        run_index = [gi for gi, g in enumerate(groups) if not all(it.done for *_, it in g)]
        if not run_index:
            return
        to_run = [groups[gi] for gi in run_index]
        # An echoed prompt is scored with the group where it first appears (a fixed batch, for exact resumes).
        first: dict[tuple[int, int], int] = {}
        for gi, g in enumerate(groups):
            for _, _, p, _, it in g:
                first.setdefault((id(it), p), gi)
        for gi in run_index:
            self._prompt_logprobs([(it, p) for _, _, p, _, it in groups[gi] if first[(id(it), p)] == gi])
        requests = [(it.prompts[p][0], it.prompts[p][1], it.sample_params[j]) for g in to_run for _, _, p, j, it in g]
        self.hooks.stall("group")
        for g, outputs in zip(to_run, self.llm.run_groups(requests, policy)):
            for (_, _, p, j, it), out in zip(g, outputs):
                sample = out.outputs[0]
                sample.index = j
                it.samples[p][j] = sample
            self.hooks.stall("computed")
            self._write_finished([it for *_, it in g])
            self.hooks.stall("group")

    # -- writing --
    def _write_finished(self, candidates: list[Item]) -> None:
        finished, seen = [], set()
        for it in candidates:
            if id(it) not in seen and it.complete and not it.done:
                seen.add(id(it))
                finished.append(it)
        if not finished:
            return
        lines = [self._result_line(it) for it in finished]
        tokens = sum(len(s.token_ids) for it in finished for per_prompt in it.samples for s in per_prompt)
        for it in finished:
            it.done = True
        self.summary.tokens += tokens
        self._write(lines, tokens=tokens)

    def _result_line(self, it: Item) -> bytes:
        outputs = []
        for p, (text, ids) in enumerate(it.prompts):
            outputs.append(
                RequestOutput(
                    request_id=it.custom_id,
                    prompt=text,
                    prompt_token_ids=ids,
                    outputs=list(it.samples[p]),
                    finished=True,
                    prompt_logprobs=it.prompt_logprobs[p],
                )
            )
        body = op.response_body(
            it.request,
            outputs,
            it.settings,
            model=it.request.model or self.model_name,
            id=op.response_id(it.request, it.custom_id),
            created=int(time.time()),
            token_text=self._token_text,
            system_fingerprint=self.fingerprint,
        )
        line = op.batch_result_line(it.custom_id, body, id=_line_id(it.custom_id), request_id=_request_id(it.custom_id))
        return _dump(line)

    def _error_line(self, f: Failure) -> bytes:
        key = f"line:{f.line}" if f.line is not None else f.custom_id
        line = op.batch_error_line(f.custom_id, f.error, id=_line_id(key), request_id=_request_id(key), line=f.line)
        return _dump(line)

    def _write(self, lines: list[bytes], tokens: int = 0, failed: int = 0) -> None:
        """Append whole lines, flush and fsync before returning: after this, they survive any crash."""
        self.signals.writing = True
        try:
            for line in lines:
                if self.hooks.hit("torn"):
                    self.fout.write(line[: len(line) // 2])
                    self.fout.flush()
                    self.hooks.wait()
                    self.fout.write(line[len(line) // 2 :])
                else:
                    self.fout.write(line)
                if self.hooks.hit("line"):
                    self.fout.flush()
                    self.hooks.wait()
            self.fout.flush()
            self.hooks.stall("fsync")
            os.fsync(self.fout.fileno())
        except OSError as exc:
            raise JobError(
                f"cannot write {self.output} ({exc.strerror}); the lines before this are safe: free "
                "the space or fix the path and run the same command again to resume"
            ) from None
        finally:
            self.signals.writing = False
        if failed:
            self.summary.failed += failed
        else:
            self.summary.ok += len(lines)
        self.progress.advance(len(lines), tokens=tokens, failed=failed)
        if self.signals.stop is not None:
            raise Interrupted(self.signals.stop)

    def summary_line(self) -> str:
        s = self.summary
        rate = s.tokens / s.wall_s if s.wall_s > 0 else 0.0
        ran = s.ok + s.failed
        return (
            f"run-batch: {s.total_lines} requests in {self.input} ({s.already_done} already in the output): "
            f"{ran} run now, {s.ok} ok, {s.failed} failed"
            f"{f' (+{s.failed_before} failed before)' if s.failed_before else ''}; {s.tokens} tokens generated "
            f"in {s.wall_s:.1f} s = {rate:.1f} tok/s; {_size(s.bytes_read)} read; results in {self.output}"
        )


def request_seed(engine_seed: int, custom_id: str) -> int:
    """The seed of an unseeded request: from the engine seed and its custom_id, so a resumed job (where
    request positions differ) samples exactly what an uninterrupted one did."""
    digest = hashlib.sha256(f"{engine_seed}:custom_id:{custom_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _salvage_custom_id(raw: bytes) -> str | None:
    """The custom_id of a line that failed to parse, when it can still be read (to name its error line)."""
    m = re.search(rb'"custom_id"\s*:\s*"((?:[^"\\]|\\.){1,200})"', raw)
    if not m:
        return None
    try:
        value = json.loads(b'"' + m.group(1) + b'"')
        value.encode("utf-8")
        return value
    except (ValueError, UnicodeError):
        return None


def _line_id(key: str) -> str:
    return "batch_req_" + hashlib.sha256(("line-id:" + key).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _request_id(key: str) -> str:
    return "req_" + hashlib.sha256(("request-id:" + key).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _dump(line: dict) -> bytes:
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# -- signals and test hooks ----------------------------------------------------------------------------
class _Signals:
    """SIGINT / SIGTERM: the first stops the job after the lines being written (at once when none are);
    the second aborts on the spot (OUT may end in a torn line, which the next run repairs)."""

    def __init__(self) -> None:
        self.writing = False
        self.stop: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the process's handlers alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.stop is not None:
            os.write(2, b"klotski: second signal: aborted; run the same command again to resume\n")
            os._exit(128 + signum)
        self.stop = signum
        if not self.writing:
            raise Interrupted(signum)
        os.write(2, b"klotski: finishing the lines being written, then stopping (again to abort)\n")


class _StallHooks:
    """Tests only: KLOTSKI_BATCH_STALL=POINT:K makes the job stop at the K-th time it reaches POINT,
    write POINT to $KLOTSKI_BATCH_STALL_FILE and wait (until a signal asks it to stop), so a test can
    kill it at a chosen moment instead of sleeping on timing luck. Points: window (a window is read),
    group (a group is about to compute), computed (a group computed, nothing written yet), line (a
    line written and flushed, not yet fsynced), torn (half a line written and flushed), fsync (a
    group's lines flushed, not yet fsynced). KLOTSKI_BATCH_STALL_HOLD=1 keeps waiting after a signal
    (to test that a second one aborts)."""

    def __init__(self, point: str | None, count: int, path: str | None, signals: _Signals, hold: bool = False) -> None:
        self.point, self.count, self.path, self.signals, self.hold = point, count, path, signals, hold
        self.seen: dict[str, int] = {}

    @classmethod
    def from_env(cls, signals: _Signals) -> _StallHooks:
        spec = os.environ.get("KLOTSKI_BATCH_STALL")
        if not spec:
            return cls(None, 0, None, signals)
        point, _, count = spec.partition(":")
        return cls(
            point,
            int(count or 1),
            os.environ.get("KLOTSKI_BATCH_STALL_FILE"),
            signals,
            os.environ.get("KLOTSKI_BATCH_STALL_HOLD") == "1",
        )

    def hit(self, point: str) -> bool:
        """Count one arrival at point; True when it is the chosen one (the caller then calls wait())."""
        if self.point != point:
            return False
        self.seen[point] = self.seen.get(point, 0) + 1
        return self.seen[point] == self.count

    def stall(self, point: str) -> None:
        if self.hit(point):
            self.wait()

    def wait(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                f.write(self.point or "")
        while self.signals.stop is None or self.hold:
            time.sleep(0.05)
