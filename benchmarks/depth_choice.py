"""Does ``faster_diffusion.depth.choose_depth`` pick the right depth? Every branch at DeepCache's cost, on the
reference models, against the branch the chooser picks from its predicted error.

Protocol (written before the first run):

- Judge and pairs: those of ``benchmarks/frontier.py`` (80 held-out attribute combinations x 3 seeds;
  faithfulness difference to stock with a 95% paired bootstrap interval, 1000 draws; PSNR against stock's
  image of the same pair), DPM-Solver-20, each reference model at its own guidance scale.
- Costs of a partial step of each branch, in full UNet passes: those ``benchmarks/deep_variants.py --costs``
  measured on the SD v1.5 architecture at 256 px (``results/deep-variants-costs.json``), where speed is
  judged; the reference models are too small to time. The library's ``measure_step_costs`` times them on a
  user's own model.
- Budgets: the cost of DeepCache at each interval I in 2..5, ``F_I + (20 - F_I) p_0`` (``F_I`` its full
  steps).
- Candidates at a budget: every branch b in 0..5 whose affordable full steps ``F_b`` (``full_steps_within``)
  are at least 2, placed by the model's own ``deep:b`` calibration read with the ``prediction`` criterion
  (branch 0's is the committed one; deeper ones are made in the run on the model's calibration prompts and
  seeds, and not saved). Beside them, the baseline ``deep:I`` (branch 0, uniform: equal to DeepCache:I,
  checked in ``modes_frontier.py``).
- The pick: ``choose_depth``'s, the candidate of least predicted error.
- Rules:
  1. The chooser *ranks well* at a budget when its pick's PSNR is within 0.5 dB of the best candidate's (by
     PSNR) and its faithfulness difference is not lower than that candidate's by more than 1 point. It is
     kept (exported from ``faster_diffusion`` and documented as the way to pick a depth) if it ranks well at
     3 or more of the 4 budgets on each model; otherwise it stays in ``faster_diffusion.depth`` with this
     verdict.
  2. For the frontier issue's first target, the pick *beats DeepCache* at a budget when its PSNR is higher
     than the baseline's and its faithfulness difference is not lower by more than 1 point; *strictly* when
     it is not lower at all. Reported, not a rule of this script.
  3. No default changes here: a change goes by the default rule (``benchmarks/README.md``), with speed
     measured.

    python benchmarks/depth_choice.py --threads 2                 # both models -> results/depth-choice.md
    python benchmarks/depth_choice.py --quick --out /tmp/d.md     # a smoke run: 8 pairs, the first model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import DeepReuseConfig, KeySteps, Sampler, reference  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SAMPLER = Sampler.DPM_SOLVER
INTERVALS = (2, 3, 4, 5)
QUICK_INTERVALS = (2, 3)
#: The chooser ranks well within this much PSNR of the best candidate (rule 1).
RANK_DB = 0.5
#: ... and this much faithfulness (rule 1; also rule 2's margin).
FAITH_POINTS = 1.0


def judge_model(model: Path, args, partial: dict[int, float], draws) -> dict:
    pipe, steps, branches, found, classifier = harness.budgets.load_model(model, partial, SAMPLER)
    pairs = harness.Pairs.held_out(args.quick, 0)
    guidance = reference.guidance_scale(model)

    def score(how) -> dict:
        images = harness.run(pipe, SAMPLER, how, pairs.prompts, pairs.seeds, guidance, args.batch)
        return judge(images)

    stock = harness.run(pipe, SAMPLER, None, pairs.prompts, pairs.seeds, guidance, args.batch)
    judge = harness.Judge(classifier, pairs.labels, stock, draws)
    budgets = []
    for interval in QUICK_INTERVALS if args.quick else INTERVALS:
        cost, choice = harness.budgets.choose_at(pipe, interval, steps, partial, branches, found)
        rows = []
        baseline = {"name": f"deep:{interval}", "branch": 0, "full": len(range(0, steps, interval))}
        baseline.update(score(baseline["name"]))
        for c in choice.candidates:
            config = DeepReuseConfig(key_steps=KeySteps.explicit(c.indices), branch=c.branch)
            row = {"name": f"b{c.branch}:{c.full_steps}", "branch": c.branch, "full": c.full_steps}
            row.update({"indices": list(c.indices), "predicted": c.predicted, "cost": c.cost})
            row.update(score(config))
            rows.append(row)
            print(
                f"{model.name} I={interval} {row['name']}: predicted {c.predicted:.4g}, "
                f"{row['delta'] * 100:+.1f} pts, {row['psnr']:.2f} dB",
                flush=True,
            )
        budgets.append(
            {
                "interval": interval,
                "cost": cost,
                "pick": choice.branch,
                "baseline": baseline,
                "candidates": rows,
            }
        )
    return {"model": model.name, "pairs": len(pairs.prompts), "budgets": budgets}


def verdicts(budget: dict) -> dict:
    rows = budget["candidates"]
    pick = next(r for r in rows if r["branch"] == budget["pick"])
    best = max(rows, key=lambda r: r["psnr"])
    ranks = (
        pick["psnr"] >= best["psnr"] - RANK_DB and pick["delta"] * 100 >= best["delta"] * 100 - FAITH_POINTS
    )
    base = budget["baseline"]
    beats = pick["psnr"] > base["psnr"] and pick["delta"] * 100 >= base["delta"] * 100 - FAITH_POINTS
    strictly = beats and pick["delta"] >= base["delta"]
    return {
        "pick": pick["name"],
        "best": best["name"],
        "ranks_well": ranks,
        "beats": beats,
        "strictly": strictly,
    }


def report(saved: harness.budgets.Saved) -> str:
    lines = harness.budgets.header(
        "The depth chooser against every branch at DeepCache's cost",
        "depth_choice.py",
        saved,
        "DPM-Solver-20; candidates placed by each branch's `deep:b` calibration (prediction criterion); "
        "the pick is the candidate of least predicted error; `deep:I` is DeepCache:I's rule",
    )
    kept = []
    for result in saved.results:
        lines += [f"## {result['model']} ({result['pairs']} pairs)", ""]
        lines += [
            "| budget (full passes) | method | full steps | predicted error "
            "| all five right − stock (points, 95% CI) | within noise | PSNR vs stock dB (95% CI) |",
            "|---|---|---|---|---|---|---|",
        ]
        well = 0
        notes = []
        for budget in result["budgets"]:
            v = verdicts(budget)
            well += v["ranks_well"]
            for row in [budget["baseline"], *budget["candidates"]]:
                mark = " **(pick)**" if row["name"] == v["pick"] else ""
                predicted = f"{row['predicted']:.4g}" if "predicted" in row else "–"
                ci = row["delta_ci"]
                lines.append(
                    f"| I={budget['interval']} ({budget['cost']:.2f}) | {row['name']}{mark} | "
                    f"{row['full']} | {predicted} | {row['delta'] * 100:+.1f} "
                    f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] | "
                    f"{harness.noise_verdict(row['delta'], ci)} | {row['psnr']:.2f} "
                    f"[{row['psnr_ci'][0]:.2f}, {row['psnr_ci'][1]:.2f}] |"
                )
            notes.append(
                f"- I={budget['interval']}: pick {v['pick']}, best by PSNR {v['best']}: ranks well "
                f"**{'yes' if v['ranks_well'] else 'no'}**; beats DeepCache:{budget['interval']} "
                f"{'yes' if v['beats'] else 'no'} (strictly: {'yes' if v['strictly'] else 'no'})"
            )
        needed = 3 if len(result["budgets"]) == 4 else len(result["budgets"])
        kept.append(well >= needed)
        lines += ["", *notes, f"- Ranks well at {well} of {len(result['budgets'])} budgets", ""]
    verdict = "kept" if all(kept) else "not kept"
    lines += [
        f"**By rule 1 the chooser is {verdict}** (it must rank well at 3 of 4 budgets on each model).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.budgets.add_run_arguments(parser, RESULTS / "depth-choice.md")
    parser.add_argument(
        "--models",
        type=lambda text: [Path(t) for t in text.split(",")],
        default=None,
        help="comma-separated model folders (default: both reference models; --quick: the first)",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        harness.budgets.report_again(args, report)
        return 0
    partial = harness.budgets.prepare(parser, args)
    models = args.models or harness.reference_models(args.quick)
    pairs = len(harness.Pairs.held_out(args.quick, 0).prompts)
    harness.budgets.judge_and_write(args, argv, models, pairs, judge_model, report, partial)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
