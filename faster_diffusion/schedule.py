"""Key-step schedules: at which denoising steps the whole UNet runs (the full steps).

A key step is an index ``i`` into the scheduler's timesteps ``tau_0 > tau_1 > ... > tau_{N-1}``. At a key
step the whole UNet runs; every other step (a partial step) reuses what the latest key step computed: the
encoder features in encoder propagation (Li et al., "Faster Diffusion", NeurIPS 2024, Sec. 3.2), the deep
features in deep reuse. Step 0 is always a key step.

A *step* is one iteration of the pipeline's denoising loop, over all of ``scheduler.timesteps``: one UNet
call. For most schedulers that is one sampler step; Heun, KDPM2 and DPMSolverSDE make 2N - 1 calls for N
sampler steps and PNDM N + 1 (its warm-up repeats a timestep), and ``N`` here is then that count of calls.
Key-step lists, ``uniform:K``, ``auto:B``, calibrations and ``RunStats.steps`` all count UNet calls, as
DeepCache does.

Two values live here:

- :class:`KeySteps` says *how* to choose key steps (the paper's preset, every k-th step, an explicit list,
  every step, or ``auto``: placed from a calibration of the model). It does not know the number of steps
  yet. ``KeySteps.parse`` reads the text a user types.
- :class:`KeyStepSchedule` is the resolved, validated set of indices for a given number of steps. Everything
  else in the package reads it; nothing recomputes it.

Example:
    >>> from faster_diffusion import KeySteps
    >>> KeySteps.parse("paper").resolve(20).indices
    (0, 1, 2, 3, 5, 10, 15)
    >>> KeySteps.parse("uniform:4").resolve(10).groups
    ((0, 4), (4, 8), (8, 10))
"""

from __future__ import annotations

import enum
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, SupportsIndex

#: Key steps of the paper for DDIM with 50 steps: t_key = {50, 49, 48, 47, 45, 40, 35, 25, 15} in the paper's
#: 1-based, descending notation (Sec. 4.1 and the authors' reference code), as 0-based indices.
PAPER_DDIM_50_KEY_STEPS: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 25, 35)

#: The number of steps the paper's list was written for.
PAPER_REFERENCE_STEPS = 50

#: Key steps of the paper for DPM-Solver and DPM-Solver++ with 20 steps: the DDIM list cut at 20 (reference
#: code).
PAPER_DPM_SOLVER_20_KEY_STEPS: tuple[int, ...] = tuple(i for i in PAPER_DDIM_50_KEY_STEPS if i < 20)

#: Uniform spacing the authors recommend for community fine-tunes (reference code README): every 4th step.
RECOMMENDED_UNIFORM_EVERY = 4

#: What ``KeySteps.parse`` accepts, for error messages.
ACCEPTED_FORMS = (
    "'paper', 'all', 'auto', 'auto:B' (B key steps, a whole number >= 1), 'auto:B@C' or 'auto@C' (read "
    "with the calibration's criterion C, such as 'auto:6@feature'), 'uniform:K' (K a whole number >= 1), "
    "or a comma-separated list of step indices that starts with 0, such as '0,1,2,3,5,10,15,25,35'"
)


#: What a calibration criterion's name may be, so that key steps can carry it (``auto:6@feature``): lowercase
#: letters, digits, ``_`` and ``-``, starting with a letter.
CRITERION_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class KeyStepError(ValueError):
    """A key-step specification that cannot be used. The message names the input and what is allowed."""


class CalibrationError(KeyStepError):
    """A calibration that cannot be made or used; the message says what is missing and how to get it."""


class CalibrationMissing(CalibrationError):
    """No calibration of the model is saved or made for a run's scheduler and step count. A run with ``auto``
    key steps then places them by :meth:`KeySteps.fallback` and says so (``benchmarks/README.md``, "The first
    call without a calibration"); :func:`faster_diffusion.calibrate` raises it only where it is asked for a
    saved calibration alone."""


class KeyStepKind(enum.Enum):
    PAPER = "paper"
    UNIFORM = "uniform"
    EXPLICIT = "explicit"
    ALL = "all"
    AUTO = "auto"


def paper_key_steps(num_steps: int) -> tuple[int, ...]:
    """The paper's key steps for ``num_steps`` steps.

    The paper gives one list, for 50 steps, and derives its 20-step DPM-Solver list by cutting it at 20.
    We apply the same two rules to any step count:

    - ``num_steps <= 50``: the 50-step list cut at ``num_steps`` (gives the paper's lists for 50 and 20);
    - ``num_steps > 50``: the 50-step list scaled to ``num_steps``, ``floor(i * num_steps / 50 + 1/2)``
      (rounded half up), so the key steps sit at the same fractions of the trajectory (scaling up never
      merges two indices).
    """
    _check_num_steps(num_steps)
    if num_steps <= PAPER_REFERENCE_STEPS:
        return tuple(i for i in PAPER_DDIM_50_KEY_STEPS if i < num_steps)
    return tuple(math.floor(i * num_steps / PAPER_REFERENCE_STEPS + 0.5) for i in PAPER_DDIM_50_KEY_STEPS)


def uniform_key_steps(num_steps: int, every: int) -> tuple[int, ...]:
    """Every ``every``-th step is a key step: ``i % every == 0`` (the reference code's uniform mode)."""
    _check_num_steps(num_steps)
    return tuple(range(0, num_steps, every))


def scaled_budget(num_steps: int, fraction: float) -> int:
    """``fraction`` of ``num_steps`` key steps, rounded half up, at least 1."""
    return max(1, math.floor(num_steps * fraction + 0.5))


def fallback_interval(num_steps: int, budget: int) -> int:
    """The uniform interval that stands in for ``budget`` calibrated key steps of ``num_steps``: the largest
    ``I`` whose ``uniform:I`` has at least ``budget`` key steps (``ceil(num_steps / I) >= budget``), so it is
    never cheaper than the budget asked: 4 for 13 of 50, 3 for 6 of 20.

    Example:
        >>> fallback_interval(50, 13), fallback_interval(20, 6), fallback_interval(20, 20)
        (4, 3, 1)
    """
    _check_num_steps(num_steps)
    _check_budget(num_steps, budget)
    return max(i for i in range(1, num_steps + 1) if math.ceil(num_steps / i) >= budget)


def evenly_spaced_key_steps(num_steps: int, budget: int) -> tuple[int, ...]:
    """``budget`` key steps spread evenly over ``num_steps`` steps: ``round(i * num_steps / budget)`` (half
    up) for ``i = 0 .. budget-1``. For a budget that divides the step count this is ``uniform``."""
    _check_num_steps(num_steps)
    _check_budget(num_steps, budget)
    return tuple(math.floor(i * num_steps / budget + 0.5) for i in range(budget))


def paper_shaped_key_steps(num_steps: int, budget: int) -> tuple[int, ...]:
    """The paper's preset stretched or squeezed to ``budget`` key steps: the same shape, dense early, sparse
    late. The preset's i-th of L key steps sits at fraction ``i / L`` of the budget; a budget of B takes the
    piecewise-linear interpolation of the preset (with ``num_steps`` at fraction 1) at ``j / B``, rounded,
    kept strictly increasing. ``budget == L`` gives the preset itself."""
    _check_num_steps(num_steps)
    _check_budget(num_steps, budget)
    paper = paper_key_steps(num_steps)
    points = [i / len(paper) for i in range(len(paper))] + [1.0]
    values = [*paper, num_steps]
    keys: list[int] = []
    for j in range(budget):
        x = j / budget
        segment = max(i for i in range(len(points) - 1) if points[i] <= x)
        x0, x1, y0, y1 = points[segment], points[segment + 1], values[segment], values[segment + 1]
        value = math.floor(y0 + (y1 - y0) * (x - x0) / (x1 - x0) + 0.5)
        lowest = keys[-1] + 1 if keys else 0
        keys.append(min(max(value, lowest), num_steps - (budget - j)))
    return tuple(keys)


def _check_budget(num_steps: int, budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= num_steps:
        raise KeyStepError(f"budget must be a whole number from 1 to {num_steps}, got {budget!r}")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise KeyStepError(f"num_steps must be a whole number >= 1, got {num_steps!r}")


@dataclass(frozen=True)
class KeySteps:
    """How to choose key steps, before the number of steps is known.

    Build one with :meth:`paper`, :meth:`uniform`, :meth:`explicit`, :meth:`every_step`, :meth:`auto` or
    :meth:`parse`, then call :meth:`resolve` with the number of inference steps (and, for ``auto``, the
    model's calibration).
    """

    kind: KeyStepKind
    #: For ``UNIFORM``: k, every k-th step is a key step.
    every: int | None = None
    #: For ``EXPLICIT``: the indices given, made plain ints (validated for a step count by :meth:`resolve`).
    indices: tuple[int, ...] | None = None
    #: For ``AUTO``: the number of key steps; ``None`` for the paper's count (9 of 50, 7 of 20).
    budget: int | None = None
    #: For ``EXPLICIT``: where the list came from (a calibration, say), echoed by ``describe()``.
    origin: str | None = None
    #: For ``AUTO``: the criterion the calibration is read with (one it measured, such as ``"feature"``);
    #: ``None`` for the calibration target's default (:func:`faster_diffusion.calibration.default_criterion`).
    criterion: str | None = None
    #: For ``AUTO``: ``budget`` is per this many steps, scaled to the run's (:meth:`for_steps`); ``None``: the
    #: budget is the run's.
    per: int | None = None

    def __post_init__(self) -> None:
        every = self.every
        if self.kind is KeyStepKind.UNIFORM and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise KeyStepError(f"key_steps: uniform spacing must be a whole number >= 1, got {every!r}")
        if self.kind is KeyStepKind.EXPLICIT:
            object.__setattr__(self, "indices", _step_indices(self.indices))
            _validate_explicit(self.indices)
        budget = self.budget
        if (
            self.kind is KeyStepKind.AUTO
            and budget is not None
            and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1)
        ):
            raise KeyStepError(f"key_steps: the auto budget must be a whole number >= 1, got {budget!r}")
        per = self.per
        if per is not None and (
            self.kind is not KeyStepKind.AUTO
            or isinstance(per, bool)
            or not isinstance(per, int)
            or budget is None
            or not 1 <= budget <= per
        ):
            raise KeyStepError(
                f"key_steps: a budget per steps is 'auto:B/N' with whole numbers 1 <= B <= N, got "
                f"budget {budget!r} per {per!r}"
            )
        if self.criterion is not None:
            if self.kind is not KeyStepKind.AUTO:
                raise KeyStepError("key_steps: only 'auto' key steps are read with a criterion")
            if not isinstance(self.criterion, str) or not CRITERION_NAME.fullmatch(self.criterion):
                raise KeyStepError(
                    f"key_steps: a criterion is a lowercase name such as 'feature', got {self.criterion!r}"
                )

    @classmethod
    def paper(cls) -> KeySteps:
        """The paper's preset; see :func:`paper_key_steps` for step counts other than 50 and 20."""
        return cls(KeyStepKind.PAPER)

    @classmethod
    def uniform(cls, every: int) -> KeySteps:
        """Every ``every``-th step (``i % every == 0``). ``uniform(1)`` is every step."""
        return cls(KeyStepKind.UNIFORM, every=every)

    @classmethod
    def explicit(cls, indices: Iterable[SupportsIndex]) -> KeySteps:
        """An explicit, strictly increasing list of 0-based step indices that starts with 0.

        Any iterable of whole numbers: Python ints, numpy integers, a numpy array or a torch tensor of
        integers; they are kept as plain ints. Floats (even ``3.0``) and booleans are refused.
        """
        return cls(KeyStepKind.EXPLICIT, indices=indices)

    @classmethod
    def auto(
        cls, budget: int | None = None, criterion: str | None = None, per: int | None = None
    ) -> KeySteps:
        """``budget`` key steps placed from a calibration of the model (:mod:`faster_diffusion.calibration`);
        ``None`` for the paper's count. Resolved at the start of a run, against the calibration for the
        run's model, sampler and step count, read with ``criterion`` (one the calibration measured; ``None``:
        the default criterion of what the mode reuses). ``per``: the budget is ``budget`` per ``per`` steps,
        scaled to the run's step count (:meth:`for_steps`; ``auto:13/50``), as the one-call default is."""
        return cls(KeyStepKind.AUTO, budget=budget, criterion=criterion, per=per)

    def check_budget_fits(self, num_steps: int) -> None:
        """Raise :class:`KeyStepError` if an ``auto`` budget is more than a run's ``num_steps`` steps."""
        if self.budget is not None and self.budget > num_steps:
            raise KeyStepError(
                f"key_steps {str(self)!r}: a budget of {self.budget} key steps is more than the "
                f"{num_steps} steps of the run"
            )

    def for_steps(self, num_steps: int) -> KeySteps:
        """These key steps for a run of ``num_steps`` steps: ``auto:B/N`` becomes ``auto:b`` with ``b`` the
        same fraction of the run's steps, rounded half up, at least 1 (``auto:13/50`` is ``auto:13`` for 50
        steps and ``auto:7`` for 25); any other value is returned as it is.

        Example:
            >>> str(KeySteps.auto(13, per=50).for_steps(25)), str(KeySteps.auto(6, "feature", 20))
            ('auto:7', 'auto:6/20@feature')
        """
        if self.per is None:
            return self
        _check_num_steps(num_steps)
        return KeySteps.auto(min(num_steps, scaled_budget(num_steps, self.budget / self.per)), self.criterion)

    def placed_by(self, calibration: Any) -> Any:
        """For ``AUTO``: ``calibration`` read with this value's criterion (itself when it names none). A
        clear error when the calibration did not measure that criterion."""
        if self.criterion is None or calibration.criterion == self.criterion:
            return calibration
        if self.criterion not in calibration.other:
            measured = sorted(calibration.criteria)
            raise CalibrationError(
                f"key_steps {str(self)!r}: the calibration of this model measured the criteria {measured}, "
                f"not {self.criterion!r}; run faster_diffusion.calibrate(pipe, num_inference_steps="
                f"{calibration.num_steps}, target={calibration.target!r}, criteria=[{self.criterion!r}]) "
                "(it adds the criterion to the calibration), or pass key steps without a criterion"
            )
        return calibration.with_criterion(self.criterion)

    def with_origin(self, origin: str) -> KeySteps:
        """The same explicit list, saying where it came from."""
        if self.kind is not KeyStepKind.EXPLICIT:
            raise KeyStepError("key_steps: only an explicit list carries an origin")
        return KeySteps(KeyStepKind.EXPLICIT, indices=self.indices, origin=origin)

    @classmethod
    def every_step(cls) -> KeySteps:
        """Every step is a key step: the whole UNet always runs, which is plain stock sampling."""
        return cls(KeyStepKind.ALL)

    @classmethod
    def parse(cls, text: str) -> KeySteps:
        """Read the text form a user types.

        Accepted: ``paper``, ``all`` (or ``every``), ``auto``, ``auto:B``, ``auto@C`` and ``auto:B@C`` (read
        with the calibration's criterion ``C``), ``auto:B/N`` (B per N steps, scaled to the run's),
        ``uniform:K`` and a comma-separated index list such as
        ``0,1,2,3,5,10,15,25,35`` (spaces and surrounding brackets are allowed). Case does not matter.
        """
        if not isinstance(text, str):
            raise KeyStepError(f"key_steps must be text, got {type(text).__name__}: {text!r}")
        raw = text
        text = text.strip().lower()
        if text == "paper":
            return cls.paper()
        if text in ("all", "every"):
            return cls.every_step()
        match = re.fullmatch(r"auto(?:\s*[:=]\s*([^@\s]+))?(?:\s*@\s*(\S*))?", text)
        if match:
            value, criterion = match.groups()
            per = None
            if value is not None and re.fullmatch(r"\d+/\d+", value):
                value, per_text = value.split("/")
                per = int(per_text)
                if not 1 <= int(value) <= per:
                    raise KeyStepError(
                        f"key_steps: invalid value {raw!r}: 'auto:B/N' needs whole numbers 1 <= B <= N"
                    )
            if value is not None and (not re.fullmatch(r"\d+", value) or int(value) < 1):
                raise KeyStepError(
                    f"key_steps: invalid value {raw!r}: the auto budget must be a whole number >= 1, "
                    f"got {value!r}"
                )
            if criterion is not None and not CRITERION_NAME.fullmatch(criterion):
                raise KeyStepError(
                    f"key_steps: invalid value {raw!r}: after '@' comes a criterion such as 'feature', "
                    f"got {criterion!r}"
                )
            return cls.auto(None if value is None else int(value), criterion, per)
        match = re.fullmatch(r"uniform\s*[:=]\s*(\S+)", text)
        if match:
            value = match.group(1)
            if not re.fullmatch(r"\d+", value):
                raise KeyStepError(
                    f"key_steps: invalid value {raw!r}: uniform spacing must be a whole number >= 1, "
                    f"got {value!r}"
                )
            return cls.uniform(int(value))
        body = text
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        parts = [part.strip() for part in body.split(",")]
        if not body.strip() or not all(re.fullmatch(r"[+-]?\d+", part) for part in parts):
            raise KeyStepError(f"key_steps: invalid value {raw!r}: expected {ACCEPTED_FORMS}")
        return cls.explicit(int(part) for part in parts)

    def resolve(
        self, num_steps: int, calibration: Any = None, start: int = 0, stop: int | None = None
    ) -> KeyStepSchedule:
        """The validated schedule for ``num_steps`` inference steps, of which steps ``start .. stop-1`` run
        (all of them by default; image-to-image runs the last ones).

        ``AUTO`` needs ``calibration``, a :class:`~faster_diffusion.calibration.Calibration` for ``num_steps``
        steps; the other kinds ignore it. For a run of part of the schedule, a list (the paper's, uniform or
        explicit) is cut to the steps that run (:meth:`KeyStepSchedule.cut`), while ``AUTO``'s budget, a
        number of encoder passes, is placed again over them (``Calibration.indices``).
        """
        schedule = self._resolve_whole(num_steps, calibration, start, stop)
        whole_run = start == 0 and (stop is None or stop == num_steps)
        return schedule if whole_run else schedule.cut(start, stop)

    def _resolve_whole(
        self, num_steps: int, calibration: Any, start: int, stop: int | None
    ) -> KeyStepSchedule:
        _check_num_steps(num_steps)
        if self.per is not None:
            return self.for_steps(num_steps)._resolve_whole(num_steps, calibration, start, stop)
        if self.kind is KeyStepKind.AUTO:
            if calibration is None:
                raise KeyStepError(
                    f"key_steps {str(self)!r} needs a calibration of the model for {num_steps} steps: run "
                    "faster_diffusion.calibrate(pipe) first, or pass explicit key steps"
                )
            if calibration.num_steps != num_steps:
                raise KeyStepError(
                    f"key_steps {str(self)!r}: the calibration is for {calibration.num_steps} steps, the run "
                    f"has {num_steps}"
                )
            self.check_budget_fits(num_steps)
            return self.placed_by(calibration).key_steps(self.budget, start, stop).resolve(num_steps)
        if self.kind is KeyStepKind.PAPER:
            indices = paper_key_steps(num_steps)
        elif self.kind is KeyStepKind.UNIFORM:
            indices = uniform_key_steps(num_steps, self.every)
        elif self.kind is KeyStepKind.ALL:
            indices = tuple(range(num_steps))
        else:
            out_of_range = [i for i in self.indices if i >= num_steps]
            if out_of_range:
                raise KeyStepError(
                    f"key_steps: index {out_of_range[0]} is out of range for {num_steps} steps; "
                    f"allowed indices are 0 to {num_steps - 1}"
                )
            indices = self.indices
        return KeyStepSchedule(num_steps=num_steps, indices=indices, source=self)

    def fallback(self, num_steps: int) -> KeySteps:
        """What a run of ``num_steps`` steps places instead of these ``auto`` key steps when the model has
        no calibration for it: ``uniform:I`` with :func:`fallback_interval`, at least as many key steps as the
        budget (the paper's count when none is given). Any other kind is returned as it is."""
        if self.kind is not KeyStepKind.AUTO:
            return self
        if self.per is not None:
            return self.for_steps(num_steps).fallback(num_steps)
        budget = len(paper_key_steps(num_steps)) if self.budget is None else self.budget
        return KeySteps.uniform(fallback_interval(num_steps, budget))

    def __str__(self) -> str:
        if self.kind is KeyStepKind.UNIFORM:
            return f"uniform:{self.every}"
        if self.kind is KeyStepKind.EXPLICIT:
            return ",".join(str(i) for i in self.indices)
        if self.kind is KeyStepKind.AUTO:
            budget = "" if self.budget is None else f":{self.budget}"
            budget += "" if self.per is None else f"/{self.per}"
            criterion = "" if self.criterion is None else f"@{self.criterion}"
            return f"auto{budget}{criterion}"
        return self.kind.value


def _step_indices(indices: Any) -> tuple[int, ...]:
    """``indices`` as a tuple of plain ints: every entry a whole number, a Python int or anything else with
    ``__index__`` (numpy integers, 0-dim integer arrays and tensors), never a boolean (``True``, numpy's or
    torch's) nor a float, even a whole one. Only an iterable of them is a list (not text, nor a scalar)."""
    if indices is None:
        return ()
    if (
        isinstance(indices, (str, bytes))
        or not isinstance(indices, Iterable)
        or getattr(indices, "ndim", None) == 0  # a 0-dim array or tensor: iterable by type only
    ):
        raise KeyStepError(f"key_steps: expected a list of step indices, got {indices!r}")
    return tuple(_step_index(value) for value in indices)


def _step_index(value: Any) -> int:
    boolean = isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))
    if not boolean and getattr(value, "ndim", 0) == 0:  # several values are no index, even a 1-element one
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise KeyStepError(f"key_steps: step indices must be whole numbers, got {value!r}")


def _validate_explicit(indices: tuple[int, ...]) -> None:
    """Checks a list of plain ints (:func:`_step_indices`) for a schedule that starts at step 0."""
    if not indices:
        raise KeyStepError("key_steps: the list of step indices is empty; it must start with 0")
    negative = [i for i in indices if i < 0]
    if negative:
        raise KeyStepError(f"key_steps: step indices must be >= 0, got {negative[0]}")
    if 0 not in indices:
        raise KeyStepError(
            f"key_steps: the list must contain step 0 (the first step always runs in full: nothing ran "
            "before it to reuse), "
            f"got {list(indices)}"
        )
    seen = set()
    for value in indices:
        if value in seen:
            raise KeyStepError(f"key_steps: step {value} is listed twice in {list(indices)}")
        seen.add(value)
    if list(indices) != sorted(indices):
        raise KeyStepError(f"key_steps: step indices must be in increasing order, got {list(indices)}")


@dataclass(frozen=True)
class KeyStepSchedule:
    """The key steps for one run of ``num_steps`` steps. Immutable; validated when built.

    A run may start part-way through the schedule (image-to-image: diffusers runs the last
    ``int(num_steps * strength)`` steps) or stop early (SDXL's ``denoising_end``). Then ``start`` and ``stop``
    say which steps run, and the schedule is the one of the whole run cut to them by :meth:`cut`. Indices stay
    those of the whole schedule, so a step keeps its timestep whatever part of the schedule runs.
    """

    num_steps: int
    indices: tuple[int, ...]
    #: The specification this schedule was resolved from, for echoing back.
    source: KeySteps | None = None
    #: The first step that runs (0 unless the run starts part-way, as image-to-image does).
    start: int = 0
    #: One past the last step that runs; ``None``: to the end of the schedule.
    stop: int | None = None

    def __post_init__(self) -> None:
        _check_num_steps(self.num_steps)
        stop = self.num_steps if self.stop is None else self.stop
        for name, value in (("start", self.start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise KeyStepError(f"key_steps: {name} must be a whole number, got {value!r}")
        if not 0 <= self.start < stop <= self.num_steps:
            raise KeyStepError(
                f"key_steps: the steps that run, {self.start} to {stop - 1}, must lie within the "
                f"{self.num_steps} steps of the schedule, in order"
            )
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "indices", _step_indices(self.indices))
        if self.start == 0:
            _validate_explicit(self.indices)
        elif not self.indices or self.indices[0] != self.start:
            raise KeyStepError(
                f"key_steps: the first step that runs ({self.start}) must be a key step, got "
                f"{list(self.indices)}"
            )
        else:
            _validate_explicit((0, *self.indices))
        if self.indices[-1] >= stop:
            raise KeyStepError(
                f"key_steps: index {self.indices[-1]} is out of range for {self.num_steps} steps; "
                f"allowed indices are {self.start} to {stop - 1}"
            )

    def cut(self, start: int, stop: int | None = None) -> KeyStepSchedule:
        """This schedule for a run of steps ``start .. stop-1`` only: its key steps among them, with
        ``start`` always a key step (nothing before it has run, so no encoder features exist to reuse).

        Example:
            >>> KeySteps.paper().resolve(50).cut(10).indices   # image-to-image, strength 0.8
            (10, 15, 25, 35)
            >>> KeySteps.paper().resolve(50).cut(12, 40).indices
            (12, 15, 25, 35)
        """
        stop = self.num_steps if stop is None else stop
        kept = tuple(i for i in self.indices if start < i < stop)
        return KeyStepSchedule(
            num_steps=self.num_steps, indices=(start, *kept), source=self.source, start=start, stop=stop
        )

    @property
    def num_steps_run(self) -> int:
        """How many steps run: ``num_steps`` unless the run is cut (:meth:`cut`)."""
        return self.stop - self.start

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        """Half-open ranges ``(start, stop)``: a key step and the non-key steps that reuse its features."""
        stops = (*self.indices[1:], self.stop)
        return tuple(zip(self.indices, stops, strict=True))

    @property
    def group_end(self) -> tuple[int, ...]:
        """For each step index, the end (exclusive) of its group; 0 for the steps that don't run."""
        ends = [0] * self.num_steps
        for start, stop in self.groups:
            ends[start:stop] = [stop] * (stop - start)
        return tuple(ends)

    @property
    def is_key(self) -> tuple[bool, ...]:
        """For each step index, whether it is a key step (the whole UNet runs there)."""
        keys = set(self.indices)
        return tuple(i in keys for i in range(self.num_steps))

    @property
    def num_key_steps(self) -> int:
        return len(self.indices)

    @property
    def is_every_step(self) -> bool:
        return len(self.indices) == self.num_steps_run

    def describe(self) -> str:
        """One line that says what was used, e.g. ``paper: 9 of 50 steps are key steps [0, 1, ...]``, or for a
        run cut to part of the schedule ``paper: 4 of the 40 steps that run (10 to 49 of 50) are key steps
        [10, 15, 25, 35]``."""
        name = str(self.source) if self.source is not None else "explicit"
        if self.source is not None and self.source.origin:
            name = self.source.origin
        if self.num_steps_run == self.num_steps:
            steps = f"{self.num_steps} steps"
        else:
            run = f"{self.start} to {self.stop - 1} of {self.num_steps}"
            steps = f"the {self.num_steps_run} steps that run ({run})"
        return f"{name}: {self.num_key_steps} of {steps} are key steps {list(self.indices)}"
