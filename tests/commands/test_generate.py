"""`klotski generate`: output formats, the default model, and exit code 2 without a traceback for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from klotski.cli import main
from klotski.default_model import notice
from tests.broken import BREAKAGES, copy_checkpoint


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, err: str, words: str) -> None:
    """Exit code 2, one-line 'klotski: error:' messages, and no traceback."""
    assert code == 2
    assert "klotski: error:" in err and words in err
    assert "Traceback" not in err


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -- outputs ------------------------------------------------------------------------------------
def test_json_has_outputs_and_stats(capsys, tiny_mixtral):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        "Hello",
        "--prompt",
        "The river",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert [len(row["token_ids"]) for row in result["outputs"]] == [4, 4]
    assert result["stats"]["generated_tokens"] == 8
    assert result["stats"]["wall_s"] > 0 and result["stats"]["tokens_per_s"] > 0


def test_output_jsonl_rows(capsys, tiny_mixtral, tmp_path):
    lines = [
        '{"id": "a", "prompt": "Hello"}',
        '{"messages": [{"role": "user", "content": "Hi"}]}',
        '{"prompt_token_ids": [0, 5, 9]}',
    ]
    out_file = tmp_path / "out.jsonl"
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--input",
        write_jsonl(tmp_path / "in.jsonl", lines),
        "--output",
        str(out_file),
        "--max-tokens",
        "3",
        "--ignore-eos",
    )
    assert code == 0 and "tok/s" in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "line-2", "line-3"]
    for row in rows:
        assert set(row) == {"id", "text", "token_ids", "finish_reason"}
        assert len(row["token_ids"]) == 3 and row["finish_reason"] == "length"


def test_default_model_is_the_trained_one(capsys):
    """No --model: the shipped Shakespeare model answers, the note says which model it is, and its
    greedy continuation is made of words (a random-weight model's would be reserved-token soup)."""
    code, out, err = run_cli(capsys, "generate", "--prompt", "KING. My lords, the", "--max-tokens", "24", "--json")
    assert code == 0
    assert notice() in err and "Shakespeare" in err and "random" not in err.lower()
    text = json.loads(out)["outputs"][0]["text"]
    words = [w.strip(".,;:!?'\"-") for w in text.split()]
    assert len(words) >= 8 and sum(w.isalpha() for w in words) >= 0.8 * len(words), text


# -- bad input: exit code 2, a clear message, no traceback, nothing lost --------------------------------
@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_broken_checkpoint(capsys, name, tiny_mixtral, tmp_path):
    damage, words = BREAKAGES[name]
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    damage(path)
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "Hello")
    assert_clean_error(code, err, words)


def test_missing_model_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "Hello")
    assert_clean_error(code, err, "does not exist")


def test_empty_prompt_is_skipped_and_the_rest_run(capsys, tiny_mixtral):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        "",
        "--prompt",
        "Hello",
        "--max-tokens",
        "2",
        "--json",
    )
    assert_clean_error(code, err, "prompt is empty")
    assert [row["id"] for row in json.loads(out)["outputs"]] == ["prompt-1"]


def test_max_tokens_below_one(capsys, tiny_mixtral):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_mixtral), "--prompt", "Hello", "--max-tokens", "0")
    assert_clean_error(code, err, "--max-tokens: 0 is below 1")


def test_prompt_longer_than_context(capsys, tiny_mixtral, tmp_path):
    context = json.loads((tiny_mixtral / "config.json").read_text())["max_position_embeddings"]
    too_long = json.dumps({"id": "long", "prompt_token_ids": [5] * (context + 1)})
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_mixtral), "--input", write_jsonl(tmp_path / "in.jsonl", [too_long])
    )
    assert_clean_error(code, err, f"the model's context is {context}")


def test_malformed_jsonl_line_names_it_and_the_rest_run(capsys, tiny_mixtral, tmp_path):
    lines = [
        '{"id": "first", "prompt": "Hello"}',
        '{"prompt": "unterminated',
        '{"id": "third", "prompt_token_ids": [0, 7]}',
        '["not", "an", "object"]',
    ]
    src, out_file = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_mixtral), "--input", src, "--output", str(out_file), "--max-tokens", "2"
    )
    assert_clean_error(code, err, f"{src}:2: not valid JSON")
    assert f"{src}:4:" in err
    assert [json.loads(line)["id"] for line in out_file.read_text().splitlines()] == ["first", "third"]


def test_input_file_missing(capsys, tiny_mixtral, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_mixtral), "--input", str(tmp_path / "none.jsonl"))
    assert_clean_error(code, err, "does not exist")


def test_bad_device_memory(capsys, tiny_mixtral):
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_mixtral), "--prompt", "Hello", "--device-memory", "12XB"
    )
    assert_clean_error(code, err, "cannot read device memory size '12XB'")


def test_unwritable_output_fails_before_generating(capsys, tiny_mixtral, tmp_path):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_mixtral),
        "--prompt",
        "Hello",
        "--output",
        str(tmp_path / "no-such-dir" / "out.jsonl"),
    )
    assert_clean_error(code, err, "cannot be written")
    assert "tok/s" not in out


def test_subprocess_error_has_no_traceback(tiny_mixtral, tmp_path):
    """The real entry point (`python -m klotski`) on a truncated checkpoint: exit 2, one clean line."""
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    damage, words = BREAKAGES["truncated-safetensors"]
    damage(path)
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "klotski", "generate", "--model", str(path), "--prompt", "Hello"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("klotski: error:") and words in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
