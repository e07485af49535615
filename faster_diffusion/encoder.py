"""Encoder propagation, the paper's reuse mode: the UNet encoder runs only at key steps, and the decoder of
every other step runs on the encoder features of the latest key step.

The encoder (``conv_in``, the down blocks and the mid block) runs only at key steps. At a key step k, the
decoder passes of the whole group k, k+1, ..., k'-1 run as one batch, on the encoder features of step k and
the time embedding of each step (Li et al., "Faster Diffusion", Sec. 3.2 and 3.3). The stock pipeline loop
then receives those noise predictions one step at a time, as if the UNet had run at every step. Prior noise
injection (:mod:`faster_diffusion.noise`, Sec. 3.4) restores the texture that reusing the encoder smooths
away.

The mode is a config, :class:`FasterDiffusionConfig`, whose :meth:`~FasterDiffusionConfig.cached_modules` are
the encoder (:func:`encoder_modules`); the hooks, the batched decoder and the handle are the engine's
(:mod:`faster_diffusion.engine`), shared with deep reuse (:mod:`faster_diffusion.deep`). Its calibration
target is ``"encoder"``, registered here with :func:`faster_diffusion.measure.register_target`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .engine import AutoResolver, FasterDiffusion, attach_reuse, check_decoder_cap, check_forecast
from .measure import register_target
from .memory import AUTO
from .noise import NoiseInjection
from .schedule import KeySteps

__all__ = ["FasterDiffusionConfig", "apply_encoder_propagation", "encoder_modules"]


def encoder_modules(unet: torch.nn.Module, arg: str | None = None) -> list[torch.nn.Module]:
    """The encoder: ``conv_in``, the down blocks and the mid block (the ``"encoder"`` calibration target)."""
    if arg is not None:
        raise ValueError("the encoder target takes no argument")
    return [unet.conv_in, *unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else [])]


register_target("encoder", encoder_modules)


@dataclass(frozen=True)
class FasterDiffusionConfig:
    """Settings of encoder propagation.

    Example:
        >>> FasterDiffusionConfig(key_steps=KeySteps.uniform(4), max_decoder_batch=8).parallel
        True
    """

    #: The mode's name in messages.
    mode_name: ClassVar[str] = "encoder propagation"

    #: Which steps run the encoder. Resolved against the number of steps at the start of every run.
    key_steps: KeySteps = field(default_factory=KeySteps.paper)
    #: Run the decoder passes of a group as one batch (the paper's parallel decoder). When false, the
    #: decoder runs one step at a time; the result is the same up to float rounding.
    parallel: bool = True
    #: Cap on how many steps one decoder batch holds; a group larger than the cap is split into consecutive
    #: chunks, which bounds memory on large images. ``"auto"``: whole groups where they fit a memory budget
    #: (about 1.5x the stock run's peak, and half the free GPU memory, read once per run), otherwise
    #: near-equal chunks; for SD v1.5 in fp16 and one image, whole groups at 256 px, at most 9 steps a batch
    #: at 512 px, 3 at 1024 px, and at most 5 steps on the CPU (see :mod:`faster_diffusion.memory`). ``None``:
    #: no cap, whole groups, as in the paper. Ignored when not parallel.
    max_decoder_batch: int | str | None = AUTO
    #: Prior noise injection settings.
    noise_injection: NoiseInjection = field(default_factory=NoiseInjection)
    #: 0: a non-key step reuses the latest key step's encoder features as they are (the paper). 1: it
    #: extrapolates them linearly, by step, from the latest two key steps (``F_k + (F_k - F_p) (j - k) / (k -
    #: p)``); the first group, with one key step behind it, copies.
    forecast: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.key_steps, KeySteps):
            raise TypeError(f"key_steps must be a KeySteps value, got {self.key_steps!r}")
        check_forecast(self.forecast)
        if not isinstance(self.parallel, bool):
            raise TypeError(f"parallel must be true or false, got {self.parallel!r}")
        check_decoder_cap(self.max_decoder_batch)
        if not isinstance(self.noise_injection, NoiseInjection):
            raise TypeError(f"noise_injection must be a NoiseInjection value, got {self.noise_injection!r}")

    @property
    def decoder_batch_cap(self) -> int | str | None:
        """Steps per decoder batch at most; 1 when not parallel, ``None`` for no cap, ``"auto"`` for the
        automatic cap."""
        return self.max_decoder_batch if self.parallel else 1

    def cached_modules(self, unet: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules whose outputs key steps compute and the other steps reuse: the encoder (``conv_in``,
        the down blocks, the mid block)."""
        return encoder_modules(unet)

    #: What ``key_steps="auto"`` is calibrated for (:func:`faster_diffusion.measure.target_modules`).
    calibration_target: ClassVar[str] = "encoder"

    def forecast_slots(self, count: int) -> range:
        """Which of the :meth:`cached_modules` (by position) are forecast when ``forecast`` is on: all."""
        return range(count) if self.forecast else range(0)

    def copies_served(self, unet: torch.nn.Module) -> bool:
        """Whether a decoder batch of one step gets a copy of the kept features: always, since the decoder may
        change what it is given in place (FreeU scales the mid block's output in place)."""
        return True


def apply_encoder_propagation(
    pipe: Any, config: FasterDiffusionConfig, *, resolve_auto: AutoResolver | None = None
) -> FasterDiffusion:
    """Attach encoder propagation to a diffusers Stable Diffusion pipeline, in place: the reuse mode of
    :class:`FasterDiffusionConfig` (use it through :func:`faster_diffusion.apply_faster_diffusion`).

    The pipeline's current scheduler is used as it is (see :func:`faster_diffusion.use_sampler` to switch to
    DDIM or DPM-Solver first). Returns a handle whose ``remove()`` takes the feature off again.
    ``resolve_auto`` finds the calibration of ``key_steps="auto"`` (:data:`AutoResolver`).
    """
    if not isinstance(config, FasterDiffusionConfig):
        raise TypeError(f"config must be a FasterDiffusionConfig, got {type(config).__name__}")
    return attach_reuse(pipe, config, resolve_auto)
