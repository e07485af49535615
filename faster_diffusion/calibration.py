"""Key steps calibrated from a model's own features: ``key_steps="auto"``.

The paper picked its key steps by hand for SD v1.5. Here they are chosen per model, sampler and step count
from a quantity measured on the model during stock sampling (:mod:`faster_diffusion.measure` records the run
and measures each criterion; a new one is a function and a ``register_criterion`` call). Three are built in;
``"feature"`` is the default (:data:`DEFAULT_CRITERION`), chosen by ``benchmarks/frontier.py``'s rank
correlation with measured quality:

- ``"prediction"``: the error that reusing step k's encoder features causes in step j's noise prediction,
  for every k < j. Along a stock trajectory, the decoder of step j is run on the encoder outputs recorded at
  step k, and its classifier-free-guided prediction is compared with stock's:
  ``cost[k, j] = mean over images of ||eps_j(enc_k) - eps_j|| / ||eps_j||``.
- ``"feature"``: the paper's own analysis (its Fig. 2), generalised from adjacent steps to any two: the
  relative distance of the encoder's outputs (``conv_in``, the down blocks, the mid block) at step j from
  those at step k, ``||F_j - F_k|| / ||F_j||``. It needs no extra UNet calls.
- ``"final"``: the error that reusing step k's encoder features at step j alone causes in the *final* latent,
  where the image is judged. Along a stock trajectory, step j's prediction is made as for ``"prediction"``
  and the run goes on stock from there (every later step a full UNet call on the changed latents) to the
  end: ``cost[k, j] = mean over images of ||x_final(k, j) - x_final|| / ||x_final||``. The local errors of
  the other two criteria weigh every step alike; this one sees how much the sampler amplifies or damps an
  error made at step j by the time the run ends. It is measured on the latent, not the decoded image: the
  VAE decoder is the same fixed map for every placement, and skipping it keeps the cost to UNet calls. It
  costs a tail of N-1-j UNet calls for every pair k < j (the prefix is replayed from the stock run, not
  recomputed): about N/3 times the decoder passes of ``"prediction"``. On the reference model with
  DPM-Solver-20 it ranks measured quality worse than the other two and places badly (key steps bunched at the
  end): a single step's error is repaired by the stock steps after it, which a schedule's later non-key steps
  do not do (``benchmarks/results/frontier-cpu-final.plan.md``).

Reusing key step k for every step j of its group is charged ``cost[k, j]``; a schedule's cost is the sum over
its non-key steps. :func:`optimal_key_steps` finds the cheapest placement of a given number of key steps
exactly, with a dynamic programme over "the latest key step before j" (O(N² · budget)).

A :class:`Calibration` holds the whole N x N cost matrix, so any budget is solved from it in microseconds. It
is saved as a small JSON next to the weights (:data:`CALIBRATION_FILE`), keyed by the UNet's architecture
and weights, the sampler and its timesteps, and :func:`find_calibration` reads it back.

Example:
    >>> from faster_diffusion import FasterDiffusionConfig, apply_faster_diffusion, calibrate, use_sampler
    >>> from fixtures.tiny import build_tiny_pipeline
    >>> pipe = build_tiny_pipeline()
    >>> _ = use_sampler(pipe, "DPM-Solver-20")
    >>> keys = calibrate(pipe, budget=7, prompts=["a red circle"])
    >>> keys.resolve(20).num_key_steps
    7
    >>> handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=keys))
    >>> handle.remove()
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import get_faster_diffusion
from .measure import canonical_target, criterion_names, measure_run, target_modules
from .schedule import CalibrationError, CalibrationMissing, KeySteps, paper_key_steps

logger = logging.getLogger(__name__)

#: File name of saved calibrations, in the weights folder.
CALIBRATION_FILE = "faster_diffusion_calibration.json"
#: Format version of that file.
FILE_VERSION = 1
#: The built-in criteria :func:`measure_costs` can compute (see the module docstring); others are added with
#: :func:`faster_diffusion.measure.register_criterion`.
CRITERIA = criterion_names()
#: The criterion ``calibrate`` uses for encoder propagation: the one whose predicted cost ranked measured
#: quality better (``benchmarks/frontier.py``).
DEFAULT_CRITERION = "feature"
#: The criterion for each other target (by the name before its ``:``): deep reuse places its full steps by
#: the error in the step's prediction (``benchmarks/modes_frontier.py``).
DEFAULT_CRITERIA: dict[str, str] = {
    "encoder": DEFAULT_CRITERION,
    "deep": "prediction",
    "deep-batched": "prediction",
}


def default_criterion(target: str = "encoder") -> str:
    """The criterion calibrations of ``target`` are read with by default."""
    return DEFAULT_CRITERIA.get(target.partition(":")[0], DEFAULT_CRITERION)


#: Calibration prompts for weights other than the reference model: varied subjects, layouts and styles.
#: The reference model calibrates on its own training captions (``reference.CALIBRATION_PROMPTS``).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a red sports car parked in front of a modern glass building",
)
#: Seeds of the calibration runs: far from the small seeds users and the benchmarks use.
DEFAULT_SEED = 90_000


def _not_finite(matrix: Any, shown: int = 3) -> str | None:
    """What in a cost matrix is not a finite number (NaN or infinite), ``None`` if nothing: how many values
    and the first ``shown`` of them, e.g. ``2 values that are not finite: cost[0][3] = nan, cost[1][5] = inf``
    (``[k][j]`` as in :attr:`Calibration.cost`)."""
    values = np.asarray(matrix, dtype=np.float64)
    return _listed(values, np.argwhere(~np.isfinite(values)), "not finite", shown)


def _listed(values: np.ndarray, places: np.ndarray, what: str, shown: int) -> str | None:
    """``"2 values that are WHAT: cost[0][3] = ..., ..."`` for the first ``shown`` of ``places``."""
    if not len(places):
        return None
    listed = ", ".join(f"cost[{k}][{j}] = {values[k, j]}" for k, j in places[:shown])
    more = ", ..." if len(places) > shown else ""
    count = "1 value that is" if len(places) == 1 else f"{len(places)} values that are"
    return f"{count} {what}: {listed}{more}"


def _unusable(matrix: Any, shown: int = 3) -> str | None:
    """What makes a cost matrix unusable by the optimiser, ``None`` if nothing: values that are not finite
    (:func:`_not_finite`), negative values (a cost is an error, never below 0), or values so large that
    their sum overflows (the optimiser adds them up: 1e308 twice is infinite, and every placement would then
    cost the same)."""
    problem = _not_finite(matrix, shown)
    if problem is not None:
        return problem
    values = np.asarray(matrix, dtype=np.float64)
    problem = _listed(values, np.argwhere(values < 0), "negative", shown)
    if problem is not None:
        return problem
    with np.errstate(over="ignore"):
        total = values.sum()
    if not np.isfinite(total):
        k, j = np.unravel_index(int(np.argmax(values)), values.shape)
        largest = f"cost[{k}][{j}] = {values[k, j]}"
        return f"values too large to add up (their sum overflows): the largest is {largest}"
    return None


def _not_finite_costs(matrices: Mapping[str, Any]) -> str | None:
    """What makes the cost matrices of several criteria unusable (:func:`_unusable`), ``None`` if nothing."""
    problems = [
        f"the {name!r} cost matrix has {problem}"
        for name, matrix in matrices.items()
        if (problem := _unusable(matrix)) is not None
    ]
    return "; ".join(problems) or None


# ------------------------------------------------------------------------------------------ the optimiser


def segment_costs(cost: np.ndarray) -> np.ndarray:
    """``seg[k, m]``: the cost of a group that starts at key step k and ends before step m, the sum of
    ``cost[k, j]`` for ``k < j < m`` (``0 <= k < m <= N``)."""
    n = len(cost)
    seg = np.zeros((n, n + 1))
    for k in range(n):
        seg[k, k + 2 :] = np.cumsum(cost[k, k + 1 :])
    return seg


def schedule_cost(cost: np.ndarray, indices: Sequence[int]) -> float:
    """The predicted cost of a key-step list: each non-key step pays ``cost[latest key step, step]``."""
    cost = np.asarray(cost, dtype=np.float64)
    keys = sorted(indices)
    stops = [*keys[1:], len(cost)]
    return float(sum(cost[k, k + 1 : m].sum() for k, m in zip(keys, stops, strict=True)))


def optimal_key_steps(cost: np.ndarray, budget: int) -> tuple[int, ...]:
    """The ``budget`` key steps (step 0 among them) of least :func:`schedule_cost`: exact.

    Dynamic programme: ``F[b, m]`` is the least cost of steps ``0 .. m-1`` with ``b`` key steps placed and the
    ``b``-th at step ``m``; ``F[b, m] = min over k < m of F[b-1, k] + seg[k, m]``. Ties go to the earlier
    step, so the result is deterministic.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or len(cost) < 1:
        raise ValueError(f"cost must be a square N x N matrix, got shape {cost.shape}")
    # A NaN would win every comparison, and a sum that overflows would tie every placement: either places step
    # 0 again and again.
    problem = _unusable(cost)
    if problem is not None:
        raise ValueError(f"cost must be finite numbers >= 0 whose sum is finite; it has {problem}")
    n = len(cost)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise CalibrationError(f"key_steps: the budget must be a whole number from 1 to {n}, got {budget!r}")
    seg = segment_costs(cost)
    best = np.full((budget + 1, n), np.inf)
    came_from = np.zeros((budget + 1, n), dtype=np.int64)
    best[1, 0] = 0.0
    for b in range(2, budget + 1):
        for m in range(b - 1, n):
            totals = best[b - 1, :m] + seg[:m, m]
            k = int(np.argmin(totals))
            best[b, m], came_from[b, m] = totals[k], k
    last = best[budget] + seg[:, n]
    m = int(np.argmin(last))
    keys = [m]
    for b in range(budget, 1, -1):
        m = int(came_from[b, m])
        keys.append(m)
    return tuple(reversed(keys))


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (ties share their mean rank): how much two cost
    matrices agree on which reuses cost more (NaN when either is constant)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(np.asarray(x, np.float64)), ranks(np.asarray(y, np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def paper_budget(num_steps: int) -> int:
    """The number of key steps the paper uses for ``num_steps`` steps: 9 for 50, 7 for 20."""
    return len(paper_key_steps(num_steps))


# ------------------------------------------------------------------------------------ the saved value


@dataclass(frozen=True)
class Calibration:
    """The measured cost matrix of one model, sampler and step count, and how it was measured."""

    #: :func:`model_fingerprint` of the UNet (its architecture).
    model: str
    #: :func:`scheduler_key` of the sampler.
    scheduler: str
    num_steps: int
    criterion: str
    #: ``cost[k][j]`` for ``k < j``: the cost of serving step j from key step k (zero elsewhere).
    cost: tuple[tuple[float, ...], ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    guidance_scale: float
    height: int
    width: int
    #: Wall time of the measurement.
    seconds: float
    #: Other criteria measured in the same run, for comparison (same layout as ``cost``).
    other: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    #: :func:`weight_probe` of the UNet (its weights).
    probe: tuple[float, ...] = ()
    #: The run's timesteps (:func:`scheduler_timesteps`): settings that move them (Karras sigmas, spacing,
    #: offsets) make another trajectory, which needs its own calibration.
    timesteps: tuple[int, ...] = ()
    #: Which features the costs are of reusing (:func:`faster_diffusion.measure.target_modules`):
    #: ``"encoder"`` (encoder propagation) or ``"deep:B"`` (deep reuse of branch B).
    target: str = "encoder"

    def __post_init__(self) -> None:
        if self.criterion not in criterion_names():
            raise CalibrationError(f"criterion must be one of {criterion_names()}, got {self.criterion!r}")
        matrices = {self.criterion: self.cost, **self.other}
        for name, matrix in matrices.items():
            if len(matrix) != self.num_steps or any(len(row) != self.num_steps for row in matrix):
                raise CalibrationError(
                    f"the {name!r} cost matrix must be {self.num_steps} x {self.num_steps}"
                )
        problem = _not_finite_costs(matrices)
        if problem is not None:
            raise CalibrationError(problem)

    @property
    def criteria(self) -> tuple[str, ...]:
        """Every criterion this calibration measured: the one it is read with, then ``other``'s."""
        return (self.criterion, *self.other)

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.cost, dtype=np.float64)

    def indices(self, budget: int | None = None, start: int = 0, stop: int | None = None) -> tuple[int, ...]:
        """The optimal key steps for ``budget`` encoder passes (default: the paper's count for this step
        count).

        For a run of steps ``start .. stop-1`` only (image-to-image runs the last steps of the schedule), the
        budget is placed over the steps that run, by the same optimiser on the matrix's block for them: the
        run makes the encoder passes asked for (at most one per step that runs), where they cost the least.
        """
        budget = paper_budget(self.num_steps) if budget is None else budget
        stop = self.num_steps if stop is None else stop
        if not 0 <= start < stop <= self.num_steps:
            raise CalibrationError(
                f"key_steps: the steps that run, {start} to {stop - 1}, must lie within the {self.num_steps} "
                "steps of the calibration"
            )
        if (start, stop) == (0, self.num_steps):
            return optimal_key_steps(self.matrix, budget)
        block = self.matrix[start:stop, start:stop]
        return tuple(start + i for i in optimal_key_steps(block, min(budget, stop - start)))

    def describe(self) -> str:
        of = "" if self.target == "encoder" else f" of {self.target} reuse"
        return (
            f"calibrated by {self.criterion} error{of} on {len(self.prompts)} prompt"
            f"{'s' if len(self.prompts) != 1 else ''} (one seed each), "
            f"{self.width}x{self.height}, {self.num_steps} steps of {self.scheduler.split(',')[0]}"
        )

    def key_steps(self, budget: int | None = None, start: int = 0, stop: int | None = None) -> KeySteps:
        """An explicit :class:`KeySteps` for ``budget`` (default: the paper's count), which says where it
        came from when echoed (as ``auto:B@C`` when read with a criterion C other than the target's default).
        For a run of steps ``start .. stop-1`` (:meth:`indices`), the list is step 0 and the key steps placed
        over the run: cut to the steps that run, it gives exactly those."""
        criterion = None if self.criterion == default_criterion(self.target) else self.criterion
        budget_text = str(KeySteps.auto(budget, criterion))
        indices = self.indices(budget, start, stop)
        if start > 0:
            indices = (0, *indices)
        return KeySteps.explicit(indices).with_origin(f"{budget_text}, {self.describe()}")

    def matches(
        self,
        model: str,
        scheduler: str,
        num_steps: int,
        probe: Sequence[float] | None = None,
        timesteps: Sequence[int] | None = None,
        target: str = "encoder",
    ) -> bool:
        """Whether this is the calibration of that architecture, sampler, step count and ``target``, and,
        when given, of those weights (``probe``) and of that trajectory (``timesteps``)."""
        key = (self.model, self.scheduler, self.num_steps, self.target)
        same_key = key == (model, scheduler, num_steps, target)
        same_steps = timesteps is None or tuple(timesteps) == self.timesteps
        return same_key and same_steps and (probe is None or same_weights(self.probe, probe))

    def to_json(self) -> dict[str, Any]:
        def rounded(matrix):
            return [[float(f"{value:.6g}") for value in row] for row in matrix]

        return {
            "model": self.model,
            "scheduler": self.scheduler,
            "num_steps": self.num_steps,
            "criterion": self.criterion,
            "prompts": list(self.prompts),
            "seeds": list(self.seeds),
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "seconds": round(self.seconds, 2),
            "cost": rounded(self.cost),
            "other": {name: rounded(matrix) for name, matrix in self.other.items()},
            "weights_probe": [float(f"{value:.9g}") for value in self.probe],
            "timesteps": list(self.timesteps),
            "target": self.target,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        try:
            return cls(
                model=str(data["model"]),
                scheduler=str(data["scheduler"]),
                num_steps=int(data["num_steps"]),
                criterion=str(data["criterion"]),
                cost=tuple(tuple(float(v) for v in row) for row in data["cost"]),
                prompts=tuple(data["prompts"]),
                seeds=tuple(int(s) for s in data["seeds"]),
                guidance_scale=float(data["guidance_scale"]),
                height=int(data["height"]),
                width=int(data["width"]),
                seconds=float(data["seconds"]),
                other={
                    name: tuple(tuple(float(v) for v in row) for row in matrix)
                    for name, matrix in data.get("other", {}).items()
                },
                probe=tuple(float(v) for v in data["weights_probe"]),
                timesteps=tuple(int(t) for t in data["timesteps"]),
                target=str(data.get("target", "encoder")),  # files from before deep reuse: the encoder's
            )
        except CalibrationError:  # its own message says what is wrong
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(f"a saved calibration is malformed ({error!r})") from error

    def with_criterion(self, criterion: str) -> Calibration:
        """The same measurement read with another criterion of ``other``."""
        if criterion == self.criterion:
            return self
        if criterion not in self.other:
            raise CalibrationError(f"this calibration did not measure the {criterion!r} criterion")
        other = {name: m for name, m in self.other.items() if name != criterion}
        other[self.criterion] = self.cost
        return dataclasses.replace(self, criterion=criterion, cost=self.other[criterion], other=other)


# ------------------------------------------------------------------------------- keys for a model


def model_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's class, config and parameter names and shapes: its architecture. Whether
    two UNets of one architecture hold the same weights is :func:`weight_probe`'s part."""
    digest = hashlib.sha256(type(unet).__name__.encode())
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, parameter in unet.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
    return digest.hexdigest()[:16]


#: Values :func:`weight_probe` reads, and the tolerance two probes of the same weights agree within: fp16 and
#: bf16 copies of fp32 weights round by at most 2^-11 and 2^-8 relative, a fine-tune moves weights further.
PROBE_VALUES = 64
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-6


def weight_probe(unet: torch.nn.Module) -> tuple[float, ...]:
    """A sample of the UNet's weights, read once: two values (the first and the middle one) of
    :data:`PROBE_VALUES` / 2 parameter tensors spread over the network. Compared with a tolerance
    (:func:`same_weights`), so a copy in fp16 or on another device matches its fp32 original."""
    parameters = [p for p in unet.parameters() if p.numel() > 0]
    if not parameters:
        return ()
    count = min(len(parameters), PROBE_VALUES // 2)
    chosen = [parameters[round(i * (len(parameters) - 1) / max(count - 1, 1))] for i in range(count)]
    device = chosen[0].device
    with torch.no_grad():  # gathered on one device, then a single read to the host
        picked = [p.detach().flatten()[[0, p.numel() // 2]].to(device, torch.float64) for p in chosen]
    return tuple(torch.cat(picked).tolist())


def same_weights(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two :func:`weight_probe` samples come from the same weights (up to fp16/bf16 rounding)."""
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=PROBE_RTOL, atol=PROBE_ATOL))


def scheduler_timesteps(scheduler: Any, num_steps: int) -> tuple[int, ...]:
    """The timesteps a run of ``num_steps`` steps takes with ``scheduler``'s class and config, from a fresh
    copy (``scheduler`` itself is not touched)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = type(scheduler).from_config(scheduler.config)
        fresh.set_timesteps(num_steps)
    return tuple(int(t) for t in fresh.timesteps.tolist())


#: Settings :func:`scheduler_key` names first, as it always has (the keys of the calibrations shipped with the
#: reference models are these alone).
_KEY_SETTINGS = ("algorithm_type", "solver_order", "prediction_type", "timestep_spacing")
#: The noise schedule of Stable Diffusion 1.x/2.x and SDXL, which :func:`scheduler_key` leaves unnamed; a
#: scheduler's other settings are left unnamed at the class's own defaults.
_PLAIN_SETTINGS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def scheduler_key(scheduler: Any) -> str:
    """The sampler as a calibration key: the scheduler class and every setting that changes its sigmas, its
    timesteps or its update rule.

    ``algorithm_type``, ``solver_order``, ``prediction_type`` and ``timestep_spacing`` are always named; every
    other setting of the class (Karras, exponential or beta sigmas, ``final_sigmas_type``, ``solver_type``,
    ``lower_order_final``, ``euler_at_final``, ``variance_type``, ``thresholding``,
    ``rescale_betas_zero_snr``, the beta schedule, ``steps_offset``, ...) is named when it differs from SD's
    noise schedule (:data:`_PLAIN_SETTINGS`) or, for the rest, from the class's default. The calibration also
    stores the run's timesteps, which are checked when it is found.

    Example:
        >>> from diffusers import EulerDiscreteScheduler
        >>> scheduler_key(EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
        ...     beta_end=0.012, steps_offset=1, use_karras_sigmas=True))
        'EulerDiscreteScheduler,prediction_type=epsilon,timestep_spacing=linspace,use_karras_sigmas=True'
    """
    config = getattr(scheduler, "config", {})
    # A scheduler made with from_config(another's config) carries the other's settings too (a DDIM scheduler
    # made from DPM-Solver's config keeps algorithm_type): only the class's own settings count.
    own = inspect.signature(type(scheduler).__init__).parameters
    parts = [type(scheduler).__name__]
    for name in _KEY_SETTINGS:
        if name in config and name in own:
            parts.append(f"{name}={config[name]}")
    for name, parameter in own.items():
        if name in _KEY_SETTINGS or name == "self" or name not in config:
            continue
        if name == "final_sigmas_type" and config.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver"):
            continue  # these algorithms take only "sigma_min" (diffusers refuses "zero"): it says nothing
        plain = _PLAIN_SETTINGS.get(name, parameter.default)
        value = config[name]
        if value == plain or parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            continue
        if isinstance(value, (list, tuple, dict)):
            digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]
            parts.append(f"{name}=sha256:{digest}")
        else:
            parts.append(f"{name}={value}")
    return ",".join(parts)


def check_calibratable(scheduler: Any, num_steps: int) -> None:
    """Raise :class:`CalibrationError`, naming the scheduler and why, unless a calibration of ``num_steps``
    steps with ``scheduler`` is sound: its loop must call the UNet once per sampler step, since the recorded
    stock run is measured and replayed step by step, with a ``step`` between calls that the replays of
    ``"final"`` run again. Heun, KDPM2 (and its ancestral form) and DPMSolverSDE call it twice a step but the
    last, PNDM once more for its warm-up: their calibrations would be measured on other steps than the ones a
    run of ``num_steps`` serves. Schedulers that draw noise in ``step`` (Euler ancestral, DDPM, LCM, TCD, the
    SDE forms of DPM-Solver) draw it from the pipeline's generators, row by row, so the replayed copies of a
    batch follow the stock run's latents: they are sound."""
    calls = len(scheduler_timesteps(scheduler, num_steps))
    if calls != num_steps:
        name = type(scheduler).__name__
        # A run under way (key_steps 'auto' counts its UNet calls) says it in the user's own steps.
        steps, timesteps = (
            getattr(scheduler, "num_inference_steps", None),
            getattr(scheduler, "timesteps", None),
        )
        if isinstance(steps, int) and timesteps is not None and len(timesteps) != steps:
            calls, num_steps = len(timesteps), steps
        raise CalibrationError(
            f"key_steps 'auto' and calibrate() do not support the scheduler {name}: its loop calls the UNet "
            f"{calls} times for {num_steps} steps (Heun, KDPM2 and DPMSolverSDE twice a step, PNDM once more "
            "for its warm-up), and a calibration measures and replays one UNet call per step; pass explicit "
            "key steps instead (such as 'uniform:3' or a list of UNet calls that starts with 0)"
        )


# ---------------------------------------------------------------------------------- measuring


def measure_costs(
    pipe: Any,
    *,
    num_inference_steps: int,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float,
    height: int,
    width: int,
    criteria: Sequence[str] = CRITERIA,
    max_rows: int | None = None,
    prompts_per_run: int | None = None,
    target: str = "encoder",
) -> dict[str, np.ndarray]:
    """Stock runs of ``pipe`` (one image per prompt, ``seeds[i]`` for ``prompts[i]``), measuring the N x N
    cost matrix of each criterion: the mean over all images of each image's cost.

    A run keeps every step's encoder outputs until its costs are measured. ``prompts_per_run`` bounds how many
    prompts share one run; by default all of them, unless their encoder outputs would take more than half the
    free memory (:func:`prompts_per_run_for`): SDXL at 1024 px in fp16 keeps 5 GiB per prompt over 50
    steps. Every criterion is a mean over images, so splitting the prompts changes nothing but float rounding.
    ``max_rows`` bounds the rows of one replay UNet call (for ``"final"``, of one run's batch); by default as
    many as fit a quarter of the free memory by :func:`faster_diffusion.memory.decoder_row_bytes`'s
    estimate, at most 512.
    """
    unknown = [c for c in criteria if c not in criterion_names()]
    if unknown:
        raise CalibrationError(f"criterion must be among {criterion_names()}, got {unknown[0]!r}")
    if len(prompts) != len(seeds) or not prompts:
        raise CalibrationError(
            f"calibration needs one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds"
        )
    if prompts_per_run is None:
        prompts_per_run = prompts_per_run_for(
            pipe, num_inference_steps, height, width, rows_per_prompt=2 if guidance_scale > 1 else 1
        )
    if isinstance(prompts_per_run, bool) or not isinstance(prompts_per_run, int) or prompts_per_run < 1:
        raise CalibrationError(f"prompts_per_run must be a whole number >= 1, got {prompts_per_run!r}")
    n = num_inference_steps
    totals = {c: np.zeros((n, n)) for c in criteria}
    for start in range(0, len(prompts), prompts_per_run):
        chunk = list(prompts[start : start + prompts_per_run])
        costs = measure_run(
            pipe,
            num_inference_steps=n,
            prompts=chunk,
            seeds=list(seeds[start : start + prompts_per_run]),
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            criteria=criteria,
            max_rows=max_rows,
            target=target,
        )
        for criterion in criteria:
            totals[criterion] += costs[criterion] * len(chunk)
    return {criterion: total / len(prompts) for criterion, total in totals.items()}


def prompts_per_run_for(
    pipe: Any, num_inference_steps: int, height: int, width: int, *, rows_per_prompt: int = 2
) -> int:
    """How many calibration prompts one stock run can hold: as many as keep every step's encoder outputs
    (:func:`faster_diffusion.memory.encoder_row_values` per batch row) within half the free memory of the
    UNet's device, and at least one."""
    from .memory import available_memory_bytes, encoder_row_values

    unet = pipe.unet
    parameter = next(unet.parameters())
    factor = getattr(pipe, "vae_scale_factor", 8)
    values = encoder_row_values(unet.config, -(-height // factor), -(-width // factor))
    per_prompt = values * parameter.element_size() * rows_per_prompt * num_inference_steps
    return max(1, int(available_memory_bytes(parameter.device) // 2 // max(per_prompt, 1)))


#: Calibrations made or loaded in this process, per UNet.
_REGISTRY: weakref.WeakKeyDictionary[torch.nn.Module, list[Calibration]] = weakref.WeakKeyDictionary()


def weights_folder(pipe: Any) -> Path | None:
    """The local folder ``pipe`` was loaded from, if any (``pipe.name_or_path``)."""
    name = getattr(pipe, "name_or_path", None)
    if not name:
        config = getattr(pipe, "config", None) or {}
        name = config.get("_name_or_path") if hasattr(config, "get") else None
    path = Path(name) if isinstance(name, (str, Path)) and name else None
    return path if path is not None and path.is_dir() else None


def load_calibrations(folder: str | Path) -> list[Calibration]:
    """Every calibration saved in ``folder`` (none if it has no :data:`CALIBRATION_FILE`).

    A file that cannot be read whole is refused with a :class:`CalibrationError` that names it (and the
    calibration in it that is wrong): malformed, of another format version, or with costs the optimiser
    cannot use (not finite, negative, or too large to add up). None of its calibrations is used, and
    :func:`save_calibration` does not write over it.
    """
    file = Path(folder) / CALIBRATION_FILE
    if not file.is_file():
        return []
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        version, entries = data["version"], data["calibrations"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CalibrationError(f"{file} cannot be read ({error}); delete it to calibrate again") from error
    if version != FILE_VERSION:
        raise CalibrationError(f"{file} has format version {version!r}; this version reads {FILE_VERSION}")
    if not isinstance(entries, list):
        raise CalibrationError(
            f"{file} cannot be read (its calibrations are not a list); delete it to calibrate again"
        )
    calibrations = []
    for number, entry in enumerate(entries, 1):
        try:
            calibrations.append(Calibration.from_json(entry))
        except (CalibrationError, TypeError) as error:
            which = f"calibration {number} of {len(entries)}{_saved_key(entry)}"
            raise CalibrationError(
                f"{file} cannot be read ({which}: {error}); delete it to calibrate again"
            ) from error
    return calibrations


def _saved_key(entry: Any) -> str:
    """The sampler and step count a saved calibration names, as ``", DDIMScheduler with 20 steps"``; nothing
    if it names none."""
    if isinstance(entry, dict) and "scheduler" in entry and "num_steps" in entry:
        return f", {str(entry['scheduler']).split(',')[0]} with {entry['num_steps']} steps"
    return ""


def save_calibration(calibration: Calibration, folder: str | Path) -> Path:
    """Add ``calibration`` to ``folder``'s :data:`CALIBRATION_FILE`, replacing one of the same key. The file
    is replaced atomically, so a reader never sees half of it."""
    folder = Path(folder)
    kept = [
        c
        for c in load_calibrations(folder)
        if not c.matches(
            calibration.model, calibration.scheduler, calibration.num_steps, target=calibration.target
        )
    ]
    return write_calibrations(folder, [*kept, calibration])


def write_calibrations(folder: str | Path, calibrations: Sequence[Calibration]) -> Path:
    """Write ``folder``'s :data:`CALIBRATION_FILE` with exactly ``calibrations``, replacing it atomically, so
    a reader never sees half of it."""
    data = {"version": FILE_VERSION, "calibrations": [c.to_json() for c in calibrations]}
    file = Path(folder) / CALIBRATION_FILE
    partial = file.with_name(file.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    partial.replace(file)
    return file


def register(unet: torch.nn.Module, calibration: Calibration) -> None:
    """Make ``calibration`` known for ``unet`` in this process (``find_calibration`` looks here first)."""
    entries = [
        c
        for c in _REGISTRY.get(unet, [])
        if not c.matches(
            calibration.model, calibration.scheduler, calibration.num_steps, target=calibration.target
        )
    ]
    _REGISTRY[unet] = [*entries, calibration]


def find_calibration(
    pipe: Any,
    num_steps: int,
    scheduler: Any = None,
    timesteps: Sequence[int] | None = None,
    target: str = "encoder",
) -> Calibration | None:
    """The calibration of ``pipe``'s UNet for its scheduler (or ``scheduler``), ``num_steps`` and ``target``:
    one made or loaded in this process, else one saved in the folder the pipeline was loaded from; ``None`` if
    neither.
    It must be of the same architecture, weights (:func:`weight_probe`) and timesteps (``timesteps`` when the
    caller has them, else the scheduler's own for ``num_steps``, :func:`scheduler_timesteps`)."""
    unet = pipe.unet
    target = canonical_target(target)
    scheduler = scheduler if scheduler is not None else pipe.scheduler
    model, key, probe = model_fingerprint(unet), scheduler_key(scheduler), weight_probe(unet)
    if timesteps is None:
        timesteps = scheduler_timesteps(scheduler, num_steps)
    for calibration in _REGISTRY.get(unet, []):
        if calibration.matches(model, key, num_steps, probe, timesteps, target):
            return _preferred(calibration)
    folder = weights_folder(pipe)
    if folder is not None:
        for calibration in load_calibrations(folder):
            if calibration.matches(model, key, num_steps, probe, timesteps, target):
                register(unet, calibration)
                return _preferred(calibration)
    return None


def _preferred(calibration: Calibration) -> Calibration:
    """``calibration`` read with its target's :func:`default_criterion` where it measured it."""
    preferred = default_criterion(calibration.target)
    if calibration.criterion != preferred and preferred in calibration.other:
        return calibration.with_criterion(preferred)
    return calibration


def missing_message(pipe: Any, num_steps: int, target: str = "encoder") -> str:
    """What a run with ``auto`` key steps says when the model has no calibration for its scheduler and step
    count: which calibration, and the call that makes it."""
    of, also = ("", "") if target == "encoder" else (f" of {target} reuse", f", target={target!r}")
    return (
        f"no calibration{of} of this model for {scheduler_key(pipe.scheduler)} with {num_steps} steps is "
        "saved or was made in this process. To place the key steps by one, run "
        f"faster_diffusion.calibrate(pipe, num_inference_steps={num_steps}{also}) once (it saves the result "
        "next to the weights when they come from a local folder), or pass explicit key steps"
    )


def resolve_auto(
    pipe: Any,
    scheduler: Any,
    num_steps: int,
    timesteps: Sequence[float] | None = None,
    *,
    target: str = "encoder",
) -> Calibration:
    """The calibration ``key_steps="auto"`` is placed from, for a run of ``num_steps`` steps of ``pipe`` with
    ``scheduler``: handed to the reuse modes by :func:`faster_diffusion.apply_faster_diffusion`.

    Raises :class:`~faster_diffusion.schedule.CalibrationMissing` when none is saved or made for them (the run
    then places :meth:`KeySteps.fallback` instead, and says so), and :class:`CalibrationError` when the run's
    ``timesteps`` are not the scheduler's own for that step count (the only ones a calibration measures)."""
    check_calibratable(scheduler, num_steps)
    own = scheduler_timesteps(scheduler, num_steps)
    if timesteps is not None:
        given = tuple(int(t) for t in timesteps)
        if given != own:
            raise CalibrationError(
                f"key_steps 'auto' is calibrated on the scheduler's own {num_steps} timesteps "
                f"({_span(own)}), and this run was given others ({_span(given)}), as by a timesteps= "
                "argument or a set_timesteps option (LCM's original_inference_steps or strength); pass "
                "explicit key steps (such as 'paper' or a list) for a run on custom timesteps"
            )
    found = find_calibration(pipe, num_steps, scheduler, own, target) if pipe is not None else None
    if found is None:
        raise CalibrationMissing(missing_message(pipe, num_steps, target))
    return found


def _span(timesteps: Sequence[int]) -> str:
    """Timesteps for a message: all of them when few, else the first three and the last."""
    if len(timesteps) <= 6:
        return ", ".join(map(str, timesteps))
    return f"{', '.join(map(str, timesteps[:3]))}, ..., {timesteps[-1]}"


def _default_steps(scheduler: Any) -> int:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if isinstance(scheduler, DDIMScheduler):
        return 50
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return 20
    raise CalibrationError(
        f"calibrate: pass num_inference_steps; there is no default for {type(scheduler).__name__}"
    )


def get_calibration(
    pipe: Any,
    *,
    num_inference_steps: int | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    criterion: str | None = None,
    criteria: Sequence[str] | None = None,
    save: bool = True,
    force: bool = False,
    target: str | None = None,
) -> Calibration:
    """The calibration of ``pipe`` (its UNet and current scheduler) for ``num_inference_steps`` steps: the
    saved one if there is one (unless ``force``), else measured now with :func:`measure_costs`, registered
    for this process and, when ``save`` and the pipeline came from a writable local folder, saved there.

    ``target`` is what is reused: ``"encoder"`` (encoder propagation) or ``"deep:B"`` (deep reuse of branch
    B, as :class:`~faster_diffusion.DeepReuseConfig`'s ``calibration_target``); each has its own calibration.
    ``None``: the target of the faster diffusion attached to ``pipe``, else ``"encoder"``. On a pipeline with
    faster diffusion attached it calibrates the stock pipeline (:meth:`FasterDiffusion.paused`) and leaves it
    attached, so ``apply_faster_diffusion(pipe)``, ``calibrate(pipe)``, ``pipe(prompt)`` places the default's
    ``auto`` key steps by the calibration it made.

    Defaults: :data:`DEFAULT_PROMPTS`, one seed each from :data:`DEFAULT_SEED`, guidance 7.5, the pipeline's
    default size, the target's :func:`default_criterion`. ``criterion`` and the ``criteria`` named are
    measured, and for a target whose default criterion is not ``"feature"`` (deep reuse) ``"feature"`` too,
    which costs nothing but the stock run of the prompts every criterion needs (``"prediction"`` adds
    N(N-1)/2 replayed passes per prompt, each the part of the UNet the target does not reuse, about 20 times
    more for DDIM-50; ``"final"`` adds a tail of N-1-j UNet calls for every pair k < j, about N^3/6 calls per
    prompt).

    A saved calibration that lacks a criterion asked for gets it measured and added, keeping what it
    measured before: the prompts, seeds, guidance and size left out are the saved calibration's. Given other
    ones, it is measured again with them, with its criteria and the new ones (a warning says so).
    """
    handle = get_faster_diffusion(pipe)
    if target is None:
        target = getattr(handle.config, "calibration_target", "encoder") if handle is not None else "encoder"
    if handle is not None:  # calibrate the stock pipeline, then put faster diffusion back as it was
        with handle.paused():
            return get_calibration(
                pipe,
                num_inference_steps=num_inference_steps,
                prompts=prompts,
                seeds=seeds,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                criterion=criterion,
                criteria=criteria,
                save=save,
                force=force,
                target=target,
            )
    target = canonical_target(target)
    target_modules(pipe.unet, target)  # an unknown target, or a branch this UNet lacks, fails here
    criterion = default_criterion(target) if criterion is None else criterion
    if criterion not in criterion_names():
        raise CalibrationError(f"criterion must be one of {criterion_names()}, got {criterion!r}")
    asked = tuple(dict.fromkeys([criterion, *(criteria or ())]))
    unknown = [c for c in asked if c not in criterion_names()]
    if unknown:
        raise CalibrationError(f"criteria must be among {criterion_names()}, got {unknown[0]!r}")
    # feature comes from the stock run's records alone; for the encoder target it is the default criterion
    # already, and adding it there would change which criterion plain ``auto`` reads (``_preferred``).
    implicit = () if default_criterion(target) == "feature" else ("feature",)
    criteria = tuple(dict.fromkeys([*asked, *implicit]))
    steps = _default_steps(pipe.scheduler) if num_inference_steps is None else num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise CalibrationError(f"num_inference_steps must be a whole number >= 2, got {steps!r}")
    check_calibratable(pipe.scheduler, steps)
    found = None if force else find_calibration(pipe, steps, target=target)
    if found is not None and all(c in found.criteria for c in asked):
        return found.with_criterion(criterion)
    if found is not None:  # it lacks a criterion asked for: measure with its settings unless told otherwise
        if prompts is None:
            prompts, seeds = found.prompts, found.seeds if seeds is None else seeds
        guidance_scale = found.guidance_scale if guidance_scale is None else guidance_scale
        height, width = height or found.height, width or found.width
    guidance_scale = 7.5 if guidance_scale is None else guidance_scale
    prompts = tuple(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise CalibrationError(f"prompts must be a non-empty list of texts, got {prompts!r}")
    seeds = tuple(DEFAULT_SEED + i for i in range(len(prompts))) if seeds is None else tuple(seeds)
    if len(seeds) != len(prompts):
        raise CalibrationError(f"one seed per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    kept: dict[str, Any] = {}
    if found is not None:  # it lacks a criterion asked for
        measured = {found.criterion: found.cost, **found.other}
        settings = (found.prompts, found.seeds, found.guidance_scale, found.height, found.width)
        if settings == (prompts, seeds, float(guidance_scale), height, width):
            kept = {name: np.array(matrix, dtype=np.float64) for name, matrix in measured.items()}
            criteria = tuple(c for c in criteria if c not in kept)
        else:
            # A criterion not registered in this process cannot be measured again: it is left out.
            known = [name for name in measured if name in criterion_names()]
            criteria = tuple(dict.fromkeys([*criteria, *known]))
            logger.warning(
                "calibrate: the saved calibration was made with other prompts, seeds, guidance or size; "
                "measuring it again with these, for the criteria %s",
                ", ".join(criteria),
            )
    started = time.perf_counter()
    costs = measure_costs(
        pipe,
        num_inference_steps=steps,
        prompts=prompts,
        seeds=seeds,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        criteria=criteria,
        target=target,
    )
    seconds = time.perf_counter() - started + (found.seconds if kept else 0.0)
    costs = {**kept, **costs}
    problem = _not_finite_costs(costs)
    if problem is not None:
        sampler = scheduler_key(pipe.scheduler).split(",")[0]
        raise CalibrationError(
            f"calibrate: the costs measured for {sampler} with {steps} steps cannot be used ({problem}); "
            "nothing was saved. Activations that overflow in float16 do this: calibrate the pipeline in "
            "float32 (pipe.to(torch.float32)); the calibration it saves is found for the float16 pipeline "
            "too (the same weights, rounded)"
        )

    def as_tuple(matrix: np.ndarray) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(float(v) for v in row) for row in matrix)

    calibration = Calibration(
        model=model_fingerprint(pipe.unet),
        scheduler=scheduler_key(pipe.scheduler),
        num_steps=steps,
        criterion=criterion,
        cost=as_tuple(costs[criterion]),
        prompts=prompts,
        seeds=seeds,
        guidance_scale=float(guidance_scale),
        height=height,
        width=width,
        seconds=seconds,
        other={name: as_tuple(matrix) for name, matrix in costs.items() if name != criterion},
        probe=weight_probe(pipe.unet),
        timesteps=scheduler_timesteps(pipe.scheduler, steps),
        target=target,
    )
    logger.info("calibrated %s", calibration.describe())
    register(pipe.unet, calibration)
    folder = weights_folder(pipe)
    if save and folder is not None:
        try:
            save_calibration(calibration, folder)
        except OSError as error:  # a read-only weights folder: keep it for this process only
            logger.warning(
                "could not save the calibration in %s (%s); it is kept for this process", folder, error
            )
    return calibration


def calibrate(pipe: Any, budget: int | None = None, **options: Any) -> KeySteps:
    """Key steps for ``pipe``, placed where the model's own features say reuse costs least.

    ``budget`` is the number of key steps (encoder passes, or full passes of deep reuse); default: the paper's
    count for the step count (9 of 50, 7 of 20). ``options`` are those of :func:`get_calibration`
    (``num_inference_steps``, ``prompts``, ``seeds``, ``guidance_scale``, ``height``, ``width``,
    ``criterion``, ``save``, ``force``, ``target``). The result is
    an explicit list that says where it came from when echoed. A bad budget fails before anything is measured.
    """
    if budget is not None:
        KeySteps.auto(budget)  # a whole number >= 1
        steps = options.get("num_inference_steps")
        steps = _default_steps(pipe.scheduler) if steps is None else steps
        if isinstance(steps, int) and budget > steps:
            raise CalibrationError(
                f"calibrate: the budget must be a whole number from 1 to {steps} (the steps), got {budget!r}"
            )
    return get_calibration(pipe, **options).key_steps(budget)
