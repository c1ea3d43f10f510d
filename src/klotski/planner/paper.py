"""The paper's ablation ladder (Table 3) reproduced on paper: simulated on the Env 1 / Env 2 profiles.

Each column plans the full Klotski schedule (bs from 16/32/64, n up to 16 as the paper's n = 15,
KV cache in host memory as the paper keeps it), then plays every rung of the ladder through the
real pipeline on the simulated backend with the same bs and n (one batch for the simple pipeline),
each rung placed for its own in-flight needs, routing sampled from the authors' correlation tables.
"""

from __future__ import annotations

import torch

from klotski.planner.api import make_plan
from klotski.planner.profile import load_profile
from klotski.planner.shapes import shape_from_preset
from klotski.planner.solver import Budgets, Workload
from klotski.prefetch.table import bundled_table

COLUMNS = (
    ("Env1 8x7B", "env1", "mixtral-8x7b"),
    ("Env1 8x22B", "env1", "mixtral-8x22b"),
    ("Env2 8x22B", "env2", "mixtral-8x22b"),
)
# (label, schedule, multi-batch) bottom to top, and the paper's tok/s per column.
RUNGS = (
    ("simple pipeline (one batch, prefetch whole next layer)", "overlap", False, (5.721, 0.01, 1.149)),
    ("+ multi-batch", "multibatch", True, (18.24, 0.97, 34.07)),
    ("+ prefetch only gate and hot experts", "hot", True, (19.074, 1.127, 44.17)),
    ("+ reorder expert computation (= Klotski)", "klotski", True, (22.414, 1.325, 52.85)),
)
HQQ = ("Klotski + HQQ 4-bit", (22.604, 1.366, 53.125))
WORK = Workload(prompt_len=512, gen_len=32)


def ladder(env: str, preset: str) -> tuple[list[tuple[str, float, float]], str]:
    """[(rung, simulated tok/s, bubble ratio)] for one column, and the Klotski plan's summary."""
    profile, shape = load_profile(env), shape_from_preset(preset)
    budgets = Budgets(profile.device_memory, profile.host_memory)
    table = bundled_table(preset)
    common = dict(profile_from=env, table=table, kv_tier="host")
    best = make_plan(
        shape,
        profile,
        budgets,
        WORK,
        torch.bfloat16,
        batch_sizes=(16, 32, 64),
        max_batches=16,
        run_simulation=False,
        **common,
    )
    bs, n = best.plan.policy.batch_size, best.plan.policy.num_batches
    rows = []
    for label, schedule, multi, _ in RUNGS:
        nb = n if multi else 1
        work = Workload(WORK.prompt_len, WORK.gen_len, bs * nb)
        r = make_plan(
            shape, profile, budgets, work, torch.bfloat16, schedule=schedule, batch_size=bs, num_batches=nb, **common
        )
        rows.append((label, r.sim.tokens_per_s, r.sim.summary["bubble_ratio"]))
    m = best.plan.memory
    note = (
        f"bs {bs}, n {n}; weights device {m.weights['device'] / 2**30:.1f} / host {m.weights['host'] / 2**30:.1f} "
        f"/ disk {m.weights['disk'] / 2**30:.1f} GiB; KV {m.kv_cache / 2**30:.1f} GiB on host"
    )
    return rows, note


def paper_table() -> str:
    """The ladder per column next to the paper's Table 3, as Markdown."""
    columns = [ladder(env, preset) for _, env, preset in COLUMNS]
    head = " | ".join(f"{name} sim (bubble) | paper" for name, _, _ in COLUMNS)
    lines = [f"| step | {head} |", "|---|" + "---|---|" * len(COLUMNS)]
    for i, (label, _, _, paper) in enumerate(RUNGS):
        cells = " | ".join(
            f"{columns[c][0][i][1]:.3f} ({columns[c][0][i][2]:.2f}) | {paper[c]}" for c in range(len(COLUMNS))
        )
        lines.append(f"| {label} | {cells} |")
    lines.append(f"| {HQQ[0]} | " + " | ".join(f"not built | {v}" for v in HQQ[1]) + " |")
    lines.append("")
    lines += [f"- {name}: {columns[c][1]}" for c, (name, _, _) in enumerate(COLUMNS)]
    return "\n".join(lines)
