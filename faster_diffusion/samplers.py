"""The samplers of the paper: DDIM with 50 steps and DPM-Solver / DPM-Solver++ (multistep) with 20 steps.

Each is a stock diffusers scheduler built with ``from_config`` from the pipeline's own scheduler config, so a
fine-tune's noise schedule (betas, prediction type, offsets) carries over.
"""

from __future__ import annotations

import enum
import warnings
from typing import Any

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler


class Sampler(enum.Enum):
    """A sampler with its step count from the paper (Table 1)."""

    DDIM = "DDIM-50"
    DPM_SOLVER = "DPM-Solver-20"
    DPM_SOLVER_PP = "DPM-Solver++-20"

    @property
    def default_steps(self) -> int:
        return 50 if self is Sampler.DDIM else 20

    @classmethod
    def parse(cls, text: str) -> Sampler:
        """Read a sampler name: ``DDIM-50``, ``DPM-Solver-20``, ``DPM-Solver++-20`` (also ``ddim``,
        ``dpm-solver``, ``dpmsolver``, ``dpm-solver++``, ``dpmsolver++``; case-insensitive)."""
        if isinstance(text, Sampler):
            return text
        if not isinstance(text, str):
            raise ValueError(f"sampler must be text, got {type(text).__name__}: {text!r}")
        key = text.strip().lower().replace("_", "-")
        aliases = {
            "ddim-50": cls.DDIM,
            "ddim": cls.DDIM,
            "dpm-solver-20": cls.DPM_SOLVER,
            "dpm-solver": cls.DPM_SOLVER,
            "dpmsolver": cls.DPM_SOLVER,
            "dpm-solver++-20": cls.DPM_SOLVER_PP,
            "dpm-solver++": cls.DPM_SOLVER_PP,
            "dpmsolver++": cls.DPM_SOLVER_PP,
        }
        if key not in aliases:
            allowed = ", ".join(repr(s.value) for s in cls)
            raise ValueError(f"sampler: unknown value {text!r}; allowed: {allowed}")
        return aliases[key]


def make_scheduler(sampler: Sampler | str, scheduler_config: Any) -> Any:
    """A fresh scheduler for ``sampler``, built from a pipeline's ``pipe.scheduler.config``."""
    sampler = Sampler.parse(sampler)
    if sampler is Sampler.DDIM:
        return DDIMScheduler.from_config(scheduler_config)
    if sampler is Sampler.DPM_SOLVER_PP:
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2
        )
    # The paper's "DPM-Solver" is the original (noise-prediction) algorithm. diffusers marks it deprecated in
    # favour of DPM-Solver++ but still ships it; it cannot step to sigma 0, so it ends at sigma_min.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*algorithm_type dpmsolver is deprecated.*")
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"
        )


#: The attribute where :func:`use_sampler` keeps, on a pipeline, the scheduler it set and the config it was
#: built from.
_SET_BY_USE_SAMPLER = "_faster_diffusion_sampler_base"


def scheduler_config_of(pipe: Any) -> Any:
    """The scheduler config a sampler for ``pipe`` is built from: the config of the scheduler ``pipe`` had
    before :func:`use_sampler` replaced it (the model's own), so that no sampler's settings carry over to the
    next one (DPM-Solver-20's ``final_sigmas_type`` into DPM-Solver++-20). A scheduler set on the pipeline by
    other means is the new base."""
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
