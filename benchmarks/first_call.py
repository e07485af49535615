"""What the first call of the default costs on a model without a calibration: calibrating then, or running the
fallback placement (``benchmarks/README.md``, "The first call without a calibration", whose rule was written
before this script was first run).

For each sampler whose default places its full steps by a calibration (DDIM-50's ``auto:13`` and
DPM-Solver-20's ``auto:6@feature``), on each model: the time of a stock call; of the calibration the first
call would make (``get_calibration`` for the default's target and criterion, with the prompts a first call
would use: the built-in models' own, otherwise ``DEFAULT_PROMPTS``); of a call placed by that calibration;
and of a call placed by the fallback (:meth:`KeySteps.fallback`). Calls are interleaved, the median of
``--repeats`` is reported, and the first call's cost is given in stock calls:

- calibrating: (calibration + calibrated call) / stock call;
- fallback: fallback call / stock call.

Condition 2 of the rule holds (the fallback is chosen, given condition 1) where calibrating makes the first
call longer than two stock calls. Condition 1, the fallback's quality, is read from the reports of
``modes_frontier.py`` that the rule names; this script measures time only.

    python benchmarks/first_call.py --out benchmarks/results/first-call-reference.md   # the reference models
    python benchmarks/first_call.py --sd15 --size 256 --repeats 1 --out benchmarks/results/first-call-sd15.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import report  # noqa: E402
from benchmarks.harness.pipes import REFERENCE_MODELS, load_reference  # noqa: E402
from benchmarks.harness.timing import cpu_model, interleaved, median  # noqa: E402
from faster_diffusion import (  # noqa: E402
    CalibrationFallbackWarning,
    DeepReuseConfig,
    KeySteps,
    Sampler,
    apply_faster_diffusion,
    get_calibration,
    use_sampler,
)
from faster_diffusion.app.generate import calibration_options  # noqa: E402
from faster_diffusion.calibration import DEFAULT_PROMPTS, find_calibration  # noqa: E402
from faster_diffusion.policy import default_key_steps  # noqa: E402

SCRIPT = "first_call.py"
#: The samplers whose default is placed by a calibration.
SAMPLERS = (Sampler.DDIM, Sampler.DPM_SOLVER)
#: The rule's threshold: calibrating must not make the first call longer than this many stock calls.
THRESHOLD = 2.0
PROMPT = "a photo of an astronaut riding a horse on the moon"


def _pipes(args: argparse.Namespace):
    """(name, pipeline, calibration options, size) of each model the run measures."""
    if args.sd15:
        from benchmarks.models import build_sd15_pipeline

        pipe = build_sd15_pipeline()
        pipe.set_progress_bar_config(disable=True)
        options = {"prompts": DEFAULT_PROMPTS[: args.prompts], "height": args.size, "width": args.size}
        yield "SD v1.5 architecture, random weights", pipe, options, args.size
        return
    for folder in REFERENCE_MODELS:
        pipe = load_reference(folder)
        options = {k: v for k, v in calibration_options(pipe).items() if k != "save"}
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        yield f"reference model `{folder.name}`", pipe, options, size


def _call(pipe, steps: int, size: int, guidance: float) -> float:
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    pipe(
        PROMPT,
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=guidance,
        generator=generator,
    )
    return time.perf_counter() - started


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, pipe, options, size in _pipes(args):
        guidance = options.get("guidance_scale", 7.5)
        for sampler in args.samplers:
            use_sampler(pipe, sampler)
            steps = sampler.default_steps
            keys = default_key_steps(pipe, sampler, steps, mode="deep")
            fallback = keys.fallback(steps)
            config = DeepReuseConfig(key_steps=keys)
            target = config.calibration_target
            _call(pipe, 2, size, guidance)  # warm-up
            started = time.perf_counter()
            calibration = get_calibration(
                pipe,
                num_inference_steps=steps,
                target=target,
                criterion=keys.criterion,
                save=False,
                force=True,
                **options,
            )
            calibrating = time.perf_counter() - started
            assert find_calibration(pipe, steps, target=target) is not None
            placed = KeySteps.explicit(keys.resolve(steps, calibration).indices)
            methods = {
                "stock": None,
                "calibrated": DeepReuseConfig(key_steps=placed),
                "fallback": DeepReuseConfig(key_steps=fallback),
            }
            seconds: dict[str, list[float]] = {method: [] for method in methods}
            for _, method in interleaved(methods, args.repeats, warmups=0):
                handle = None if methods[method] is None else apply_faster_diffusion(pipe, methods[method])
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", CalibrationFallbackWarning)
                        seconds[method].append(_call(pipe, steps, size, guidance))
                finally:
                    if handle is not None:
                        handle.remove()
            rows.append(
                {
                    "model": name,
                    "sampler": sampler.value,
                    "default": str(keys),
                    "full_steps": len(placed.indices),
                    "fallback": str(fallback),
                    "fallback_full_steps": len(fallback.resolve(steps).indices),
                    "calibration_prompts": len(calibration.prompts),
                    "calibration_criteria": list(calibration.criteria),
                    "calibration_seconds": round(calibrating, 2),
                    "seconds": {method: [round(s, 3) for s in values] for method, values in seconds.items()},
                }
            )
    return rows


def render(saved: dict) -> str:
    run = saved["run"]
    lines = report.header(
        "The first call without a calibration: calibrating then, or the fallback",
        SCRIPT,
        run,
        f"{run['processor']}; medians of {run['repeats']} interleaved repeat(s) per call",
    )
    lines += [
        "",
        "| model | sampler | default (full steps) | fallback (full steps) | stock call s | calibration s "
        "(prompts, criteria) | first call, calibrating | first call, fallback | later calls, calibrated "
        "| calibrating > 2 stock calls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in saved["rows"]:
        stock = median(row["seconds"]["stock"])
        calibrated = median(row["seconds"]["calibrated"])
        fallback = median(row["seconds"]["fallback"])
        first_calibrating = (row["calibration_seconds"] + calibrated) / stock
        over = "yes" if first_calibrating > THRESHOLD else "no"
        lines.append(
            f"| {row['model']} | {row['sampler']} | `{row['default']}` ({row['full_steps']}) "
            f"| `{row['fallback']}` ({row['fallback_full_steps']}) | {stock:.2f} "
            f"| {row['calibration_seconds']:.1f} ({row['calibration_prompts']}, "
            f"{'+'.join(row['calibration_criteria'])}) | {first_calibrating:.1f} stock calls "
            f"| {fallback / stock:.2f} stock calls | {calibrated / stock:.2f} stock calls | {over} |"
        )
    lines += [
        "",
        "First call, calibrating: (calibration + a calibrated call) / a stock call. First call, fallback: "
        "a call placed by the fallback / a stock call. Later calls: a call placed by the calibration / a "
        "stock call.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sd15", action="store_true", help="the SD v1.5 architecture with random weights")
    parser.add_argument("--size", type=int, default=256, help="px, --sd15 (a multiple of 64)")
    parser.add_argument(
        "--prompts", type=int, default=len(DEFAULT_PROMPTS), help="calibration prompts (--sd15)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each kind")
    parser.add_argument(
        "--samplers",
        type=lambda text: [Sampler.parse(t) for t in text.split(",")],
        default=list(SAMPLERS),
        help="comma-separated, among DDIM-50 and DPM-Solver-20 (default: both)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (and .json beside it)")
    report.add_from_json(parser)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        if args.out is None:
            parser.error("--from-json needs --out")
        report.report_again(args, render)
        return 0
    if args.size % 64 or args.size < 64:
        parser.error(f"--size must be a multiple of 64, got {args.size}")
    if not 1 <= args.prompts <= len(DEFAULT_PROMPTS):
        parser.error(f"--prompts must be from 1 to {len(DEFAULT_PROMPTS)}, got {args.prompts}")
    if any(sampler not in SAMPLERS for sampler in args.samplers):
        parser.error("--samplers: DDIM-50 and/or DPM-Solver-20 (the defaults placed by a calibration)")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began, started = time.perf_counter(), report.started_now()
    rows = measure(args)
    argv = report.argv_of(argv)
    data = {
        "run": report.run_facts(argv, started, began, processor=cpu_model(), repeats=args.repeats),
        "rows": rows,
    }
    if args.out is not None:
        report.write(args.out, data, render)
    else:
        print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
