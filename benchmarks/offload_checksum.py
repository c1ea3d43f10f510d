"""What verifying every offload blob read costs: the same reads with and without the per-chunk
checksum, side by side in one run (O_DIRECT where the filesystem allows it, as the store reads;
warm device or page cache, so the read is as cheap as it gets: the worst case for the check).

    python -m benchmarks.offload_checksum [--mib 512] [--blob-mib 64] [--reps 5] [--dir DIR]

Builds a one-layer checkpoint whose experts are `--blob-mib` each, repacks it, then reads every
expert blob `--reps` times with verify="always" and verify="never" alternately, and prints GB/s
for both and the ratio. Also prints zlib.crc32's own rate on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _checkpoint(root: Path, blob_mib: int, total_mib: int) -> Path:
    from klotski.commands.create_model import create_model

    # A Mixtral layer whose expert (gate + up + down, bf16) is about blob_mib: 3 * H * I * 2 bytes.
    hidden = 1024
    inter = blob_mib * 2**20 // (3 * hidden * 2)
    experts = max(2, total_mib // blob_mib)
    return create_model(
        root / "ckpt",
        "mixtral",
        "tiny",
        layers=1,
        dtype="bfloat16",
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=experts,
        num_attention_heads=8,
        num_key_value_heads=8,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="total MiB of expert blobs")
    ap.add_argument("--blob-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", help="where the checkpoint and offload dir go (default: a temp dir)")
    args = ap.parse_args()

    from klotski.checkpoint.reader import Checkpoint
    from klotski.store.offload import _HASHES, HASH, OffloadDir

    data = os.urandom(64 * 2**20)
    for name, fn in _HASHES.items():
        if fn is None:
            continue
        t = time.perf_counter()
        for _ in range(4):
            fn(data)
        print(f"{name} alone: {4 * len(data) / (time.perf_counter() - t) / 1e9:.2f} GB/s (one thread)")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        ckpt = Checkpoint.open(_checkpoint(root, args.blob_mib, args.mib))
        off = OffloadDir.prepare(ckpt, root / "off")
        keys = [k for k in off.blobs if k.part == "expert"]
        buf = torch.empty(max(off.blobs[k].padded for k in keys), dtype=torch.uint8)
        total = sum(off.blobs[k].nbytes for k in keys)
        rates: dict[str, list[float]] = {"always": [], "never": []}
        for k in keys:  # warm the page cache so both modes read from memory
            off.read_raw(k, buf)
        for _ in range(args.reps):
            for mode in ("always", "never"):
                off.verify = mode
                t = time.perf_counter()
                for k in keys:
                    off.read_raw(k, buf)
                rates[mode].append(total / (time.perf_counter() - t) / 1e9)
        direct = off._direct
        off.close()
    on, off_ = statistics.median(rates["always"]), statistics.median(rates["never"])
    print(
        f"{len(keys)} blobs x {args.blob_mib} MiB, {args.reps} reps, one reader thread, checksum {HASH}, "
        f"{'O_DIRECT' if direct else 'buffered (page cache)'} reads"
    )
    print(f"verified reads:   {on:.2f} GB/s (median; all {', '.join(f'{r:.2f}' for r in rates['always'])})")
    print(f"unverified reads: {off_:.2f} GB/s (median; all {', '.join(f'{r:.2f}' for r in rates['never'])})")
    print(f"verified / unverified: {on / off_:.2f}")


if __name__ == "__main__":
    main()
