"""Property tests (hypothesis): for any input, SamplingParams, size strings and the config /
checkpoint loaders give a valid object or their documented error, never another exception."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from klotski.checkpoint.reader import load_config, read_header
from klotski.config import format_bytes, parse_bytes
from klotski.errors import CheckpointError, KlotskiError, ParameterError
from klotski.models import spec_from_config
from klotski.models.presets import preset_config
from klotski.sampling import Sampler, SamplingParams, make_generator

FAST = settings(
    max_examples=int(os.environ.get("KLOTSKI_HYPOTHESIS_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FILES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Anything a JSON body or a Python caller could hand over.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=2),
    st.text(max_size=8),
    st.binary(max_size=4),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=4), scalars, max_size=3))

FIELDS = [
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
]


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), st.integers(min_value=1, max_value=600))
@example({"n": 1, "top_p": 1.76e-55}, 1)  # below fp32's range: the nucleus once dropped every token (NaN draw)
def test_sampling_params_valid_or_parameter_error(kwargs, vocab):
    try:
        p = SamplingParams(**kwargs)
        p.validate(vocab)
    except ParameterError as exc:
        assert exc.field in FIELDS and str(exc).startswith("SamplingParams: ")
        return
    # A valid object: exact types and ranges the sampler relies on.
    assert type(p.max_tokens) is int and p.max_tokens >= 1 and 0 <= p.min_tokens <= p.max_tokens
    assert type(p.temperature) is float and math.isfinite(p.temperature) and p.temperature >= 0
    assert 0 < p.top_p <= 1 and 0 <= p.min_p <= 1 and type(p.top_k) is int and p.top_k >= -1
    assert p.seed is None or (type(p.seed) is int and 0 <= p.seed < 2**64)
    assert p.logprobs is None or (type(p.logprobs) is int and 0 <= p.logprobs <= vocab)
    assert all(type(t) is int and 0 <= t < vocab for t in p.stop_token_ids)
    assert all(isinstance(s, str) and s for s in p.stop)
    for flag in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        assert type(getattr(p, flag)) is bool
    # ... and the sampler takes it: a token id inside the vocabulary, logprobs when asked.
    logits = torch.randn(1, vocab)
    result = Sampler().sample(logits, [p], [make_generator(p.seed, 0)])
    assert 0 <= int(result.token_ids[0]) < vocab
    assert (result.logprobs[0] is None) == (p.logprobs is None)


@FAST
@given(
    st.one_of(
        st.text(max_size=20),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.from_regex(r"\s*[0-9]{0,30}\.?[0-9]{0,5}\s*[kKmMgGtT]?i?[bB]?\s*", fullmatch=True),
    )
)
def test_parse_bytes_valid_or_klotski_error(value):
    try:
        n = parse_bytes(value)
    except KlotskiError:
        return
    assert n is None if value is None else (type(n) is int and 0 <= n < 2**63)


@FAST
@given(st.integers(min_value=0, max_value=2**32), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "kb", "GB"]))
def test_parse_bytes_reads_what_format_writes(n, unit):
    scale = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kb": 10**3, "GB": 10**9}[unit]
    assert parse_bytes(f"{n}{unit}") == n * scale
    text = format_bytes(n)
    number, shown = text.split()
    assert not number.startswith("0.00") or n == 0
    assert abs(parse_bytes(f"{number}{shown}") - n) <= max(0.01 * n, 1)


# -- config.json: any edit of a good config gives a spec or a KlotskiError -------------------------------------
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"]


@st.composite
def edited_configs(draw):
    config = preset_config(draw(st.sampled_from(FAMILIES)))
    keys = sorted(config) + ["rope_scaling", "head_dim", "eos_token_id", "n_group", "topk_group", "clip_qkv"]
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = draw(values)
    return config


@FAST
@given(edited_configs())
def test_config_gives_a_spec_or_a_klotski_error(config):
    try:
        spec = spec_from_config(config)
    except KlotskiError:
        return
    assert 1 <= spec.top_k <= spec.num_experts and spec.num_layers >= 1
    assert spec.attention.num_heads % spec.attention.num_kv_heads == 0
    for key in spec.weight_keys()[:8]:  # the shapes the reader checks weights against are computable
        assert all(all(type(d) is int and d >= 0 for d in shape) for shape in spec.unit_shapes(key).values())


@FILES
@given(st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v, default=repr).encode(), values)))
def test_config_file_gives_a_dict_or_a_checkpoint_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(raw)
        try:
            config = load_config(Path(tmp))
        except CheckpointError:
            return
        assert isinstance(config, dict)


@st.composite
def safetensors_bytes(draw):
    """Mostly well-formed headers with damaged entries, sometimes garbage."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    entry = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.one_of(st.sampled_from(["F32", "BF16", "F16", "I8", "F8_E4M3", "Q4"]), values),
            "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=9), max_size=3), values),
            "data_offsets": st.one_of(
                st.lists(st.integers(min_value=-4, max_value=400), min_size=2, max_size=2), values
            ),
        },
    )
    header = draw(st.dictionaries(st.text(max_size=6), st.one_of(entry, values), max_size=3))
    raw = json.dumps(header, default=repr).encode()
    length = draw(st.one_of(st.just(len(raw)), st.integers(min_value=0, max_value=2**64 - 1)))
    return struct.pack("<Q", length) + raw + draw(st.binary(max_size=300))


@FILES
@given(safetensors_bytes())
def test_safetensors_header_gives_refs_or_a_checkpoint_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.safetensors"
        file.write_bytes(raw)
        try:
            refs = read_header(file)
        except CheckpointError:
            return
        size = file.stat().st_size
        for ref in refs.values():
            assert 0 <= ref.offset and ref.offset + ref.nbytes <= size
            assert ref.nbytes == math.prod(ref.shape) * ref.dtype.itemsize


@pytest.mark.parametrize("raw", [b"", b"\x00" * 7, struct.pack("<Q", 2) + b"{}"])
def test_header_edge_cases(tmp_path, raw):
    file = tmp_path / "model.safetensors"
    file.write_bytes(raw)
    try:
        assert read_header(file) == {}
    except CheckpointError:
        pass
