"""The product's best setting at DeepCache's cost against DeepCache itself, pair by pair, on fresh seeds.

``depth_choice.py`` scores each method against stock, so two methods' faithfulness can only be compared
through two intervals that each carry stock's noise. This script compares them directly: the same prompts and
seeds, the difference of the two methods' scores taken pair by pair, with a paired bootstrap interval.

Protocol (written before the first run):

- Models: both reference models, DPM-Solver-20, each at its own guidance scale.
- Pairs: the 80 held-out attribute combinations with 6 seeds each, seeds 2000 to 2479. No earlier benchmark
  used these seeds (the others use 0-239 and 1000-1239), so nothing here was chosen on them.
- Methods at each DeepCache interval I in 2..5:
  - ``deepcache:I``: DeepCache's own ``DeepCacheSDHelper`` (``cache_interval=I``, ``cache_branch_id=0``).
    The script refuses to run without the ``deepcache`` package.
  - ``pick:I``: the product's setting at DeepCache:I's cost, chosen by ``choose_depth`` exactly as
    ``depth_choice.py`` chooses it: the partial-step costs of ``results/deep-variants-costs.json`` (SD v1.5
    architecture, 256 px), each branch's ``deep:b`` calibration read with the ``prediction`` criterion, the
    branch of least predicted error. Its cost in full UNet passes is at most DeepCache's, by construction.
  - ``stock``, to score both against.
- Scores: for each method, faithfulness (all five attributes read right) minus stock's, and PSNR against
  stock's image of the same pair, as in ``frontier.py``. For the comparison, the paired differences
  ``pick - deepcache`` of faithfulness (points) and of PSNR (dB), each with a 95% paired bootstrap interval
  (1000 draws of the pairs, the same draws for every score).
- Rule, at each model and interval (a cell):
  1. The pick *holds its own* against DeepCache when its mean PSNR against stock is at least DeepCache's and
     its faithfulness is not lower by the issue's own "within noise" test applied to the paired difference:
     the 95% interval of ``pick - deepcache`` contains 0 and its point estimate is at least -1 point, or the
     whole interval is above 0.
  2. It *beats* DeepCache when it holds its own, the interval of the paired PSNR difference is above 0, and
     the point estimate of the faithfulness difference is at least 0.
  3. The frontier issue's first target ("at every interval some setting is as fast, has at least
     DeepCache's PSNR, without lower faithfulness") counts as met at a cell under rule 1. The report gives the
     count of cells under each rule; nothing in the product changes with the verdict.

    python benchmarks/head_to_head.py --threads 2                # both models -> results/head-to-head.md
    python benchmarks/head_to_head.py --quick --out /tmp/h.md    # a smoke run: 8 pairs, the first model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import DeepReuseConfig, KeySteps, Sampler, reference  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SAMPLER = Sampler.DPM_SOLVER
INTERVALS = (2, 3, 4, 5)
QUICK_INTERVALS = (2, 3)
#: Seeds of the two blocks of held-out pairs (fresh: no other benchmark uses them).
SEED_BLOCKS = (2000, 2240)


def fresh_pairs(quick: bool):
    """Prompts, seeds and labels of the protocol's pairs (the held-out set twice, with fresh seeds)."""
    blocks = [harness.Pairs.held_out(quick, offset) for offset in (SEED_BLOCKS[:1] if quick else SEED_BLOCKS)]
    prompts = [p for b in blocks for p in b.prompts]
    seeds = [s for b in blocks for s in b.seeds]
    labels = np.concatenate([b.labels for b in blocks])
    if len(set(seeds)) != len(seeds):
        raise RuntimeError("the seed blocks overlap")
    return prompts, seeds, labels


def judge_model(model: Path, args, partial: dict[int, float], draws) -> dict:
    pipe, steps, branches, found, classifier = harness.budgets.load_model(model, partial, SAMPLER)
    prompts, seeds, labels = fresh_pairs(args.quick)
    guidance = reference.guidance_scale(model)

    def images(how) -> np.ndarray:
        return harness.run(pipe, SAMPLER, how, prompts, seeds, guidance, args.batch)

    paired = harness.Paired(classifier, labels, images(None), draws)
    zeros = np.zeros(len(prompts))
    cells = []
    for interval in QUICK_INTERVALS if args.quick else INTERVALS:
        cost, choice = harness.budgets.choose_at(pipe, interval, steps, partial, branches, found)
        pick = next(c for c in choice.candidates if c.branch == choice.branch)
        config = DeepReuseConfig(key_steps=KeySteps.explicit(pick.indices), branch=pick.branch)
        dc = paired.scores(images(f"deepcache:{interval}"))
        ours = paired.scores(images(config))
        cell = {
            "interval": interval,
            "cost": cost,
            "setting": {"branch": pick.branch, "indices": list(pick.indices), "cost": pick.cost},
        }
        for name, s in (("deepcache", dc), ("pick", ours)):
            cell[name] = {
                "delta": paired.difference(s["correct"], paired.stock_correct),
                "psnr": paired.difference(s["psnr"], zeros),
            }
        cell["faith_diff"] = paired.difference(ours["correct"], dc["correct"])
        cell["psnr_diff"] = paired.difference(ours["psnr"], dc["psnr"])
        cells.append(cell)
        print(
            f"{model.name} I={interval}: pick b{pick.branch}:{len(pick.indices)}, "
            f"faithfulness pick - deepcache {cell['faith_diff'][0] * 100:+.1f}, "
            f"PSNR {cell['psnr_diff'][0]:+.2f} dB",
            flush=True,
        )
    return {"model": model.name, "pairs": len(prompts), "cells": cells}


def verdict(cell: dict) -> dict:
    faith, faith_ci = cell["faith_diff"]
    psnr, psnr_ci = cell["psnr_diff"]
    not_lower = harness.within_noise(faith, faith_ci) or faith_ci[0] > 0
    holds = psnr >= 0 and not_lower
    beats = holds and psnr_ci[0] > 0 and faith >= 0
    return {"holds": holds, "beats": beats}


def points(value: tuple[float, tuple[float, float]]) -> str:
    mean, (low, high) = value
    return f"{mean * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"


def report(saved: harness.budgets.Saved) -> str:
    lines = harness.budgets.header(
        "The product's best setting against DeepCache, pair by pair",
        "head_to_head.py",
        saved,
        "DPM-Solver-20; DeepCache is its own `DeepCacheSDHelper` (branch 0); the pick is `choose_depth`'s "
        "at DeepCache's cost; seeds 2000 and up (fresh)",
    )
    totals = {"holds": 0, "beats": 0, "cells": 0}
    for result in saved.results:
        lines += [f"## {result['model']} ({result['pairs']} pairs)", ""]
        lines += [
            "| interval (cost, full passes) | pick | DeepCache − stock (points) | pick − stock (points) "
            "| pick − DeepCache (points, 95% CI) | DeepCache PSNR dB | pick PSNR dB "
            "| pick − DeepCache PSNR dB (95% CI) | holds its own | beats |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cell in result["cells"]:
            v = verdict(cell)
            totals["holds"] += v["holds"]
            totals["beats"] += v["beats"]
            totals["cells"] += 1
            dc, pk = cell["deepcache"], cell["pick"]
            f, fci = cell["faith_diff"]
            p, pci = cell["psnr_diff"]
            lines.append(
                f"| {cell['interval']} ({cell['cost']:.2f}) | b{cell['setting']['branch']}, "
                f"{len(cell['setting']['indices'])} full ({cell['setting']['cost']:.2f}) | "
                f"{points(dc['delta'])} | {points(pk['delta'])} | "
                f"{f * 100:+.1f} [{fci[0] * 100:+.1f}, {fci[1] * 100:+.1f}] | {dc['psnr'][0]:.2f} | "
                f"{pk['psnr'][0]:.2f} | {p:+.2f} [{pci[0]:+.2f}, {pci[1]:+.2f}] | "
                f"{'yes' if v['holds'] else 'no'} | {'yes' if v['beats'] else 'no'} |"
            )
        lines.append("")
    lines += [
        f"**The pick holds its own against DeepCache (rule 1) at {totals['holds']} of {totals['cells']} "
        f"cells, and beats it (rule 2) at {totals['beats']}.**",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.budgets.add_run_arguments(parser, RESULTS / "head-to-head.md")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        harness.budgets.report_again(args, report)
        return 0
    if not harness.have_deepcache():
        parser.error("the deepcache package is not installed (pip install --no-deps deepcache==0.1.1)")
    partial = harness.budgets.prepare(parser, args)
    models = harness.reference_models(args.quick)
    harness.budgets.judge_and_write(
        args, argv, models, len(fresh_pairs(args.quick)[0]), judge_model, report, partial
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
