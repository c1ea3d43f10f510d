"""`klotski profile` (measure this machine) and `klotski plan` (the policy, before loading anything)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from klotski.commands.generate import add_config_flags, add_policy_flags
from klotski.config import parse_bytes
from klotski.errors import KlotskiError
from klotski.runtime.compute_dtype import resolve_dtype


def register(sub) -> None:
    _register_profile(sub)
    _register_plan(sub)


def _model_flags(p) -> None:
    p.add_argument("--model", help="checkpoint directory (only its config.json is read)")
    p.add_argument("--preset", help="a model's shapes by name instead, e.g. mixtral-8x7b, mixtral-8x22b")
    p.add_argument("--layers", type=int, help="with --preset: number of layers")
    add_config_flags(p, "dtype")


def _register_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure disk / host->device bandwidth and op times at a model's shapes")
    _model_flags(p)
    p.add_argument("--out", help="also write the profile to FILE (always cached under $KLOTSKI_HOME/profiles/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per op size (best of)")
    p.add_argument(
        "--disk-dir",
        "--offload-dir",
        dest="disk_dir",
        help="where the disk tier will be: the read test runs there, and the profile is cached for its "
        "filesystem (default: $KLOTSKI_HOME, where runs keep their offload dirs)",
    )
    p.add_argument("--disk-size", default="256MiB", help="size of the read-test file (at least two expert blobs)")
    p.add_argument("--force", action="store_true", help="measure again even if a cached profile exists")
    p.set_defaults(handler=run_profile)


def _register_plan(sub) -> None:
    p = sub.add_parser("plan", help="choose placement, bs, n and K and predict throughput (reads config.json only)")
    _model_flags(p)
    add_config_flags(p, "budget", "hardware")
    p.add_argument("--offload-dir", help="where the disk tier will be (the automatic profile reads its disk there)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, default=32, help="generated tokens per sequence")
    p.add_argument("--num-prompts", type=int, help="how many prompts (default: one batch group of the plan's size)")
    p.add_argument("--routing", help="correlation table for routing statistics (a file, mixtral-8x7b, mixtral-8x22b)")
    add_policy_flags(p)
    p.add_argument(
        "--kv-offload",
        action="store_true",
        help="plan the KV cache in host memory, as the paper does (the runtime keeps it on the device)",
    )
    p.add_argument("--trace", help="write the simulated timeline as Chrome trace JSON")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--paper-table", action="store_true", help="simulate the paper's ablation ladder (Table 3)")
    p.set_defaults(handler=run_plan)


# -- shared ------------------------------------------------------------------------------------
def _shape(args):
    from klotski.planner.shapes import shape_from_dir, shape_from_preset

    if bool(args.model) == bool(args.preset):
        raise KlotskiError("give exactly one of --model DIR or --preset NAME")
    return shape_from_dir(args.model) if args.model else shape_from_preset(args.preset, args.layers)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise KlotskiError(f"--device must be auto, cpu or cuda, got {name!r}")
    return name


# -- profile -------------------------------------------------------------------------------------
def run_profile(args) -> int:
    from klotski.planner.measure import FULL, measure_profile
    from klotski.planner.profile import cache_path, cached_profile

    shape, device = _shape(args), _device(args.device)
    dtype = resolve_dtype(args.dtype, shape.weight_dtype, torch.device(device))
    cached = None if args.force else cached_profile(shape.shape_key(), dtype, device, args.disk_dir)
    if cached is not None:
        profile, path = cached
        print(f"using the cached profile {path} (--force measures again)", file=sys.stderr)
    else:
        start = time.perf_counter()
        effort = dataclasses.replace(FULL, reps=args.reps, disk_bytes=parse_bytes(args.disk_size, "--disk-size") or 0)
        profile = measure_profile(shape, dtype, device, effort, args.disk_dir, log=lambda m: print(m, file=sys.stderr))
        path = cache_path(shape.shape_key(), dtype, device, args.disk_dir)
        profile.save(path)
        print(f"measured in {time.perf_counter() - start:.1f} s; cached at {path}", file=sys.stderr)
    if args.out:
        profile.save(args.out)
    print(json.dumps(profile.to_dict(), indent=2))
    return 0


# -- plan ---------------------------------------------------------------------------------------
def run_plan(args) -> int:
    if args.paper_table:
        from klotski.planner.paper import paper_table

        print(paper_table())
        return 0
    report = plan_from_args(args)
    if args.trace and report.sim is not None:
        report.sim.timeline.write_chrome_trace(args.trace)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_report(report))
    return 0


def plan_from_args(args):
    from klotski.config import check_hardware
    from klotski.planner.api import make_plan, pick_profile
    from klotski.planner.profile import load_profile
    from klotski.planner.solver import Budgets, Workload, compute_dtype
    from klotski.prefetch.table import find_model_table, load_table

    shape = _shape(args)
    hardware = check_hardware(args.hardware)
    # A what-if profile (env1, a file from another machine) plans for its own device.
    device = load_profile(hardware).device if hardware not in ("auto", "builtin") else _device("auto")
    dtype = (
        compute_dtype(shape, device)
        if args.dtype == "auto"
        else resolve_dtype(args.dtype, shape.weight_dtype, torch.device("cpu"))
    )
    # Without --offload-dir the disk is $KLOTSKI_HOME's, where runs keep their offload dirs by default.
    disk = args.offload_dir or _home_offload()
    profile, source = pick_profile(shape, dtype, device, hardware, disk)
    table = load_table(args.routing) if args.routing else (find_model_table(args.model) if args.model else None)
    host = parse_bytes(args.host_memory, "host memory")
    budgets = Budgets(parse_bytes(args.device_memory, "device memory"), host)
    work = Workload(args.prompt_len, args.gen_len, args.num_prompts)
    return make_plan(
        shape,
        profile,
        budgets,
        work,
        dtype,
        profile_from=source,
        table=table,
        schedule=args.schedule,
        kv_tier="host" if args.kv_offload else "device",
        batch_size=args.batch_size,
        num_batches=args.num_batches,
        num_hot=args.num_hot,
    )


def _home_offload():
    from klotski.paths import home

    return home() / "offload"


def format_report(report) -> str:
    """The plan for a human: policy, memory per tier, prediction, constraints."""
    d, gib = report.to_dict(), lambda b: f"{(b or 0) / 2**30:.2f} GiB"
    m, lines = d["memory"], []
    lines.append(
        f"policy: schedule {d['schedule']}, bs {d['batch_size']}, n {d['num_batches']} "
        f"(a group of {d['batch_size'] * d['num_batches']} sequences), K {d['num_hot']}"
    )
    lines.append(
        "placement: "
        + "; ".join(
            f"{kind} " + ", ".join(f"{t} {v['units']}" for t, v in tiers.items())
            for kind, tiers in d["placement"].items()
            if kind not in ("kv_cache", "expert_layers")
        )
    )
    lines.append(
        "  expert layers: "
        + ", ".join(f"{t} {r}" for t, r in d["placement"]["expert_layers"].items())
        + f"; KV cache on {m['kv_tier']}"
    )
    budget = d["budgets"]
    lines.append(
        f"memory: device peak {gib(m['device_peak'])} of {gib(budget['device']) if budget['device'] else 'unlimited'} "
        f"(weights {gib(m['weights']['device'])}, KV {gib(m['kv_cache'] * (m['kv_tier'] == 'device'))}, "
        f"in-flight {gib(m['inflight'])}, activations {gib(m['activations'])}); "
        f"host {gib(m['host_peak'])}; disk {gib(m['weights']['disk'])}"
    )
    if "predicted_tokens_per_s" in d:
        lines.append(
            f"predicted: {d['predicted_tokens_per_s']:.3f} tok/s; {d['predicted_wall_s']:.2f} s "
            f"(prefill {d['predicted_prefill_s']:.2f} s); bubble ratio {d['predicted_bubble_ratio']:.3f} "
            f"({d['predicted_bubble_s']:.2f} s of compute waiting; compute busy "
            f"{d['predicted_compute_busy_s']:.2f} s; I/O busy "
            + ", ".join(f"{k} {v:.2f} s" for k, v in d["predicted_io_busy_s_per_lane"].items())
            + ")"
        )
    slack = ", ".join(f"{k} {v * 1e3:+.2f} ms" for k, v in d["constraints_slack_s"].items())
    lines.append(f"constraints (slack at the worst MoE layer, decode): {slack}")
    lines.append(f"binding: {', '.join(d['binding_constraints']) or 'none'}")
    p = d["profile"]
    lines.append(
        f"profile: {p['name']} ({p['source']}; {p['from'] or 'given'}; op costs from {p['op_costs']}); "
        f"routing: {d['routing']}"
    )
    if p["source"] == "built-in estimate":
        lines.append(
            "uncalibrated: the built-in roofline estimate, not measured on this machine (it has predicted "
            "12x the measured tok/s); --hardware auto measures this machine"
        )
    return "\n".join(lines)
