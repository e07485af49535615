"""The key-step policy: the default reuse mode and what ``key_steps="default"`` means, decided once from the
quality evidence and used by the library (``apply_faster_diffusion(pipe)`` with no config), the command line
and the Cog model alike.

The default mode is deep reuse (:data:`DEFAULT_MODE`), chosen by the rule written in ``benchmarks/README.md``
("The rule that sets the product's default"): the fastest setting measured that keeps stock quality on both
reference models. Its full steps are, for any weights, 13 of 50 with DDIM placed by the model's own
calibration (``auto:13``, :data:`DEEP_DDIM_FRACTION`; 3.19x end to end on the SD v1.5 architecture at 256 px
on a 2-core CPU), and 6 of 20 with DPM-Solver placed by the same calibration read with the ``feature``
criterion (``auto:6@feature``, :data:`DEEP_DPM_SOLVER_FRACTION`: 2.68x), each a fraction of the run's steps
for other step counts (:data:`DEEP_DEFAULTS`). DPM-Solver++ keeps every third step, DeepCache's own interval
(:data:`DEEP_DEFAULT_KEY_STEPS`): with it, 6 calibrated full steps lost 1.7-2.1 points on the first reference
model (the third addendum of ``benchmarks/modes_frontier.py``), where every third step kept stock quality.

Euler and UniPC take every fourth step, and DPM-Solver++ 2M Karras and Euler ancestral every third
(:data:`SCHEDULER_DEFAULTS`, by the rule of ``benchmarks/README.md``, "Defaults for the schedulers users pick
most"); any other scheduler takes every third (:data:`DEEP_DEFAULT_KEY_STEPS`).

Encoder propagation (``mode="encoder"``), the paper's method, has its own default key steps:

- SD v1.5 base weights (a weights folder whose recorded source, :data:`SOURCE_FILE`, is one of
  :data:`SD15_REPOS`): the paper's preset, which the paper's FID and CLIP scores support on exactly these
  weights;
- any other weights, the built-in reference model included: ``auto``, calibrated on the model itself. DDIM
  (and every sampler but DPM-Solver) keeps the paper's budget (9 of 50: within noise of stock on the reference
  model, where the preset loses 13 points); the DPM-Solver samplers take 9 of 20
  (:data:`DPM_SOLVER_DEFAULT_FRACTION`). The evidence: ``benchmarks/README.md``, "The defaults".

Replicate's scheduler names (``DPMSolverMultistep``, ``KarrasDPM``, ``K_EULER``, ``K_EULER_ANCESTRAL``,
``HeunDiscrete``, ``PNDM``, ``KLMS``, ``UniPCMultistep``; :class:`~faster_diffusion.samplers.Sampler`) have no
measured default: deep reuse keeps every third step (:data:`DEEP_DEFAULT_KEY_STEPS`), and encoder propagation
the paper's preset at the run's step count (:data:`UNMEASURED_ENCODER_KEY_STEPS`). Neither needs a
calibration, which Heun and PNDM (more than one UNet call a step) could not have; neither was measured for
quality on these schedulers. ``DDIM`` is ``DDIM-50`` and has its defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from .calibration import weights_folder
from .measure import criterion_names
from .samplers import Sampler
from .schedule import KeyStepError, KeyStepKind, KeySteps, scaled_budget

#: Repositories of SD v1.5 base weights: the weights the paper's key steps and its FID evidence are for.
SD15_REPOS = frozenset({"stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"})
#: The text input that asks for :func:`default_key_steps`.
DEFAULT_KEY_STEPS = "default"
#: The reuse mode of the product's default: the library's one-call default, the command line's and the Cog
#: model's.
DEFAULT_MODE = "deep"
#: Key steps per step for the DPM-Solver samplers by default: 9 of 20, the smallest budget at which ``auto``
#: stayed within noise of stock on the reference model (the paper's 7 lost 3.3 points [-7.9, +1.2];
#: ``benchmarks/results/frontier.md``).
DPM_SOLVER_DEFAULT_FRACTION = 9 / 20
#: Where ``script/download-weights`` records the repository a weights folder came from.
SOURCE_FILE = "faster_diffusion_source.json"


def read_source(folder: str | Path | None) -> str | None:
    """The repository ``folder`` was downloaded from (its :data:`SOURCE_FILE`); ``None`` if it says none."""
    if folder is None:
        return None
    try:
        repo = json.loads((Path(folder) / SOURCE_FILE).read_text()).get("repo")
    except (OSError, ValueError, AttributeError):
        return None
    return repo if isinstance(repo, str) else None


def sampler_of(scheduler: Any) -> Sampler | None:
    """The sampler a scheduler is (DDIM, DPM-Solver or DPM-Solver++), or ``None`` for any other (the SDE forms
    of DPM-Solver, ``sde-dpmsolver`` and ``sde-dpmsolver++``, included: no default was measured for them)."""
    if type(scheduler) is DDIMScheduler:
        return Sampler.DDIM
    if type(scheduler) is DPMSolverMultistepScheduler:
        algorithm = scheduler.config.get("algorithm_type", "dpmsolver++")
        return {"dpmsolver++": Sampler.DPM_SOLVER_PP, "dpmsolver": Sampler.DPM_SOLVER}.get(algorithm)
    return None


#: Full steps of deep reuse when none are given, for a sampler without an entry in :data:`DEEP_DEFAULTS`:
#: every third, DeepCache's own default interval.
DEEP_DEFAULT_KEY_STEPS = KeySteps.uniform(3)
#: Full steps per step of deep reuse's default with DDIM, placed by the model's ``deep:0`` calibration: 13 of
#: 50 (``auto:13``), by the rule of ``benchmarks/README.md`` ("The rule that sets the product's default"); 13
#: uniform ones (every fourth step) were as fast and 1.2 dB less faithful to stock on the SD v1.5-layout
#: reference model.
DEEP_DDIM_FRACTION = 13 / 50
#: Full steps per step of deep reuse's default with DPM-Solver: 6 of 20 (``auto:6@feature``), placed by the
#: model's ``deep:0`` calibration read with :data:`DEEP_DPM_SOLVER_CRITERION`. By the rule of the second
#: addendum of ``benchmarks/modes_frontier.py``, it kept stock quality in three confirmation runs on the two
#: reference models (``benchmarks/results/modes-frontier*-confirm*.md``), with 2.68x end to end against 2.31x
#: for every third step (``benchmarks/results/speed-256-deep-6.md``).
DEEP_DPM_SOLVER_FRACTION = 6 / 20
#: The criterion DPM-Solver's deep default reads the calibration with: ``feature`` (the reused feature's own
#: error), whose placement kept stock quality where ``prediction``'s at the same budget did not.
DEEP_DPM_SOLVER_CRITERION = "feature"
#: Deep reuse's default full steps by sampler: a fraction of the run's steps, placed by the model's ``deep:0``
#: calibration read with a criterion (``None``: the target's default criterion). The DPM-Solver++ sampler
#: keeps :data:`DEEP_DEFAULT_KEY_STEPS` (``benchmarks/results/modes-frontier*-pp-confirm*.md``).
DEEP_DEFAULTS: dict[Sampler, tuple[float, str | None]] = {
    Sampler.DDIM: (DEEP_DDIM_FRACTION, None),
    Sampler.DPM_SOLVER: (DEEP_DPM_SOLVER_FRACTION, DEEP_DPM_SOLVER_CRITERION),
}


#: Deep reuse's default for the schedulers users pick most, by :func:`scheduler_family`, measured at 25 steps
#: by the rule written before the runs (``benchmarks/README.md``, "Defaults for the schedulers users pick
#: most"): the candidate with the fewest full steps that kept stock quality on both reference models, on two
#: sets of seeds. Every fourth step for Euler and UniPC (7 full steps of 25). DPM-Solver++ 2M Karras keeps
#: every third: every fourth lost 1.3 points on the first model's fresh seeds. Euler ancestral keeps every
#: third with a loss the benchmarks document: no candidate kept stock quality on the first reference model
#: (every third step lost 15 points there, every second 3.3; a likely cause is the fresh noise it adds at
#: every step, which the reused features never saw). The interval is kept at other step counts.
SCHEDULER_DEFAULTS: dict[str, KeySteps] = {
    "euler": KeySteps.uniform(4),
    "euler-ancestral": KeySteps.uniform(3),
    "karras-dpm": KeySteps.uniform(3),
    "unipc": KeySteps.uniform(4),
}
#: The family of :data:`SCHEDULER_DEFAULTS` each of Replicate's names builds.
SAMPLER_FAMILIES: dict[Sampler, str] = {
    Sampler.K_EULER: "euler",
    Sampler.K_EULER_ANCESTRAL: "euler-ancestral",
    Sampler.KARRAS_DPM: "karras-dpm",
    Sampler.UNIPC: "unipc",
}
#: Settings that change a scheduler's sigmas: a scheduler that sets any of them is not the one measured.
_SIGMA_SETTINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")


def scheduler_family(scheduler: Any) -> str | None:
    """Which scheduler of :data:`SCHEDULER_DEFAULTS` ``scheduler`` is, as measured: Euler or Euler ancestral
    or UniPC with their own sigmas, or DPM-Solver++ 2M (multistep, order 2) with Karras sigmas and no other
    sigma setting (``KarrasDPM``); ``None`` for any other scheduler or setting."""
    config = getattr(scheduler, "config", None) or {}
    sigmas = {name for name in _SIGMA_SETTINGS if config.get(name)}
    kind = type(scheduler)
    if kind is DPMSolverMultistepScheduler:
        karras_2m = (
            config.get("algorithm_type", "dpmsolver++") == "dpmsolver++" and config.get("solver_order") == 2
        )
        return "karras-dpm" if karras_2m and sigmas == {"use_karras_sigmas"} else None
    if sigmas:
        return None
    return {
        EulerDiscreteScheduler: "euler",
        EulerAncestralDiscreteScheduler: "euler-ancestral",
        UniPCMultistepScheduler: "unipc",
    }.get(kind)


#: Encoder propagation's key steps when none are given, for a sampler without a measured default (Replicate's
#: scheduler names but ``DDIM``): the paper's preset, cut or scaled to the run's step count
#: (:func:`~faster_diffusion.schedule.paper_key_steps`). Not measured on these schedulers; chosen because it
#: needs no calibration and is the paper's own.
UNMEASURED_ENCODER_KEY_STEPS = KeySteps.paper()


def default_key_steps(
    pipe: Any, sampler: Sampler | str | None = None, num_steps: int | None = None, mode: str = DEFAULT_MODE
) -> KeySteps:
    """The key steps used when none are given (see the module docstring). ``sampler``: the one the run
    uses; ``None`` reads it from ``pipe.scheduler``. ``num_steps``: the run's step count; ``None`` is the
    sampler's own (20 for DPM-Solver). ``mode``: ``"deep"`` (the default) gives :data:`DEEP_DEFAULTS`'s entry,
    ``"encoder"`` the paper's preset or ``auto`` (:data:`UNMEASURED_ENCODER_KEY_STEPS` for a named sampler
    that is not the paper's)."""
    scheduler = getattr(pipe, "scheduler", None)
    family = scheduler_family(scheduler) if sampler is None else SAMPLER_FAMILIES.get(Sampler.parse(sampler))
    sampler = Sampler.parse(sampler) if sampler is not None else sampler_of(scheduler)
    if num_steps == 1 and not isinstance(num_steps, bool):
        return KeySteps.every_step()  # one step: nothing to reuse, and nothing to calibrate
    if mode == "deep":
        if family is not None:
            return SCHEDULER_DEFAULTS[family]
        if sampler not in DEEP_DEFAULTS:
            return DEEP_DEFAULT_KEY_STEPS
        fraction, criterion = DEEP_DEFAULTS[sampler]
        return KeySteps.auto(scaled_budget(num_steps or sampler.default_steps, fraction), criterion)
    if sampler is not None and not sampler.is_paper:
        return UNMEASURED_ENCODER_KEY_STEPS
    if read_source(weights_folder(pipe)) in SD15_REPOS:
        return KeySteps.paper()
    if sampler not in (Sampler.DPM_SOLVER, Sampler.DPM_SOLVER_PP):
        return KeySteps.auto()
    return KeySteps.auto(scaled_budget(num_steps or sampler.default_steps, DPM_SOLVER_DEFAULT_FRACTION))


def any_steps_default_key_steps(pipe: Any, mode: str = DEFAULT_MODE) -> KeySteps:
    """:func:`default_key_steps` for ``pipe``'s scheduler, for a run of any step count: a budget of ``auto``
    is given per the sampler's own step count and scaled to each run's (``auto:13/50``: 13 of 50 steps, 7 of
    25), as the command line and Cog scale it. What ``apply_faster_diffusion(pipe)`` uses."""
    keys = default_key_steps(pipe, mode=mode)
    sampler = sampler_of(getattr(pipe, "scheduler", None))
    if keys.kind is not KeyStepKind.AUTO or keys.budget is None or sampler is None:
        return keys
    return KeySteps.auto(keys.budget, keys.criterion, per=sampler.default_steps)


def resolve_key_steps(
    value: str | KeySteps,
    pipe: Any,
    sampler: Sampler | str | None = None,
    num_steps: int | None = None,
    mode: str = DEFAULT_MODE,
) -> KeySteps:
    """The one entry point for a key-step input: ``"default"`` is :func:`default_key_steps` for ``pipe``,
    ``sampler``, ``num_steps`` and ``mode``; any other text is read by :func:`parse_key_steps`; a
    :class:`KeySteps` is taken as it is."""
    if isinstance(value, KeySteps):
        return value
    if isinstance(value, str) and value.strip().lower() == DEFAULT_KEY_STEPS:
        return default_key_steps(pipe, sampler, num_steps, mode)
    return parse_key_steps(value)


def parse_key_steps(text: str) -> KeySteps:
    """:meth:`KeySteps.parse`, with the criterion of ``auto:B@C`` checked against those calibration can
    measure (:func:`faster_diffusion.measure.criterion_names`), so that a typo fails before anything runs."""
    keys = KeySteps.parse(text)
    if keys.criterion is not None and keys.criterion not in criterion_names():
        raise KeyStepError(
            f"key_steps {text.strip()!r}: unknown criterion {keys.criterion!r}; the criteria are "
            f"{', '.join(criterion_names())}"
        )
    return keys
