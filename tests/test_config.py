"""EngineConfig is the one declaration of the engine's options: LLM's keyword arguments and the
command line's engine flags both come from it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from klotski import LLM
from klotski.cli import build_parser
from klotski.commands.generate import engine_kwargs
from klotski.config import EngineConfig
from klotski.errors import KlotskiError


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def test_generate_has_a_flag_per_field_of_its_groups_with_the_fields_default():
    actions = {a.dest: a for a in _subparser("generate")._actions}
    flagged = [f for f, _ in EngineConfig.flags("budget", "engine", "policy", "dtype", "replay")]
    assert {f.name for f in flagged} >= {
        "device_memory",
        "host_memory",
        "offload_dir",
        "schedule",
        "batch_size",
        "num_batches",
        "num_hot",
        "prefetch_table",
        "dtype",
        "routing_replay",
    }
    for f in flagged:
        assert f.name in actions, f.name
        assert actions[f.name].option_strings == ["--" + f.name.replace("_", "-")]
        assert actions[f.name].default == f.default
        assert actions[f.name].help == f.metadata["flag"].help


def test_engine_flags_become_llm_options_of_the_same_names():
    args = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "x",
            "--device-memory",
            "2GiB",
            "--batch-size",
            "4",
            "--num-hot",
            "0",
            "--schedule",
            "hot",
        ]
    )
    kwargs = engine_kwargs(args)
    assert kwargs["device_memory"] == "2GiB" and kwargs["batch_size"] == 4 and kwargs["num_hot"] == 0
    config = EngineConfig.create(model="m", **kwargs)
    assert config.device_memory == 2 * 2**30 and config.schedule == "hot" and config.budgeted
    assert set(kwargs) <= {f.name for f in fields(EngineConfig)}


def test_every_flagged_field_is_some_commands_flag():
    dests = {a.dest for name in ("generate", "serve", "plan") for a in _subparser(name)._actions}
    assert {f.name for f in fields(EngineConfig) if "flag" in f.metadata} <= dests


def test_plan_shares_the_policy_and_budget_flags():
    actions = {a.dest: a for a in _subparser("plan")._actions}
    for name in ("device_memory", "host_memory", "schedule", "batch_size", "num_batches", "num_hot", "dtype"):
        assert actions[name].help == next(f for f in fields(EngineConfig) if f.name == name).metadata["flag"].help


def test_unknown_option_is_a_type_error_naming_the_options(tmp_path):
    with pytest.raises(TypeError, match="unknown engine option 'batchsize'.*batch_size"):
        LLM(str(tmp_path), batchsize=4)


def test_sizes_are_parsed_and_checked():
    assert EngineConfig.create(model="m", host_memory="1.5GB").host_memory == 1_500_000_000
    assert not EngineConfig.create(model="m").budgeted
    with pytest.raises(KlotskiError, match="cannot read device memory size 'lots'"):
        EngineConfig.create(model="m", device_memory="lots")
