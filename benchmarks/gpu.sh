#!/usr/bin/env bash
# The prepared GPU run (one H200, 128 GiB RAM, 64 GiB disk, no network, <= 10 min a call):
# Mixtral-8x7B's 32 layers created in host memory (/dev/shm), a 24 GiB device budget, every rung of
# the ladder and the engine's policy, printed beside the paper's 5.72 -> 22.41 tok/s.
#   benchmarks/gpu.sh [--layers N] [--max-tokens N] [--rungs sequential,...,klotski,policy] [--json OUT]
#   benchmarks/gpu.sh --dry-run      # tiny preset on a CPU, seconds (tests/benchmarks)
# It says so, loudly, when torch has no CUDA or the tiered store has no CUDA path (then the figures
# are the CPU path's, not a GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
if [ "$dry" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "gpu.sh: nvidia-smi not found"
  free -g | head -2
  # 32 layers are ~93 GB of bf16: /dev/shm (tmpfs, half the RAM by default) must be made larger.
  shm=$(df -BG --output=size /dev/shm | tail -1 | tr -dc 0-9)
  if [ "${shm:-0}" -lt 100 ]; then
    mount -o remount,size=110G /dev/shm 2>/dev/null && echo "gpu.sh: /dev/shm resized to 110G" \
      || echo "gpu.sh: /dev/shm is ${shm}G; 32 layers need ~93G: pass --layers 16 or resize it"
  fi
fi
"$py" -c "import torch; print('gpu.sh: torch', torch.__version__, 'CUDA available:', torch.cuda.is_available())"
exec timeout 590 env PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" "$py" -m benchmarks.gpu "$@"
