"""OpenMP's wait policy on a CPU that another process shares: should the server and the command line set
``OMP_WAIT_POLICY=PASSIVE``?

Protocol (written before the first run):

- Work: stock DDIM-50 on the built-in reference model (32 px, guidance 5.0, one image), in a fresh Python
  process per setting, because libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it. Each process makes
  one untimed run, then ``--repeats`` timed runs; the median is reported, with the range.
- Threads: torch's, fitted to the CPUs the process may use (2 on the 2-core machines here).
- Settings: the policy unset (libgomp's default, which spins before it sleeps) and ``PASSIVE``; each on a
  quiet machine and with a competitor, a process that keeps one core busy (a Python busy loop) for the whole
  run.
- Decision rule: ``PASSIVE`` becomes the default of the Cog model (set at the top of ``predict.py``, before
  torch loads) and of ``script/generate`` if, with the competitor, its median is at least 2x faster than the
  default's, and on the quiet machine it is at most 10% slower. A user's own ``OMP_WAIT_POLICY`` is always
  left as set.

    python benchmarks/omp_wait.py                     # prints the table
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time, json
sys.path.insert(0, {root!r})
import torch
from faster_diffusion import reference, use_sampler
from faster_diffusion.app.loading import load_pipeline
from faster_diffusion.app.threads import fit_torch_threads
fit_torch_threads()
pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
pipe.set_progress_bar_config(disable=True)
use_sampler(pipe, "DDIM-50")
def once():
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(reference.EXAMPLE_PROMPT, num_inference_steps=50, guidance_scale=5.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - started
once()
print(json.dumps([once() for _ in range({repeats})]))
"""


def _busy(stop) -> None:
    while not stop.is_set():
        pass


def measure(policy: str | None, competitor: bool, repeats: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=_busy, args=(stop,)) if competitor else None
    if busy is not None:
        busy.start()
    try:
        out = subprocess.run(
            [sys.executable, "-c", WORKER.format(root=str(REPO_ROOT), repeats=repeats)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        if busy is not None:
            stop.set()
            busy.join()
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for competitor in (False, True):
        for policy in (None, "PASSIVE"):
            times = measure(policy, competitor, args.repeats)
            rows.append((competitor, policy, statistics.median(times), min(times), max(times)))
    cpu = platform.processor() or platform.machine()
    print("# OMP_WAIT_POLICY on a shared CPU: stock DDIM-50, reference model, one image")
    print()
    print(
        f"- {os.cpu_count()} CPUs ({cpu}); {args.repeats} timed runs after one warm-up per setting; total "
        f"{time.perf_counter() - started:.0f} s"
    )
    print()
    print("| machine | OMP_WAIT_POLICY | median s | range s |")
    print("|---|---|---|---|")
    for competitor, policy, median, low, high in rows:
        machine = "one core kept busy by another process" if competitor else "quiet"
        print(f"| {machine} | {policy or 'unset (default)'} | {median:.2f} | {low:.2f}–{high:.2f} |")
    quiet = {p: m for c, p, m, _, _ in rows if not c}
    shared = {p: m for c, p, m, _, _ in rows if c}
    gain = shared[None] / shared["PASSIVE"]
    cost = quiet["PASSIVE"] / quiet[None] - 1
    verdict = "PASSIVE becomes the default" if gain >= 2 and cost <= 0.10 else "the default stays"
    print()
    print(
        f"Shared: PASSIVE is {gain:.1f}x faster; quiet: PASSIVE costs {cost * 100:+.1f}%. "
        f"By the rule: {verdict}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
