#!/usr/bin/env bash
# The ablation ladder on one checkpoint: every --schedule, the same prompts, device budget and
# routing replay (no memory cgroup: reads are O_DIRECT, so the page cache does not help).
# sequential and overlap run n = 1 (one batch at a time); the others share each layer across N.
# Usage: benchmarks/ladder.sh CHECKPOINT_DIR [DEVICE_MEMORY] [NUM_PROMPTS] [MAX_TOKENS] [BS] [N]
# Writes one JSON line per schedule to benchmarks/results/ladder.jsonl and prints a table.
set -euo pipefail
model=${1:?checkpoint dir}; mem=${2:-2.5GiB}; prompts=${3:-1024}; max_tokens=${4:-4}; bs=${5:-128}; n=${6:-8}
bin=${KLOTSKI_BIN:-.venv/bin/klotski}
out=benchmarks/results/ladder.jsonl
mkdir -p benchmarks/results
input=$(mktemp)
for i in $(seq 1 "$prompts"); do echo "{\"prompt_token_ids\": [1, $((i % 300 + 5)), 17, 42, 99, 7, 250, 33]}"; done > "$input"
: > "$out"
for schedule in sequential overlap multibatch hot klotski; do
  nb=$n; { [ "$schedule" = sequential ] || [ "$schedule" = overlap ]; } && nb=1
  "$bin" generate --model "$model" --input "$input" --max-tokens "$max_tokens" --ignore-eos \
    --device-memory "$mem" --schedule "$schedule" --batch-size "$bs" --num-batches "$nb" \
    --routing-replay mixtral-8x7b --json 2>/dev/null \
    | python3 -c "import json,sys; d=json.load(sys.stdin)['stats']; d.pop('placement', None); print(json.dumps(d))" >> "$out"
done
rm -f "$input"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'schedule':<11} {'bs':>4} {'n':>3} {'tok/s':>7} {'wall s':>7} {'prefill s':>9} {'bubble':>7} {'GB read':>8} {'peak dev GB':>11}")
for r in rows:
    p = r["policy"]
    print(f"{p['schedule']:<11} {p['batch_size']:>4} {p['num_batches']:>3} {r['tokens_per_s']:>7.2f} {r['wall_s']:>7.1f} "
          f"{r['prefill_s']:>9.1f} {r['bubble_ratio']:>7.3f} {sum(r['bytes_read'].values())/1e9:>8.2f} {r['peak_bytes']['device']/1e9:>11.2f}")
PY
