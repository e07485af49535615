"""Shared fixtures: tiny SD-shaped pipelines with random weights, built on the CPU in well under a second."""

from __future__ import annotations

import pytest
import torch

from faster_diffusion import FasterDiffusionConfig, KeySteps, NoiseInjection, use_sampler
from faster_diffusion.reference.tiny import build_tiny_pipeline

SAMPLERS = ("DDIM-50", "DPM-Solver-20", "DPM-Solver++-20")

#: Every step a key step, no noise injection: must give stock diffusers' output.
STOCK_EQUIVALENT = FasterDiffusionConfig(
    key_steps=KeySteps.every_step(), noise_injection=NoiseInjection.off()
)
PAPER = FasterDiffusionConfig(key_steps=KeySteps.paper())
PAPER_ONE_STEP_AT_A_TIME = FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=False)


#: An SD 2.x-style UNet: linear projections in the transformers, per-level head dims, upcast attention.
SD2_SHAPED_UNET = dict(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True)

# The tiny models are far too small to gain from several threads; one thread is faster and keeps timings of
# other processes on this machine undisturbed.
torch.set_num_threads(1)


@pytest.fixture
def make_pipe():
    """Build a tiny pipeline with the given sampler; the same seed gives the same weights."""

    def make(sampler: str = "DDIM-50", seed: int = 0, **kwargs):
        pipe = build_tiny_pipeline(seed, **kwargs)
        use_sampler(pipe, sampler)
        return pipe

    return make


def generate_latents(
    pipe, prompt: str = "a red circle above a blue square", *, steps: int, seed: int = 0, **kwargs
):
    """Final latents of a pipeline call, with a fixed seed."""
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 16)
    with torch.inference_mode():
        return pipe(
            prompt,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **kwargs,
        ).images
