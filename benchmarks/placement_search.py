"""Direct searches for a placement of key steps, scored on whole schedules rather than an additive cost.

The protocol, written before the first run, is ``benchmarks/results/placement-search.plan.md``:

- Start from the committed ``auto`` placement at the budget; neighbours move one key step other than 0 by
  -2, -1, +1 or +2. Steepest ascent, at most ``--moves`` moves, scores cached; deterministic.
- Search A (the model alone): mean PSNR against stock over the calibration prompts and seeds.
- Search B (tuned on the classifier, an optimistic reference): all-five-attributes-right count over
  development pairs (the held-out combinations x 3 seeds from 50,000), ties broken by their mean PSNR against
  stock.
- Then one evaluation on the frontier's evaluation set (seeds 0-239): stock, the start, A's and B's lists and
  uniform spacing, with the frontier's bootstrap and "within noise" rule.

    python benchmarks/placement_search.py     # DPM-Solver-20, 7 keys -> results/placement-search.md, .json
    python benchmarks/placement_search.py --quick --out /tmp/p.md   # a smoke run: 8 pairs, 1 move
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import FasterDiffusionConfig, KeySteps, Sampler, reference  # noqa: E402
from faster_diffusion.calibration import find_calibration, paper_budget  # noqa: E402
from faster_diffusion.schedule import evenly_spaced_key_steps  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
#: Seeds of the development pairs: apart from the evaluation's (0-239) and the calibration's (90,000 and up).
DEVELOPMENT_SEED_BASE = 50_000
STEPS = (-2, -1, 1, 2)


def neighbours(keys: tuple[int, ...], num_steps: int) -> list[tuple[int, ...]]:
    """Every list made by moving one key step other than 0 by one of :data:`STEPS`, kept in 1..N-1 and
    distinct from the others, in a fixed order."""
    out = []
    for i in range(1, len(keys)):
        for step in STEPS:
            moved = keys[i] + step
            if 1 <= moved < num_steps and moved not in keys:
                candidate = tuple(sorted((*keys[:i], moved, *keys[i + 1 :])))
                if candidate not in out:
                    out.append(candidate)
    return out


def steepest_ascent(score, start: tuple[int, ...], num_steps: int, moves: int, log) -> tuple[tuple, list]:
    """Move to the best-scoring neighbour while it is strictly better, at most ``moves`` times. Returns the
    final list and the path of (list, score)."""
    current, best = start, score(start)
    path = [(current, best)]
    for _ in range(moves):
        scored = [(score(c), c) for c in neighbours(current, num_steps)]
        top_score, top = max(scored, key=lambda item: item[0])
        if not top_score > best:
            break
        current, best = top, top_score
        path.append((current, best))
        log(f"  -> {list(current)}: {best}")
    return current, path


def decide(a: dict, b: dict, start: dict) -> int:
    """The protocol's outcome from the evaluation of search A's list, search B's and the start: 1 when A's is
    within noise with a point at least the start's; else 2 when B's is within noise; else 3."""
    if a["within_noise"] and a["delta"] >= start["delta"]:
        return 1
    return 2 if b["within_noise"] else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 pairs, 1 move, 20 draws")
    parser.add_argument("--out", type=Path, default=RESULTS / "placement-search.md")
    parser.add_argument("--sampler", type=Sampler.parse, default=Sampler.DPM_SOLVER)
    parser.add_argument("--budget", type=int, default=None, help="key steps (default: the paper's budget)")
    parser.add_argument("--moves", type=int, default=10, help="at most this many moves per search")
    harness.add_common_arguments(parser)
    harness.report.add_from_json(parser)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        harness.report.report_again(args, render)
        return 0
    harness.apply_common_arguments(parser, args, argv)
    moves = 1 if args.quick else args.moves
    sampler, steps = args.sampler, args.sampler.default_steps
    budget = args.budget if args.budget is not None else paper_budget(steps)
    started, began = harness.report.started_now(), time.perf_counter()

    pipe = harness.load_reference(args.model, sampler)
    calibration = find_calibration(pipe, steps)
    if calibration is None:
        raise SystemExit(f"no saved calibration of the reference model for {sampler.value}")
    start = tuple(calibration.indices(budget))
    classifier = harness.load_classifier(args.classifier)
    guidance = args.guidance

    def images(keys, prompts, seeds):
        config = None if keys is None else FasterDiffusionConfig(key_steps=KeySteps.explicit(keys))
        return harness.run(pipe, sampler, config, prompts, seeds, guidance, args.batch)

    # Search A: the calibration prompts, PSNR against stock.
    options = reference.calibration_options()
    cal_prompts, cal_seeds = list(options["prompts"]), list(options["seeds"])
    if args.quick:
        cal_prompts, cal_seeds = cal_prompts[:4], cal_seeds[:4]
    cal_stock = images(None, cal_prompts, cal_seeds)
    cache_a: dict[tuple, float] = {}

    def score_a(keys):
        if keys not in cache_a:
            cache_a[keys] = round(
                float(harness.psnr(images(keys, cal_prompts, cal_seeds), cal_stock).mean()), 4
            )
        return cache_a[keys]

    print(f"search A (calibration prompts, PSNR) from {list(start)}: {score_a(start)}", flush=True)
    found_a, path_a = steepest_ascent(score_a, start, steps, moves, lambda m: print(m, flush=True))

    # Search B: development pairs, the classifier's count then PSNR.
    pairs = harness.Pairs.held_out(args.quick)
    dev_seeds = [DEVELOPMENT_SEED_BASE + s for s in pairs.seeds]
    development = harness.Judge(classifier, pairs.labels, images(None, pairs.prompts, dev_seeds), draws=[])
    dev_stock_right = int(development.stock_correct.sum())
    cache_b: dict[tuple, tuple[int, float]] = {}

    def score_b(keys):
        if keys not in cache_b:
            run = images(keys, pairs.prompts, dev_seeds)
            cache_b[keys] = (
                int(development.correct(run).sum()),
                round(float(harness.psnr(run, development.stock_images).mean()), 4),
            )
        return cache_b[keys]

    print(f"search B (development pairs; stock {dev_stock_right} right) from {list(start)}: {score_b(start)}")
    found_b, path_b = steepest_ascent(score_b, start, steps, moves, lambda m: print(m, flush=True))

    # One evaluation on the evaluation set.
    n = len(pairs.prompts)
    draws = harness.bootstrap_draws(n, args.boot)
    judge = harness.Judge(classifier, pairs.labels, images(None, pairs.prompts, pairs.seeds), draws)
    candidates = {
        "start (auto)": start,
        "A: model alone": found_a,
        "B: tuned on the classifier": found_b,
        "uniform": tuple(evenly_spaced_key_steps(steps, budget)),
    }
    evaluated: dict[tuple, dict] = {}
    for keys in dict.fromkeys(candidates.values()):
        scored = judge(images(keys, pairs.prompts, pairs.seeds))
        within = harness.within_noise(scored["delta"], scored["delta_ci"])
        evaluated[keys] = {"key_steps": list(keys), **scored, "within_noise": within}

    outcome = decide(evaluated[found_a], evaluated[found_b], evaluated[start])
    wall = time.perf_counter() - began
    data = {
        "run": harness.report.run_facts(args.argv, started, began),
        "sampler": sampler.value,
        "budget": budget,
        "pairs": n,
        "stock_all": float(judge.stock_correct.mean()),
        "development_stock_right": dev_stock_right,
        "search_a": {"path": [[list(k), v] for k, v in path_a], "scored": len(cache_a)},
        "search_b": {"path": [[list(k), list(v)] for k, v in path_b], "scored": len(cache_b)},
        "threads": torch.get_num_threads(),
        "scores": {
            "a": [[list(k), v] for k, v in cache_a.items()],
            "b": [[list(k), list(v)] for k, v in cache_b.items()],
        },
        "evaluation": {name: evaluated[keys] for name, keys in candidates.items()},
        "outcome": outcome,
        "seconds": wall,
    }
    harness.report.write(args.out, data, render)
    return 0


OUTCOMES = {
    1: "1: the search from the model alone is within noise and at least as good as the start.",
    2: "2: only the placement tuned on the classifier is within noise; a placement exists that the model's "
    "own outputs do not find.",
    3: "3: not even the placement tuned on the classifier is within noise.",
}


def render(data: dict) -> str:
    """The report of a run's JSON ``data``."""
    fmt, run = harness.report.fmt_ci, data["run"]
    lines = [
        f"# Direct searches for a {data['budget']}-key placement, {data['sampler']}, on the reference model",
        "",
        f"Command: `{harness.report.command('placement_search.py', run['argv'])}`  ",
        f"Started {run['started']}; took {data['seconds'] / 60:.1f} min on the CPU, float32"
        + (f", {data['threads']} threads" if "threads" in data else "")
        + f"; torch {run['torch']}. "
        "Protocol: `benchmarks/results/placement-search.plan.md`, written before the run.",
        "",
        "Search A (PSNR against stock over the calibration prompts) scored "
        f"{data['search_a']['scored']} lists; search B (all attributes right over {data['pairs']} "
        f"development pairs, stock {data['development_stock_right']}) scored {data['search_b']['scored']}.",
        "",
        "| search | path (list: score) |",
        "|---|---|",
        "| A | " + " → ".join(f"{k}: {v:.2f} dB" for k, v in data["search_a"]["path"]) + " |",
        "| B | "
        + " → ".join(f"{k}: {v[0]} right, {v[1]:.2f} dB" for k, v in data["search_b"]["path"])
        + " |",
        "",
        f"## Evaluation ({data['pairs']} pairs, seeds 0-{data['pairs'] - 1}; "
        f"stock {data['stock_all'] * 100:.1f}% fully right)",
        "",
        "| placement | key steps | faithfulness − stock (pts) | within noise | PSNR vs stock (dB) |",
        "|---|---|---|---|---|",
    ]
    for name, m in data["evaluation"].items():
        lines.append(
            f"| {name} | {', '.join(map(str, m['key_steps']))} | "
            f"{fmt(m['delta'], m['delta_ci'], scale=100)} | {'yes' if m['within_noise'] else 'no'} | "
            f"{fmt(m['psnr'], m['psnr_ci'])} |"
        )
    lines += ["", f"Outcome by the protocol: {OUTCOMES[data['outcome']]}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
