"""The benchmark scripts run end to end (on the tiny model), so the committed results stay reproducible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_run_writes_a_report(tmp_path):
    out = tmp_path / "speed.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    for mode in ("stock", "propagation", "propagation+batched"):
        assert f"| DDIM-50 | {mode} |" in report and f"| DPM-Solver-20 | {mode} |" in report
    assert "9 / 50 (9)" in report and "7 / 20 (7)" in report  # pass counts of the batched mode
    assert "encoder share" in report.lower()
