"""Calibrate the reference model's key steps (``key_steps="auto"``) for each sampler, with both criteria.

Writes ``faster_diffusion/assets/shapes-ldm/faster_diffusion_calibration.json``, which the library, the CLI,
the Cog model and ``benchmarks/frontier.py`` read. The prompts are captions of training combinations
(``reference.CALIBRATION_PROMPTS``) with seeds 90,000 and up, apart from the quality benchmark's held-out
prompts and seeds. Both criteria are measured, so the frontier benchmark can compare them.

    python training/calibrate_reference.py        # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from faster_diffusion import Sampler, get_calibration, reference, use_sampler  # noqa: E402
from faster_diffusion.calibration import CRITERIA  # noqa: E402
from faster_diffusion.loading import load_pipeline  # noqa: E402


def main() -> int:
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for sampler in Sampler:
        use_sampler(pipe, sampler)
        started = time.perf_counter()
        calibration = get_calibration(
            pipe,
            num_inference_steps=sampler.default_steps,
            prompts=reference.CALIBRATION_PROMPTS,
            seeds=reference.CALIBRATION_SEEDS,
            guidance_scale=reference.GUIDANCE_SCALE,
            criteria=CRITERIA,
            force=True,
        )
        print(
            f"{sampler.value}: {time.perf_counter() - started:.1f} s; auto = {list(calibration.indices())} "
            f"({calibration.criterion})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
