"""Prior noise injection (Li et al., "Faster Diffusion", Sec. 3.3).

Reusing encoder features smooths away some high-frequency texture. The paper restores it by adding a little
of the initial latent noise back in late in sampling: for every step whose timestep is below ``tau``,
``x_t <- x_t + alpha * z_T``. The addition lands between a step's UNet call and its scheduler step, so the
UNet sees ``x_t`` and the scheduler sees ``x_t + alpha * z_T`` (the order of the authors' parallel pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def inject_prior_noise(latents: torch.Tensor, initial_latents: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x_t + alpha * z_T`` (Sec. 3.3), as a new tensor; the inputs are not modified."""
    return latents + alpha * initial_latents
