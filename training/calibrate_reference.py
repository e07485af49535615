"""Calibrate a reference model's key steps (``key_steps="auto"``) for each sampler, with two criteria.

Writes the model's ``faster_diffusion_calibration.json`` entries for one target anew (one entry per sampler),
keeping the other targets' entries; the library, the CLI, the Cog model and the benchmarks read them. The
prompts are captions of training combinations (``reference.CALIBRATION_PROMPTS``) with seeds 90,000 and up,
apart from the quality benchmark's held-out prompts and seeds, at the model's guidance scale. "feature" and
"prediction" are measured, so the frontier benchmarks can compare them; ``--with-final`` adds "final" (12
minutes for DPM-Solver-20 on 2 busy CPU cores, and about 17 times its UNet calls for DDIM-50).

    python training/calibrate_reference.py              # encoder propagation, about 1 minute on 2 CPU cores
    python training/calibrate_reference.py --target deep:0    # deep reuse, branch 0
    python training/calibrate_reference.py --model faster_diffusion/reference/assets/shapes-ldm-sd15
    python training/calibrate_reference.py --out-dir DIR   # the same, saved in DIR instead of the weights
    python training/calibrate_reference.py --halves     # how much two disjoint 8-prompt halves agree

``--halves`` saves nothing: it calibrates (feature criterion) on each half of the prompts and on all 16 and
prints the key steps each gives at several budgets, and the rank correlation of the halves' cost matrices.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from faster_diffusion import Sampler, get_calibration, reference, use_sampler  # noqa: E402
from faster_diffusion.app.loading import load_pipeline  # noqa: E402
from faster_diffusion.calibration import (  # noqa: E402
    CALIBRATION_FILE,
    CRITERIA,
    load_calibrations,
    spearman,
    write_calibrations,
)
from faster_diffusion.measure import canonical_target  # noqa: E402
from faster_diffusion.samplers import PAPER_SAMPLERS  # noqa: E402


def halves(pipe) -> None:
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


def replace_target(folder: Path, target: str, calibrations: list) -> None:
    """Write ``calibrations`` in place of ``target``'s entries in ``folder``'s calibration file, keeping the
    other targets' entries as they are."""
    kept = []
    if (folder / CALIBRATION_FILE).is_file():
        kept = [c for c in load_calibrations(folder) if c.target != target]
    write_calibrations(folder, [*kept, *calibrations])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked before anything is loaded or written (``--help`` writes nothing)."""
    parser = argparse.ArgumentParser(
        description="Calibrate a reference model's key steps for each sampler, and save them with the model "
        "(or in --out-dir).",
    )
    parser.add_argument("--model", type=Path, default=reference.MODEL_DIR, help="the model's folder")
    parser.add_argument(
        "--target", default="encoder", help="what is reused: 'encoder' or 'deep:B' (default: encoder)"
    )
    parser.add_argument("--out-dir", type=Path, help="save here instead of next to the model's weights")
    parser.add_argument("--with-final", action="store_true", help="also measure the 'final' criterion (slow)")
    parser.add_argument(
        "--halves", action="store_true", help="print how much two halves of the prompts agree; save nothing"
    )
    args = parser.parse_args(argv)
    try:
        args.target = canonical_target(args.target)
    except ValueError as error:
        parser.error(f"--target: {error}")
    if not (args.model / "model_index.json").is_file():
        parser.error(f"--model: {args.model} is not a diffusers model folder (it has no model_index.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, target, out_dir = args.model, args.target, args.out_dir
    pipe = load_pipeline(model, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if args.halves:
        halves(pipe)
        return 0
    measured = []
    for sampler in PAPER_SAMPLERS:
        use_sampler(pipe, sampler)
        started = time.perf_counter()
        calibration = get_calibration(
            pipe,
            num_inference_steps=sampler.default_steps,
            criteria=CRITERIA if args.with_final else ("feature", "prediction"),
            force=True,
            save=False,
            target=target,
            **reference.calibration_options(model),
        )
        measured.append(calibration)
        print(
            f"{sampler.value}: {time.perf_counter() - started:.1f} s; {target} auto = "
            f"{list(calibration.indices())} ({calibration.criterion})",
            flush=True,
        )
    # Written once, when every sampler is measured: a run stopped part-way leaves the file as it was.
    folder = out_dir or model
    folder.mkdir(parents=True, exist_ok=True)
    replace_target(folder, target, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
