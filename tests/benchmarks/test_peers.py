"""The llama.cpp peer's pure-Python part: its table parsed, the metric it is scored on, its bounds."""

import pytest

from benchmarks.peers.llama_cpp import batched_bench_cmd, parse_batched_bench

TABLE = """
main: n_kv_max = 6144, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |     16 |   32 |   1536 |   40.000 |    25.60 |   40.000 |    12.80 |   80.000 |    19.20 |

llama_perf_context_print:        load time =    1234.56 ms
"""

# The benchmark checkpoint's config.json fields must_read looks at (Mixtral-8x7B shapes, 2 layers).
MIXTRAL_2L = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "torch_dtype": "bfloat16",
}


def test_parse_batched_bench_reads_the_row_and_ignores_the_log():
    (row,) = parse_batched_bench(TABLE)
    assert (row.prompt_len, row.gen_len, row.batch_size) == (32, 16, 32)
    assert (row.prefill_s, row.decode_s, row.total_s) == (40.0, 40.0, 80.0)


def test_tokens_per_s_counts_generated_tokens_only():
    (row,) = parse_batched_bench(TABLE)
    assert row.tokens_per_s == 32 * 16 / 80.0  # not llama.cpp's S t/s, which counts prompts too
    assert row.decode_tokens_per_s == 32 * 16 / 40.0


def test_parse_without_a_table_is_empty():
    assert parse_batched_bench("error: unable to load model\n") == []


def test_command_sizes_the_context_to_the_batch():
    cmd = batched_bench_cmd("llama-batched-bench", "m.gguf", 32, 16, 8)
    assert cmd[cmd.index("-c") + 1] == str(8 * 48)
    assert cmd[cmd.index("-npl") + 1] == "8" and cmd[cmd.index("-t") + 1] == "2"


def test_bounds_use_the_fastest_disk_rate_a_klotski_run_showed():
    from argparse import Namespace

    from benchmarks.peers import run

    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    args = Namespace(prompt_len=4, gen_len=2, weights_bytes=10e9, cap=4e9)
    figures = {
        "disk_gbps_samples": [1.0, 1.5],
        "matmul_gflops_bfloat16": {"64": 1e3},
        "matmul_gflops_float32": {"64": 1e2},
    }
    runs = [
        {"engine": "llama.cpp", "sequences": 1, "bytes_read": 90e9, "wall_s": 10.0},  # load + warmup reads
        {"engine": "klotski", "sequences": 1, "bytes_read": 20e9, "wall_s": 10.0},
        {"engine": "klotski", "error": "rc=137"},
    ]
    run.rebound(runs, args, config, figures)
    assert figures["disk_gbps"] == 2.0 and figures["disk_rate_source"] == "achieved by a klotski run"
    forced = run.must_read(config, 10e9, 4e9, 1, 4, 2)
    assert runs[1]["bound_io_s"] == forced / 2e9 and runs[1]["io_efficiency"] == 1.0
    assert "bound_s" not in runs[2]
    runs[1]["bytes_read"] = 5e9  # slower than the measured samples: they stand
    run.rebound(runs, args, config, figures)
    assert figures["disk_gbps"] == 1.5 and figures["disk_rate_source"].startswith("measured")


def test_bytes_the_cap_forces_follow_the_experts_a_step_uses():
    from benchmarks.peers.run import must_read

    config = MIXTRAL_2L
    expert = 3 * 4096 * 14336 * 2
    weights, cap = 16 * expert + 0.7e9, 3 * 2**30
    # 128 sequences use every expert every step: the rig's bound, weights - cap a step.
    assert must_read(config, weights, cap, 128, 32, 16) == pytest.approx(16 * (weights - cap), rel=1e-6)
    # One sequence: its 31-token prefill uses nearly all; a decode step 2 of 8 per layer, 45% of them cachable.
    one = must_read(config, weights, cap, 1, 32, 16)
    decode = 2 * 8 * (1 - 0.75) * expert * (1 - (cap - 0.7e9) / (16 * expert))
    assert one == pytest.approx(must_read(config, weights, cap, 1, 32, 1) + 15 * decode)
    assert one < 0.4 * 16 * (weights - cap)
    assert must_read(config, weights, 100 * weights, 128, 32, 16) == 0  # everything fits: nothing is forced


def test_the_curve_takes_each_engines_fastest_run_and_the_ceiling_the_cap_allows():
    from argparse import Namespace

    from benchmarks.peers import run

    config = MIXTRAL_2L
    expert = 3 * 4096 * 14336 * 2
    args = Namespace(prompt_len=32, gen_len=16, weights_bytes=16 * expert + 0.7e9, cap=3 * 2**30)

    def row(engine, schedule, s, tps, read, bs=None, n=1):
        return {
            "engine": engine,
            "schedule": schedule,
            "sequences": s,
            "tokens_per_s": tps,
            "bytes_read": read,
            "batch_size": bs or s,
            "num_batches": n,
        }

    runs = [
        row("llama.cpp", "f16", 8, 2.0, 90e9),
        row("llama.cpp", "bf16", 8, 3.0, 80e9),  # the faster dtype is the one compared
        row("klotski", "klotski", 8, 4.5, 60e9),
        row("klotski", "klotski", 8, 5.0, 65e9),
        row("klotski", "klotski (planner)", 1, 9.0, 1e9),  # no llama.cpp run at 1: no row
        row("llama.cpp", "bf16", 256, 20.0, 170e9),
        row("klotski", "klotski", 256, 50.0, 80e9, bs=128, n=2),
        {"engine": "klotski", "schedule": "klotski", "sequences": 256, "error": "rc=137"},
        row("llama.cpp", "bf16", 32, 9.0, 110e9),  # klotski did not run at 32
    ]
    eight, thirty_two, big = run.curve(runs, args, config)
    assert eight["llama_cpp"] == {"dtype": "bf16", "tokens_per_s": 3.0}
    assert eight["klotski"]["tokens_per_s"] == 5.0 and eight["ratio"] == pytest.approx(5 / 3)
    assert eight["target"] == 2.0 and eight["met"] is False
    forced = run.must_read(config, args.weights_bytes, args.cap, 8, 32, 16)
    assert eight["bytes_must_read"] == forced and eight["ceiling"] == pytest.approx(80e9 / forced)
    assert thirty_two["klotski"] is None and thirty_two["ratio"] is None and thirty_two["met"] is None
    assert big["klotski"]["bs_x_n"] == "128x2" and big["met"] is True
    table = run.curve_markdown([eight, thirty_two, big])
    assert "| 8 | 3.00 (bf16) | 5.00 (8x1) | 1.67x | >= 2x (not met) |" in table
    assert "| 32 | 9.00 (bf16) | - | - |" in table


def test_runs_at_one_sequence_count_are_next_to_each_other_and_alternate_by_repeat(tmp_path):
    from argparse import Namespace

    from benchmarks.peers import run

    args = Namespace(
        llama_batch_sizes="1,8,256",
        klotski_grid="1x1,128x2,8x1,plan8",
        out=tmp_path / "latest.json",
        checkpoint=tmp_path,
        schedule="klotski",
    )
    models = {"f16": tmp_path / "f16.gguf", "bf16": tmp_path / "bf16.gguf"}
    first = [(s, label) for s, label, _ in run._jobs(args, tmp_path / "bench", models, {}, rep=0)]
    assert first == [
        (1, "llama.cpp f16"), (1, "llama.cpp bf16"), (1, "klotski 1x1"),
        (8, "llama.cpp f16"), (8, "llama.cpp bf16"), (8, "klotski 8x1"), (8, "klotski plan8"),
        (256, "llama.cpp f16"), (256, "llama.cpp bf16"), (256, "klotski 128x2"),
    ]  # fmt: skip
    second = [(s, label) for s, label, _ in run._jobs(args, tmp_path / "bench", models, {}, rep=1)]
    assert second[:3] == [(1, "klotski 1x1"), (1, "llama.cpp bf16"), (1, "llama.cpp f16")]
    assert sorted(second) == sorted(first)
