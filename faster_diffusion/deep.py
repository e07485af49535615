"""Deep reuse: at a partial step only the shallowest layers of the UNet run; everything deeper comes from the
latest full step.

DeepCache (Ma et al., CVPR 2024) observed that a UNet's deep features change slowly from step to step, while
the skip connections of the outermost level carry what changes. At a *partial* step, this mode runs
``conv_in`` on the step's own latent, the outermost layers of the down path and of the up path, and the output
layers; the rest of the UNet (the deeper down blocks, the mid block and the deeper up blocks) returns the
outputs it computed at the latest *full* step. The key steps (:class:`~faster_diffusion.schedule.KeySteps`)
are the full steps, so every form of them works: ``uniform:N`` is DeepCache's ``cache_interval``, and ``auto``
places them from a calibration of this mode (target ``"deep:B"``: the same criteria, measured by replaying
the deep modules' outputs; :func:`faster_diffusion.calibrate` with ``target="deep:0"``).

``branch`` says how deep a partial step reaches, with DeepCache's numbering: with L layers in an up block
(3 in SD v1.5), branch ``b`` runs the last ``b % L + 1`` layers of up block ``b // L`` counted from the
output, every up block after it, and the matching layers of the down path. Branch 0 (the default,
DeepCache's) runs only the last layer of the last up block: a partial step then costs about a tenth of a full
one on SD v1.5.

``forecast=1`` extrapolates the reused feature (the input of the first layer that runs) linearly from the
latest two full steps instead of copying it, as TaylorSeer does for transformers.

``batched=True`` also reuses ``conv_in`` and the down-path layers a partial step would run (DeepCache's
design runs them on the step's own latent): a partial step then sees only its own timestep, not its own
latent, so a full step and the partial steps after it run as one batch of the UNet, as encoder propagation's
decoder does (capped by ``max_decoder_batch``). Its calibration target is ``"deep-batched:B"``.

It runs through the same engine as encoder propagation (:mod:`faster_diffusion.engine`: the same hooks,
taps and guarantees): every step full gives stock output bit for bit, prior noise injection
and every key-step form work, and the state is dropped after every run. Unless ``batched``, a partial step
needs the step's own latent, so partial steps run one at a time.
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

__all__ = ["DeepReuseConfig", "apply_deep_reuse", "batched_modules", "branch_count", "deep_modules"]


def _no_noise_injection() -> NoiseInjection:
    return NoiseInjection(enabled=False)


def branch_count(unet: torch.nn.Module) -> int:
    """How many branches ``unet`` has: up blocks times the layers of its last up block."""
    return len(unet.up_blocks) * len(unet.up_blocks[-1].resnets)


def deep_modules(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """The modules a partial step of ``branch`` does not run, in the order a forward pass meets them. The
    last is the one whose output enters the layers that run (the feature a forecast extrapolates)."""
    count = branch_count(unet)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < count:
        raise ValueError(
            f"branch must be a whole number from 0 to {count - 1} for this UNet ({len(unet.up_blocks)} up "
            f"blocks of {count // len(unet.up_blocks)} layers), got {branch!r}"
        )
    up_layers = len(unet.up_blocks[-1].resnets)
    block, layer = divmod(branch, up_layers)
    modules: list[torch.nn.Module] = []
    for index, down in enumerate(unet.down_blocks):
        if index > block or (index == block and layer == 0):
            modules.append(down)
        elif index == block:
            attentions = getattr(down, "attentions", None) or [None] * len(down.resnets)
            for position, (resnet, attention) in enumerate(zip(down.resnets, attentions, strict=True)):
                if position >= layer:
                    modules.extend(m for m in (resnet, attention) if m is not None)
            modules.extend(down.downsamplers or [])
    if unet.mid_block is not None:
        modules.append(unet.mid_block)
    last = len(unet.up_blocks) - 1
    for index, up in enumerate(unet.up_blocks):
        from_output = last - index
        if from_output > block:
            modules.append(up)
        elif from_output == block:
            skipped = len(up.resnets) - 1 - layer
            attentions = getattr(up, "attentions", None) or [None] * len(up.resnets)
            for resnet, attention in list(zip(up.resnets, attentions, strict=True))[:skipped]:
                modules.extend(m for m in (resnet, attention) if m is not None)
    return modules


def batched_modules(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """What a partial step of ``branch`` reuses when ``batched``: :func:`deep_modules` and, before them,
    ``conv_in`` and the down-path layers a partial step would otherwise run on its own latent (no module
    and one of its parts both: a whole down block, or its layers)."""
    deep = deep_modules(unet, branch)
    block, layer = divmod(branch, len(unet.up_blocks[-1].resnets))
    shallow: list[torch.nn.Module] = [unet.conv_in, *unet.down_blocks[:block]]
    if layer:
        down = unet.down_blocks[block]
        attentions = getattr(down, "attentions", None) or [None] * len(down.resnets)
        for resnet, attention in list(zip(down.resnets, attentions, strict=True))[:layer]:
            shallow.extend(m for m in (resnet, attention) if m is not None)
    return shallow + deep


def _branch_arg(name: str, arg: str | None) -> int:
    if arg is None or not arg.isdigit():
        raise ValueError(f"the branch after '{name}:' must be a whole number, got {arg!r}")
    return int(arg)


def _target_modules(unet: torch.nn.Module, arg: str | None) -> list[torch.nn.Module]:
    """The ``"deep:B"`` calibration target: what a partial step of branch B reuses."""
    return deep_modules(unet, _branch_arg("deep", arg))


def _batched_target_modules(unet: torch.nn.Module, arg: str | None) -> list[torch.nn.Module]:
    """The ``"deep-batched:B"`` calibration target: what a batched partial step of branch B reuses."""
    return batched_modules(unet, _branch_arg("deep-batched", arg))


register_target("deep", _target_modules, default_arg="0")
register_target("deep-batched", _batched_target_modules, default_arg="0")


@dataclass(frozen=True)
class DeepReuseConfig:
    """Settings of deep reuse (see the module docstring).

    Example:
        >>> DeepReuseConfig(key_steps=KeySteps.uniform(3), branch=0, forecast=1).forecast
        1
    """

    #: The mode's name in messages.
    mode_name: ClassVar[str] = "deep reuse"

    #: The full steps. ``uniform:3`` is DeepCache's ``cache_interval=3``.
    key_steps: KeySteps = field(default_factory=lambda: KeySteps.uniform(3))
    #: How deep a partial step reaches (DeepCache's ``cache_branch_id``): 0 runs the least.
    branch: int = 0
    #: 0: reuse the deep feature of the latest full step as it is (DeepCache). 1: extrapolate it linearly,
    #: by step, from the latest two full steps.
    forecast: int = 0
    #: Prior noise injection (off by default in this mode: it restores the texture that encoder propagation
    #: loses, which a partial step here keeps).
    noise_injection: NoiseInjection = field(default_factory=_no_noise_injection)
    #: Partial steps also reuse ``conv_in`` and the shallow down path, so that a full step and the partial
    #: steps after it run as one batch (see the module docstring). False: DeepCache's design.
    batched: bool = False
    #: With ``batched``: steps per batch at most, as :attr:`FasterDiffusionConfig.max_decoder_batch`
    #: (``"auto"``, a whole number, or ``None`` for whole groups). Ignored otherwise.
    max_decoder_batch: int | str | None = AUTO

    def __post_init__(self) -> None:
        if not isinstance(self.key_steps, KeySteps):
            raise TypeError(f"key_steps must be a KeySteps value, got {self.key_steps!r}")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"branch must be a whole number >= 0, got {self.branch!r}")
        check_forecast(self.forecast)
        if not isinstance(self.noise_injection, NoiseInjection):
            raise TypeError(f"noise_injection must be a NoiseInjection value, got {self.noise_injection!r}")
        if not isinstance(self.batched, bool):
            raise TypeError(f"batched must be true or false, got {self.batched!r}")
        check_decoder_cap(self.max_decoder_batch)

    @property
    def parallel(self) -> bool:
        """Whether a group's steps run as one batch: only when ``batched`` (a partial step of DeepCache's
        design needs its own latent, so it runs on its own)."""
        return self.batched

    @property
    def decoder_batch_cap(self) -> int | str | None:
        """Steps per batch at most: 1 unless ``batched``."""
        return self.max_decoder_batch if self.batched else 1

    def cached_modules(self, unet: torch.nn.Module) -> list[torch.nn.Module]:
        return batched_modules(unet, self.branch) if self.batched else deep_modules(unet, self.branch)

    @property
    def calibration_target(self) -> str:
        """What ``key_steps="auto"`` is calibrated for: reusing this branch's deep modules (and, when
        ``batched``, its shallow down path)."""
        return f"deep-batched:{self.branch}" if self.batched else f"deep:{self.branch}"

    def forecast_slots(self, count: int) -> range:
        """Only the feature that enters the layers that run is forecast; the other kept outputs feed only
        modules that do not run."""
        return range(count - 1, count) if self.forecast else range(0)

    def copies_served(self, unet: torch.nn.Module) -> bool:
        """Kept outputs are handed over as they are, unless FreeU is on: it scales an up block's input in
        place."""
        return any(getattr(block, "b1", None) for block in unet.up_blocks)


def apply_deep_reuse(
    pipe: Any, config: DeepReuseConfig, *, resolve_auto: AutoResolver | None = None
) -> FasterDiffusion:
    """Attach deep reuse to a diffusers Stable Diffusion pipeline, in place (use it through
    :func:`faster_diffusion.apply_faster_diffusion` with a :class:`DeepReuseConfig`)."""
    if not isinstance(config, DeepReuseConfig):
        raise TypeError(f"config must be a DeepReuseConfig, got {type(config).__name__}")
    return attach_reuse(pipe, config, resolve_auto)
