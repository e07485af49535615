"""The benchmark scripts run end to end (on the tiny model), so the committed results stay reproducible."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_speed_benchmark_quick_sdxl_run_reports_the_encoder_share_at_each_size(tmp_path):
    out = tmp_path / "speed-sdxl.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--model",
            "sdxl",
            "--quick",
            "--samplers",
            "DPM-Solver-20",
            "--share-sizes",
            "16,32",
            "--share-repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# Faster Diffusion speed benchmark: SDXL, 16 px, CPU")
    assert "random weights, `StableDiffusionXLPipeline`; 16 x 16 px" in report  # the tiny SDXL pipeline
    for mode in ("stock", "propagation", "propagation+batched"):
        assert f"| DPM-Solver-20 | {mode} |" in report
    assert "| DDIM-50 |" not in report  # only the samplers asked for
    assert "7 / 20 (7)" in report  # the paper's key steps, the decoder batched per group
    # The extra encoder-share measurement: one row per size, with the bound it gives the sampler.
    assert (
        "| size px | encoder share | median call s | encoder s | loop bound DPM-Solver-20 (7 of 20) |"
        in report
    )
    rows = [line for line in report.splitlines() if line.startswith(("| 16 |", "| 32 |"))]
    assert len(rows) == 2
    for row in rows:
        share, bound = float(row.split("|")[2].strip(" %")) / 100, row.split("|")[5].strip(" x")
        assert 0 < share < 1 and float(bound) == pytest.approx(20 / (20 - 13 * share), abs=2e-3)
    assert "The paper gives no key-step preset for SDXL" in report


def test_speed_benchmark_dry_run_checks_every_mode_and_estimates_the_run(tmp_path):
    out = tmp_path / "never-written.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--model", "sdxl", "--quick", "--dry-run", "--share-sizes", "32", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "benchmarks/speed.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.exists()  # a dry run writes no report
    # Two steps, key step 0 only: stock runs the encoder twice, the batched mode decodes both in one batch.
    passes = dict(re.findall(r"([a-z+]+) [\d.]+ s \(passes (\(\d, \d, \d\))\)", result.stdout))
    assert passes == {"stock": "(2, 2, 2)", "propagation": "(1, 2, 2)", "propagation+batched": "(1, 2, 1)"}
    assert re.search(r"- at 32 px: [\d.]+ s, share [\d.]+%", result.stdout)
    assert re.search(
        r"estimated run \(--samplers DDIM-50,DPM-Solver-20 --repeats 1, .*: ~\d+ min", result.stdout
    )
