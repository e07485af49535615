"""Quality of the reuse modes against DeepCache, at equal numbers of full UNet passes, on the reference model.

Protocol (written before the first run; see ``benchmarks/README.md``, "Reuse modes against DeepCache"):

- Evaluation set and judge: those of ``benchmarks/frontier.py`` (80 held-out attribute combinations x 3
  seeds; faithfulness difference to stock with a 95% paired bootstrap interval, 1000 draws shared by every
  method; PSNR against stock's image of the same pair). ``--model`` picks the reference model
  (``shapes-ldm`` by default, or the SD v1.5-layout one), each at the guidance scale chosen when it was
  trained (5.0 and 3.0: ``reference.guidance_scale``).
- Samplers: DPM-Solver-20 and DDIM-50.
- Methods, each at the full-pass budgets of DeepCache's intervals 2 to 5 (``uniform:I``: steps 0, I, 2I, ...):
  ``deepcache:I`` (``DeepCacheSDHelper``, ``cache_branch_id=0``; when the ``deepcache`` package is
  installed), ``deep:I`` (this package's deep reuse, branch 0, features copied), ``deep+forecast:I`` (the
  same with ``forecast=1``); and this package's encoder propagation at the paper's preset and at ``auto``
  with the same budgets, all with prior noise injection (its default).
- Decision rule for forecasting, fixed before the first run: ``forecast=1`` is kept (made the deep mode's
  default) if, on DPM-Solver-20, its mean PSNR against stock is higher than ``deep:I``'s at at least three of
  the four intervals, and its faithfulness difference is nowhere lower by more than 1 point.
- ``deep:I`` is checked against ``deepcache:I`` image by image: they compute the same thing, so their largest
  pixel difference is reported (it is float rounding, or a defect).

Addendum, written before its first run (calibrated deep reuse, and the SD v1.5-layout model):

- Methods added: ``deep auto:B`` (deep reuse, branch 0, full steps placed by the model's ``deep:0``
  calibration with the target's default criterion, ``prediction``) and ``deep auto:B (feature)`` (the same
  calibration read with the ``feature`` criterion), at each interval's budget B, and at the extra budgets of
  :data:`EXTRA_BUDGETS` (DPM-Solver-20: 6, the most full passes that can reach 2.5x end to end; DDIM-50: 8).
- Criterion rule: ``prediction`` stays deep reuse's default criterion if its PSNR against stock is at least
  ``feature``'s at at least three of the four interval budgets on DPM-Solver-20, on the first model; else
  ``feature`` becomes it.
- Placement rule: at a budget, calibrated deep reuse *beats* DeepCache when its PSNR is higher and its
  faithfulness difference is not lower by more than 1 point.

Addendum 2, written before its first run (a second look at DPM-Solver-20's default):

- Of the settings faster than the default's 7 full passes, one kept stock quality on the first model's
  held-out pairs: ``deep auto:6 (feature)`` (+2.1 points, 33.7 dB; ``results/modes-frontier.md``). It was
  picked *after* that run, so that run cannot confirm it. Its placement differs from ``deep auto:6``'s
  (-4.2 points on the same pairs) only in the first two full steps, which says how noisy one run is.
- Confirmation runs: the SD v1.5-layout model's held-out pairs (the method never ran there), and on both
  models the same held-out prompts with fresh seeds (``--seed-offset 1000``: seed 1000 + i for pair i; the
  calibration used seeds 90,000 and up, every earlier run seeds 0-239). Each run has stock, the default
  (``deep:3``) and ``deep auto:6`` beside it, for context only.
- Rule: ``deep auto:6 (feature)`` becomes DPM-Solver-20's default (6 of 20 full steps placed by the model's
  ``deep:0`` calibration read with the ``feature`` criterion) if it keeps stock quality (faithfulness
  difference at least -1 point, 95% interval containing 0 or above it) in all three confirmation runs.
  Otherwise ``uniform:3`` stays.

Addendum 3, written before its first run (DPM-Solver++-20, which no run above measured):

- The policy gave DPM-Solver++-20 DPM-Solver-20's deep default (``uniform:3``) without a run of its own.
  Four runs on DPM-Solver++-20 (``--samplers DPM-Solver++-20``): each model's held-out pairs with seeds
  0-239 and with ``--seed-offset 1000``; each with stock, ``deep:3`` (for context) and ``deep auto:6
  (feature)`` (budget 6 is in :data:`EXTRA_BUDGETS` for this sampler from this addendum on).
- Rule: ``deep auto:6 (feature)`` becomes DPM-Solver++-20's default too if it keeps stock quality (as in
  Addendum 2) in all four runs. Otherwise DPM-Solver++-20 keeps ``uniform:3``, and the report says whether
  ``uniform:3`` kept stock quality there.

Speed is not measured here (the reference model is too small to time): ``benchmarks/speed.py
--extra-modes`` times the same methods on the SD v1.5 architecture.

    python benchmarks/modes_frontier.py                 # -> benchmarks/results/modes-frontier.md, .json, .png
    python benchmarks/modes_frontier.py --quick --out /tmp/m.md   # a smoke run: 8 pairs, intervals 3 and 5
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import KeySteps, Sampler, reference, use_sampler  # noqa: E402
from faster_diffusion.calibration import find_calibration  # noqa: E402
from faster_diffusion.policy import default_key_steps  # noqa: E402
from faster_diffusion.schedule import KeyStepKind  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
INTERVALS = (2, 3, 4, 5)
QUICK_INTERVALS = (3, 5)
#: Budgets of calibrated deep reuse beside the intervals' (see the protocol's addendum).
EXTRA_BUDGETS = {Sampler.DPM_SOLVER: (6,), Sampler.DPM_SOLVER_PP: (6,), Sampler.DDIM: (8,)}
SAMPLERS = (Sampler.DPM_SOLVER, Sampler.DDIM)


def deep_auto(pipe, sampler: Sampler, budget: int) -> list[str]:
    """Calibrated deep reuse at ``budget`` full passes, placed by each criterion of the model's ``deep:0``
    calibration (one row, which reports the error, if it has none)."""
    if find_calibration(pipe, sampler.default_steps, target="deep:0") is None:
        return [f"deep auto:{budget}"]
    return [f"deep auto:{budget}", f"deep auto:{budget} (feature)"]


def methods(pipe, sampler: Sampler, intervals, deepcache: bool) -> list[str]:
    """Every method of the protocol (registered names, ``benchmarks/harness/methods.py``)."""
    steps = sampler.default_steps
    use_sampler(pipe, sampler)
    out = ["stock", "encoder: paper"]
    for interval in intervals:
        budget = len(range(0, steps, interval))
        if deepcache:
            out.append(f"deepcache:{interval}")
        out += [f"deep:{interval}", f"deep+forecast:{interval}"]
        out += deep_auto(pipe, sampler, budget)
        out.append(f"encoder: auto:{budget}")
    for budget in EXTRA_BUDGETS.get(sampler, ()):
        out += deep_auto(pipe, sampler, budget)
    return out


def plot(results: dict, path: Path) -> None:
    with harness.plots.figure(path, len(results), 4.2) as axes:
        for row, (sampler, rows) in enumerate(results.items()):
            families: dict[str, list] = {}
            for name, m in rows.items():
                if name == "stock":
                    continue
                family = re.sub(r":\d+", "", name)  # "deep auto:7 (feature)" -> "deep auto (feature)"
                families.setdefault(family, []).append(m)
            for col, (metric, label, scale) in enumerate(harness.plots.PANELS):
                ax = axes[row][col]
                for family, points in families.items():
                    points = sorted(points, key=lambda m: m["full_passes"])
                    x = [m["full_passes"] for m in points]
                    legend = (
                        "deepcache (identical to deep, drawn under it)" if family == "deepcache" else family
                    )
                    y = [m[metric] * scale for m in points]
                    (line,) = ax.plot(x, y, marker="o", label=legend, color=COLOURS.get(family))
                    ax.fill_between(
                        x,
                        [m[f"{metric}_ci"][0] * scale for m in points],
                        [m[f"{metric}_ci"][1] * scale for m in points],
                        color=line.get_color(),
                        alpha=0.12,
                    )
                harness.plots.reference_lines(ax, metric)
                harness.plots.label(ax, "full UNet passes", label, f"{sampler}: {label}")


#: One colour per family of methods, the same in every panel.
COLOURS = {
    "encoder: paper": "C0",
    "deepcache": "C1",
    "deep": "C2",
    "deep auto": "C3",
    "deep auto (feature)": "C4",
    "deep+forecast": "C5",
    "encoder: auto": "C6",
}


def read_speedups(path: Path) -> dict[tuple[str, str], float]:
    """End-to-end speedups from a ``benchmarks/speed.py`` report: ``{(sampler, mode): speedup}``."""
    speedups = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) > 5 and cells[5].endswith("x") and cells[0] in {s.value for s in Sampler}:
            speedups[(cells[0], cells[1])] = float(cells[5][:-1])
    return speedups


def speed_of(name: str, full: int, sampler: str, speedups: dict, steps: int) -> float | None:
    """The measured speedup a method runs at: its own row, or the row of a method that makes the same UNet
    calls (a partial step of deep reuse costs the same wherever it falls; encoder propagation's cost depends
    only on how many key steps it has)."""
    own = {"stock": "stock", "encoder: paper": "propagation+batched"}.get(name, name)
    if (sampler, own) in speedups:
        return speedups[(sampler, own)]
    if name.startswith("deep auto:") or name.startswith("deep:"):
        same = [f"deep:{i}" for i in range(1, steps + 1) if len(range(0, steps, i)) == full] + [
            f"deep-full:{full}"
        ]
        return next((speedups[(sampler, m)] for m in same if (sampler, m) in speedups), None)
    if name.startswith("encoder: auto:") and full == KeySteps.paper().resolve(steps).num_key_steps:
        return speedups.get((sampler, "propagation+batched"))
    return None


def default_method(sampler: str) -> str:
    """The name this script gives the product's default for ``sampler`` (``faster_diffusion.policy``)."""
    keys = default_key_steps(None, sampler, mode="deep")
    if keys.kind is KeyStepKind.UNIFORM:
        return f"deep:{keys.every}"
    if keys.kind is KeyStepKind.AUTO:
        return f"deep auto:{keys.budget}" + (" (feature)" if keys.criterion == "feature" else "")
    return str(keys)


def plot_speed(results: dict, defaults: dict[str, str], speedups: dict, path: Path) -> list[str]:
    """Quality against measured end-to-end speedup, for the samplers the speed reports cover, the product's
    default (``defaults``, by sampler) ringed; returns the methods left out for want of a speed."""
    samplers = [s for s in results if any(k[0] == s for k in speedups)]
    missing: list[str] = []
    if not samplers:
        return missing
    with harness.plots.figure(path, len(samplers), 4.4) as axes:
        for row, sampler in enumerate(samplers):
            steps = Sampler.parse(sampler).default_steps
            families: dict[str, list] = {}
            for name, m in results[sampler].items():
                if "error" in m:
                    continue
                speed = speed_of(name, m["full_passes"], sampler, speedups, steps)
                if speed is None:
                    missing.append(f"{sampler} {name}")
                    continue
                families.setdefault(re.sub(r":\d+", "", name), []).append((speed, m))
            name = defaults[sampler]  # ringed on both panels
            default = results[sampler].get(name, {})
            default_speed = speed_of(name, default.get("full_passes"), sampler, speedups, steps)
            for col, (metric, label, scale) in enumerate(harness.plots.PANELS):
                ax = axes[row][col]
                for family, points in families.items():
                    if family == "stock":
                        continue
                    points.sort(key=lambda p: p[0])
                    x = [p[0] for p in points]
                    style = {"linestyle": ":"} if family == "deepcache" else {}
                    colour = COLOURS.get(family)
                    y = [p[1][metric] * scale for p in points]
                    ax.plot(x, y, marker="o", label=family, color=colour, **style)
                    ax.errorbar(
                        x,
                        [p[1][metric] * scale for p in points],
                        yerr=[
                            [(p[1][metric] - p[1][f"{metric}_ci"][0]) * scale for p in points],
                            [(p[1][f"{metric}_ci"][1] - p[1][metric]) * scale for p in points],
                        ],
                        fmt="none",
                        ecolor="0.6",
                        capsize=2,
                    )
                if metric in default and default_speed is not None:
                    y = default[metric] * scale
                    ax.plot(default_speed, y, marker="o", markersize=14, fillstyle="none", color="k")
                    ax.annotate("the default", (default_speed, y), (10, -18), textcoords="offset points")
                harness.plots.reference_lines(ax, metric)
                ax.axvline(2.5, color="0.8", linewidth=0.8, linestyle="--")
                xlabel = "end-to-end speedup over stock (SD v1.5 architecture, 256 px, CPU)"
                harness.plots.label(ax, xlabel, label, f"{sampler}: {label}")
    return missing


def speed_plot(data: dict, args, stem: Path) -> None:
    """The quality-against-speed plot of a run's JSON ``data``, if ``--speed`` names speed reports."""
    if not args.speed:
        return
    speedups: dict[tuple[str, str], float] = {}
    for path in args.speed:
        speedups.update(read_speedups(path))
    results = data["results"]
    # Runs from before the defaults were recorded: the policy's default now (what their plots were drawn with
    # when they were last drawn again).
    defaults = data.get("defaults") or {s: default_method(s) for s in results}
    missing = plot_speed(results, defaults, speedups, Path(f"{stem}-speed.png"))
    if missing:
        print(f"no measured speed, left off the speed plot: {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 pairs, intervals 3 and 5")
    parser.add_argument("--out", type=Path, default=RESULTS / "modes-frontier.md")
    parser.add_argument("--model", type=Path, default=reference.MODEL_DIR, help="reference model folder")
    parser.add_argument("--boot", type=int, default=None, help="bootstrap draws (default 1000, quick 20)")
    parser.add_argument("--batch", type=int, default=80, help="prompts per pipeline call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    harness.report.add_from_json(parser, plots=True)
    parser.add_argument(
        "--speed",
        type=Path,
        action="append",
        default=[],
        help="a benchmarks/speed.py report whose end-to-end speedups place the methods on a second plot, "
        "quality against speed (<out>-speed.png); may be given more than once",
    )
    parser.add_argument(
        "--skip",
        type=re.compile,
        default=None,
        help="leave out the methods whose name this regular expression matches (e.g. 'forecast|feature')",
    )
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="seed of pair i is OFFSET + i (default 0, the seeds of every other benchmark on these pairs)",
    )
    parser.add_argument(
        "--samplers",
        type=lambda text: [Sampler.parse(t) for t in text.split(",")],
        default=list(SAMPLERS),
        help="comma-separated samplers (default DPM-Solver-20,DDIM-50)",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved, _ = harness.report.report_again(args, render, parser)
        stem = args.out.with_suffix("")
        plot(saved["results"], Path(f"{stem}.png"))
        speed_plot(saved, args, stem)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    started, began = harness.report.started_now(), time.perf_counter()
    pipe = harness.load_reference(args.model)
    classifier = harness.load_classifier()
    pairs = harness.Pairs.held_out(args.quick, args.seed_offset)
    n = len(pairs.prompts)
    draws = harness.bootstrap_draws(n, args.boot or (20 if args.quick else 1000))
    deepcache = harness.have_deepcache()
    intervals = QUICK_INTERVALS if args.quick else INTERVALS
    guidance = reference.guidance_scale(args.model)

    results: dict[str, dict[str, dict]] = {}
    agreement: dict[str, dict[str, float]] = {}
    for sampler in args.samplers:
        rows: dict[str, dict] = {}
        images: dict[str, np.ndarray] = {}
        judge = None
        for name in methods(pipe, sampler, intervals, deepcache):
            if args.skip is not None and args.skip.search(name):
                continue
            full = harness.full_passes(name, harness.Context(steps=sampler.default_steps))
            try:
                images[name] = harness.run(
                    pipe, sampler, name, pairs.prompts, pairs.seeds, guidance, args.batch
                )
            except Exception as error:  # a method that cannot run here (no calibration) is reported as such
                rows[name] = {"full_passes": full, "error": f"{type(error).__name__}: {error}"}
                print(f"{sampler.value} {name}: {rows[name]['error']}", flush=True)
                continue
            if judge is None:
                judge = harness.Judge(classifier, pairs.labels, images["stock"], draws)
            rows[name] = {"full_passes": full, **judge(images[name])}
            print(
                f"{sampler.value} {name} ({full} full): {rows[name]['delta'] * 100:+.1f} pts "
                f"[{rows[name]['delta_ci'][0] * 100:+.1f}, {rows[name]['delta_ci'][1] * 100:+.1f}], "
                f"{rows[name]['psnr']:.2f} dB",
                flush=True,
            )
        if deepcache:
            agreement[sampler.value] = {
                str(i): float(np.abs(images[f"deep:{i}"] - images[f"deepcache:{i}"]).max() * 127.5)
                for i in intervals
                if f"deep:{i}" in images and f"deepcache:{i}" in images
            }
        results[sampler.value] = rows

    stem = args.out.with_suffix("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, Path(f"{stem}.png"))
    data = {
        "run": harness.report.run_facts(harness.report.argv_of(argv), started, began, deepcache=deepcache),
        "pairs": n,
        "seed_offset": args.seed_offset,
        "guidance": guidance,
        "defaults": {s.value: default_method(s.value) for s in args.samplers},
        "results": results,
        "agreement": agreement,
    }
    harness.report.write(args.out, data, render, parser)
    speed_plot(data, args, stem)
    return 0


def forecast_verdict(rows: dict[str, dict], intervals) -> str:
    if not any(f"deep+forecast:{i}" in rows for i in intervals):
        return "forecasting was not run"
    better = [
        i
        for i in intervals
        if "psnr" in rows.get(f"deep+forecast:{i}", {})
        and rows[f"deep+forecast:{i}"]["psnr"] > rows[f"deep:{i}"]["psnr"]
    ]
    worse_faith = [
        i
        for i in intervals
        if "delta" in rows.get(f"deep+forecast:{i}", {})
        and rows[f"deep+forecast:{i}"]["delta"] < rows[f"deep:{i}"]["delta"] - 0.01
    ]
    kept = len(better) >= min(3, len(intervals)) and not worse_faith
    return (
        f"forecast raises PSNR at intervals {better or 'none'}; faithfulness lower by more than 1 point at "
        f"{worse_faith or 'none'}: **{'kept' if kept else 'not kept'}** by the protocol's rule"
    )


def criterion_verdict(rows: dict[str, dict], intervals) -> str:
    budgets = [rows[f"deep:{i}"]["full_passes"] for i in intervals if f"deep:{i}" in rows]
    pairs = [
        (b, rows[f"deep auto:{b}"]["psnr"], rows[f"deep auto:{b} (feature)"]["psnr"])
        for b in budgets
        if "psnr" in rows.get(f"deep auto:{b}", {}) and "psnr" in rows.get(f"deep auto:{b} (feature)", {})
    ]
    if not pairs:
        return "no calibrated deep reuse rows with both criteria"
    at_least = [b for b, prediction, feature in pairs if prediction >= feature]
    kept = len(at_least) >= min(3, len(pairs))
    return (
        f"prediction's PSNR is at least feature's at budgets {at_least or 'none'} of "
        f"{[b for b, *_ in pairs]}: "
        f"**{'prediction stays' if kept else 'feature becomes'}** deep reuse's default criterion by the rule"
    )


def placement_verdict(rows: dict[str, dict], intervals) -> str:
    beats, loses = [], []
    for i in intervals:
        cache = rows.get(f"deepcache:{i}", rows.get(f"deep:{i}", {}))
        if "psnr" not in cache:
            continue
        auto = rows.get(f"deep auto:{cache['full_passes']}", {})
        if "psnr" not in auto:
            continue
        better = auto["psnr"] > cache["psnr"] and auto["delta"] >= cache["delta"] - 0.01
        (beats if better else loses).append(cache["full_passes"])
    return (
        f"calibrated deep reuse (prediction) beats DeepCache's uniform steps at {beats or 'no'} full passes, "
        f"not at {loses or 'none'}"
    )


def render(data: dict, args: argparse.Namespace) -> str:
    """The report of a run's JSON ``data``; ``args``: the settings its command line parses to."""
    run, n, results, agreement = data["run"], data["pairs"], data["results"], data["agreement"]
    intervals = QUICK_INTERVALS if args.quick else INTERVALS
    # A run from before --seed-offset (4250dac) saved no offset; its report named no seed range, and printed
    # the agreement line for a sampler even where no interval ran both (as before ed9ddf6).
    legacy = "seed_offset" not in data
    offset = data.get("seed_offset", 0)
    seeds = "seeds" if legacy else f"seeds {offset} to {offset + n - 1}"
    # Runs from before the guidance was recorded ran at the model's, as reference.guidance_scale gives it.
    guidance = data.get("guidance", reference.guidance_scale(args.model))
    lines = harness.report.header(
        "Reuse modes against DeepCache on the reference model",
        "modes_frontier.py",
        run,
        f"Model: `{Path(args.model).name}`; {n} pairs (held-out combinations x {seeds}); guidance {guidance}",
        "DeepCache: "
        + (
            "installed; DeepCacheSDHelper, branch 0"
            if run["deepcache"]
            else "not installed (its rows are left out)"
        ),
    )
    for sampler, rows in results.items():
        lines += [
            f"## {sampler}",
            "",
            "| method | full passes | all five right − stock (points, 95% CI) | within noise "
            "| PSNR vs stock dB (95% CI) |",
            "|---|---|---|---|---|",
        ]
        for name, m in rows.items():
            if "error" in m:
                lines.append(f"| {name} | {m['full_passes']} | not run: {m['error']} | | |")
                continue
            ci = m["delta_ci"]
            lines.append(
                f"| {name} | {m['full_passes']} | {m['delta'] * 100:+.1f} [{ci[0] * 100:+.1f}, "
                f"{ci[1] * 100:+.1f}] | {harness.noise_verdict(m['delta'], ci)} | {m['psnr']:.2f} "
                f"[{m['psnr_ci'][0]:.2f}, {m['psnr_ci'][1]:.2f}] |"
            )
        decides = sampler == Sampler.DPM_SOLVER.value
        lines += [
            "",
            "The rules, applied to this sampler"
            + ("" if decides else " for reference (the protocol decides on DPM-Solver-20)")
            + ":",
            "",
            f"- {forecast_verdict(rows, intervals)}",
            f"- {criterion_verdict(rows, intervals)}",
            f"- {placement_verdict(rows, intervals)}",
            "",
        ]
        if agreement.get(sampler) or (legacy and sampler in agreement):  # both ran at some interval
            shown = ", ".join(f"interval {i}: {d:.3g}" for i, d in agreement[sampler].items())
            lines += [f"Largest pixel difference (0-255) of `deep:I` against `deepcache:I`: {shown}.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
