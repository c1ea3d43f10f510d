"""benchmarks/gpu.sh --dry-run: the prepared GPU script runs end to end on a CPU with the tiny preset."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_dry_run_prints_every_rung_beside_the_paper(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=str(Path(os.sys.executable)))
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["sequential", "overlap", "multibatch", "hot", "klotski", "klotski (policy)"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert any(r["bytes_read"] > 0 for r in rows)  # the budget really offloads (the planner may fit some rungs)
    assert "5.72" in proc.stdout and "22.41" in proc.stdout
    assert "CPU path" in proc.stdout  # a CPU run says it is not a GPU run
