"""llama.cpp's `llama-batched-bench`: the command for one batch size and its table, parsed.

Its table reports, per (PP, TG, B): prefill time T_PP, decode time T_TG and total T. Its own
"S t/s" counts prompt tokens too; the metric here is generated tokens / total time (B * TG / T),
the same one klotski reports, with its decode-only rate (S_TG = B * TG / T_TG) beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")


@dataclass(frozen=True, slots=True)
class BatchedBenchRow:
    """One row of llama-batched-bench's table: B sequences of PP prompt and TG generated tokens."""

    prompt_len: int
    gen_len: int
    batch_size: int
    prefill_s: float
    decode_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens / (prefill + decode) time."""
        return self.batch_size * self.gen_len / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens / decode time (llama-batched-bench's S_TG)."""
        return self.batch_size * self.gen_len / self.decode_s


def parse_batched_bench(text: str) -> list[BatchedBenchRow]:
    """The rows of llama-batched-bench's markdown table in `text` (log lines around it are ignored)."""
    rows, header = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if tuple(cells) == _COLUMNS:
            header = cells
        elif header and len(cells) == len(header) and cells[0].isdigit():
            v = dict(zip(header, cells))
            rows.append(
                BatchedBenchRow(
                    int(v["PP"]), int(v["TG"]), int(v["B"]), float(v["T_PP s"]), float(v["T_TG s"]), float(v["T s"])
                )
            )
    return rows


def batched_bench_cmd(
    binary: Path, gguf: Path, prompt_len: int, gen_len: int, batch_size: int, threads: int = 2
) -> list[str]:
    """One batch size per process, so peak RSS and bytes read belong to that row alone.

    The context holds exactly the batch's tokens; weights are memory-mapped (llama.cpp's default),
    which is how llama.cpp runs a model larger than RAM.
    """
    n_kv = batch_size * (prompt_len + gen_len)
    return [
        str(binary),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(n_kv),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(prompt_len),
        "-ntg",
        str(gen_len),
        "-npl",
        str(batch_size),
    ]
