"""Shared fixtures: tiny SD-shaped pipelines with random weights, built on the CPU in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

from faster_diffusion import FasterDiffusionConfig, KeySteps, NoiseInjection, use_sampler
from fixtures.tiny import build_tiny_pipeline

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
# other processes on this machine undisturbed. The variable tells the thread fitting of the command line and
# the Cog setup (faster_diffusion.app.threads) to leave it so, as a user's own setting does.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def make_pipe():
    """Build a tiny pipeline with the given sampler; the same seed gives the same weights."""

    def make(sampler: str = "DDIM-50", seed: int = 0, **kwargs):
        """``dtype=torch.float64`` for a comparison up to rounding (:func:`assert_equal_up_to_rounding`)."""
        pipe = build_tiny_pipeline(seed, **kwargs)
        use_sampler(pipe, sampler)
        return pipe

    return make


#: Tolerance of "equal up to float rounding" (parallel = sequential, batched = one step at a time, against
#: the hand-written reference). These comparisons run in float64: float32's rounding depends on how the
#: CPU's kernels block a batch of 2 rows against one of 10 (differences up to 1.6e-4 were seen on an AMD
#: EPYC, in latents of size ~50), so no float32 tolerance holds on every CPU while staying tight. In float64,
#: epsilon is 2.2e-16; with latents up to ~1e2 and a few dozen steps that amplify differences, the largest
#: difference measured on the tiny pipelines is 3.6e-13 (LCM, whose 4 steps amplify most). 1e-9 sits over
#: three orders of magnitude above that, and seven below the smallest real defect found so far (1e-2: a
#: decoder batch served to the wrong step, noise injected twice, features scaled in place).
ROUNDING = dict(rtol=1e-9, atol=1e-9)


def assert_equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``actual`` equals ``expected`` up to float64 rounding (:data:`ROUNDING`); both must be float64."""
    assert actual.dtype == expected.dtype == torch.float64, (
        f"compare up to rounding in float64 (build the pipelines with dtype=torch.float64), got "
        f"{actual.dtype} and {expected.dtype}"
    )
    torch.testing.assert_close(actual, expected, **ROUNDING)


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
