"""The profile by default: measured once per machine, shapes, dtype and disk, then cached; the
built-in estimate only when asked for, and then said to be uncalibrated."""

from __future__ import annotations

import json

import pytest
import torch

from klotski.errors import KlotskiError
from klotski.planner import api, profile
from klotski.planner.api import UNCALIBRATED, pick_profile
from tests.cli_helpers import assert_one_error, run_cli


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A KLOTSKI_HOME with no profiles in it (the session's holds the other tests' stubs)."""
    home = tmp_path / "home"
    monkeypatch.setenv("KLOTSKI_HOME", str(home))
    return home


@pytest.fixture
def counted(monkeypatch):
    """Count the automatic measurements (each still returns the stub's built-in figures)."""
    calls = []
    stub = api.measure_quick

    def counting(*args):
        calls.append(args)
        return stub(*args)

    monkeypatch.setattr(api, "measure_quick", counting)
    return calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from klotski.commands.create_model import create_model

    return create_model(tmp_path_factory.mktemp("auto-profile"), "mixtral", "tiny", layers=2, dtype="bfloat16")


@pytest.mark.real_timing
def test_the_first_plan_measures_a_quick_profile_and_caches_it(tiny_shape, fresh_home, monkeypatch, capsys):
    from klotski.planner import measure

    calls = []
    real = measure.measure_profile
    monkeypatch.setattr(measure, "measure_profile", lambda *a, **k: calls.append(a) or real(*a, **k))

    first, source = pick_profile(tiny_shape, torch.bfloat16, "cpu")
    err = capsys.readouterr().err
    assert len(calls) == 1 and calls[0][3] is measure.QUICK
    assert first.source == "measured" and first.calibrated and first.disk_gbps > 0
    assert {"expert", "gate", "attention", "head"} <= set(first.fits(tiny_shape.shape_key(), torch.bfloat16))
    assert first.compute_slowdown_under_io >= 1.0 and first.disk_gbps_beside_compute
    assert first.machine == profile.machine_fingerprint()
    path = source.removeprefix("measured now: ")
    (line,) = err.splitlines()  # one line on stderr, naming what was measured and where it went
    assert line.startswith("klotski: no profile for this machine; measured one in ") and f"cached at {path}" in line
    assert "GB/s" in line and "expert 16 tokens" in line and "klotski profile --force" in line
    assert json.loads(open(path).read())["source"] == "measured"

    again, source = pick_profile(tiny_shape, torch.bfloat16, "cpu")
    assert len(calls) == 1 and source == f"cached: {path}" and again.ops == first.ops
    assert capsys.readouterr().err == ""
    assert not list(fresh_home.rglob("klotski-profile-*"))  # the scratch file is gone


def test_a_budgeted_engine_measures_once_and_reports_the_prediction_error(model, fresh_home, counted, tmp_path):
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    llm = LLM(str(model), offload_dir=str(tmp_path / "off"), device_memory="600KB", batch_size=2)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for _ in range(2):
        llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}] * 4, params)
    assert len(counted) == 1  # at load; both runs' plans read the cache
    stats = llm.last_stats
    predicted = stats["predicted_tokens_per_s"]
    assert predicted > 0 and stats["planner"]["predicted_tokens_per_s"] == predicted
    assert stats["prediction_error"] == pytest.approx(stats["tokens_per_s"] / predicted - 1)
    assert stats["prediction_profile"].startswith("cached: ") and stats["planner"]["predicted_prefill_s"] > 0
    # The disk measured is the offload dir's.
    assert counted[0][3] == str(tmp_path / "off")


def test_builtin_says_uncalibrated_in_the_run_stats(model, fresh_home, counted, tmp_path):
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    llm = LLM(str(model), offload_dir=str(tmp_path / "off"), device_memory="600KB", batch_size=2, hardware="builtin")
    llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}] * 2, SamplingParams(max_tokens=2, ignore_eos=True))
    stats = llm.last_stats
    assert not counted and stats["prediction_profile"] == UNCALIBRATED
    assert stats["planner"]["profile"]["calibrated"] is False and "prediction_error" in stats


def test_unbudgeted_runs_have_no_prediction(model, counted):
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    llm = LLM(str(model))
    llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=1))
    assert not counted and "prediction_error" not in llm.last_stats


def test_the_fingerprint_follows_cpu_flags_and_the_disk(tiny_shape, monkeypatch, tmp_path):
    base = profile.cache_path(tiny_shape.shape_key(), torch.bfloat16, "cpu", tmp_path)
    flags = profile.cpu_flags()
    other = [f for f in flags if f != "amx_bf16"] if "amx_bf16" in flags else [*flags, "amx_bf16"]
    monkeypatch.setattr(profile, "cpu_flags", lambda cpuinfo=None: other)
    assert profile.cache_path(tiny_shape.shape_key(), torch.bfloat16, "cpu", tmp_path) != base
    monkeypatch.setattr(profile, "cpu_flags", lambda cpuinfo=None: flags)
    assert profile.cache_path(tiny_shape.shape_key(), torch.bfloat16, "cpu", tmp_path) == base
    monkeypatch.setattr(profile, "_st_dev", lambda path: 0xFE01)  # another disk under the offload dir
    assert profile.cache_path(tiny_shape.shape_key(), torch.bfloat16, "cpu", tmp_path) != base


def test_the_fingerprint_reads_flags_and_mounts(monkeypatch, tmp_path):
    cpuinfo = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f amx_tile something\n"
    mounts = f"rootfs / rootfs rw 0 0\n/dev/nvme0n1p2 {tmp_path} ext4 rw 0 0\n"
    monkeypatch.setattr(profile, "_read_text", lambda p: {"/proc/cpuinfo": cpuinfo, "/proc/mounts": mounts}.get(p, ""))
    fp = profile.machine_fingerprint(tmp_path / "not-made-yet" / "off")
    assert fp["cpu_flags"] == ["avx2", "fma", "avx512f", "amx_tile"]
    assert fp["disk"]["source"] == "/dev/nvme0n1p2" and fp["disk"]["fstype"] == "ext4"
    assert fp["disk"]["mount_point"] == str(tmp_path) and ":" in fp["disk"]["st_dev"]
    assert fp["torch_threads"] == torch.get_num_threads() and fp["cores"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    from klotski.models.presets import preset_config

    path = tmp_path_factory.mktemp("config-only")
    (path / "config.json").write_text(json.dumps(preset_config("mixtral", "tiny", 3) | {"torch_dtype": "bfloat16"}))
    return path


PLAN = ("--device-memory", "1MB", "--prompt-len", "16", "--gen-len", "4", "--num-prompts", "8")


def test_plan_builtin_says_uncalibrated_in_text_and_json(config_dir, capsys, counted):
    code, out, _ = run_cli(capsys, "plan", "--model", str(config_dir), *PLAN, "--hardware", "builtin")
    assert code == 0 and "uncalibrated: the built-in roofline estimate" in out
    code, out, _ = run_cli(capsys, "plan", "--model", str(config_dir), *PLAN, "--hardware", "builtin", "--json")
    p = json.loads(out)["profile"]
    assert code == 0 and p["from"] == UNCALIBRATED and p["calibrated"] is False and not counted


def test_plan_auto_measures_once_then_reads_the_cache(config_dir, capsys, counted, fresh_home):
    code, out, err = run_cli(capsys, "plan", "--model", str(config_dir), *PLAN, "--json")
    assert code == 0 and json.loads(out)["profile"]["from"].startswith("measured now: ")
    assert "klotski: no profile for this machine" in err
    code, out, err = run_cli(capsys, "plan", "--model", str(config_dir), *PLAN, "--json")
    assert code == 0 and json.loads(out)["profile"]["from"].startswith("cached: ") and len(counted) == 1
    assert "uncalibrated" not in run_cli(capsys, "plan", "--model", str(config_dir), *PLAN)[1]


def test_plan_takes_a_profile_file(config_dir, capsys, tmp_path):
    path = tmp_path / "p.json"
    profile.builtin_estimate("cpu", torch.bfloat16).save(path)
    code, out, _ = run_cli(capsys, "plan", "--model", str(config_dir), *PLAN, "--hardware", str(path), "--json")
    assert code == 0 and json.loads(out)["profile"]["from"] == str(path)


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_a_bad_hardware_value_is_one_line_exit_2(command, config_dir, tiny_mixtral, capsys):
    model = config_dir if command == "plan" else tiny_mixtral
    argv = [command, "--model", str(model), "--device-memory", "1MB", "--hardware", "env3"]
    code, _, err = run_cli(capsys, *(argv + (["--prompt", "hi"] if command == "generate" else [])))
    assert_one_error(code, err, "'env3'", "auto", "builtin", "env1", "env2", "JSON")


def test_llm_rejects_a_bad_hardware_value(tiny_mixtral):
    from klotski.engine import LLM

    with pytest.raises(KlotskiError, match="builtin"):
        LLM(str(tiny_mixtral), hardware="nope")
