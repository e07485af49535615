"""The speed-quality frontier of key-step placements, and which calibration criterion predicts quality.

Protocol (fixed before the first full run; see ``benchmarks/README.md``):

- Evaluation set: the quality benchmark's (``benchmarks/quality.py``): 80 attribute combinations that
  training never saw x 3 seeds (0-239), guidance 5.0, on the trained reference model. The calibration that
  ``auto`` uses ran on other prompts (training combinations) and other seeds (90,000 and up).
- Samplers and budgets (key steps = encoder passes): DDIM-50 at every budget from 5 to 25, DPM-Solver-20 at
  every budget from 4 to 12.
- Families at each budget, all with prior noise injection (the default):
  ``auto`` (the calibration's criterion, :data:`faster_diffusion.calibration.DEFAULT_CRITERION`),
  ``auto (other criterion)`` for every other criterion the calibration measured, ``uniform`` (evenly
  spaced, ``schedule.evenly_spaced_key_steps``) and
  ``paper-shaped`` (the paper's preset stretched to the budget, ``schedule.paper_shaped_key_steps``; the
  preset itself at 9 of 50 and 7 of 20). A list two families share is generated once.
- Quality of a schedule: (a) faithfulness: the share of pairs whose five attributes the classifier reads
  right, as a difference to stock in points, with a 95% paired bootstrap interval (1000 draws over the
  pairs, shared by all schedules); (b) PSNR against the stock image of the same pair, with its interval.
- "Within noise of stock": the interval of the faithfulness difference contains 0 and its point estimate is
  at least -1 point. The smallest such budget of ``auto`` is reported, and also the smallest from which every
  larger budget holds too.
- Criteria: for each sampler, Spearman's rank correlation between each criterion's predicted cost
  (``calibration.schedule_cost``) and the measured mean PSNR, and the faithfulness difference, over all
  distinct schedules of all families and budgets. The criterion with the larger mean |rho| against PSNR over
  the two samplers is the better one.

    python benchmarks/frontier.py                       # -> benchmarks/results/frontier.md, .json, .png
    python benchmarks/frontier.py --quick --out /tmp/f.md   # a smoke run: 8 pairs, 2 budgets each

``--calibrations DIR`` reads the calibrations from ``DIR`` (a ``faster_diffusion_calibration.json`` made by
``training/calibrate_reference.py --out-dir DIR``) instead of the weights folder, to judge a criterion the
committed calibration lacks. ``--samplers`` and ``--budgets`` run a part of the protocol (the report says
which); the judging rules stay the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import FasterDiffusionConfig, KeySteps, Sampler, reference, use_sampler  # noqa: E402
from faster_diffusion.calibration import (  # noqa: E402
    DEFAULT_CRITERION,
    find_calibration,
    load_calibrations,
    optimal_key_steps,
    paper_budget,
    register,
    schedule_cost,
    spearman,
)
from faster_diffusion.schedule import evenly_spaced_key_steps, paper_shaped_key_steps  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
BUDGETS = {Sampler.DDIM: range(5, 26), Sampler.DPM_SOLVER: range(4, 13)}
QUICK_BUDGETS = {Sampler.DDIM: (5, 9), Sampler.DPM_SOLVER: (4, 7)}


def families(criteria) -> tuple[str, ...]:
    """The families of a run whose calibration measured ``criteria``: ``auto`` is the default criterion."""
    others = [f"auto ({c})" for c in criteria if c != DEFAULT_CRITERION]
    return ("auto", *others, "uniform", "paper-shaped")


def auto_criterion(family: str) -> str:
    return DEFAULT_CRITERION if family == "auto" else family[len("auto (") : -1]


def schedules_for(sampler: Sampler, budgets, costs: dict[str, np.ndarray]) -> dict[tuple[str, int], tuple]:
    steps = sampler.default_steps
    out = {}
    for budget in budgets:
        for family in families(costs)[:-2]:
            out[(family, budget)] = optimal_key_steps(costs[auto_criterion(family)], budget)
        out[("uniform", budget)] = evenly_spaced_key_steps(steps, budget)
        out[("paper-shaped", budget)] = paper_shaped_key_steps(steps, budget)
    return out


def plot(results: dict, path: Path) -> None:
    with harness.plots.figure(path, len(results), 4.2) as axes:
        for row, (sampler, by_family) in enumerate(results.items()):
            for col, (metric, label, scale) in enumerate(harness.plots.PANELS):
                ax = axes[row][col]
                for family in by_family:
                    points = sorted(by_family[family].items())
                    budgets = [b for b, _ in points]
                    values = [m[metric] * scale for _, m in points]
                    low = [m[f"{metric}_ci"][0] * scale for _, m in points]
                    high = [m[f"{metric}_ci"][1] * scale for _, m in points]
                    (line,) = ax.plot(budgets, values, marker="o", markersize=3, label=family)
                    ax.fill_between(budgets, low, high, color=line.get_color(), alpha=0.15)
                harness.plots.reference_lines(ax, metric)
                ax.axvline(paper_budget(sampler.default_steps), color="0.85", linewidth=0.8, zorder=0)
                xlabel = "key steps (encoder passes); grey line: the paper's budget"
                harness.plots.label(ax, xlabel, label, f"{sampler.value}: {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 pairs, 2 budgets per sampler")
    parser.add_argument("--out", type=Path, default=RESULTS / "frontier.md")
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline (cpu or cuda)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="pipeline dtype (the quality benchmark's is float32)",
    )
    parser.add_argument("--boot", type=int, default=None, help="bootstrap draws (default 1000, quick 20)")
    parser.add_argument("--batch", type=int, default=80, help="prompts per pipeline call")
    parser.add_argument(
        "--calibrations", type=Path, default=None, help="folder of the calibrations (default: the weights')"
    )
    parser.add_argument(
        "--samplers",
        type=lambda text: [Sampler.parse(t) for t in text.split(",")],
        default=[Sampler.DDIM, Sampler.DPM_SOLVER],
        help="comma-separated samplers (default DDIM-50,DPM-Solver-20)",
    )
    parser.add_argument(
        "--budgets",
        action="append",
        default=[],
        metavar="SAMPLER=B,B,...",
        help="the budgets of one sampler instead of the protocol's, e.g. DDIM-50=5,9,13 (repeatable)",
    )
    harness.report.add_from_json(parser, plots=True)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved, _ = harness.report.report_again(args, render, parser)
        plot(typed(saved)[0], Path(f"{args.out.with_suffix('')}.png"))
        return 0
    budgets_of = dict(QUICK_BUDGETS if args.quick else BUDGETS)
    for item in args.budgets:
        name, _, values = item.partition("=")
        budgets_of[Sampler.parse(name)] = tuple(int(v) for v in values.split(","))
    boot = args.boot or (20 if args.quick else 1000)
    started, began = harness.report.started_now(), time.perf_counter()

    pipe = harness.load_reference(device=args.device, dtype=getattr(torch, args.dtype))
    if args.calibrations is not None:
        calibrations = load_calibrations(args.calibrations)
        if not calibrations:
            raise SystemExit(f"--calibrations: no calibrations in {args.calibrations}")
        for calibration in calibrations:
            register(pipe.unet, calibration)
    classifier = harness.load_classifier()
    pairs = harness.Pairs.held_out(args.quick)
    prompts, seeds, labels = pairs.prompts, pairs.seeds, pairs.labels
    n = len(prompts)
    draws = harness.bootstrap_draws(n, boot)
    guidance = reference.GUIDANCE_SCALE

    results: dict[Sampler, dict[str, dict[int, dict]]] = {}
    correlations: dict[Sampler, dict[str, dict[str, float]]] = {}
    stock_rows = {}
    for sampler in args.samplers:
        use_sampler(pipe, sampler)
        calibration = find_calibration(pipe, sampler.default_steps)
        if calibration is None:
            raise SystemExit(f"no saved calibration of the reference model for {sampler.value}")
        criteria = calibration.criteria
        costs = {c: calibration.with_criterion(c).matrix for c in criteria}
        budgets = budgets_of[sampler]
        schedules = schedules_for(sampler, budgets, costs)
        stock = harness.generate(pipe, sampler, None, prompts, seeds, guidance, args.batch)
        judge = harness.Judge(classifier, labels, stock.images, draws)
        stock_rows[sampler] = {"all": float(judge.stock_correct.mean()), "seconds": stock.seconds}
        measured: dict[tuple, dict] = {}
        for indices in dict.fromkeys(schedules.values()):
            config = FasterDiffusionConfig(key_steps=KeySteps.explicit(indices))
            run = harness.generate(pipe, sampler, config, prompts, seeds, guidance, args.batch)
            measured[indices] = {
                "key_steps": list(indices),
                **judge(run.images),
                "seconds": run.seconds,
                "cost": {c: schedule_cost(costs[c], indices) for c in criteria},
            }
            print(
                f"{sampler.value} {list(indices)}: {measured[indices]['delta'] * 100:+.1f} pts, "
                f"{measured[indices]['psnr']:.1f} dB",
                flush=True,
            )
        results[sampler] = {family: {} for family in families(criteria)}
        for (family, budget), indices in schedules.items():
            results[sampler][family][budget] = measured[indices]
        distinct = list(measured.values())
        correlations[sampler] = {
            c: {
                "psnr": spearman([-m["cost"][c] for m in distinct], [m["psnr"] for m in distinct]),
                "delta": spearman([-m["cost"][c] for m in distinct], [m["delta"] for m in distinct]),
            }
            for c in criteria
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, Path(f"{args.out.with_suffix('')}.png"))
    device = harness.timing.processor_name(torch.device(args.device))
    data = {
        "run": harness.report.run_facts(harness.report.argv_of(argv), started, began, device_name=device),
        "pairs": n,
        "guidance": guidance,
        "stock": {s.value: v for s, v in stock_rows.items()},
        "correlations": {s.value: v for s, v in correlations.items()},
        "results": {
            s.value: {family: {str(b): m for b, m in by_budget.items()} for family, by_budget in by.items()}
            for s, by in results.items()
        },
    }
    harness.report.write(args.out, data, render, parser)
    return 0


def typed(data: dict) -> tuple[dict, dict, dict]:
    """A saved run's results, correlations and stock rows keyed by sampler (and budget) again."""
    results = {
        Sampler.parse(s): {family: {int(b): m for b, m in by.items()} for family, by in by_family.items()}
        for s, by_family in data["results"].items()
    }
    correlations = {Sampler.parse(s): v for s, v in data["correlations"].items()}
    stock = {Sampler.parse(s): v for s, v in data["stock"].items()}
    return results, correlations, stock


def render(data: dict, args: argparse.Namespace) -> str:
    """The report of a run's JSON ``data``; ``args``: the settings its command line parses to."""
    # Runs from before the guidance was recorded ran at the reference model's, then and now 5.0.
    guidance = data.get("guidance", reference.GUIDANCE_SCALE)
    return write_report(data["run"], args, data["pairs"], guidance, *typed(data))


def smallest_within_noise(by_budget: dict[int, dict]) -> tuple[int | None, int | None]:
    """(smallest budget within noise, smallest budget from which every larger one is within noise)."""
    ok = {b: harness.within_noise(m["delta"], m["delta_ci"]) for b, m in by_budget.items()}
    first = min((b for b, good in ok.items() if good), default=None)
    from_on = None
    for b in sorted(ok, reverse=True):
        if not ok[b]:
            break
        from_on = b
    return first, from_on


def write_report(run: dict, args, n, guidance, results, correlations, stock_rows) -> str:
    took = harness.report.minutes(run)
    lines = [
        "# Key-step placement: the speed-quality frontier on the reference model",
        "",
        f"Command: `{harness.report.command('frontier.py', run['argv'])}`  ",
        f"Started {run['started']}; took {took} min on {args.device} ({run['device_name']}), "
        f"{args.dtype}; torch {run['torch']}.  ",
        f"{n} held-out prompt x seed pairs (the quality benchmark's), guidance {guidance}; "
        "noise injection on for every schedule. Faithfulness: all five attributes read right. Intervals: 95% "
        "paired bootstrap over the pairs. 'Within noise': the faithfulness difference's interval contains 0 "
        f"and its point is at least {harness.WITHIN_NOISE_POINTS:+.0f} point.",
        "",
        "## Which criterion predicts quality",
        "",
        "Spearman's rho between minus each criterion's predicted cost and the measured quality, over every "
        "distinct schedule of the run (all families and budgets):",
        "",
        "| sampler | criterion | rho vs PSNR | rho vs faithfulness difference |",
        "|---|---|---|---|",
    ]
    for sampler, by_criterion in correlations.items():
        for criterion, rho in by_criterion.items():
            lines.append(f"| {sampler.value} | {criterion} | {rho['psnr']:.3f} | {rho['delta']:.3f} |")
    criteria = next(iter(correlations.values()))
    mean_rho = {c: np.mean([abs(correlations[s][c]["psnr"]) for s in correlations]) for c in criteria}
    better = max(mean_rho, key=mean_rho.get)
    lines += [
        "",
        "Mean |rho| against PSNR: "
        + ", ".join(f"{c} {v:.3f}" for c, v in mean_rho.items())
        + f". The better criterion by the protocol: **{better}**.",
        "",
    ]
    for sampler, by_family in results.items():
        steps = sampler.default_steps
        pb = paper_budget(steps)
        first, from_on = smallest_within_noise(by_family["auto"])
        at_paper = {f: by_family[f].get(pb) for f in by_family}
        lines += [
            f"## {sampler.value}",
            "",
            f"Stock: {stock_rows[sampler]['all'] * 100:.1f}% of pairs fully right.",
            f"`auto` within noise of stock: smallest budget {first}; "
            + (
                f"from {from_on} on at every larger budget."
                if from_on is not None
                else f"not at the largest budget run ({max(by_family['auto'])})."
            ),
            "",
        ]
        if all(at_paper.values()):
            lines.append(f"At the paper's budget ({pb} of {steps}):")
            lines.append("")
            for family, m in at_paper.items():
                lines.append(
                    f"- {family}: {m['delta'] * 100:+.1f} [{m['delta_ci'][0] * 100:+.1f}, "
                    f"{m['delta_ci'][1] * 100:+.1f}] points, PSNR {m['psnr']:.1f} dB; {m['key_steps']}"
                )
            lines.append("")
        lines += [
            "| budget | family | key steps | faithfulness − stock (pts) | PSNR vs stock (dB) "
            f"| predicted cost ({' / '.join(criteria)}) |",
            "|---|---|---|---|---|---|",
        ]
        budgets = sorted(by_family["auto"])
        for budget in budgets:
            for family in by_family:
                m = by_family[family][budget]
                lines.append(
                    f"| {budget} | {family} | {', '.join(map(str, m['key_steps']))} "
                    f"| {m['delta'] * 100:+.1f} "
                    f"[{m['delta_ci'][0] * 100:+.1f}, {m['delta_ci'][1] * 100:+.1f}] "
                    f"| {m['psnr']:.1f} [{m['psnr_ci'][0]:.1f}, {m['psnr_ci'][1]:.1f}] "
                    f"| {' / '.join(format(m['cost'][c], '.2f') for c in criteria)} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
