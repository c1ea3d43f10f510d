"""The harness's arithmetic: lower bound, aggregation over repeats, the done-when verdicts."""

from __future__ import annotations

from benchmarks import report, run
from benchmarks.workload import Workload, prompt_token_ids

SPEC = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 2,
    "vocab_size": 32000,
}


def test_prompts_are_deterministic_and_avoid_special_ids():
    assert prompt_token_ids(3, 16, 32000) == prompt_token_ids(3, 16, 32000) != prompt_token_ids(4, 16, 32000)
    assert min(prompt_token_ids(0, 1000, 100)) >= 3


def test_the_bound_never_assumes_a_disk_slower_than_a_run_read():
    ctx = run.Context(
        None,
        None,
        None,
        cap=3 << 30,
        device_budget=2 << 30,
        klotski_budget=2 << 30,
        spec=SPEC,
        weights_bytes=6_000_000_000,
        machine={"disk_gbps": 1.0, "matmul_gflops_float32": {"64": 10.0}, "matmul_gflops_bfloat16": {"64": 1e6}},
    )
    work = Workload("w", 4, 8, 2, "")
    rows = [
        run._score(
            ctx, {"workload": "w", "tokens_per_s": 1.0, "wall_s": 10.0, "forward_steps": 2, "bytes_read": 30e9}, work
        )
    ]
    assert rows[0]["io_efficiency"] == 3.0  # read 3 GB/s against a measured 1 GB/s: the measurement was low
    run.rebound_on_achieved(ctx, rows, {"w": work})
    assert ctx.machine["disk_gbps"] == 3.0 and ctx.machine["disk_gbps_measured"] == 1.0
    assert rows[0]["io_efficiency"] == 1.0
    assert rows[0]["bound_s"] == run.lower_bound(ctx, work, 2)["bound_s"]  # rescored at the new rate
    assert rows[0]["efficiency"] == rows[0]["bound_s"] / 10.0
    slower = [{"workload": "w", "tokens_per_s": 1.0, "wall_s": 100.0, "forward_steps": 2, "bytes_read": 30e9}]
    run.rebound_on_achieved(ctx, slower, {"w": work})  # a slower run leaves the rate alone
    assert ctx.machine["disk_gbps"] == 3.0


def test_lower_bound_is_the_larger_of_io_and_compute():
    ctx = run.Context(
        None,
        None,
        None,
        cap=3 << 30,
        device_budget=1 << 30,
        klotski_budget=1 << 30,
        spec=SPEC,
        weights_bytes=6_000_000_000,
        machine={"disk_gbps": 1.0, "matmul_gflops_float32": {"64": 10.0}, "matmul_gflops_bfloat16": {"64": 100.0}},
    )
    work = Workload("w", 4, 8, 2, "")
    b = run.lower_bound(ctx, work, steps=2)
    assert b["bytes_must_read"] == 2 * (6_000_000_000 - (3 << 30))
    assert abs(b["bound_io_s"] - b["bytes_must_read"] / 1e9) < 1e-9
    assert abs(b["bound_compute_s"] - run.flops(SPEC, work) / 100e9) < 1e-9
    assert b["bound_s"] == max(b["bound_io_s"], b["bound_compute_s"])


def _run(schedule, tps, engine="klotski", n=4, replay=True, eff=0.9):
    return {
        "workload": "w",
        "engine": engine,
        "schedule": schedule,
        "routing_replay": "t" if replay else None,
        "batch_size": 8,
        "num_batches": n,
        "tokens_per_s": tps,
        "efficiency": eff,
        "load_avg": (1.0, 1.0, 1.0),
    }


def test_verdicts_read_medians_and_ranges():
    runs = [
        _run("sequential", 1.0, n=1),
        _run("overlap", 2.0, n=1),
        _run("multibatch", 3.0),
        _run("hot", 3.5),
        _run("klotski", 4.0),
        _run("klotski", 5.0),
        _run("x", 1.0, engine="hf-accelerate", n=1, replay=False),
    ]
    rows = report.aggregate(runs)
    kl = next(r for r in rows if r["schedule"] == "klotski")
    assert kl["tokens_per_s"][0] == 4.0 and kl["tokens_per_s"][2] == 5.0 and kl["runs"] == 2
    text = "\n".join(report.verdicts(rows))
    assert "monotonic" in text and "NOT" not in text.split("\n")[0]
    assert "meets 3x" in text
