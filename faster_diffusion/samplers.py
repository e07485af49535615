"""The samplers: the paper's, DDIM with 50 steps and DPM-Solver / DPM-Solver++ (multistep) with 20 steps, and
the schedulers Replicate's Stable Diffusion models offer by name (the ``scheduler`` input of cog-sdxl and of
stability-ai/stable-diffusion: ``DDIM``, ``DPMSolverMultistep``, ``KarrasDPM``, ``K_EULER``,
``K_EULER_ANCESTRAL``, ``HeunDiscrete``, ``PNDM``, ``KLMS``, ``UniPCMultistep``).

Each is a stock diffusers scheduler built with ``from_config`` from the pipeline's own scheduler config, so a
fine-tune's noise schedule (betas, prediction type, offsets) carries over; Replicate's names are built exactly
as cog-sdxl builds them (``KarrasDPM``: multistep DPM-Solver with ``use_karras_sigmas=True``; the others the
class's own defaults over the config).
"""

from __future__ import annotations

import enum
import warnings
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)


class Sampler(enum.Enum):
    """A sampler and its default step count: the paper's three with theirs (Table 1), and Replicate's
    scheduler names with 50 steps for ``PNDM`` (``DDIM`` is ``DDIM-50`` itself) and 25 for the others."""

    DDIM = "DDIM-50"
    DPM_SOLVER = "DPM-Solver-20"
    DPM_SOLVER_PP = "DPM-Solver++-20"
    DPM_MULTISTEP = "DPMSolverMultistep"
    KARRAS_DPM = "KarrasDPM"
    K_EULER = "K_EULER"
    K_EULER_ANCESTRAL = "K_EULER_ANCESTRAL"
    HEUN = "HeunDiscrete"
    PNDM = "PNDM"
    KLMS = "KLMS"
    UNIPC = "UniPCMultistep"

    @property
    def default_steps(self) -> int:
        """Sampler steps when none are given: 50 for DDIM and PNDM, 20 for the paper's DPM-Solvers, 25 for
        the other Replicate names. A step is the sampler's (Heun calls the UNet twice a step but the last)."""
        if self in (Sampler.DDIM, Sampler.PNDM):
            return 50
        return 20 if self.is_paper else 25

    @property
    def is_paper(self) -> bool:
        """Whether this is one of the paper's samplers, those with measured default key steps."""
        return self in PAPER_SAMPLERS

    @property
    def scheduler_class(self) -> type:
        """The diffusers scheduler class :func:`make_scheduler` builds."""
        return _CLASSES[self]

    @property
    def one_call_per_step(self) -> bool:
        """Whether the pipeline's loop calls the UNet once per sampler step: not Heun (2N - 1 calls for N
        steps) or PNDM (N + 1 with SD's config: its warm-up repeats a step), which ``auto`` key steps (a
        calibration measures one call per step) cannot serve."""
        return self not in (Sampler.HEUN, Sampler.PNDM)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every name :meth:`parse` documents, as the command line and the Cog model offer them: the paper's
        samplers, then Replicate's scheduler names (``DDIM`` among them)."""
        paper = [s.value for s in cls if s.is_paper]
        return (*paper, "DDIM", *(s.value for s in cls if not s.is_paper))

    @classmethod
    def parse(cls, text: str) -> Sampler:
        """Read a sampler name, case-insensitively (``_`` and ``-`` alike): ``DDIM-50``, ``DPM-Solver-20``,
        ``DPM-Solver++-20`` (also ``ddim``, ``dpm-solver``, ``dpmsolver``, ``dpm-solver++``, ``dpmsolver++``),
        or one of Replicate's scheduler names: ``DDIM`` (``DDIM-50``), ``DPMSolverMultistep``, ``KarrasDPM``,
        ``K_EULER``, ``K_EULER_ANCESTRAL``, ``HeunDiscrete``, ``PNDM``, ``KLMS``, ``UniPCMultistep``."""
        if isinstance(text, Sampler):
            return text
        if not isinstance(text, str):
            raise ValueError(f"sampler must be text, got {type(text).__name__}: {text!r}")
        key = _key(text)
        if key not in _ALIASES:
            allowed = ", ".join(repr(name) for name in cls.names())
            raise ValueError(f"sampler: unknown value {text!r}; allowed: {allowed}")
        return _ALIASES[key]


#: The paper's samplers: those whose default key steps were measured (:mod:`faster_diffusion.policy`), and the
#: ones the benchmarks and the reference models' calibrations cover.
PAPER_SAMPLERS: tuple[Sampler, ...] = (Sampler.DDIM, Sampler.DPM_SOLVER, Sampler.DPM_SOLVER_PP)


def _key(text: str) -> str:
    return text.strip().lower().replace("_", "-")


_ALIASES: dict[str, Sampler] = {
    **{_key(sampler.value): sampler for sampler in Sampler},
    "ddim": Sampler.DDIM,
    "dpm-solver": Sampler.DPM_SOLVER,
    "dpmsolver": Sampler.DPM_SOLVER,
    "dpm-solver++": Sampler.DPM_SOLVER_PP,
    "dpmsolver++": Sampler.DPM_SOLVER_PP,
}

_CLASSES: dict[Sampler, type] = {
    Sampler.DDIM: DDIMScheduler,
    Sampler.DPM_SOLVER: DPMSolverMultistepScheduler,
    Sampler.DPM_SOLVER_PP: DPMSolverMultistepScheduler,
    Sampler.DPM_MULTISTEP: DPMSolverMultistepScheduler,
    Sampler.KARRAS_DPM: DPMSolverMultistepScheduler,
    Sampler.K_EULER: EulerDiscreteScheduler,
    Sampler.K_EULER_ANCESTRAL: EulerAncestralDiscreteScheduler,
    Sampler.HEUN: HeunDiscreteScheduler,
    Sampler.PNDM: PNDMScheduler,
    Sampler.KLMS: LMSDiscreteScheduler,
    Sampler.UNIPC: UniPCMultistepScheduler,
}


def make_scheduler(sampler: Sampler | str, scheduler_config: Any) -> Any:
    """A fresh scheduler for ``sampler``, built from a pipeline's ``pipe.scheduler.config``."""
    sampler = Sampler.parse(sampler)
    if sampler is Sampler.DPM_SOLVER_PP:
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2
        )
    if sampler is Sampler.DPM_SOLVER:
        # The paper's "DPM-Solver" is the original (noise-prediction) algorithm. diffusers marks it deprecated
        # in favour of DPM-Solver++ but still ships it; it cannot step to sigma 0, so it ends at sigma_min.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*algorithm_type dpmsolver is deprecated.*")
            return DPMSolverMultistepScheduler.from_config(
                scheduler_config, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"
            )
    if sampler is Sampler.KARRAS_DPM:  # cog-sdxl's KarrasDPM
        return DPMSolverMultistepScheduler.from_config(scheduler_config, use_karras_sigmas=True)
    return sampler.scheduler_class.from_config(scheduler_config)


#: The attribute where :func:`use_sampler` keeps, on a pipeline, the scheduler it set and the config it was
#: built from.
_SET_BY_USE_SAMPLER = "_faster_diffusion_sampler_base"


def scheduler_config_of(pipe: Any) -> Any:
    """The scheduler config a sampler for ``pipe`` is built from: the config of the scheduler ``pipe`` had
    before :func:`use_sampler` replaced it (the model's own), so that no sampler's settings carry over to the
    next one (DPM-Solver-20's ``final_sigmas_type`` into DPM-Solver++-20, KarrasDPM's Karras sigmas into
    K_EULER). A scheduler set on the pipeline by other means is the new base."""
    record = getattr(pipe, _SET_BY_USE_SAMPLER, None)
    if record is not None and record[0] is pipe.scheduler:
        return record[1]
    return pipe.scheduler.config


def use_sampler(pipe: Any, sampler: Sampler | str) -> Sampler:
    """Give ``pipe`` a fresh scheduler for ``sampler``, built from :func:`scheduler_config_of`: the same one
    whichever sampler it had. Do this before ``apply_faster_diffusion``."""
    from .engine import get_faster_diffusion

    sampler = Sampler.parse(sampler)
    if get_faster_diffusion(pipe) is not None:
        raise RuntimeError(
            "use_sampler: faster diffusion is attached to this pipeline; call remove() first, set the "
            "sampler, then apply it again"
        )
    config = scheduler_config_of(pipe)
    pipe.scheduler = make_scheduler(sampler, config)
    setattr(pipe, _SET_BY_USE_SAMPLER, (pipe.scheduler, config))
    return sampler
