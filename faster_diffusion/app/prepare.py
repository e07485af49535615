"""Put the weights and their calibrations in place before ``cog build``, so that the image holds both and the
Cog setup only loads and checks: ``script/prepare-weights``.

1. **Download** the weights into the folder (``weights/``, or ``$FASTER_DIFFUSION_WEIGHTS``, or ``--weights``)
   when it holds none yet, as ``script/download-weights`` does (``--repo``, ``--revision``).
2. **Calibrate** the default key steps of every sampler the Cog model offers, at its own step count, in each
   reuse mode it offers, where they are ``auto`` and no calibration is saved: a stock run of the calibration
   prompts each, saved in ``faster_diffusion_calibration.json`` next to the weights. Only the paper's samplers
   have ``auto`` defaults (deep reuse's with DDIM-50 and DPM-Solver-20; encoder propagation's with all three,
   on weights other than SD v1.5's base): Replicate's scheduler names default to key steps that need no
   calibration (:mod:`faster_diffusion.policy`), and nothing is measured for them.
3. **Verify**: load the folder again, as setup does, and look every default up without measuring. The script
   fails, naming what is missing, if any would still need a calibration.

Replicate stops a model whose setup takes more than 600 s; with this done, setup loads the weights and reads a
JSON file, and a clean build no longer fetches the weights or calibrates at every cold boot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..samplers import Sampler
from ..schedule import KeyStepError
from . import download
from .generate import MODE_NAMES
from .loading import WeightsError, default_weights_dir
from .serving import TextToImage

#: The samplers the Cog model offers (its ``sampler`` input's choices).
SAMPLERS = Sampler.names()
#: The reuse modes the Cog model offers (its ``mode`` input's choices).
MODES = MODE_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="script/prepare-weights",
        description="Download the weights (if the folder holds none) and calibrate the default key steps of "
        "every sampler in every reuse mode, then verify that the Cog setup will measure nothing. Run it "
        "before cog build.",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="the weights folder (default: $FASTER_DIFFUSION_WEIGHTS or weights/)",
    )
    parser.add_argument(
        "--repo",
        default=os.environ.get(download.REPO_ENV) or download.DEFAULT_REPO,
        help="Hugging Face repository to download when the folder holds no weights (default: "
        f"${download.REPO_ENV} or {download.DEFAULT_REPO})",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit of --repo (default: main)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = (args.weights or default_weights_dir()).absolute()
    if download.is_unfilled(folder):
        print(f"{folder}/ holds no weights: downloading {args.repo}", flush=True)
        fetch = ["--repo", args.repo, "--dest", str(folder)]
        code = download.main(fetch + (["--revision", args.revision] if args.revision else []))
        if code:
            return code
    try:
        model = TextToImage.load(folder)
        for mode in MODES:
            for sampler in SAMPLERS:
                started = time.perf_counter()
                described = model.prepare_default_key_steps(sampler, mode, calibrate=True)
                seconds = time.perf_counter() - started
                print(f"{sampler}, mode {mode}: {described} ({seconds:.1f} s)", flush=True)
        # As setup does: no measuring.
        missing = TextToImage.load(folder).check_default_key_steps(SAMPLERS, MODES)
    except (KeyStepError, WeightsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if missing:
        print(f"error: still no calibration for {', '.join(missing)} in {folder}", file=sys.stderr)
        return 2
    print(f"Ready: {folder}/ holds the weights and every default's calibration; setup measures nothing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
