"""Prior noise injection (Li et al., "Faster Diffusion", Sec. 3.3).

Reusing encoder features smooths away some high-frequency texture. The paper restores it by adding a little
of the initial latent noise back in late in sampling: for every step whose timestep is below ``tau``,
``x_t <- x_t + alpha * z_T``. The addition lands between a step's UNet call and its scheduler step, so the
UNet sees ``x_t`` and the scheduler sees ``x_t + alpha * z_T`` (the order of the authors' parallel pipeline).

The paper's ``x_t`` and ``z_T`` are variance-preserving (VP) latents, at unit scale. The Euler family of
schedulers (Euler, Euler ancestral, LMS; ``init_noise_sigma != 1``) keeps its latents larger, by
``sqrt(1 + sigma_t^2)``: Karras et al. ("Elucidating the Design Space of Diffusion-Based Generative Models",
NeurIPS 2022, Table 1) write VP's scale as ``s(t) = 1 / sqrt(1 + sigma(t)^2)``. There the same addition, in VP
terms, reads ``x_t + alpha * z_T * sqrt(1 + sigma_t^2) / sqrt(1 + sigma_first^2)``, with ``z_T`` the latents
at the run's first step, so that ``z_T / sqrt(1 + sigma_first^2)`` is at unit scale (:func:`latent_scales`).
For text-to-image with SD's ``leading`` spacing, ``sqrt(1 + sigma_first^2)`` is ``init_noise_sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Strength of the injected prior noise: alpha = 0.003 (reference code default, Sec. 3.3).
PRIOR_NOISE_ALPHA = 0.003

#: Injection applies at steps whose timestep is below tau = 500 (reference code default, Sec. 3.3): the last
#: 25 of SD's 50 DDIM steps.
PRIOR_NOISE_TAU = 500


@dataclass(frozen=True)
class NoiseInjection:
    """Settings of prior noise injection.

    Example:
        >>> NoiseInjection().applies_at([981, 501, 499, 1])
        (False, False, True, True)
        >>> NoiseInjection.off().applies_at([981, 1])
        (False, False)
    """

    #: Whether to inject at all.
    enabled: bool = True
    #: The strength alpha; the paper uses 0.003. Must be finite and >= 0.
    alpha: float = PRIOR_NOISE_ALPHA
    #: Inject at steps whose timestep value is strictly below this; the paper uses 500. Finite, >= 0.
    tau: float = PRIOR_NOISE_TAU

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"noise_injection: enabled must be true or false, got {self.enabled!r}")
        for name, value in (("alpha (strength)", self.alpha), ("tau (threshold)", self.tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"noise_injection: {name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"noise_injection: {name} must be >= 0, got {value!r}")

    @classmethod
    def off(cls) -> NoiseInjection:
        return cls(enabled=False)

    def describe(self) -> str:
        """One line for logs, e.g. ``alpha=0.003 at timesteps below 500`` or ``off``."""
        return f"alpha={self.alpha:g} at timesteps below {self.tau:g}" if self.enabled else "off"

    def applies_at(self, timesteps: Sequence[float]) -> tuple[bool, ...]:
        """For each timestep value, whether noise is injected before that step's scheduler update."""
        if not self.enabled or self.alpha == 0:
            return tuple(False for _ in timesteps)
        return tuple(float(t) < self.tau for t in timesteps)


def latent_scales(scheduler: Any) -> tuple[float, ...]:
    """``sqrt(1 + sigma_i^2)`` for each of the scheduler's sigmas, read once: how much larger its latents are
    than variance-preserving ones at each step (see the module docstring). Empty for a scheduler whose latents
    are at unit scale (``init_noise_sigma == 1``), where the addition needs no scaling."""
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) == 1.0:
        return ()
    sigmas = scheduler.sigmas.detach().to("cpu", torch.float64).tolist()
    return tuple(math.sqrt(1.0 + sigma * sigma) for sigma in sigmas)


def inject_prior_noise(latents: torch.Tensor, initial_latents: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x_t + alpha * z_T`` (Sec. 3.3), as a new tensor; the inputs are not modified."""
    return latents + alpha * initial_latents
