"""`klotski run-batch`: OpenAI batch results, per-line errors, and resumes that equal an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from klotski.cli import main
from klotski.entrypoints.batch import EXIT_FAILED_LINES, IdSet, sidecar_path

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny-model steps on a shared, loaded machine run far faster on one thread than two (OpenMP barriers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def line(custom_id, body, url=COMPLETIONS) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def good_lines(count: int) -> list[str]:
    """A mix of every kind of request: greedy, seeded and unseeded sampling, n > 1, echo, scoring, chat, stops."""
    words = ["The river", "Once upon a time", "A mixture of experts", "She asked", "Hello", "The library opened at"]
    out = []
    for i in range(count):
        prompt = " ".join([words[i % len(words)]] * (1 + i % 3))
        kind = i % 8
        if kind == 0:
            body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
        elif kind == 1:
            body = {"prompt": prompt, "max_tokens": 3, "temperature": 0.9, "seed": i, "n": 2, "logprobs": 2}
        elif kind == 2:
            body = {"prompt": prompt, "max_tokens": 3, "temperature": 1.0, "top_k": 20}  # unseeded sampling
        elif kind == 3:
            body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
        elif kind == 4:
            body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}  # scoring only
        elif kind == 5:
            out.append(
                line(
                    f"req-{i}",
                    {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 3,
                        "temperature": 0,
                        "logprobs": True,
                        "top_logprobs": 2,
                    },
                    CHAT,
                )
            )
            continue
        elif kind == 6:
            body = {
                "prompt": [prompt, prompt + " again"],
                "max_tokens": 2,
                "temperature": 0.7,
                "top_p": 0.9,
                "seed": 7,
                "stop": [" the"],
                "min_tokens": 1,
            }
        else:
            body = {
                "prompt": [3, 17, 42, 99][: 1 + i % 4],
                "max_tokens": 5,
                "ignore_eos": True,
                "temperature": 0,
                "min_p": 0.05,
            }
        out.append(line(f"req-{i}", body))
    return out


def write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def results(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def key(record: dict) -> str:
    error = record["error"]
    return f"line:{error['line']}" if error and "line" in error else record["custom_id"]


def comparable(record: dict) -> dict:
    """A result line without its creation time (the one field that differs between two runs)."""
    record = json.loads(json.dumps(record))
    body = (record["response"] or {}).get("body") or {}
    body.pop("created", None)
    return record


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def batch_args(model, src, dst, *extra) -> list[str]:
    return [
        "run-batch",
        "-i",
        str(src),
        "-o",
        str(dst),
        "--model",
        str(model),
        "--dtype",
        "float32",
        "--window",
        "8",
        "--batch-size",
        "2",
        "--num-batches",
        "2",
        *extra,
    ]


# -- results ---------------------------------------------------------------------------------------------
def test_every_body_validates_with_openai_types(capsys, tiny_mixtral, tmp_path):
    lines = good_lines(24)
    src, dst = write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst))
    assert code == 0, err
    assert "Traceback" not in err and f"results in {dst}" in out and "24 ok, 0 failed" in out
    got = results(dst)
    assert sorted(r["custom_id"] for r in got) == sorted(json.loads(x)["custom_id"] for x in lines)
    requests = {json.loads(x)["custom_id"]: json.loads(x) for x in lines}
    for record in got:
        assert record["error"] is None and record["response"]["status_code"] == 200
        request = requests[record["custom_id"]]
        body = record["response"]["body"]
        parsed = (ChatCompletion if request["url"] == CHAT else Completion).model_validate(body)
        prompts = request["body"].get("prompt")
        n_prompts = len(prompts) if isinstance(prompts, list) and isinstance(prompts[0], str) else 1
        assert len(parsed.choices) == n_prompts * request["body"].get("n", 1)
        assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
        if request["body"].get("max_tokens") == 0:
            assert all(c.text == request["body"]["prompt"] for c in parsed.choices)
            assert parsed.usage.completion_tokens == 0
            assert len(parsed.choices[0].logprobs.token_logprobs) == parsed.usage.prompt_tokens
        if request["body"].get("n") == 2 and request["body"].get("temperature", 1) > 0:
            assert (
                parsed.choices[0].text != parsed.choices[1].text
                or parsed.choices[0].logprobs != parsed.choices[1].logprobs
            )  # two samples, two seeds
    meta = json.loads(sidecar_path(dst).read_text())
    assert meta["grouping"] == {"batch_size": 2, "num_batches": 2} and meta["settings"]["compute_dtype"] == "float32"


def test_seeded_result_matches_the_python_api(capsys, tiny_mixtral, tmp_path):
    """A seeded sample in a batch file is what LLM.generate gives for the same SamplingParams."""
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    src = write(
        tmp_path / "in.jsonl",
        [
            line("a", {"prompt": "The river", "max_tokens": 5, "temperature": 0.8, "seed": 123}),
            line("b", {"prompt": "The river", "max_tokens": 5, "temperature": 0}),
        ],
    )
    dst = tmp_path / "out.jsonl"
    assert run_cli(capsys, *batch_args(tiny_mixtral, src, dst))[0] == 0
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in results(dst)}
    llm = LLM(model=str(tiny_mixtral), dtype="float32")
    sampled, greedy = llm.generate(
        ["The river"] * 2,
        [SamplingParams(max_tokens=5, temperature=0.8, seed=123), SamplingParams(max_tokens=5, temperature=0)],
    )
    assert texts == {"a": sampled.outputs[0].text, "b": greedy.outputs[0].text}


BAD_LINES = {  # kind: (raw line, expected error code)
    "malformed JSON": (
        '{"custom_id": "j", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}',
        "invalid_json",
    ),
    "invalid UTF-8": (
        b'{"custom_id": "u", "method": "POST", "url": "/v1/completions", "body": {"prompt": "\xff\xfe"}}',
        "invalid_utf8",
    ),
    "lone surrogate": (line("s", {"prompt": "\ud800"}), "invalid_unicode"),  # json.dumps writes the \\ud800 escape
    "NaN": (
        '{"custom_id": "nan", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": NaN}}',
        "invalid_json",
    ),
    "deep nesting": ('{"custom_id": "deep", "body": ' + "[" * 100000 + "]" * 100000 + "}", "invalid_json"),
    "not an object": ('["custom_id", "x"]', "invalid_line"),
    "no custom_id": ('{"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}', "invalid_custom_id"),
    "custom_id not a string": (
        '{"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}}',
        "invalid_custom_id",
    ),
    "duplicate custom_id": (line("good-0", {"prompt": "again"}), "duplicate_custom_id"),
    "GET": (
        json.dumps({"custom_id": "get", "method": "GET", "url": COMPLETIONS, "body": {"prompt": "x"}}),
        "unsupported_method",
    ),
    "unknown url": (line("url", {"input": "x"}, "/v1/embeddings"), "unknown_url"),
    "unknown line field": (
        json.dumps({"custom_id": "lf", "method": "POST", "url": COMPLETIONS, "body": {}, "priority": 1}),
        "unknown_field",
    ),
    "no body": (json.dumps({"custom_id": "nb", "method": "POST", "url": COMPLETIONS}), "missing_field"),
    "unknown body field": (line("bf", {"prompt": "x", "temprature": 0.5}), "unknown_field"),
    "unsupported field": (line("lb", {"prompt": "x", "logit_bias": {"5": 100}}), "unsupported_field"),
    "wrong type": (line("wt", {"prompt": "x", "max_tokens": "ten"}), "invalid_type"),
    "negative temperature": (line("t", {"prompt": "x", "temperature": -1}), "invalid_value"),
    "top_p out of range": (line("p", {"prompt": "x", "top_p": 2.0}), "invalid_value"),
    "n = 0": (line("n0", {"prompt": "x", "n": 0}), "invalid_value"),
    "logprobs too many": (line("lp", {"prompt": "x", "logprobs": 50}), "invalid_value"),
    "max_tokens 0 without echo": (line("mt", {"prompt": "x", "max_tokens": 0}), "invalid_value"),
    "min_tokens above max_tokens": (line("mn", {"prompt": "x", "max_tokens": 2, "min_tokens": 5}), "invalid_value"),
    "prompt longer than the context": (line("long", {"prompt": list(range(5, 105))}), "context_length_exceeded"),
    "completion past the context": (line("ctx", {"prompt": [5, 6], "max_tokens": 100}), "context_length_exceeded"),
    "empty prompt": (line("empty", {"prompt": []}), "invalid_prompt"),
    "token outside the vocabulary": (line("vocab", {"prompt": [1, 10**6]}), "invalid_prompt"),
    "stream": (line("stream", {"prompt": "x", "stream": True}), "invalid_value"),
    "bad chat role": (line("role", {"messages": [{"role": "robot", "content": "x"}]}, CHAT), "invalid_value"),
}


def test_bad_lines_get_error_records_and_the_job_goes_on(capsys, tiny_mixtral, tmp_path):
    assert len(BAD_LINES) >= 20
    lines: list[str | bytes] = []
    good = [
        line(f"good-{i}", {"prompt": "The river", "max_tokens": 2, "temperature": 0}) for i in range(len(BAD_LINES))
    ]
    for (_kind, (raw, _)), ok in zip(BAD_LINES.items(), good):
        lines += [ok, raw]
    lines.insert(3, "")  # a blank line is skipped, not an error
    src, dst = write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst, "--max-model-len", "64"))
    assert code == EXIT_FAILED_LINES and "Traceback" not in err
    got = results(dst)
    assert len(got) == 2 * len(BAD_LINES)
    oks = [r for r in got if r["error"] is None]
    assert sorted(r["custom_id"] for r in oks) == sorted(f"good-{i}" for i in range(len(BAD_LINES)))
    errors = sorted((r for r in got if r["error"] is not None), key=lambda r: r["error"].get("line", 0) or 0)
    by_line = {r["error"]["line"]: r for r in errors if "line" in r["error"]}
    by_id = {r["custom_id"]: r for r in errors if "line" not in r["error"]}
    number = 0
    for raw in lines:
        number += 1
        kind = next((k for k, (bad, _) in BAD_LINES.items() if bad == raw), None)
        if kind is None:
            continue
        code_expected = BAD_LINES[kind][1]
        record = by_line.get(number)
        if record is None:
            record = by_id[json.loads(raw)["custom_id"]]
        assert record["error"]["code"] == code_expected, (kind, record["error"])
        assert record["response"]["status_code"] == 400
        error_body = record["response"]["body"]["error"]
        assert error_body["code"] == code_expected and error_body["message"] == record["error"]["message"]
        assert record["error"]["message"], kind
    assert f"{len(BAD_LINES)} ok, {len(BAD_LINES)} failed" in out
    assert by_line[next(i + 1 for i, x in enumerate(lines) if x == BAD_LINES["malformed JSON"][0])]["custom_id"] == "j"


# -- the job cannot run: exit 2, one line -------------------------------------------------------------------
def assert_job_error(code: int, err: str, words: str) -> None:
    assert code == 2 and "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("klotski: error:")]
    assert len(lines) == 1 and words in lines[0], err


def test_job_errors(capsys, tiny_mixtral, tmp_path):
    src = write(tmp_path / "in.jsonl", good_lines(2))
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, tmp_path / "missing.jsonl", tmp_path / "o.jsonl"))
    assert_job_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, src))
    assert_job_error(code, err, "is the input file")
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, tmp_path / "no-dir" / "o.jsonl"))
    assert_job_error(code, err, "cannot be written")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"something": "else"}\n')
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, foreign))
    assert_job_error(code, err, "not made by run-batch")


def test_mismatched_resume_is_refused(capsys, tiny_mixtral, tmp_path):
    from klotski.commands.create_model import create_model

    src, dst = write(tmp_path / "in.jsonl", good_lines(3)), tmp_path / "out.jsonl"
    assert run_cli(capsys, *batch_args(tiny_mixtral, src, dst))[0] == 0
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst, "--seed", "5"))
    assert_job_error(code, err, "different seed")
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst, "--dtype", "bfloat16"))
    assert_job_error(code, err, "different compute-dtype")
    other = create_model(tmp_path / "other", "mixtral", "tiny", dtype="float32", seed=1)  # same shapes, other weights
    args = batch_args(tiny_mixtral, src, dst)
    args[args.index("--model") + 1] = str(other)
    code, _, err = run_cli(capsys, *args)
    assert_job_error(code, err, "different model")
    # The same flags again: nothing left to do, exit 0; the grouping stays the job's; --overwrite starts over.
    code, out, _ = run_cli(capsys, *batch_args(tiny_mixtral, src, dst))
    assert code == 0 and "3 already in the output" in out and "0 run now" in out
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst, "--batch-size", "3"))
    assert code == 0 and "resuming with the job's bs 2 x n 2" in err
    code, out, _ = run_cli(capsys, *batch_args(tiny_mixtral, src, dst, "--seed", "5", "--overwrite"))
    assert code == 0 and "3 ok" in out and len(results(dst)) == 3


# -- resume ------------------------------------------------------------------------------------------------
KILL_LINES = (
    good_lines(30)[:12]
    + [BAD_LINES["malformed JSON"][0], BAD_LINES["negative temperature"][0]]
    + good_lines(30)[12:]
    + [line("req-3", {"prompt": "dup"})]
)


@pytest.fixture(scope="module")
def reference(tiny_mixtral, tmp_path_factory):
    """An uninterrupted run of KILL_LINES."""
    tmp = tmp_path_factory.mktemp("reference")
    src, dst = write(tmp / "in.jsonl", KILL_LINES), tmp / "out.jsonl"
    assert main(batch_args(tiny_mixtral, src, dst)) == EXIT_FAILED_LINES
    return {key(r): comparable(r) for r in results(dst)}


def assert_same_as_reference(dst: Path, reference: dict) -> None:
    data = dst.read_bytes()
    assert data.endswith(b"\n"), "a torn last line was left"
    got = [json.loads(x) for x in data.splitlines()]
    keys = [key(r) for r in got]
    assert len(keys) == len(set(keys)), "a request was written twice"
    assert set(keys) == set(reference)
    for record in got:
        assert comparable(record) == reference[key(record)], key(record)


def test_resume_repairs_a_torn_line(capsys, tiny_mixtral, tmp_path, reference):
    src, dst = write(tmp_path / "in.jsonl", KILL_LINES), tmp_path / "out.jsonl"
    assert run_cli(capsys, *batch_args(tiny_mixtral, src, dst))[0] == EXIT_FAILED_LINES
    data = dst.read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 40  # through a third of the file and into a line
    dst.write_bytes(data[:cut])
    code, _, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst))
    assert code == EXIT_FAILED_LINES and "torn line" in err
    assert_same_as_reference(dst, reference)


def start(model, src, dst, tmp_path, stall: str | None, hold: bool = False) -> tuple[subprocess.Popen, Path]:
    flag = tmp_path / f"stalled-{time.monotonic_ns()}"
    env = os.environ | {
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "KLOTSKI_BATCH_STALL_FILE": str(flag),
    }
    env.pop("KLOTSKI_BATCH_STALL", None)
    if stall:
        env["KLOTSKI_BATCH_STALL"] = stall
    if hold:
        env["KLOTSKI_BATCH_STALL_HOLD"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "klotski", *batch_args(model, src, dst)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, flag


def wait_for_stall(proc: subprocess.Popen, flag: Path, timeout: float = 180) -> bool:
    """True once the job stalls at its point; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if flag.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the job neither stalled nor finished")


def test_sigkill_at_chosen_moments_then_resume_equals_an_uninterrupted_run(tiny_mixtral, tmp_path, reference):
    src, dst = write(tmp_path / "in.jsonl", KILL_LINES), tmp_path / "out.jsonl"
    rng = random.Random(13)
    # The first kill lands in the first group (nothing computed is written), one tears a line in two;
    # the rest are drawn: any stall point, at its first few occurrences.
    plan = ["group:1", f"torn:{rng.randint(2, 4)}"]
    plan += [
        f"{rng.choice(['window', 'group', 'computed', 'line', 'torn', 'fsync'])}:{rng.randint(1, 3)}" for _ in range(4)
    ]
    kills = 0
    for stall in plan:
        proc, flag = start(tiny_mixtral, src, dst, tmp_path, stall)
        if not wait_for_stall(proc, flag):
            continue  # the job finished before reaching this point
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += 1
        data = dst.read_bytes()
        lines = data.split(b"\n")
        for complete in lines[:-1]:
            json.loads(complete)  # every whole line is a result
        if stall.startswith("torn"):
            assert lines[-1] and not data.endswith(b"\n"), "the torn kill left no torn line"
    assert kills >= 5, plan
    proc, _ = start(tiny_mixtral, src, dst, tmp_path, None)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_FAILED_LINES, err
    assert "Traceback" not in err
    assert_same_as_reference(dst, reference)


def test_sigint_stops_cleanly_and_says_how_to_resume(tiny_mixtral, tmp_path, reference):
    src, dst = write(tmp_path / "in.jsonl", KILL_LINES), tmp_path / "out.jsonl"
    # While a group computes: it is dropped at once.
    proc, flag = start(tiny_mixtral, src, dst, tmp_path, "group:3")
    assert wait_for_stall(proc, flag)
    before = dst.read_bytes()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Resume with the same command" in err and "Traceback" not in err
    assert dst.read_bytes() == before and before.endswith(b"\n") and "run-batch:" in out
    # While lines are written: the group's lines are finished first, then the job stops.
    proc, flag = start(tiny_mixtral, src, dst, tmp_path, "torn:2")
    assert wait_for_stall(proc, flag)
    assert not dst.read_bytes().endswith(b"\n")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Resume with the same command" in err
    assert dst.read_bytes().endswith(b"\n")
    # A second signal aborts on the spot.
    proc, flag = start(tiny_mixtral, src, dst, tmp_path, "line:1", hold=True)
    assert wait_for_stall(proc, flag)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # still finishing its lines (held here by the test hook)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "aborted" in err
    proc, _ = start(tiny_mixtral, src, dst, tmp_path, None)
    proc.communicate(timeout=300)
    assert proc.returncode == EXIT_FAILED_LINES
    assert_same_as_reference(dst, reference)


# -- progress -----------------------------------------------------------------------------------------------
def test_progress_lines_when_not_a_terminal(capsys, tiny_mixtral, tmp_path):
    src, dst = write(tmp_path / "in.jsonl", good_lines(6)), tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, *batch_args(tiny_mixtral, src, dst, "--progress-interval", "0"))
    assert code == 0 and "run-batch: 6/6 (100.0%), 0 failed" in err and "tok/s" in err and "ETA" in err
    assert "tokens generated" in out and "read; results in" in out
    code, out, err = run_cli(
        capsys, *batch_args(tiny_mixtral, src, tmp_path / "o2.jsonl", "--progress-interval", "0", "--no-progress")
    )
    assert code == 0 and "run-batch: 6/6" not in err


def test_progress_bar_on_a_terminal():
    import io

    from klotski.progress import Progress

    stream = io.StringIO()
    progress = Progress(10, initial=2, stream=stream, tty=True, desc="run-batch")
    progress.advance(3, tokens=30, failed=1)
    progress.close()
    text = stream.getvalue()
    assert "run-batch" in text and "5/10" in text and "tok/s" in text and "1 failed" in text


def test_generate_use_tqdm_drives_the_same_progress(tiny_mixtral, monkeypatch):
    from klotski import engine
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    seen = []

    class Recording(engine.Progress):
        def advance(self, requests, tokens=0, failed=0):
            seen.append((requests, tokens))
            super().advance(requests, tokens, failed)

    monkeypatch.setattr(engine, "Progress", Recording)
    llm = LLM(model=str(tiny_mixtral), dtype="float32", batch_size=1, num_batches=1)
    llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=True)
    assert seen == [(1, 2)] * 3
    seen.clear()
    llm.generate(["a"], SamplingParams(max_tokens=2))
    assert seen == []


# -- pieces ---------------------------------------------------------------------------------------------------
def test_id_set(monkeypatch):
    monkeypatch.setattr(IdSet, "_MERGE_AT", 4)
    ids = IdSet()
    names = [f"id-{i}" for i in range(50)]
    for name in names[:25]:
        ids.add(name)
    assert all(n in ids for n in names[:25]) and not any(n in ids for n in names[25:])
    assert len(ids) == 25


def test_generate_output_is_written_as_groups_finish(capsys, tiny_mixtral, tmp_path, monkeypatch):
    """generate --output: a crash after the first group keeps that group's rows."""
    from klotski.engine import LLM

    real = LLM.run_groups

    def crash_after_first(self, requests, policy=None):
        for i, group in enumerate(real(self, requests, policy)):
            if i == 1:
                raise KeyboardInterrupt
            yield group

    monkeypatch.setattr(LLM, "run_groups", crash_after_first)
    dst = tmp_path / "out.jsonl"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_mixtral),
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--prompt",
            "c",
            "--batch-size",
            "1",
            "--num-batches",
            "1",
            "--max-tokens",
            "2",
            "--output",
            str(dst),
        ]
    )
    assert code == 130
    assert [json.loads(x)["id"] for x in dst.read_text().splitlines()] == ["prompt-0"]
