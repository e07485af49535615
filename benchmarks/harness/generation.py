"""Running a method over the pairs: batched pipeline calls, one generator per pair; :func:`run` gives the
images, :func:`generate` also the seconds in the calls and the run's passes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from faster_diffusion import Sampler, apply_faster_diffusion, use_sampler

from .methods import Context, attach


def run_in_batches(
    runner, prompts, seeds, batch: int, images: torch.Tensor | None = None, **call
) -> tuple[np.ndarray, float]:
    """``runner`` over ``prompts`` in calls of ``batch`` prompts, one generator seeded ``seeds[i]`` per
    prompt, ``images`` (image-to-image inputs) sliced alongside, ``call`` passed to every call. Returns the
    images, (N, 3, H, W) in [-1, 1], and the seconds spent in the calls."""
    images_out, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        inputs = {} if images is None else {"image": images[i : i + batch]}
        started = time.perf_counter()
        with torch.inference_mode():
            out = runner(
                list(prompts[i : i + batch]), **inputs, **call, generator=generators, output_type="np"
            ).images
        seconds += time.perf_counter() - started
        images_out.append(out.transpose(0, 3, 1, 2) * 2.0 - 1.0)
    return np.concatenate(images_out).astype(np.float32), seconds


@contextlib.contextmanager
def attached(pipe, sampler: Sampler, how) -> Iterator:
    """``pipe`` set for ``sampler`` with ``how`` attached for the block: a registered method's name
    (``None``: stock), or a config of ours at a setting no name stands for (``apply_faster_diffusion``'s).
    Yields the handle (``None`` for stock), removed when the block ends."""
    use_sampler(pipe, sampler)
    if how is None or isinstance(how, str):
        handle = attach(pipe, how or "stock", Context(steps=sampler.default_steps))
    else:
        handle = apply_faster_diffusion(pipe, how)
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()


def run(pipe, sampler: Sampler, how, prompts, seeds, guidance: float, batch: int) -> np.ndarray:
    """The images of ``how`` (see :func:`attached`) over the pairs."""
    with attached(pipe, sampler, how):
        images, _ = run_in_batches(
            pipe, prompts, seeds, batch, num_inference_steps=sampler.default_steps, guidance_scale=guidance
        )
    return images


@dataclass
class RunResult:
    """A method's run over the pairs: its images, the seconds in its pipeline calls, its full passes and
    steps per image trajectory (``RunStats``' ``full_passes``, and ``full_passes + partial_passes``), its key
    steps, and the metrics a script adds. Reports' JSONs keep the counts under their former names,
    ``encoder_passes`` and ``decoder_passes``."""

    images: np.ndarray  # (N, 3, 32, 32) in [-1, 1]
    seconds: float
    #: Full UNet passes (the encoder's, for encoder propagation).
    full_passes: int = 0
    #: Steps, full and partial (the decoder's passes, for encoder propagation).
    steps: int = 0
    key_steps: tuple[int, ...] = ()
    metrics: dict = field(default_factory=dict)


def generate(pipe, sampler: Sampler, how, prompts, seeds, guidance: float, batch: int) -> RunResult:
    """:func:`run`, with the seconds in the calls and the run's counts (``handle.last_run``; stock: every
    step)."""
    steps = sampler.default_steps
    with attached(pipe, sampler, how) as handle:
        images, seconds = run_in_batches(
            pipe, prompts, seeds, batch, num_inference_steps=steps, guidance_scale=guidance
        )
    if handle is None:
        return RunResult(images, seconds, steps, steps, tuple(range(steps)))
    stats = handle.last_run
    steps = stats.full_passes + stats.partial_passes
    return RunResult(images, seconds, stats.full_passes, steps, stats.schedule.indices)
