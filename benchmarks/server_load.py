"""Memory of the Cog server over a bounded run of sequential predictions, on loopback.

Starts the real Cog HTTP server (``python -m cog.server.http`` serving ``predict.py:Predictor``) on 127.0.0.1
with tiny SD-shaped random weights (or ``--weights``), sends predictions one after another until ``--count``
are done or ``--max-seconds`` have passed, and after each one reads the resident memory (RSS) of the server
process and its children (the coglet worker that holds the model). The requests cycle through the samplers,
output formats, several outputs, a comparison with stock diffusers and a rejected input, so that every path of
``run()`` repeats. It prints a table (RSS after the first prediction, the median, the last, the growth) and
writes it to ``benchmarks/results/server-load.md``; then it stops the server.

    OMP_NUM_THREADS=1 python benchmarks/server_load.py                # 100 predictions on the tiny model
    python benchmarks/server_load.py --count 20 --out /tmp/server-load.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the package and the test helpers importable
    sys.path.insert(0, str(REPO_ROOT))

from tests.cog_server import CogServer, save_server_weights  # noqa: E402

#: The requests, in turn: every sampler and output format, several outputs, a comparison, a rejected input.
REQUESTS: tuple[dict, ...] = (
    dict(sampler="DDIM-50", output_format="png"),
    dict(sampler="DPM-Solver-20", output_format="webp", num_outputs=2, width=128),
    dict(sampler="DPM-Solver++-20", output_format="jpg", key_steps="uniform:4"),
    dict(sampler="DDIM-50", output_format="webp", compare_with_baseline=True),
    dict(sampler="DDIM-50", width=100),  # rejected: not a multiple of 8
)
BASE_REQUEST = dict(prompt="a red circle above a blue square", width=64, height=64)
MIB = 2**20


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """RSS of ``process`` with all its children, and of its largest child (the worker holding the model)."""
    children = []
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a child that just exited
            children.append(child.memory_info().rss)
    return process.memory_info().rss + sum(children), max(children, default=0)


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    covariance = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return covariance / sum((i - mean_x) ** 2 for i in range(n))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="predictions to send (at most 10000)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument(
        "--weights", type=Path, default=None, help="weights folder (default: tiny, built now)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "server-load.md")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 10000:
        parser.error(f"--count must be between 1 and 10000, got {args.count}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="server-load-") as scratch:
        weights = args.weights or save_server_weights(Path(scratch) / "weights")
        server = CogServer(weights, Path(scratch) / "server.log")
        try:
            health = server.wait_for_setup()
            if health["status"] != "READY":
                print(f"setup failed: {health['setup']['logs']}", file=sys.stderr)
                return 1
            process = psutil.Process(server.process.pid)
            after_setup = tree_rss(process)
            samples: list[tuple[int, int]] = []
            statuses: dict[str, int] = {}
            started = time.monotonic()
            while len(samples) < args.count and time.monotonic() - started < args.max_seconds:
                request = {**BASE_REQUEST, **REQUESTS[len(samples) % len(REQUESTS)], "seed": len(samples)}
                status = server.predict(**request)["status"]
                statuses[status] = statuses.get(status, 0) + 1
                samples.append(tree_rss(process))
            elapsed = time.monotonic() - started
        finally:
            server.stop()

    outcomes = ", ".join(f"{count} {status}" for status, count in statuses.items())
    summary = f"{len(samples)} predictions in {elapsed:.0f} s ({outcomes})."
    report = render(weights=args.weights, after_setup=after_setup, samples=samples, summary=summary)
    text = "\n".join(report) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def render(*, weights, after_setup, samples, summary: str) -> list[str]:
    total = [t / MIB for t, _ in samples]
    worker = [w / MIB for _, w in samples]
    half = len(samples) // 2
    lines = [
        "# Server memory over sequential predictions",
        "",
        f"`{shlex.join(['python', 'benchmarks/server_load.py', *sys.argv[1:]])}`, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{datetime.date.today()}, {platform.platform()}, Python {platform.python_version()}. {summary}",
        "",
        f"Weights: {weights or 'tiny SD-shaped random weights (tests/cog_server.py), 64 px images'}. "
        f"Requests cycle through {len(REQUESTS)} kinds: "
        + "; ".join(", ".join(f"{k}={v}" for k, v in r.items()) for r in REQUESTS)
        + ".",
        "",
        "RSS is read after each prediction; the server is `python -m cog.server.http` plus its children (the "
        "coglet worker holds the model).",
        "",
        "| RSS (MiB) | after setup | after prediction 1 | median | last | growth, first to last | "
        "slope over the second half (KiB per prediction) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = (("server + children", total, after_setup[0] / MIB), ("worker", worker, after_setup[1] / MIB))
    for name, series, base in rows:
        first, median, last = series[0], statistics.median(series), series[-1]
        lines.append(
            f"| {name} | {base:.1f} | {first:.1f} | {median:.1f} | {last:.1f} | {last - first:+.1f} "
            f"| {slope(series[half:]) * 1024:+.1f} |"
        )
    lines += ["", "Every 10th prediction:", "", "| prediction | server + children (MiB) | worker (MiB) |"]
    lines.append("|---:|---:|---:|")
    for index in range(0, len(samples), 10):
        lines.append(f"| {index + 1} | {total[index]:.1f} | {worker[index]:.1f} |")
    if (len(samples) - 1) % 10:
        lines.append(f"| {len(samples)} | {total[-1]:.1f} | {worker[-1]:.1f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
