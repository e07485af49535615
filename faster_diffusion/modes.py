"""The ways of reusing UNet features, and the one entry point that applies any of them.

A reuse mode is a config class (a frozen dataclass), a function that attaches the mode to a pipeline and
returns a handle with ``remove()`` and ``last_run``, and one row in :data:`MODES` (or a call of
:func:`register_mode`). :func:`apply_faster_diffusion` looks the config's class up there, as diffusers'
``enable_cache(config)`` does, and hands the mode calibration's resolver for ``key_steps="auto"``, so that no
mode imports calibration. Two modes are registered: the paper's encoder propagation
(:class:`~faster_diffusion.encoder.FasterDiffusionConfig`) and deep reuse
(:class:`~faster_diffusion.deep.DeepReuseConfig`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .calibration import resolve_auto
from .deep import DeepReuseConfig, apply_deep_reuse
from .encoder import FasterDiffusionConfig, apply_encoder_propagation
from .policy import DEFAULT_MODE, any_steps_default_key_steps

#: Applies a mode: ``apply(pipe, config, resolve_auto=...)`` attaches it and returns its handle.
ApplyMode = Callable[..., Any]

#: Each reuse mode's config class, and the function that applies it.
MODES: dict[type, ApplyMode] = {
    FasterDiffusionConfig: apply_encoder_propagation,
    DeepReuseConfig: apply_deep_reuse,
}


def register_mode(config_class: type, apply: ApplyMode) -> None:
    """Make ``apply_faster_diffusion(pipe, config)``, for a ``config`` of ``config_class``, call
    ``apply(pipe, config, resolve_auto=...)``."""
    if not isinstance(config_class, type):
        raise TypeError(f"config_class must be a class, got {config_class!r}")
    if not callable(apply):
        raise TypeError(f"apply must be callable, got {apply!r}")
    MODES[config_class] = apply


def apply_faster_diffusion(pipe: Any, config: Any = None) -> Any:
    """Attach faster diffusion to a diffusers Stable Diffusion pipeline, in place, in the mode of ``config``'s
    class (:data:`MODES`). Returns a handle whose ``remove()`` takes it off again.

    ``config=None`` gives the product's default, as the command line and the Cog model use it: deep reuse
    (:data:`faster_diffusion.policy.DEFAULT_MODE`) with the default key steps for this pipeline's scheduler,
    for runs of any step count (:func:`faster_diffusion.policy.any_steps_default_key_steps`: ``auto:13/50``
    with DDIM, 13 full steps of 50 and 7 of 25; ``auto:6/20@feature`` with DPM-Solver; every third step with
    DPM-Solver++ and every other scheduler). A config of a
    mode gives that mode; ``auto`` key steps are placed by a calibration of the model for the run's sampler
    and step count (:func:`faster_diffusion.calibrate`, which also works with faster diffusion attached); a
    run without one places :meth:`KeySteps.fallback` (DeepCache's uniform interval, with at least as many
    full steps) and says so once with a :class:`~faster_diffusion.engine.CalibrationFallbackWarning`.

    Example:
        >>> from faster_diffusion import FasterDiffusionConfig, KeySteps, apply_faster_diffusion, use_sampler
        >>> from fixtures.tiny import build_tiny_pipeline
        >>> pipe = build_tiny_pipeline()
        >>> use_sampler(pipe, "DPM-Solver-20")
        <Sampler.DPM_SOLVER: 'DPM-Solver-20'>
        >>> handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.paper()))
        >>> latents = pipe("a red circle", num_inference_steps=20, output_type="latent").images
        >>> handle.last_run.full_passes, handle.last_run.partial_passes
        (7, 13)
        >>> handle.remove()
    """
    if config is None:
        default = DeepReuseConfig if DEFAULT_MODE == "deep" else FasterDiffusionConfig
        config = default(key_steps=any_steps_default_key_steps(pipe, mode=DEFAULT_MODE))
    apply = MODES.get(type(config))
    if apply is None:
        known = ", ".join(cls.__name__ for cls in MODES)
        raise TypeError(
            f"config must be a FasterDiffusionConfig (or another registered mode: {known}), got "
            f"{type(config).__name__}"
        )
    return apply(pipe, config, resolve_auto=resolve_auto)
