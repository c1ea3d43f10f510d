"""Inputs and parameters a user gets wrong: argparse errors, non-UTF-8 text, SamplingParams of the
wrong type or range (CLI and Python API, validated in one place), unwritable output paths, size
strings; and --logprobs actually returned. Each CLI case: exit 2, one `klotski: error:` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from klotski import LLM, SamplingParams
from klotski.config import format_bytes, parse_bytes
from klotski.errors import KlotskiError, ParameterError
from tests.cli_helpers import assert_one_error, run_cli

BAD_UTF8 = os.fsdecode(b"caf\xe9 au lait")  # latin-1 bytes in argv: Python keeps them as surrogates


@pytest.fixture(scope="module")
def llm(tiny_mixtral):
    return LLM(str(tiny_mixtral))


# -- argparse: one line with the flag and what was expected ----------------------------------------
@pytest.mark.parametrize(
    "argv,words",
    [
        (["generate", "--max-tokens", "x"], "--max-tokens: expected an integer, got 'x'"),
        (["generate", "--max-tokens", "2.0"], "--max-tokens: expected an integer, got '2.0'"),
        (["generate", "--temperature", "warm"], "--temperature: expected a number, got 'warm'"),
        (["generate", "--model"], "--model: expected a value after it"),
        (["generate", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ([], "no command given"),
        (["generat"], "unknown command 'generat'"),
        (["plan", "--prompt-len", "1.5"], "--prompt-len: expected an integer, got '1.5'"),
        (["create-model", "--layers", "two", "--out", "x"], "--layers: expected an integer"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    line = assert_one_error(code, err, words, "--help")
    assert "usage:" not in err and len(err.splitlines()) == 1 and out == ""
    assert line.startswith("klotski: error:")


# -- text that is not UTF-8 ------------------------------------------------------------------------------
def test_non_utf8_prompt_is_an_error_for_that_prompt_only(capsys, tiny_mixtral):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        BAD_UTF8,
        "--prompt",
        "Hello",
        "--max-tokens",
        "2",
        "--json",
    )
    assert_one_error(code, err, "prompt-0", "not valid UTF-8")
    assert [row["id"] for row in json.loads(out)["outputs"]] == ["prompt-1"]


@pytest.mark.parametrize("flag", ["--stop", "--model", "--offload-dir"])
def test_non_utf8_flag_value_is_refused_up_front(capsys, tiny_mixtral, flag):
    argv = ["generate", "--model", str(tiny_mixtral), "--prompt", "Hello", flag, BAD_UTF8]
    code, out, err = run_cli(capsys, *argv)
    assert_one_error(code, err, f"{flag}: the value", "not valid UTF-8")
    assert out == ""


def test_non_utf8_chat_content_and_stop_in_the_api(llm):
    with pytest.raises(ParameterError, match="message 0: the content is not valid UTF-8"):
        llm.chat([{"role": "user", "content": BAD_UTF8}])
    with pytest.raises(ParameterError, match="not valid UTF-8"):
        SamplingParams(stop=[BAD_UTF8])
    with pytest.raises(ParameterError, match="not valid UTF-8"):
        llm.generate([BAD_UTF8])


# -- SamplingParams from the CLI: the flag named -------------------------------------------------------
@pytest.mark.parametrize(
    "flags,words",
    [
        (["--temperature", "nan"], "--temperature: nan is not a finite number"),
        (["--temperature", "inf"], "--temperature: inf is not a finite number"),
        (["--temperature", "-1"], "--temperature: -1.0 is negative"),
        (["--top-p", "0"], "--top-p: 0.0 is outside (0, 1]"),
        (["--top-p", "nan"], "--top-p: nan is not a finite number"),
        (["--top-k", "-2"], "--top-k: -2 is invalid"),
        (["--seed", str(2**64)], "--seed: 18446744073709551616 does not fit in 64 bits"),
        (["--seed", "-1"], "--seed: -1 does not fit in 64 bits"),
        (["--logprobs", "513"], "--logprobs: 513 is more than the model's vocabulary (512 tokens)"),
        (["--logprobs", "-1"], "--logprobs: -1 is negative"),
        (["--min-tokens", "9", "--max-tokens", "4"], "--min-tokens: 9 must lie in [0, max_tokens=4]"),
        (["--max-tokens", "0"], "--max-tokens: 0 is below 1"),
        (["--max-tokens", "-5"], "--max-tokens: -5 is below 1"),
    ],
)
def test_sampling_flags(capsys, tiny_mixtral, flags, words):
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_mixtral), "--prompt", "Hello", *flags)
    assert_one_error(code, err, words)
    assert "tok/s" not in out


# -- SamplingParams in Python: types, not just ranges ------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"max_tokens": True}, "max_tokens must be an integer, got bool True"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer, got float 2.5"),
        ({"max_tokens": 4.0}, "max_tokens must be an integer, got float 4.0"),
        ({"max_tokens": None}, "max_tokens must be an integer, got NoneType"),
        ({"max_tokens": "8"}, "max_tokens must be an integer, got str '8'"),
        ({"temperature": "0.5"}, "temperature must be a number, got str"),
        ({"temperature": True}, "temperature must be a number, got bool"),
        ({"temperature": float("nan")}, "temperature=nan is not a finite number"),
        ({"top_p": float("-inf")}, "top_p=-inf is not a finite number"),
        ({"min_p": 1.5}, "min_p=1.5 is outside [0, 1]"),
        ({"seed": 2**64}, "does not fit in 64 bits"),
        ({"seed": 1.0}, "seed must be an integer or None, got float"),
        ({"seed": False}, "seed must be an integer or None, got bool"),
        ({"logprobs": True}, "logprobs must be an integer or None, got bool"),
        ({"top_k": 1.5}, "top_k must be an integer"),
        ({"n": 2}, "n=2 is not supported"),
        ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
        ({"ignore_eos": 1}, "ignore_eos must be true or false"),
        ({"stop_token_ids": [True]}, "stop_token_ids must hold non-negative integers, got True"),
        ({"stop_token_ids": [2.0]}, "stop_token_ids must hold non-negative integers, got 2.0"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must hold non-negative integers, got -1"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids"),
        ({"stop": [""]}, "stop must be non-empty strings"),
        ({"stop": 5}, "stop must be non-empty strings, got 5"),
        ({"stop": [b"x"]}, "stop must be non-empty strings"),
    ],
)
def test_sampling_params_types(kwargs, words):
    with pytest.raises(ParameterError) as err:
        SamplingParams(**kwargs)
    assert words in str(err.value)
    assert err.value.field == next(iter(kwargs))


def test_numpy_numbers_are_numbers():
    p = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5), seed=np.uint64(2**64 - 1))
    assert (p.max_tokens, p.seed) == (4, 2**64 - 1) and type(p.max_tokens) is int and type(p.temperature) is float


def test_the_engine_checks_against_its_vocabulary_and_revalidates(llm):
    with pytest.raises(ParameterError, match="logprobs=600 is more than the model's vocabulary"):
        llm.generate(["Hello"], SamplingParams(logprobs=600))
    with pytest.raises(ParameterError, match=r"stop_token_ids \[512\] are outside the vocabulary"):
        llm.generate(["Hello"], SamplingParams(stop_token_ids=[512]))
    p = SamplingParams(max_tokens=4)
    p.max_tokens = 0  # changed after construction: checked again when used
    with pytest.raises(ParameterError, match="max_tokens=0"):
        llm.generate(["Hello"], p)
    with pytest.raises(ParameterError, match="sampling_params must be a SamplingParams"):
        llm.generate(["Hello"], {"max_tokens": 4})
    with pytest.raises(ParameterError, match=r"sampling_params\[1\] must be a SamplingParams"):
        llm.generate(["Hello", "Hi"], [SamplingParams(), None])
    with pytest.raises(ParameterError, match="prompt_token_ids must be a list of integers"):
        llm.generate([{"prompt_token_ids": [1, True]}])


def test_top_k_beyond_the_vocabulary_means_all(llm):
    out = llm.generate(["Hello"], SamplingParams(top_k=2**70, temperature=1.0, seed=3, max_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2


# -- --logprobs is returned -----------------------------------------------------------------------------
def test_cli_logprobs_are_in_the_output(capsys, tiny_mixtral, tmp_path):
    out_file = tmp_path / "out.jsonl"
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        "Hello",
        "--max-tokens",
        "3",
        "--ignore-eos",
        "--logprobs",
        "2",
        "--json",
        "--output",
        str(out_file),
    )
    assert code == 0
    row = json.loads(out)["outputs"][0]
    assert row == json.loads(out_file.read_text())
    assert len(row["logprobs"]) == 3
    for token, step in zip(row["token_ids"], row["logprobs"]):
        assert str(token) in step and 2 <= len(step) <= 3 and all(v <= 0 for v in step.values())
    assert row["cumulative_logprob"] == pytest.approx(sum(s[str(t)] for t, s in zip(row["token_ids"], row["logprobs"])))
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_mixtral), "--prompt", "Hello", "--max-tokens", "2", "--logprobs", "0"
    )
    assert code == 0 and "logprobs: " in out


# -- output paths checked before the run, nothing created or truncated ---------------------------------
@pytest.mark.parametrize("flag", ["--trace", "--timeline", "--record-routing", "--output"])
@pytest.mark.parametrize("where", ["missing-dir", "is-dir"])
def test_unwritable_outputs_fail_before_the_run(capsys, tiny_mixtral, tmp_path, flag, where):
    path = tmp_path / "no-such-dir" / "f" if where == "missing-dir" else tmp_path
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_mixtral), "--prompt", "Hello", flag, str(path))
    assert_one_error(code, err, f"{flag} {path} cannot be written", "choose another path")
    assert "tok/s" not in out and not (tmp_path / "no-such-dir").exists()


def test_checking_an_output_path_does_not_touch_an_existing_file(capsys, tiny_mixtral, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text("earlier")
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        "Hello",
        "--trace",
        str(trace),
        "--temperature",
        "nan",
    )
    assert_one_error(code, err, "--temperature")
    assert trace.read_text() == "earlier"


# -- sizes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,words",
    [
        ("-1GB", "cannot read"),
        ("1e3", "cannot read"),
        ("9" * 400 + "GB", "out of range"),
        ("20 GiBs", "cannot read"),
        ("", "cannot read"),
        ("nan", "cannot read"),
        ("1.5.2GB", "cannot read"),
    ],
)
def test_bad_size_strings(capsys, tiny_mixtral, value, words):
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_mixtral), "--prompt", "Hello", f"--device-memory={value}"
    )
    assert_one_error(code, err, words, "device memory")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, -0.5, True, [1], 2**63])
def test_parse_bytes_refuses_non_sizes(value):
    with pytest.raises(KlotskiError):
        parse_bytes(value)


def test_sizes_are_printed_in_a_unit_that_shows_them():
    assert format_bytes(4096) == "4.00 KiB" and format_bytes(300) == "300 B"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB" and format_bytes(150 * 2**20) == "150 MiB"
    for n in (1, 10, 1000, 12345, 2**20 + 1, 7 * 2**30):
        assert not format_bytes(n).startswith("0.00")


def test_small_budget_message_shows_real_sizes(capsys, tiny_mixtral, tmp_path):
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        "Hello",
        "--device-memory",
        "20KB",
        "--batch-size",
        "1",
        "--num-batches",
        "1",
        "--offload-dir",
        str(tmp_path / "off"),
    )
    line = assert_one_error(code, err, "--device-memory")
    assert "0.00" not in line and "KiB" in line


# -- the real entry point ----------------------------------------------------------------------------------
def test_a_closed_stdout_is_not_a_traceback(tiny_mixtral):
    """`klotski generate ... | head -c1`: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "klotski",
            "generate",
            "--model",
            str(tiny_mixtral),
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--json",
        ],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert "Traceback" not in proc.stderr and proc.returncode == 141


def test_non_utf8_argv_in_a_real_process(tiny_mixtral):
    proc = subprocess.run(
        [
            sys.executable.encode(),
            b"-m",
            b"klotski",
            b"generate",
            b"--model",
            os.fsencode(tiny_mixtral),
            b"--prompt",
            b"Hello",
            b"--stop",
            b"\xff\xfe",
        ],
        capture_output=True,
        timeout=120,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("klotski: error: --stop:") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_model_given_as_a_file(capsys, tiny_mixtral):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_mixtral / "config.json"), "--prompt", "Hi")
    assert_one_error(code, err, "is a file; pass --model the checkpoint's directory")
