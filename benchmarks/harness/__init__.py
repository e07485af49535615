"""One benchmark harness: the judge, the methods, the speed protocol and the report writer, in one place for
every script in ``benchmarks/``. A script keeps only its protocol (its docstring), its method list and its
report's own tables.

- :mod:`.judge`: the held-out pairs and seeds, faithfulness with paired bootstrap intervals, PSNR against
  stock, "within noise".
- :mod:`.pipes`: the reference models, their loading and the options of the scripts that run on them.
- :mod:`.methods`: methods as registrations; :mod:`.generation`: a method run over the pairs in batches
  (its images, or with :func:`generate` also its seconds and passes).
- :mod:`.budgets`: DeepCache's budgets and the partial-step costs (``depth_choice.py``, ``head_to_head.py``).
- :mod:`.timing`: the speed protocol: the same process, a warm-up per method, interleaved repeats, medians.
- :mod:`.plots`: the quality plots' frame (faithfulness and PSNR panels with the judge's lines).
- :mod:`.report`: what a run records, headers, writing a report beside its JSON, ``--from-json``.

How to add

- **a method** (one of ours at a setting, or a peer such as T-GATE): one :func:`register_method` call in
  :mod:`.methods`, a pattern for its names, ``attach(pipe, context, **groups)`` returning a handle with
  ``remove()``, ``full(context, **groups)`` its full passes, ``needs=`` the peer's package and
  ``timed_kinds=`` the ``KIND`` of its ``KIND:N`` names that ``speed.py --extra-modes`` times. Judge runs
  (:func:`run`) and speed timing (``speed.py``) attach it through the same registration.

  What is not a registration, and goes through :func:`attached`'s config branch (or a plan of its own):
  rows that are not a method of the product at a setting, but a prototype or a setting found during the run:
  ``deep_variants.py``'s ``compose:I`` and ``damped:I`` step plans, ``head_to_head.py``'s pick and
  ``depth_choice.py``'s ``bB:F`` candidates (placed by ``choose_depth`` from calibrations made in the run),
  and ``placement_search.py``'s searched key-step lists. ``img2img_quality.py``'s :class:`EncoderSetting`
  rows (encoder propagation on the image-to-image pipeline: ``default``, the encoder policy's key steps
  then, and ``paper``) are methods at a setting that are not registrations yet.
- **a model**: a folder in :data:`REFERENCE_MODELS` (``reference.guidance_scale`` knowing its guidance).
- **a report**: a script whose report is a function of its JSON alone (the JSON's ``run`` is
  :func:`run_facts`'s, the settings are what its recorded command line parses to), which it writes with
  :func:`write`, and whose ``--from-json`` (:func:`add_from_json`, :func:`report_again`) writes it again;
  add the report's name to ``REPORT_SCRIPTS`` in ``tests/test_benchmarks.py``, which checks every committed
  report against its JSON.
"""

from __future__ import annotations

from . import budgets, plots, report, timing
from .generation import RunResult, attached, generate, run, run_in_batches
from .judge import (
    SEEDS_PER_COMBO,
    WITHIN_NOISE_POINTS,
    Judge,
    Paired,
    Pairs,
    all_right,
    bootstrap_draws,
    classify,
    interval,
    judgement,
    noise_verdict,
    psnr,
    within_noise,
)
from .methods import Context, EncoderSetting, attach, full_passes, have, have_deepcache, register_method
from .pipes import (
    REFERENCE_MODELS,
    add_common_arguments,
    apply_common_arguments,
    load_classifier,
    load_reference,
    reference_models,
)
from .report import add_from_json, report_again, run_facts, started_now, write

__all__ = [
    "REFERENCE_MODELS",
    "SEEDS_PER_COMBO",
    "WITHIN_NOISE_POINTS",
    "Context",
    "EncoderSetting",
    "Judge",
    "Paired",
    "Pairs",
    "RunResult",
    "add_common_arguments",
    "add_from_json",
    "all_right",
    "apply_common_arguments",
    "attach",
    "attached",
    "bootstrap_draws",
    "budgets",
    "classify",
    "full_passes",
    "generate",
    "have",
    "have_deepcache",
    "interval",
    "judgement",
    "load_classifier",
    "load_reference",
    "noise_verdict",
    "plots",
    "psnr",
    "reference_models",
    "register_method",
    "report",
    "report_again",
    "run",
    "run_facts",
    "run_in_batches",
    "started_now",
    "timing",
    "within_noise",
    "write",
]
