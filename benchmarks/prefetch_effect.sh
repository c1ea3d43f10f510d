#!/usr/bin/env bash
# End-to-end effect of the prefetcher (issue 5): the klotski schedule on the benchmark checkpoint
# with real Mixtral routing replayed, hot experts from (a) the correlation table, (b) frequencies
# learnt online, (c) nothing (K = 0). Same prompts, budget, bs and n; prints bubble and tok/s.
# Usage: benchmarks/prefetch_effect.sh CHECKPOINT_DIR [DEVICE_MEMORY] [NUM_PROMPTS] [MAX_TOKENS] [BS] [N]
# A trained model's own routing (the default model): REPLAY=none TABLE=its-table.json INPUT=prompts.jsonl
# (INPUT's first NUM_PROMPTS lines are used); OUT names the results file.
set -euo pipefail
model=${1:?checkpoint dir}; mem=${2:-2.5GiB}; prompts=${3:-64}; max_tokens=${4:-8}; bs=${5:-16}; n=${6:-4}
bin=${KLOTSKI_BIN:-.venv/bin/klotski}
replay=${REPLAY:-mixtral-8x7b}; table=${TABLE:-mixtral-8x7b}
out=${OUT:-benchmarks/results/prefetch_effect.jsonl}
mkdir -p "$(dirname "$out")"
input=$(mktemp)
if [ -n "${INPUT:-}" ]; then
  head -n "$prompts" "$INPUT" > "$input"
else
  for i in $(seq 1 "$prompts"); do echo "{\"prompt\": \"Request $i: summarise the history of mixture-of-experts language models.\"}"; done > "$input"
fi
replay_flags=(); [ "$replay" = none ] || replay_flags=(--routing-replay "$replay")
: > "$out"
run() {  # label, extra flags...
  local label=$1; shift
  "$bin" generate --model "$model" --input "$input" --max-tokens "$max_tokens" --ignore-eos --device-memory "$mem" \
    --schedule klotski --batch-size "$bs" --num-batches "$n" "${replay_flags[@]}" --json "$@" 2>/dev/null \
    | python3 -c "import json,sys; d=json.load(sys.stdin)['stats']; d.pop('placement', None); d['label']='$label'; print(json.dumps(d))" >> "$out"
}
run correlation --prefetch-table "$table"
run frequency
run none --num-hot 0
rm -f "$input"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'hot experts from':<17} {'tok/s':>7} {'wall s':>7} {'bubble s':>9} {'bubble':>7} {'GB read':>8}")
for r in rows:
    print(f"{r['label']:<17} {r['tokens_per_s']:>7.2f} {r['wall_s']:>7.1f} {r['bubble_s']:>9.2f} "
          f"{r['bubble_ratio']:>7.3f} {sum(r['bytes_read'].values())/1e9:>8.2f}")
PY
