"""Budgets at DeepCache's cost: the measured cost of a partial step of each branch, DeepCache:I's cost in
full UNet passes, and each branch's ``deep:b`` calibration, as ``depth_choice.py`` and ``head_to_head.py``
read them."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from faster_diffusion import Sampler, get_calibration, reference
from faster_diffusion.deep import branch_count
from faster_diffusion.depth import DEPTH_CRITERION, choose_depth, full_steps_within, run_cost

from . import report
from .judge import bootstrap_draws
from .pipes import load_classifier, load_reference

RESULTS = Path(__file__).resolve().parents[1] / "results"
#: Partial-step costs by branch, measured by ``deep_variants.py --costs`` on the SD v1.5 architecture.
COSTS = RESULTS / "deep-variants-costs.json"
#: The deepest branch compared (deeper ones cost more than half a full step on SD v1.5).
MAX_BRANCH = 5


def budget_of(interval: int, steps: int, p0: float) -> float:
    """DeepCache:I's cost in full passes: full steps every I-th, branch 0's partial steps between."""
    return run_cost(len(range(0, steps, interval)), steps, p0)


def choose_at(pipe, interval: int, steps: int, partial: dict[int, float], branches, found):
    """DeepCache:I's cost, and ``choose_depth``'s choice at it among the ``branches`` that afford at least two
    full steps there (placed by their calibrations ``found``)."""
    cost = budget_of(interval, steps, partial[0])
    costs = {b: partial[b] for b in branches if full_steps_within(cost, steps, partial[b]) >= 2}
    return cost, choose_depth(pipe, cost, costs, num_inference_steps=steps, calibrations=found)


def read_costs(parser: argparse.ArgumentParser, path: Path) -> dict[int, float]:
    """The partial-step cost of each branch from ``deep_variants.py --costs``' file; branch 0's is needed."""
    if not path.is_file():
        parser.error(f"--costs-file: {path} does not exist (benchmarks/deep_variants.py --costs)")
    partial = {int(b): float(p) for b, p in json.loads(path.read_text())["partial"].items()}
    if 0 not in partial:
        parser.error(f"--costs-file: {path} has no cost for branch 0")
    return partial


def calibrations(pipe, model: Path, branches, steps: int) -> dict:
    """Each branch's ``deep:b`` calibration read with the prediction criterion: the committed one where there
    is one, else made now (not saved)."""
    options = {**reference.calibration_options(model), "save": False}
    out = {}
    for b in branches:
        started = time.perf_counter()
        out[b] = get_calibration(
            pipe, num_inference_steps=steps, target=f"deep:{b}", criterion=DEPTH_CRITERION, **options
        )
        print(f"deep:{b} calibration ready in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def load_model(model: Path, partial: dict[int, float], sampler: Sampler):
    """The model's pipeline (set for ``sampler``), its steps, the branches compared (those with a cost, up to
    :data:`MAX_BRANCH`), their calibrations and the judge's classifier."""
    pipe = load_reference(model, sampler)
    steps = sampler.default_steps
    branches = [b for b in sorted(partial) if b < min(MAX_BRANCH + 1, branch_count(pipe.unet))]
    found = calibrations(pipe, model, branches, steps)
    return pipe, steps, branches, found, load_classifier()


def header(title: str, script: str, saved: Saved, setting: str) -> list[str]:
    """The header both ``depth_choice.py``'s and ``head_to_head.py``'s reports open with: the run, the
    partial-step costs it used (and their file's name), and ``setting``."""
    costs = ", ".join(f"b{b} {p:.3f}" for b, p in sorted(saved.partial.items()))
    line = f"Partial-step costs (full passes, SD v1.5 architecture, 256 px, `{saved.costs_file}`): {costs}"
    run = saved.run
    return report.header(title, script, run, line, setting)


def add_run_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options ``depth_choice.py`` and ``head_to_head.py`` share."""
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 pairs, intervals 2 and 3, first model"
    )
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--batch", type=int, default=80, help="prompts per pipeline call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--costs-file", type=Path, default=COSTS)
    report.add_from_json(parser)


@dataclass(frozen=True)
class Saved:
    """A saved run of either script, as its report reads it."""

    run: dict
    results: list[dict]
    #: Partial-step cost by branch.
    partial: dict[int, float]
    #: The name of the costs file it read (``--costs-file``).
    costs_file: str

    @classmethod
    def of(cls, data: dict) -> Saved:
        # Runs from before the file's name was recorded read the default file.
        partial = {int(b): p for b, p in data["partial"].items()}
        return cls(data["run"], data["results"], partial, data.get("costs_file", COSTS.name))


def report_again(args, render) -> None:
    """``--from-json`` of either script: ``render(Saved.of(data))`` of the saved run, to ``--out``."""
    report.report_again(args, lambda data: render(Saved.of(data)))


def prepare(parser: argparse.ArgumentParser, args) -> dict[int, float]:
    """Before a run of either script: its torch threads (``--threads``), and the partial-step costs it reads
    (``--costs-file``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return read_costs(parser, args.costs_file)


def judge_and_write(args, argv, models, pairs: int, judge_model, render, partial: dict[int, float]) -> None:
    """Run ``judge_model`` on each model (the same bootstrap draws of ``pairs`` pairs for all), then write
    ``render``'s report to ``--out``, the run beside it as ``.json``, and the report to stdout."""
    started, began = report.started_now(), time.perf_counter()
    draws = bootstrap_draws(pairs, 20 if args.quick else 1000)
    results = [judge_model(model, args, partial, draws) for model in models]
    run = report.run_facts(report.argv_of(argv), started, began)
    data = {"run": run, "costs_file": args.costs_file.name, "partial": partial, "results": results}
    report.write(args.out, data, lambda saved: render(Saved.of(saved)))
