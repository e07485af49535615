"""Faster Diffusion for stock diffusers Stable Diffusion pipelines: UNet features computed at full steps are
reused at the partial steps between them.

Two reuse modes, peers on one engine (:mod:`faster_diffusion.engine`: the hooks, the batching of steps, the
handle and its :class:`RunStats`): encoder propagation (:mod:`faster_diffusion.encoder`, with a batched
decoder and prior noise injection, after Li et al., "Faster Diffusion: Rethinking the Role of the Encoder
for Diffusion Model Inference", NeurIPS 2024) and deep reuse (:mod:`faster_diffusion.deep`, after DeepCache,
the product's default). :func:`apply_faster_diffusion` applies the mode of the config it is given
(:mod:`faster_diffusion.modes`).

    >>> from faster_diffusion import apply_faster_diffusion
    >>> handle = apply_faster_diffusion(pipe)                         # doctest: +SKIP
    >>> image = pipe("an astronaut riding a horse").images[0]         # doctest: +SKIP
    >>> handle.remove()                                               # doctest: +SKIP
"""

from .calibration import CalibrationError, calibrate, get_calibration
from .deep import DeepReuseConfig
from .depth import DepthChoice, choose_depth, measure_step_costs
from .encoder import FasterDiffusionConfig
from .engine import (
    CalibrationFallbackWarning,
    FasterDiffusion,
    RunStats,
    get_faster_diffusion,
    remove_faster_diffusion,
)
from .modes import apply_faster_diffusion
from .noise import PRIOR_NOISE_ALPHA, PRIOR_NOISE_TAU, NoiseInjection
from .samplers import Sampler, make_scheduler, use_sampler
from .schedule import (
    PAPER_DDIM_50_KEY_STEPS,
    PAPER_DPM_SOLVER_20_KEY_STEPS,
    KeyStepError,
    KeySteps,
    KeyStepSchedule,
)
from .support import UnsupportedModelError

__all__ = [
    "PAPER_DDIM_50_KEY_STEPS",
    "PAPER_DPM_SOLVER_20_KEY_STEPS",
    "PRIOR_NOISE_ALPHA",
    "PRIOR_NOISE_TAU",
    "CalibrationError",
    "CalibrationFallbackWarning",
    "DeepReuseConfig",
    "DepthChoice",
    "FasterDiffusion",
    "FasterDiffusionConfig",
    "KeyStepError",
    "KeyStepSchedule",
    "KeySteps",
    "NoiseInjection",
    "RunStats",
    "Sampler",
    "UnsupportedModelError",
    "apply_faster_diffusion",
    "calibrate",
    "choose_depth",
    "get_calibration",
    "get_faster_diffusion",
    "make_scheduler",
    "measure_step_costs",
    "remove_faster_diffusion",
    "use_sampler",
]
