"""`klotski perplexity`: window arithmetic, agreement with transformers, and clean errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from klotski.cli import main
from klotski.commands.perplexity import windows
from klotski.errors import KlotskiError

TEXT = (
    "When the night is long and the candles burn low, the watchmen walk the walls and count the hours. "
    "Numbers matter: 1, 2, 3 and 42 appear in tables. "
) * 6


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 3), (10, 4, 1), (11, 5, 2), (100, 16, 15), (7, 50, 49)])
def test_windows_score_every_target_once(n, window, stride):
    scored = []
    for start, end, first in windows(n, window, stride):
        assert 0 <= start < first < end <= n and end - start <= window
        scored += range(first, end)
    assert scored == list(range(1, n))


@pytest.mark.parametrize("window,stride", [(1, 1), (8, 8), (8, 0)])
def test_windows_refuse_bad_shapes(window, stride):
    with pytest.raises(KlotskiError):
        windows(10, window, stride)


def _reference_nll(model_dir, ids: list[int], window: int, stride: int) -> float:
    """Mean NLL from transformers over the same windows: an independent implementation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in windows(len(ids), window, stride):
            logits = model(input_ids=torch.tensor([ids[start:end]])).logits[0]
            pred = logits[first - start - 1 : end - start - 1]
            total += float(torch.nn.functional.cross_entropy(pred, torch.tensor(ids[first:end]), reduction="sum"))
            count += end - first
    return total / count


@pytest.mark.parametrize("window,stride", [(32, 31), (32, 8)])
def test_matches_transformers(capsys, tiny_mixtral, tmp_path, window, stride):
    from klotski.tokenizer import Tokenizer

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    code = main(
        [
            "perplexity",
            "--model",
            str(tiny_mixtral),
            "--input",
            str(text_file),
            "--dtype",
            "float32",
            "--window",
            str(window),
            "--stride",
            str(stride),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    ids = Tokenizer.from_dir(tiny_mixtral).encode(TEXT)
    assert out["scored_tokens"] == len(ids) - 1 and out["windows"] == len(windows(len(ids), window, stride))
    expected = _reference_nll(tiny_mixtral, ids, window, stride)
    assert out["loss"] == pytest.approx(expected, abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)


def test_text_output_and_budgeted_run(capsys, tiny_mixtral, tmp_path):
    """Under a budget that offloads experts the figure is the same as all-resident."""
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    args = ["perplexity", "--model", str(tiny_mixtral), "--input", str(text_file), "--dtype", "float32", "--json"]
    assert main(args) == 0
    resident = json.loads(capsys.readouterr().out)
    assert main(args + ["--device-memory", "1MiB", "--offload-dir", str(tmp_path / "off")]) == 0
    offloaded = json.loads(capsys.readouterr().out)
    assert offloaded["loss"] == pytest.approx(resident["loss"], abs=1e-5)
    assert main(args[:-1]) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ") and "tok/s" in line


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "one.txt").write_text("a") and p / "one.txt", "at least 2"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00abc") and p / "bin.txt", "not UTF-8"),
    ],
)
def test_bad_input_is_a_clean_error(capsys, tiny_mixtral, tmp_path, make, words):
    code = main(["perplexity", "--model", str(tiny_mixtral), "--input", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and "klotski: error:" in err and words in err and "Traceback" not in err
