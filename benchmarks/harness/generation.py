"""Running a method over the pairs: batched pipeline calls, one generator per pair."""

from __future__ import annotations

import time

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


def run(pipe, sampler: Sampler, how, prompts, seeds, guidance: float, batch: int) -> np.ndarray:
    """The images of ``how`` over the pairs: a registered method's name (``None``: stock), or a config of
    ours at a setting no name stands for (``apply_faster_diffusion``'s)."""
    use_sampler(pipe, sampler)
    steps = sampler.default_steps
    if how is None or isinstance(how, str):
        handle = attach(pipe, how or "stock", Context(steps=steps))
    else:
        handle = apply_faster_diffusion(pipe, how)
    try:
        images, _ = run_in_batches(
            pipe, prompts, seeds, batch, num_inference_steps=steps, guidance_scale=guidance
        )
    finally:
        if handle is not None:
            handle.remove()
    return images
