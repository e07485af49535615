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
    # Pass counts of the batched mode: the automatic cap takes at most 5 steps a batch on the CPU.
    assert "9 / 50 (13)" in report and "7 / 20 (7)" in report
    assert "| peak memory MiB (vs stock) |" in report and "(1.00x) |" in report  # stock against itself
    assert "encoder share" in report.lower()
