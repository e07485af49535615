"""Variants of deep reuse against DeepCache's rule at equal cost, on the reference models: a deeper cache,
composition with encoder propagation, a damped forecast, and batched partial steps.

Protocol (written before the first held-out run; the exploratory runs that suggested these variants used the
calibration prompts, never the held-out pairs, and are reported as exploratory in ``benchmarks/README.md``):

- Judge: that of ``benchmarks/frontier.py`` (80 held-out attribute combinations x 3 seeds; faithfulness
  difference to stock with a 95% paired bootstrap interval; PSNR against stock's image of the same pair), on
  DPM-Solver-20, the sampler of the frontier issue's targets, each model at its own guidance scale.
- Cost of a step, in full UNet passes: a full step 1, a partial step of branch b ``p_b``, a step that reuses
  the encoder and runs the decoder ``p_E``; measured by ``--costs`` on the SD v1.5 architecture at 256 px
  (UNet loop time of a run with one full step and the rest partial, against stock's; written to
  ``results/deep-variants-costs.json``, which the quality run reads).
- Baseline at each DeepCache interval I in 2..5: ``deep:I`` (branch 0, full steps 0, I, 2I, ..., features
  copied: DeepCache's rule, checked equal to DeepCache in ``modes_frontier.py``).
- Variants:
  1. ``depth bB:F``: branch B >= 1 with F full steps spread evenly (``round(i N / F)``), F the most whose cost
     ``F + (N - F) p_B`` is at most the baseline's; left out where F < 2.
  2. ``compose:I``: the baseline's full steps with every second one, from the second on, made an
     encoder-reuse step (the encoder's outputs come from the latest full step, the decoder runs, and its deep
     features serve the partial steps after it, which run as in the baseline): cheaper than the baseline.
  3. ``damped:I``: ``forecast=1``'s linear extrapolation of the reused feature scaled by 0.5.
  4. ``batched:I``: ``DeepReuseConfig(batched=True)`` at ``uniform:I``: as many full passes; partial steps
     also reuse ``conv_in``, so a group runs as one batch (its speed is measured by ``benchmarks/speed.py``).
- Rules:
  - A variant *beats* the baseline at an interval when its PSNR is higher and its faithfulness difference is
    not lower by more than 1 point.
  - Families 1-3 are run on the first reference model; a family that beats the baseline at 3 or more of the 4
    intervals there is also run on the SD v1.5-layout model, and is kept as a product option if it does the
    same there.
  - ``batched`` runs on both models. It is kept as an option if, on each model, its PSNR is at least the
    baseline's minus 0.5 dB at 3 or more of the 4 intervals and its faithfulness difference is nowhere lower
    than the baseline's by more than 1 point.
  - Whether a kept variant becomes the default is decided by the default rule (``benchmarks/README.md``, "The
    rule that sets the product's default"), from its measured speed.
- Check: the prototype below (``compose`` and ``damped``) with no encoder-reuse step and no damping equals
  ``deep:I`` to the pixel, and with a gain of 1 equals ``forecast=1``; the report gives both differences.

    python benchmarks/deep_variants.py --costs --threads 1          # ~13 min, SD v1.5 architecture
    python benchmarks/deep_variants.py --threads 1                   # first model -> results/deep-variants.md
    M=faster_diffusion/reference/assets/shapes-ldm-sd15
    python benchmarks/deep_variants.py --threads 1 --model $M \\
        --out benchmarks/results/deep-variants-sd15.md --families batched
    python benchmarks/deep_variants.py --quick --out /tmp/v.md       # a smoke run: 8 pairs, 2 intervals
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import (  # noqa: E402
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    Sampler,
    apply_faster_diffusion,
    reference,
    use_sampler,
)
from faster_diffusion.deep import branch_count, deep_modules  # noqa: E402
from faster_diffusion.depth import full_steps_within, run_cost  # noqa: E402
from faster_diffusion.encoder import encoder_modules  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
COSTS = RESULTS / "deep-variants-costs.json"
SAMPLER = Sampler.DPM_SOLVER
INTERVALS = (2, 3, 4, 5)
QUICK_INTERVALS = (3, 5)
FAMILIES = ("depth", "compose", "damped", "batched")
DAMPING = 0.5
#: The deepest branch whose cost ``--costs`` measures.
MAX_BRANCH = 5


def spread(steps: int, full: int) -> tuple[int, ...]:
    return tuple(sorted({round(i * steps / full) for i in range(full)}))


def baseline_cost(steps: int, interval: int, costs: dict) -> float:
    return run_cost(len(range(0, steps, interval)), steps, costs["partial"]["0"])


def depth_budgets(steps: int, interval: int, costs: dict) -> list[tuple[int, int]]:
    """(branch, full steps) of the depth family at the baseline's cost (see the protocol)."""
    limit = baseline_cost(steps, interval, costs)
    out = []
    for branch, p in sorted(costs["partial"].items(), key=lambda item: int(item[0])):
        if branch == "0" or p >= 1:
            continue
        full = full_steps_within(limit, steps, p)
        if full >= 2:
            out.append((int(branch), full))
    return out


def compose_plan(steps: int, interval: int) -> str:
    """F (full), E (encoder reused, decoder runs) or P (partial) for every step: the baseline's full steps
    with every second one, from the second on, an E."""
    plan = ["P"] * steps
    for n, step in enumerate(range(0, steps, interval)):
        plan[step] = "E" if n % 2 else "F"
    return "".join(plan)


def _extrapolate(now, before, weight: float):
    """``now + (now - before) * weight`` for a tensor, or for the first item of a module's output tuple."""
    if isinstance(now, tuple):
        return (_extrapolate(now[0], before[0], weight), *now[1:])
    if hasattr(now, "sample"):  # a diffusers output object
        return type(now)(sample=_extrapolate(now.sample, before.sample, weight))
    return now + (now - before) * weight


@contextlib.contextmanager
def planned(pipe, plan: str, gain: float | None = None):
    """A reference implementation of step plans (F/E/P, see :func:`compose_plan`) by replacing the forward
    of the encoder's and the deep modules (branch 0). ``gain``: at P steps, extrapolate the last deep
    module's output from the latest two F steps, scaled by ``gain`` (``forecast=1`` is gain 1); the steps
    before the second F copy."""
    unet = pipe.unet
    encoder, deep = encoder_modules(unet), deep_modules(unet, 0)
    modules = list(dict.fromkeys(encoder + deep))
    state: dict = {"step": -1, "cache": {}, "full": [], "history": []}
    originals = {m: m.forward for m in modules}
    own = {m for m in modules if "forward" in m.__dict__}  # a forward set on the instance (a hook's)

    def make(module):
        def forward(*args, **kwargs):
            kind = plan[state["step"]]
            if (kind == "E" and module in encoder) or (kind == "P" and module in deep):
                out = state["cache"][module]
                if kind == "P" and gain is not None and module is deep[-1] and len(state["history"]) > 1:
                    (k, now), (p, before) = state["history"][-1], state["history"][-2]
                    return _extrapolate(now, before, gain * (state["step"] - k) / (k - p))
                return out
            out = originals[module](*args, **kwargs)
            state["cache"][module] = out
            if kind == "F" and module is deep[-1]:
                state["history"].append((state["step"], out))
            return out

        return forward

    def count(module, args):
        state["step"] += 1

    for m in modules:
        m.forward = make(m)
    hook = unet.register_forward_pre_hook(count)
    try:
        yield
    finally:
        hook.remove()
        for m, forward in originals.items():
            if m in own:
                m.forward = forward
            else:
                del m.forward


def run_plan(pipe, plan: str, gain, pairs, guidance: float, batch: int) -> np.ndarray:
    use_sampler(pipe, SAMPLER)
    images = []
    for i in range(0, len(pairs.prompts), batch):
        # One plan per pipeline call: the step counter starts again.
        with planned(pipe, plan, gain):
            part, _ = harness.run_in_batches(
                pipe,
                pairs.prompts[i : i + batch],
                pairs.seeds[i : i + batch],
                batch,
                num_inference_steps=SAMPLER.default_steps,
                guidance_scale=guidance,
            )
        images.append(part)
    return np.concatenate(images)


def methods(steps: int, intervals, costs: dict, families) -> list[tuple[str, str, int, int, float, object]]:
    """(name, family, interval, full passes, cost in full passes, how): ``how`` is the name of a registered
    method (``harness.methods``), ``None`` (stock) or a prototype's ``("plan", plan, gain)``."""
    out: list = [("stock", "stock", 1, steps, float(steps), None)]
    p = costs["partial"]
    p_e = costs["encoder_reuse"]
    for interval in intervals:
        full = len(range(0, steps, interval))
        base = baseline_cost(steps, interval, costs)
        out.append((f"deep:{interval}", "baseline", interval, full, base, f"deep:{interval}"))
        if "depth" in families:
            for branch, f in depth_budgets(steps, interval, costs):
                cost = f + (steps - f) * p[str(branch)]
                name = f"depth b{branch}:{f} (I={interval})"
                out.append((name, "depth", interval, f, cost, name))
        if "compose" in families:
            plan = compose_plan(steps, interval)
            cost = plan.count("F") + plan.count("E") * p_e + plan.count("P") * p["0"]
            out.append(
                (f"compose:{interval}", "compose", interval, plan.count("F"), cost, ("plan", plan, None))
            )
        if "damped" in families:
            plan = "".join("F" if s % interval == 0 else "P" for s in range(steps))
            out.append((f"damped:{interval}", "damped", interval, full, base, ("plan", plan, DAMPING)))
        if "batched" in families:
            cost = full + (steps - full) * costs.get("batched_partial", p["0"])
            out.append((f"batched:{interval}", "batched", interval, full, cost, f"batched:{interval}"))
    return out


def checks(pipe, pairs, guidance: float, batch: int, interval: int) -> dict[str, float]:
    """The prototype against the package: largest pixel differences (0-255)."""
    steps = SAMPLER.default_steps
    plan = "".join("F" if s % interval == 0 else "P" for s in range(steps))
    copied = harness.run(pipe, SAMPLER, f"deep:{interval}", pairs.prompts, pairs.seeds, guidance, batch)
    forecast = harness.run(
        pipe, SAMPLER, f"deep+forecast:{interval}", pairs.prompts, pairs.seeds, guidance, batch
    )
    return {
        "plan vs deep": float(
            np.abs(run_plan(pipe, plan, None, pairs, guidance, batch) - copied).max() * 127.5
        ),
        "gain 1 vs forecast=1": float(
            np.abs(run_plan(pipe, plan, 1.0, pairs, guidance, batch) - forecast).max() * 127.5
        ),
    }


def verdicts(rows: dict, intervals) -> dict[str, str]:
    out = {}
    for family in ("depth", "compose", "damped"):
        wins, tried = [], []
        for interval in intervals:
            base = rows.get(f"deep:{interval}")
            mine = [(n, m) for n, m in rows.items() if m["family"] == family and m["interval"] == interval]
            if not mine or base is None:
                continue
            tried.append(interval)
            if any(m["psnr"] > base["psnr"] and m["delta"] >= base["delta"] - 0.01 for _, m in mine):
                wins.append(interval)
        if tried:
            keep = len(wins) >= 3
            out[family] = f"beats the baseline at intervals {wins or 'none'} of {tried}: " + (
                "passes (run it on the other model)" if keep else "not kept"
            )
    close, worse = [], []
    for interval in intervals:
        base, mine = rows.get(f"deep:{interval}"), rows.get(f"batched:{interval}")
        if base is None or mine is None:
            continue
        if mine["psnr"] >= base["psnr"] - 0.5:
            close.append(interval)
        if mine["delta"] < base["delta"] - 0.01:
            worse.append(interval)
    if close or worse or any(f"batched:{i}" in rows for i in intervals):
        keep = len(close) >= 3 and not worse
        out["batched"] = (
            f"PSNR within 0.5 dB of the baseline or above at intervals {close or 'none'}; faithfulness lower "
            f"by more than 1 point at {worse or 'none'}: " + ("kept on this model" if keep else "not kept")
        )
    return out


def measure_costs(repeats: int = 2, steps: int = 6) -> dict:
    """Per-step costs on the SD v1.5 architecture at 256 px, DPM-Solver, in full UNet passes: each variant
    (one full step, then ``steps - 1`` of its kind) is timed right after a stock run of as many steps, and
    its cost is the median over ``repeats`` of ``(t - s / steps) / ((steps - 1) s / steps)``, so that drift of
    the machine between pairs cancels."""
    from benchmarks.models import build_sd15_pipeline

    pipe = build_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, SAMPLER)

    def timed(config) -> float:
        handle = apply_faster_diffusion(pipe, config) if config is not None else None
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(
                "a photo",
                num_inference_steps=steps,
                height=256,
                width=256,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
        seconds = time.perf_counter() - started
        if handle is not None:
            handle.remove()
        return seconds

    one = KeySteps.explicit([0])
    # Branches 6 and deeper cost more than half a full step on this architecture (an exploratory timing),
    # too much for two full steps at any interval's cost: left out to keep the run short.
    branches = range(min(MAX_BRANCH + 1, branch_count(pipe.unet)))
    variants = {f"partial b{b}": DeepReuseConfig(key_steps=one, branch=b) for b in branches}
    variants["encoder reuse"] = FasterDiffusionConfig(
        key_steps=one, parallel=False, noise_injection=NoiseInjection(False)
    )
    variants["batched partial"] = DeepReuseConfig(key_steps=one, batched=True, max_decoder_batch=None)
    timed(None)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    stock: list[float] = []
    for _, (name, config) in harness.timing.interleaved(variants.items(), repeats, warmups=0):
        s = timed(None)
        t = timed(config)
        stock.append(s)
        ratios[name].append((t - s / steps) / ((steps - 1) * s / steps))
    median = {name: round(harness.timing.median(r), 4) for name, r in ratios.items()}
    return {
        "stock_seconds": {"median": harness.timing.median(stock), "min": min(stock), "max": max(stock)},
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpu": harness.timing.cpu_model(),
        "partial": {name.split("b")[-1]: v for name, v in median.items() if name.startswith("partial b")},
        "encoder_reuse": median["encoder reuse"],
        "batched_partial": median["batched partial"],
        "spread": {name: [round(min(r), 4), round(max(r), 4)] for name, r in ratios.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--costs", action="store_true", help="measure the step costs and write them")
    parser.add_argument("--costs-file", type=Path, default=COSTS)
    parser.add_argument("--repeats", type=int, default=2, help="with --costs: timed pairs per variant")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "deep-variants.md")
    parser.add_argument("--model", type=Path, default=reference.MODEL_DIR)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated of {FAMILIES}")
    parser.add_argument("--batch", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None)
    harness.report.add_from_json(parser)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        harness.report.report_again(args, render, parser)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {FAMILIES}")
    argv_list = harness.report.argv_of(argv)
    started, began = harness.report.started_now(), time.perf_counter()
    if args.costs:
        costs = measure_costs(args.repeats)
        costs["command"] = harness.report.command("deep_variants.py", argv_list)
        costs["date"] = started
        args.costs_file.write_text(json.dumps(costs, indent=1) + "\n")
        print(json.dumps(costs, indent=1))
        return 0
    if not args.costs_file.is_file():
        parser.error(f"--costs-file: {args.costs_file} does not exist; measure it first with --costs")
    costs = json.loads(args.costs_file.read_text())
    pipe = harness.load_reference(args.model)
    classifier = harness.load_classifier()
    pairs = harness.Pairs.held_out(args.quick)
    draws = harness.bootstrap_draws(len(pairs.prompts), 20 if args.quick else 1000)
    guidance = reference.guidance_scale(args.model)
    intervals = QUICK_INTERVALS if args.quick else INTERVALS
    steps = SAMPLER.default_steps
    rows: dict[str, dict] = {}
    judge = None
    for name, family, interval, full, cost, how in methods(steps, intervals, costs, families):
        if isinstance(how, tuple):
            images = run_plan(pipe, how[1], how[2], pairs, guidance, args.batch)
        else:
            images = harness.run(pipe, SAMPLER, how, pairs.prompts, pairs.seeds, guidance, args.batch)
        if judge is None:
            judge = harness.Judge(classifier, pairs.labels, images, draws)
        rows[name] = {
            "family": family,
            "interval": interval,
            "full_passes": full,
            "cost": cost,
            **judge(images),
        }
        m = rows[name]
        print(
            f"{name}: {full} full, cost {cost:.2f}: {m['delta'] * 100:+.1f} pts, {m['psnr']:.2f} dB",
            flush=True,
        )
    agreement = (
        checks(pipe, pairs, guidance, args.batch, intervals[0])
        if {"compose", "damped"} & set(families)
        else {}
    )
    data = {
        "run": harness.report.run_facts(argv_list, started, began),
        "pairs": len(pairs.prompts),
        "guidance": guidance,
        "costs": costs,
        "rows": rows,
        "agreement": agreement,
    }
    harness.report.write(args.out, data, render, parser)
    return 0


def render(data: dict, args: argparse.Namespace) -> str:
    """The report of a run's JSON ``data``; ``args``: the settings its command line parses to."""
    costs, rows, intervals = data["costs"], data["rows"], QUICK_INTERVALS if args.quick else INTERVALS
    # Runs from before the guidance was recorded ran at the model's, as reference.guidance_scale gives it.
    guidance = data.get("guidance", reference.guidance_scale(args.model))
    lines = harness.report.header(
        "Deep reuse variants against DeepCache's rule at equal cost",
        "deep_variants.py",
        data["run"],
        f"Model: `{Path(args.model).name}`; {data['pairs']} pairs; guidance {guidance}; {SAMPLER.value}",
        f"Step costs in full passes (`{args.costs_file.name}`, {costs.get('date', '?')}, SD v1.5 "
        "architecture, 256 px): partial by branch "
        + ", ".join(f"b{b} {p:.3f}" for b, p in costs["partial"].items())
        + f"; encoder reuse {costs['encoder_reuse']:.3f}; batched partial {costs['batched_partial']:.3f}",
    )
    lines += [
        "| method | family | full passes | cost (full passes) | all five right − stock (points, 95% CI) "
        "| within noise | PSNR vs stock dB (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    noise_verdict = harness.noise_verdict
    for name, m in rows.items():
        ci = m["delta_ci"]
        lines.append(
            f"| {name} | {m['family']} | {m['full_passes']} | {m['cost']:.2f} | {m['delta'] * 100:+.1f} "
            f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] | {noise_verdict(m['delta'], ci)} | {m['psnr']:.2f} "
            f"[{m['psnr_ci'][0]:.2f}, {m['psnr_ci'][1]:.2f}] |"
        )
    lines += ["", "The rules (in the script's docstring, written before the first run):", ""]
    lines += [f"- {family}: {text}" for family, text in verdicts(rows, intervals).items()]
    if data["agreement"]:
        lines += [
            "",
            "Prototype against the package, largest pixel difference (0-255): "
            + ", ".join(f"{k}: {v:.3g}" for k, v in data["agreement"].items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
