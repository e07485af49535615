"""Calibrate the reference model's key steps (``key_steps="auto"``) for each sampler, with two criteria.

Writes ``faster_diffusion/reference/assets/shapes-ldm/faster_diffusion_calibration.json`` anew (one entry
per sampler), which the library, the CLI, the Cog model and ``benchmarks/frontier.py`` read. The prompts are
captions of training combinations (``reference.CALIBRATION_PROMPTS``) with seeds 90,000 and up, apart from the
quality benchmark's held-out prompts and seeds. "feature" and "prediction" are measured, so the frontier
benchmark can compare them; ``--with-final`` adds "final" (12 minutes for DPM-Solver-20 on 2 busy CPU cores,
and about 17 times its UNet calls for DDIM-50).

    python training/calibrate_reference.py              # about 1 minute on 2 CPU cores
    python training/calibrate_reference.py --out-dir DIR   # the same, saved in DIR instead of the weights
    python training/calibrate_reference.py --halves     # how much two disjoint 8-prompt halves agree

``--halves`` saves nothing: it calibrates (feature criterion) on each half of the prompts and on all 16 and
prints the key steps each gives at several budgets, and the rank correlation of the halves' cost matrices.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from faster_diffusion import Sampler, get_calibration, reference, use_sampler  # noqa: E402
from faster_diffusion.app.loading import load_pipeline  # noqa: E402
from faster_diffusion.calibration import CALIBRATION_FILE, CRITERIA, save_calibration  # noqa: E402


def halves(pipe) -> None:
    from benchmarks.frontier import spearman

    prompts, seeds = reference.CALIBRATION_PROMPTS, reference.CALIBRATION_SEEDS
    parts = {"first 8": slice(0, 8), "last 8": slice(8, 16), "all 16": slice(0, 16)}
    budgets = {Sampler.DDIM: (5, 7, 9, 12, 15), Sampler.DPM_SOLVER: (4, 7, 9, 12)}
    for sampler, sampler_budgets in budgets.items():
        use_sampler(pipe, sampler)
        found = {
            name: get_calibration(
                pipe,
                num_inference_steps=sampler.default_steps,
                prompts=prompts[part],
                seeds=seeds[part],
                guidance_scale=reference.GUIDANCE_SCALE,
                force=True,
                save=False,
            )
            for name, part in parts.items()
        }
        upper = np.triu_indices(sampler.default_steps, 1)
        rho = spearman(found["first 8"].matrix[upper], found["last 8"].matrix[upper])
        print(f"{sampler.value}: rank correlation of the halves' costs {rho:.4f}")
        for budget in sampler_budgets:
            lists = {name: c.indices(budget) for name, c in found.items()}
            same = len(set(lists.values())) == 1
            print(f"  {budget} key steps: {'all three agree' if same else 'differ'}: {lists}")


def main() -> int:
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if "--halves" in sys.argv[1:]:
        halves(pipe)
        return 0
    out_dir = None
    if "--out-dir" in sys.argv[1:]:
        out_dir = Path(sys.argv[sys.argv.index("--out-dir") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
    (Path(out_dir or reference.MODEL_DIR) / CALIBRATION_FILE).unlink(missing_ok=True)
    for sampler in Sampler:
        use_sampler(pipe, sampler)
        started = time.perf_counter()
        calibration = get_calibration(
            pipe,
            num_inference_steps=sampler.default_steps,
            criteria=CRITERIA if "--with-final" in sys.argv[1:] else ("feature", "prediction"),
            force=True,
            save=out_dir is None,
            **reference.calibration_options(),
        )
        if out_dir is not None:
            save_calibration(calibration, out_dir)
        print(
            f"{sampler.value}: {time.perf_counter() - started:.1f} s; auto = {list(calibration.indices())} "
            f"({calibration.criterion})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
