"""Taps on what diffusers' hook registry cannot hold: a scheduler instance's ``set_timesteps`` and ``step``
(a run starts; prior noise injection; the step count), and a pipeline instance's ``progress_bar`` (the
denoising loop begins and ends). Each is undone by its ``detach``.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

from .noise import inject_prior_noise


class SchedulerTap:
    """Wraps ``set_timesteps`` and ``step`` of one scheduler instance; undone by :meth:`detach`.

    Schedulers are not ``nn.Module``s, so diffusers' hook registry cannot hold these. The wrappers keep the
    wrapped methods' signatures (the pipeline inspects them for ``eta``, ``generator`` and ``timesteps``).
    """

    _METHODS = ("set_timesteps", "step")

    def __init__(self, scheduler: Any, state: Any, handle: Any) -> None:
        self.scheduler = scheduler
        self.state = state
        self.handle = handle
        self._originals: dict[str, Any] = {}
        self._step_signature: inspect.Signature | None = None

    def attach(self) -> None:
        for name in self._METHODS:
            original = getattr(self.scheduler, name)
            self._originals[name] = original
            setattr(self.scheduler, name, self._wrap(original, getattr(self, f"_{name}")))
        self._step_signature = inspect.signature(self._originals["step"])

    @staticmethod
    def _wrap(original: Any, replacement: Any) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return replacement(*args, **kwargs)

        wrapper._faster_diffusion_tap = True
        return wrapper

    @classmethod
    def tapped(cls, scheduler: Any) -> bool:
        """Whether a handle's tap is on ``scheduler`` already."""
        return any(
            getattr(vars(scheduler).get(name), "_faster_diffusion_tap", False) for name in cls._METHODS
        )

    def detach(self) -> None:
        for name in self._METHODS:
            if name in vars(self.scheduler):
                delattr(self.scheduler, name)
        self._originals.clear()

    def _set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        result = self._originals["set_timesteps"](*args, **kwargs)
        self.handle._start_run(self.scheduler.timesteps)
        return result

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        original = self._originals["step"]
        if not state.active:
            return original(*args, **kwargs)
        index = state.step
        bound = self._step_signature.bind(*args, **kwargs)
        sample = bound.arguments["sample"]
        if state.initial_latents is None:
            # z_T: the latents at the run's first step, exactly as the pipeline prepared them (after
            # init_noise_sigma scaling; for image-to-image, the noised input image's latents).
            state.initial_latents = sample
            state.initial_scale = state.latent_scales[index] if state.latent_scales else 1.0
        should_inject_noise = state.inject[index]
        if should_inject_noise:
            alpha = self.handle.config.noise_injection.alpha
            if state.latent_scales:  # sigma-scaled latents: the addition in VP terms (noise.latent_scales)
                alpha = alpha * state.latent_scales[index] / state.initial_scale
            bound.arguments["sample"] = inject_prior_noise(sample, state.initial_latents, alpha)
        result = original(*bound.args, **bound.kwargs)
        state.step += 1
        state.stats.steps += 1
        state.stats.injected_steps += int(should_inject_noise)
        if state.step == state.num_steps:
            state.reset()  # the run is over: drop cached features and predictions
        return result


class _LoopProgressBar:
    """The pipeline's progress bar, unchanged, except that leaving its ``with`` block ends the run."""

    def __init__(self, bar: Any, on_exit: Any) -> None:
        self._bar = bar
        self._on_exit = on_exit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    def __iter__(self) -> Any:
        return iter(self._bar)

    def __len__(self) -> int:
        return len(self._bar)

    def __enter__(self) -> _LoopProgressBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return self._bar.__exit__(*exc_info)
        finally:
            self._on_exit()


#: Marks an attribute that an instance did not have.
_ABSENT = object()


class RunEndTap:
    """Wraps ``progress_bar`` of one pipeline instance, so that the run ends when the denoising loop does.

    Every diffusers pipeline runs its loop inside ``with self.progress_bar(total=...)``. Leaving that block,
    however the loop ends (finished, stopped by ``pipe._interrupt``, or by an exception), drops the run's
    cached features and predictions, so that nothing stale is served afterwards. Undone by :meth:`detach`.
    """

    def __init__(self, pipe: Any, state: Any) -> None:
        self._pipe = weakref.ref(pipe)
        self.state = state
        self.attached = False
        # What the pipeline instance itself held as progress_bar before attach() (an override of the class's
        # method), put back by detach(); _ABSENT when it held none.
        self._own: Any = _ABSENT

    def watches(self, pipe: Any) -> bool:
        return self.attached and self._pipe() is pipe

    def attach(self) -> None:
        pipe = self._pipe()
        self._own = vars(pipe).get("progress_bar", _ABSENT)
        original = getattr(pipe, "progress_bar", None)
        if not callable(original):
            return
        state = self.state

        @functools.wraps(original)
        def progress_bar(*args: Any, **kwargs: Any) -> _LoopProgressBar:
            total = kwargs.get("total")
            if state.active and not state.started:
                state.in_loop = True
                if isinstance(total, int) and not isinstance(total, bool):
                    state.loop_steps = total  # the steps the loop will run, for a run that stops early
            return _LoopProgressBar(original(*args, **kwargs), state.reset)

        progress_bar._faster_diffusion_tap = True
        pipe.progress_bar = progress_bar
        self.attached = True

    @staticmethod
    def is_tap(value: Any) -> bool:
        """Whether ``value`` is a ``progress_bar`` this class put on a pipeline (shallow copies carry it)."""
        return getattr(value, "_faster_diffusion_tap", False) is True

    def detach(self) -> None:
        pipe = self._pipe()
        if pipe is not None and "progress_bar" in vars(pipe):
            if self._own is _ABSENT:
                delattr(pipe, "progress_bar")
            else:
                pipe.progress_bar = self._own
        self._own = _ABSENT
        self.attached = False
