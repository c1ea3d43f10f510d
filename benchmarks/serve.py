"""`klotski serve` under load vs the batch path on the same prompts (not a timed test).

C concurrent clients send the peers workload's prompts (benchmarks/workload.py: prompt_token_ids of
--prompt-len tokens, --gen-len new tokens, EOS ignored, greedy) as streaming /v1/completions requests,
each client taking the next prompt as soon as its previous one finished. Reported: the server's
throughput (generated tokens over the span from the first request sent to the last answer), the median
and p99 time to first token (request sent -> first streamed chunk) and end-to-end latency. Then the
same prompts go through the batch path in one process (`klotski run-batch` when this checkout has it,
and `klotski generate --input`), whose own generation throughput (load excluded, as the server's) is
the reference. Each engine process runs in its own memory cgroup with --cap (when one can be made).

    python -m benchmarks.serve --model DIR [--prompts 128] [--clients 64] [--cap 3] [--threads N] -- [engine flags]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import cgroup
from benchmarks.workload import Workload, prompt_token_ids, write_jsonl

GiB = 1 << 30
BIN = Path(sys.executable).parent


def _klotski() -> list[str]:
    exe = BIN / "klotski"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "klotski"]


def _popen_capped(cmd: list[str], cap: int | None, name: str, env: dict) -> tuple[subprocess.Popen, Path | None]:
    """A long-running child inside its own memory cgroup (benchmarks/cgroup.py's rule, for a server)."""
    group = None
    if cap is not None and cgroup.available() is None:
        group = cgroup.ROOT / f"klotski-bench-{name}-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap))
        (group / "memory.max_usage_in_bytes").write_text("0")

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen(
        cmd, env=env, preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ), group


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _client(
    http: httpx.AsyncClient, queue: asyncio.Queue, work: Workload, rows: list[dict], stream: bool
) -> None:
    while True:
        try:
            i, ids = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        body = {"model": "bench", "prompt": ids, "max_tokens": work.max_tokens, "temperature": 0, "ignore_eos": True}
        sent = time.perf_counter()
        first, tokens, text = None, 0, ""
        if not stream:
            r = await http.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text}")
            answer = r.json()
            rows.append(
                {
                    "prompt": i,
                    "sent": sent,
                    "first": None,
                    "done": time.perf_counter(),
                    "tokens": answer["usage"]["completion_tokens"],
                    "text": answer["choices"][0]["text"],
                }
            )
            continue
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if first is None:
                        first = time.perf_counter()
                    text += c["text"]
        rows.append(
            {"prompt": i, "sent": sent, "first": first, "done": time.perf_counter(), "tokens": tokens, "text": text}
        )


async def _load(url: str, work: Workload, vocab: int, clients: int, stream: bool) -> list[dict]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(work.num_prompts):
        queue.put_nowait((i, prompt_token_ids(i, work.prompt_len, vocab)))
    rows: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits) as http:
        await asyncio.gather(*(_client(http, queue, work, rows, stream) for _ in range(clients)))
    return rows


def _figures(metrics: str) -> dict[str, float]:
    """/metrics samples by name (labels kept in the name)."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("klotski_")
    }


def run_server(args, work: Workload, vocab: int, env: dict) -> dict:
    port = args.port
    cmd = [
        *_klotski(),
        "serve",
        "--model",
        str(args.model),
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-num-seqs",
        str(args.max_num_seqs or args.clients),
        "--log-level",
        "warning",
        *args.engine_flags,
    ]
    proc, group = _popen_capped(cmd, args.cap, "serve", env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"klotski serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("klotski serve did not become ready")
            time.sleep(0.5)
        # One short request first: the first reads of each blob verify its checksum, as a batch job's would.
        httpx.post(
            url + "/v1/completions", json={"model": "bench", "prompt": [5, 6, 7], "max_tokens": 1}, timeout=args.timeout
        )
        before = _figures(httpx.get(url + "/metrics", timeout=30).text)
        load = os.getloadavg()
        rows = asyncio.run(_load(url, work, vocab, args.clients, not args.no_stream))
        after = _figures(httpx.get(url + "/metrics", timeout=30).text)
        peak = int((group / "memory.max_usage_in_bytes").read_text()) if group is not None else None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if group is not None:
            cgroup._remove(group)
    start, end = min(r["sent"] for r in rows), max(r["done"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    ttft = [r["first"] - r["sent"] for r in rows if r["first"] is not None] or [float("nan")]
    e2e = [r["done"] - r["sent"] for r in rows]
    delta = {k: after[k] - before.get(k, 0.0) for k in after}  # the warm-up request left out
    return {
        "engine": "serve",
        "clients": args.clients,
        "stream": not args.no_stream,
        "requests": len(rows),
        "generated_tokens": tokens,
        "wall_s": end - start,
        "tokens_per_s": tokens / (end - start),
        "ttft_median_s": statistics.median(ttft),
        "ttft_p99_s": _percentile(ttft, 0.99),
        "e2e_median_s": statistics.median(e2e),
        "e2e_p99_s": _percentile(e2e, 0.99),
        "bubble_ratio": delta["klotski_bubble_seconds_total"] / delta["klotski_engine_step_seconds_total"],
        "steps": delta["klotski_engine_steps_total"],
        "engine_step_s": delta["klotski_engine_step_seconds_total"],
        "bytes_read": sum(v for k, v in delta.items() if k.startswith("klotski_bytes_read_total")),
        "load_avg": load,
        "peak_cgroup_bytes": peak,
        "exit_code_after_sigterm": rc,
        "texts": {r["prompt"]: r["text"] for r in rows},
    }


def run_generate(args, work: Workload, vocab: int, env: dict, tmp: Path) -> dict:
    prompts = write_jsonl(work, vocab, tmp / "prompts.jsonl")
    cmd = [
        *_klotski(),
        "generate",
        "--model",
        str(args.model),
        "--input",
        str(prompts),
        "--json",
        "--ignore-eos",
        "--max-tokens",
        str(work.max_tokens),
        *args.engine_flags,
    ]
    load = os.getloadavg()
    res = cgroup.run_capped(cmd, args.cap or 1 << 50, "generate", env=env, timeout=args.timeout)
    if res.returncode != 0:
        return {"engine": "generate", "error": res.stderr[-2000:]}
    out = json.loads(res.stdout)
    stats = out["stats"]
    return {
        "engine": "generate",
        "requests": stats["requests"],
        "generated_tokens": stats["generated_tokens"],
        "wall_s": stats["wall_s"],
        "tokens_per_s": stats["tokens_per_s"],
        "bubble_ratio": stats["bubble_ratio"],
        "steps": stats.get("forward_steps"),
        "bytes_read": sum(stats["bytes_read"].values()),
        "policy": stats["policy"],
        "load_avg": load,
        "peak_cgroup_bytes": res.peak_bytes,
        "texts": {int(o["id"]): o["text"] for o in out["outputs"]},
    }


def run_batch(args, work: Workload, vocab: int, env: dict, tmp: Path) -> dict | None:
    """`klotski run-batch` on the same prompts, when this checkout has it: throughput over the wall its
    summary reports (from after the model loaded, as for the other two)."""
    probe = subprocess.run([*_klotski(), "run-batch", "--help"], capture_output=True, text=True, env=env, check=False)
    if probe.returncode != 0:
        return None
    lines = tmp / "batch.jsonl"
    with open(lines, "w") as f:
        for i in range(work.num_prompts):
            body = {
                "model": "bench",
                "prompt": prompt_token_ids(i, work.prompt_len, vocab),
                "max_tokens": work.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            f.write(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    out = tmp / "batch-out.jsonl"
    cmd = [
        *_klotski(),
        "run-batch",
        "-i",
        str(lines),
        "-o",
        str(out),
        "--model",
        str(args.model),
        "--no-progress",
        *args.engine_flags,
    ]
    load = os.getloadavg()
    res = cgroup.run_capped(cmd, args.cap or 1 << 50, "run-batch", env=env, timeout=args.timeout)
    if res.returncode != 0:
        return {"engine": "run-batch", "error": res.stderr[-2000:]}
    texts, tokens = {}, 0
    for line in out.read_text().splitlines():
        row = json.loads(line)
        body = row["response"]["body"]
        texts[int(row["custom_id"])] = body["choices"][0]["text"]
        tokens += body["usage"]["completion_tokens"]
    # Its summary line: "... N tokens generated in W s = R tok/s; ..." (the wall after the model loaded).
    rate = re.search(r"tokens generated in ([\d.]+) s = ([\d.]+) tok/s", res.stdout + res.stderr)
    row = {
        "engine": "run-batch",
        "requests": len(texts),
        "generated_tokens": tokens,
        "process_wall_s": res.seconds,
        "load_avg": load,
        "peak_cgroup_bytes": res.peak_bytes,
        "texts": texts,
    }
    if rate is not None:
        row |= {"wall_s": float(rate[1]), "tokens_per_s": tokens / float(rate[1])}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--cap", type=lambda s: int(float(s) * GiB), default=None, help="memory cgroup cap, GiB")
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument(
        "--max-num-seqs",
        type=int,
        help="the server plans its group for this many sequences "
        "(default: --clients, the most that can be in flight; the batch path plans for --prompts)",
    )
    p.add_argument("--no-stream", action="store_true", help="whole responses (no time to first token)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every engine process")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("engine_flags", nargs="*", help="after --: flags for both serve and generate")
    args = p.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text())
    vocab = config["vocab_size"]
    work = Workload("peers", args.prompts, args.prompt_len, args.gen_len, "the llama.cpp comparison's shape")
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_server(args, work, vocab, env), run_generate(args, work, vocab, env, Path(tmp))]
        batch = run_batch(args, work, vocab, env, Path(tmp))
        if batch is not None:
            rows.append(batch)
    served = rows[0]
    for row in rows[1:]:
        texts = row.pop("texts", None)
        if texts is not None:
            row["same_texts_as_server"] = texts == served["texts"]
        if "tokens_per_s" in row:
            row["server_ratio"] = served["tokens_per_s"] / row["tokens_per_s"]
    served.pop("texts")
    result = {
        "command": " ".join(sys.argv),
        "workload": work.to_dict(),
        "model": str(args.model),
        "engine_flags": args.engine_flags,
        "cap_bytes": args.cap,
        "threads": args.threads,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
