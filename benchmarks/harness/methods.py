"""Methods as registrations: one of ours at a setting, or a peer, is one entry of a table.

A method's name is what reports show (``stock``, ``deep:3``, ``deepcache:3``, ``deep auto:6 (feature)``,
``encoder: paper``, ``propagation+batched``...). Each name matches the pattern of exactly one registration,
whose ``attach`` attaches the method to a pipeline set for a sampler and returns a handle with ``remove()``
(``None`` for stock), and whose ``full`` gives its full UNet passes. The judge runs (:func:`run`) and the
speed protocol (``benchmarks/speed.py``) attach methods through :func:`attach`, so a new peer is one
:func:`register_method` call, used everywhere::

    def attach_deepcache(pipe, context, interval):
        from DeepCache import DeepCacheSDHelper
        ...
        return helper  # with remove()

    register_method(
        r"deepcache:(?P<interval>\\d+)", attach_deepcache, uniform_full, needs="DeepCache",
        timed_kinds=("deepcache",),  # speed.py --extra-modes deepcache:I
    )

A handle's ``last_run`` (``full_passes``, ``partial_passes``, ``unet_batches``, ``schedule.indices``),
where it has one, is what the speed report counts; a peer that keeps no counts sets it from its rule.
"""

from __future__ import annotations

import importlib
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faster_diffusion import (
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    apply_faster_diffusion,
)
from faster_diffusion.calibration import find_calibration
from faster_diffusion.schedule import paper_key_steps


@dataclass(frozen=True)
class Context:
    """What a method is attached for: the run's steps, and the settings a benchmark sets for every method."""

    #: Steps of the run.
    steps: int
    #: Key steps of the encoder-propagation modes of ``speed.py`` (``propagation``, ``propagation+batched``).
    key_steps: KeySteps = field(default_factory=KeySteps.paper)
    #: ``max_decoder_batch`` of ours where it applies (speed's ``--decoder-cap``).
    max_decoder_batch: int | str | None = "auto"


@dataclass(frozen=True)
class Method:
    """One registration: names matching ``pattern`` (its named groups are ``attach``'s and ``full``'s
    keyword arguments, as text)."""

    pattern: re.Pattern
    #: ``attach(pipe, context, **groups)``: the handle (``remove()``), or ``None`` for stock.
    attach: Callable[..., Any]
    #: ``full(context, **groups)``: full UNet passes (encoder passes) of a run.
    full: Callable[..., int]
    #: The module it imports (a peer's package), or ``None``.
    needs: str | None = None
    #: The ``KIND`` of names ``KIND:N`` (N a whole number >= 1) that ``speed.py --extra-modes`` may time.
    timed_kinds: tuple[str, ...] = ()

    def available(self) -> bool:
        """Whether :attr:`needs` imports here."""
        if self.needs is None:
            return True
        try:
            importlib.import_module(self.needs)
        except ImportError:
            return False
        return True


METHODS: list[Method] = []


def register_method(
    pattern: str,
    attach: Callable[..., Any],
    full: Callable[..., int],
    needs: str | None = None,
    timed_kinds: tuple[str, ...] = (),
) -> None:
    """Register a method: every name that ``pattern`` matches in full is attached by ``attach`` and has
    ``full`` full passes; ``needs``: the module it imports (``have(name)`` says whether it does here);
    ``timed_kinds``: the ``KIND`` of its names ``KIND:N`` that ``speed.py --extra-modes`` may time."""
    compiled = re.compile(pattern)
    if any(m.pattern.pattern == compiled.pattern for m in METHODS):
        raise ValueError(f"a method is already registered for {pattern!r}")
    METHODS.append(Method(compiled, attach, full, needs, tuple(timed_kinds)))


def lookup(name: str) -> tuple[Method, dict[str, str]]:
    """The registration of ``name`` and its groups; ``KeyError`` naming the known patterns otherwise."""
    for method in METHODS:
        match = method.pattern.fullmatch(name)
        if match:
            return method, match.groupdict()
    known = ", ".join(m.pattern.pattern for m in METHODS)
    raise KeyError(f"no method is registered for {name!r}; the registered patterns: {known}")


def attach(pipe, name: str, context: Context):
    """Attach method ``name`` to ``pipe`` (already set for its sampler); its handle, or ``None`` for stock."""
    method, groups = lookup(name)
    return method.attach(pipe, context, **groups)


def full_passes(name: str, context: Context) -> int:
    """Full UNet passes of a run of ``name``."""
    method, groups = lookup(name)
    return method.full(context, **groups)


def have(name: str) -> bool:
    """Whether the package method ``name`` needs imports here (``False`` for a peer not installed)."""
    return lookup(name)[0].available()


def timed_kinds() -> tuple[str, ...]:
    """Every registration's ``timed_kinds``, in order of registration: what ``speed.py --extra-modes``
    times beside its own modes."""
    return tuple(kind for method in METHODS for kind in method.timed_kinds)


def have_deepcache() -> bool:
    """Whether DeepCache (the peer) imports here."""
    return have("deepcache:1")


@dataclass(frozen=True)
class EncoderSetting:
    """Encoder propagation at a setting that a script names itself (``img2img_quality.py``'s ``default``, the
    encoder policy's key steps, and ``paper``): its key steps (``None``: stock) and whether prior noise
    injection is on. Not a registration: see the harness's docstring."""

    name: str
    key_steps: KeySteps | None
    noise: bool = True

    def faster(self) -> FasterDiffusionConfig | None:
        """The config to attach, or ``None`` for stock."""
        if self.key_steps is None:
            return None
        noise = NoiseInjection(enabled=self.noise)
        return FasterDiffusionConfig(key_steps=self.key_steps, noise_injection=noise)


# ---------------------------------------------------------------------------------------------- the rules


def uniform_full(context: Context, **groups: str) -> int:
    """Full steps 0, I, 2I, ... of ``interval`` I."""
    return len(range(0, context.steps, int(groups["interval"])))


def spread(steps: int, full: int) -> KeySteps:
    """``full`` full steps of ``steps`` spread evenly (``round(i * steps / full)``), step 0 first."""
    return KeySteps.explicit(sorted({round(i * steps / full) for i in range(full)}))


def _budget(context: Context, budget: str, **_: str) -> int:
    return int(budget)


def _all_steps(context: Context, **_: str) -> int:
    return context.steps


def _paper_full(context: Context, **_: str) -> int:
    return KeySteps.paper().resolve(context.steps).num_key_steps


def _speed_keys_full(context: Context, **_: str) -> int:
    return context.key_steps.resolve(context.steps).num_key_steps


# --------------------------------------------------------------------------------------------- ours


def _stock(pipe, context: Context):
    return None


def _deep(pipe, context: Context, kind: str, interval: str):
    """Deep reuse, branch 0, a full step every ``interval`` steps: features copied (``deep``), forecast
    (``deep+forecast``), or batched with their full step (``deep-batched``; ``batched`` in
    ``deep_variants.py``)."""
    config = DeepReuseConfig(
        key_steps=KeySteps.uniform(int(interval)),
        branch=0,
        forecast=int(kind == "deep+forecast"),
        batched=kind in ("deep-batched", "batched"),
        max_decoder_batch=context.max_decoder_batch,
    )
    return apply_faster_diffusion(pipe, config)


def _deep_full(pipe, context: Context, budget: str, branch: str = "0"):
    """Deep reuse at ``branch`` (0 for ``deep-full:B``), ``budget`` full steps spread evenly."""
    config = DeepReuseConfig(
        key_steps=spread(context.steps, int(budget)),
        branch=int(branch),
        max_decoder_batch=context.max_decoder_batch,
    )
    return apply_faster_diffusion(pipe, config)


def _deep_auto(pipe, context: Context, budget: str, feature: str | None):
    """Deep reuse, branch 0, ``budget`` full steps placed by the model's ``deep:0`` calibration, read with
    the ``prediction`` criterion (its default) or, for ``(feature)``, the ``feature`` one."""
    calibration = find_calibration(pipe, context.steps, target="deep:0")
    if calibration is None:
        raise RuntimeError("no deep:0 calibration of this model for this sampler")
    keys = calibration.with_criterion("feature" if feature else "prediction").key_steps(int(budget))
    return apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys))


def _encoder(pipe, context: Context, budget: str | None = None):
    """Encoder propagation with prior noise injection (its default): the paper's key steps, or ``auto`` at
    ``budget``."""
    keys = KeySteps.paper() if budget is None else KeySteps.auto(int(budget))
    return apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=keys))


def reversed_paper_key_steps(num_steps: int) -> tuple[int, ...]:
    """The paper's key steps mirrored in time: same count and gaps, dense at the end instead of the start."""
    paper = paper_key_steps(num_steps)
    return (0, *sorted(num_steps - i for i in paper if i > 0))


def _encoder_at(pipe, context: Context, keys: str, interval: str | None, no_noise: str | None):
    """``quality.py``'s encoder propagation at a setting: the paper's key steps, them mirrored in time
    (``paper reversed``), ``auto`` at the paper's budget or ``uniform:I``; prior noise injection on, or off
    for ``, no noise``."""
    if interval is not None:
        key_steps = KeySteps.uniform(int(interval))
    elif keys == "paper reversed":
        key_steps = KeySteps.explicit(reversed_paper_key_steps(context.steps))
    else:
        key_steps = KeySteps.auto() if keys == "auto" else KeySteps.paper()
    noise = NoiseInjection(enabled=no_noise is None)
    return apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=key_steps, noise_injection=noise))


def _encoder_at_full(context: Context, interval: str | None = None, **_: str) -> int:
    return _paper_full(context) if interval is None else uniform_full(context, interval=interval)


def _propagation(pipe, context: Context, batched: str | None):
    """``speed.py``'s propagation modes: its key steps, sequential or batched decoder steps."""
    config = FasterDiffusionConfig(
        key_steps=context.key_steps,
        parallel=batched is not None,
        max_decoder_batch=context.max_decoder_batch,
        noise_injection=NoiseInjection(),
    )
    return apply_faster_diffusion(pipe, config)


# -------------------------------------------------------------------------------------------- peers


def _deepcache(pipe, context: Context, interval: str):
    """DeepCache's own ``DeepCacheSDHelper``, branch 0, a full step every ``interval`` steps."""
    from DeepCache import DeepCacheSDHelper

    every = int(interval)
    handle = DeepCacheSDHelper(pipe=pipe)
    handle.set_params(cache_interval=every, cache_branch_id=0)
    handle.enable()
    handle.remove = handle.disable
    # DeepCache keeps no counts: its full steps are every I-th (its "uniform" skip mode).
    full = tuple(range(0, context.steps, every))
    handle.last_run = types.SimpleNamespace(
        full_passes=len(full),
        partial_passes=context.steps - len(full),
        unet_batches=context.steps,
        schedule=types.SimpleNamespace(indices=full),
    )
    return handle


# In the order ``speed.py --extra-modes`` lists the kinds it times.
register_method(r"stock", _stock, _all_steps)
register_method(
    r"(?P<kind>deep|deep\+forecast):(?P<interval>\d+)",
    _deep,
    uniform_full,
    timed_kinds=("deep", "deep+forecast"),
)
register_method(
    r"deepcache:(?P<interval>\d+)", _deepcache, uniform_full, needs="DeepCache", timed_kinds=("deepcache",)
)
register_method(r"deep-full:(?P<budget>\d+)", _deep_full, _budget, timed_kinds=("deep-full",))
# ``batched:I`` is ``deep_variants.py``'s name for ``deep-batched:I``.
register_method(
    r"(?P<kind>deep-batched|batched):(?P<interval>\d+)", _deep, uniform_full, timed_kinds=("deep-batched",)
)
# ``deep_variants.py``'s depth family: branch b at the budget of DeepCache's interval I.
register_method(r"depth b(?P<branch>\d+):(?P<budget>\d+) \(I=\d+\)", _deep_full, _budget)
register_method(r"deep auto:(?P<budget>\d+)(?P<feature> \(feature\))?", _deep_auto, _budget)
register_method(r"encoder: paper", _encoder, _paper_full)
register_method(r"encoder: auto:(?P<budget>\d+)", _encoder, _budget)
register_method(r"propagation(?P<batched>\+batched)?", _propagation, _speed_keys_full)
# ``quality.py``'s names (``auto``: at the paper's budget, as many full passes).
register_method(
    r"(?P<keys>paper|paper reversed|auto|uniform:(?P<interval>\d+))(?P<no_noise>, no noise)?",
    _encoder_at,
    _encoder_at_full,
)
