"""Where torch's CPU kernels round a row differently with the rows beside it, and what klotski's
way around it costs (docs/offloading.md, "Results independent of the batch").

    python -m benchmarks.batch_invariance [--threads 2]

Prints, per dtype and weight shape, the row counts at which F.linear's rows differ from the same
rows computed among 1100, with and without layers/linear.py's padding; then at which batch sizes a
decode row of F.scaled_dot_product_attention differs from the same row among 64, against
layers/attention.py's written-out decode attention, and the time of each.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from klotski.layers import linear as lin
from klotski.layers.attention import decode_attention
from klotski.runtime.compute_dtype import best_time, cpu_flags, cpu_name

ROWS = [*range(1, 17), 31, 32, 33, 100, 1000]
SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (256, 128)]


def _rows_that_differ(fn, x: torch.Tensor, w: torch.Tensor) -> list[int]:
    every = fn(x, w)
    return [m for m in ROWS if not torch.equal(fn(x[:m], w), every[:m])] + [
        f"alone:{r}" for r in range(16) if not torch.equal(fn(x[r : r + 1], w), every[r : r + 1])
    ]


def _ms(fn) -> float:
    return best_time(fn, 5) * 1e3


def _decode_inputs(rows, heads, kv_heads, dim, length, dtype, g):
    q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v, torch.ones(rows, 1, 1, length, dtype=torch.bool)


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _written_out(q, k, v, mask):
    return decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, flags {' '.join(cpu_flags())}, torch {torch.__version__}, {args.threads} threads")
    g = torch.Generator().manual_seed(0)
    print("## linear: row counts whose rows differ from the same rows among 1100")
    for dtype in (torch.bfloat16, torch.float32):
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f, generator=g).to(dtype)
            x = torch.randn(1100, in_f, generator=g).to(dtype)
            plain = _rows_that_differ(F.linear, x, w)
            padded = _rows_that_differ(lin.linear, x, w)
            times = [_ms(lambda f=f, m=m, x=x, w=w: f(x[:m], w)) for f in (F.linear, lin.linear) for m in (1, 3)]
            print(
                f"{str(dtype)[6:]:8s} {out_f}x{in_f}: F.linear {plain or 'none'}; padded {padded or 'none'};"
                f" ms at 1 / 3 rows: F.linear {times[0]:.2f} / {times[1]:.2f}, padded {times[2]:.2f} / {times[3]:.2f}"
            )
    print("## decode attention: batch sizes whose rows differ from the same rows among 64")
    for dtype in (torch.bfloat16, torch.float32):
        for heads, kv_heads, dim, length in [(32, 8, 128, 100), (16, 16, 64, 100)]:
            q, k, v, mask = _decode_inputs(64, heads, kv_heads, dim, length, dtype, g)
            found = {}
            for name, fn in (("sdpa", _sdpa), ("written out", _written_out)):
                every = fn(q, k, v, mask)
                found[name] = [
                    b for b in (1, 2, 3, 4, 5, 8, 16) if not torch.equal(fn(q[:b], k[:b], v[:b], mask[:b]), every[:b])
                ] or "none"
            print(f"{str(dtype)[6:]:8s} H {heads} Hkv {kv_heads} d {dim} L {length}: {found}")
    print("## decode attention, Mixtral's heads (32 over 8 kv heads, d 128): ms per call, SDPA / written out")
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 8, 64):
            cells = []
            for length in (128, 512, 2048):
                args = _decode_inputs(rows, 32, 8, 128, length, dtype, g)
                a, b = _ms(lambda args=args: _sdpa(*args)), _ms(lambda args=args: _written_out(*args))
                cells.append(f"L {length}: {a:.2f} / {b:.2f} ({a / b:.1f}x)")
            print(f"{str(dtype)[6:]:8s} {rows:2d} rows: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
