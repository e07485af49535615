"""The reference models the judge runs on, and their loading."""

from __future__ import annotations

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
