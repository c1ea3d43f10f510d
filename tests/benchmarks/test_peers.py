"""The llama.cpp peer's pure-Python part: its table parsed, the metric it is scored on."""
from benchmarks.peers.llama_cpp import batched_bench_cmd, parse_batched_bench

TABLE = """
main: n_kv_max = 6144, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |     16 |   32 |   1536 |   40.000 |    25.60 |   40.000 |    12.80 |   80.000 |    19.20 |

llama_perf_context_print:        load time =    1234.56 ms
"""


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

