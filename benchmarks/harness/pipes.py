"""The reference models the judge runs on, and their loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from faster_diffusion import Sampler, reference, use_sampler
from faster_diffusion.app.loading import load_pipeline

#: The reference models, the first the default of every judge script: ``shapes-ldm`` and its SD v1.5-layout
#: twin, each at the guidance scale chosen when it was trained (``reference.guidance_scale``).
REFERENCE_MODELS = (reference.MODEL_DIR, reference.SD15_LAYOUT_MODEL_DIR)


def reference_models(quick: bool) -> list[Path]:
    """Both reference models, or the first for a ``--quick`` run."""
    return list(REFERENCE_MODELS[:1] if quick else REFERENCE_MODELS)


def load_reference(
    model: Path = reference.MODEL_DIR,
    sampler: Sampler | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A reference model's pipeline, without safety checker or progress bar, set for ``sampler`` if given."""
    pipe = load_pipeline(model, device=device, dtype=dtype, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if sampler is not None:
        use_sampler(pipe, sampler)
    return pipe


def load_classifier(path: Path = reference.CLASSIFIER_PATH):
    """The judge's attribute classifier."""
    return reference.load_classifier(path)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks on the reference model: model, classifier, guidance, bootstrap resamples,
    batch and threads (see :func:`apply_common_arguments`)."""
    parser.add_argument("--model", type=Path, default=reference.MODEL_DIR, help="reference model folder")
    parser.add_argument("--classifier", type=Path, default=reference.CLASSIFIER_PATH)
    parser.add_argument("--guidance", type=float, default=reference.GUIDANCE_SCALE)
    parser.add_argument("--boot", type=int, default=None, help="bootstrap resamples (default 1000, quick 20)")
    parser.add_argument("--batch", type=int, default=80, help="prompts per pipeline call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def apply_common_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None
) -> None:
    """Record the command line for the report, default ``--boot`` (20 with ``--quick``, else 1000), check
    it, and set the torch threads."""
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.boot is None:
        args.boot = 20 if args.quick else 1000
    if args.boot < 2:
        parser.error("--boot must be at least 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
