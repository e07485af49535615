"""Quality of the reuse modes against DeepCache, at equal numbers of full UNet passes, on the reference model.

Protocol (written before the first run; see ``benchmarks/README.md``, "Reuse modes against DeepCache"):

- Evaluation set and judge: those of ``benchmarks/frontier.py`` (80 held-out attribute combinations x 3
  seeds, guidance 5.0; faithfulness difference to stock with a 95% paired bootstrap interval, 1000 draws
  shared by every method; PSNR against stock's image of the same pair). ``--model`` picks the reference
  model (``shapes-ldm`` by default, or the SD v1.5-layout one).
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

Speed is not measured here (the reference model is too small to time): ``benchmarks/speed.py
--extra-modes`` times the same methods on the SD v1.5 architecture.

    python benchmarks/modes_frontier.py                 # -> benchmarks/results/modes-frontier.md, .json, .png
    python benchmarks/modes_frontier.py --quick --out /tmp/m.md   # a smoke run: 8 pairs, intervals 3 and 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import quality  # noqa: E402
from benchmarks.frontier import Judge, within_noise  # noqa: E402
from faster_diffusion import (  # noqa: E402
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    Sampler,
    apply_faster_diffusion,
    reference,
    use_sampler,
)
from faster_diffusion.app.loading import load_pipeline  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
INTERVALS = (2, 3, 4, 5)
QUICK_INTERVALS = (3, 5)
SAMPLERS = (Sampler.DPM_SOLVER, Sampler.DDIM)


def have_deepcache() -> bool:
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        return False
    return True


def methods(sampler: Sampler, intervals, deepcache: bool) -> list[tuple[str, int, object]]:
    """(name, full passes, how to attach it) for every method of the protocol."""
    steps = sampler.default_steps
    out: list[tuple[str, int, object]] = [("stock", steps, None)]
    paper = KeySteps.paper().resolve(steps).num_key_steps
    out.append(("encoder: paper", paper, FasterDiffusionConfig(key_steps=KeySteps.paper())))
    for interval in intervals:
        budget = len(range(0, steps, interval))
        if deepcache:
            out.append((f"deepcache:{interval}", budget, ("deepcache", interval)))
        out.append((f"deep:{interval}", budget, DeepReuseConfig(key_steps=KeySteps.uniform(interval))))
        out.append(
            (
                f"deep+forecast:{interval}",
                budget,
                DeepReuseConfig(key_steps=KeySteps.uniform(interval), forecast=1),
            )
        )
        out.append(
            (f"encoder: auto:{budget}", budget, FasterDiffusionConfig(key_steps=KeySteps.auto(budget)))
        )
    return out


def run(pipe, sampler: Sampler, how, prompts, seeds, guidance: float, batch: int) -> np.ndarray:
    use_sampler(pipe, sampler)
    if how is None:
        handle = None
    elif isinstance(how, tuple):
        from DeepCache import DeepCacheSDHelper

        handle = DeepCacheSDHelper(pipe=pipe)
        handle.set_params(cache_interval=how[1], cache_branch_id=0)
        handle.enable()
        handle.remove = handle.disable
    else:
        handle = apply_faster_diffusion(pipe, how)
    try:
        images, _ = quality.run_in_batches(
            pipe, prompts, seeds, batch, num_inference_steps=sampler.default_steps, guidance_scale=guidance
        )
    finally:
        if handle is not None:
            handle.remove()
    return images


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    for row, (sampler, rows) in enumerate(results.items()):
        families: dict[str, list] = {}
        for name, m in rows.items():
            if name == "stock":
                continue
            family = name.split(":")[0] if not name.startswith("encoder: auto") else "encoder: auto"
            families.setdefault(family, []).append(m)
        for col, (metric, label, scale) in enumerate(
            (("delta", "faithfulness − stock (points)", 100), ("psnr", "PSNR vs stock (dB)", 1))
        ):
            ax = axes[row][col]
            for family, points in families.items():
                points = sorted(points, key=lambda m: m["full_passes"])
                x = [m["full_passes"] for m in points]
                label = "deepcache (identical to deep, drawn under it)" if family == "deepcache" else family
                (line,) = ax.plot(x, [m[metric] * scale for m in points], marker="o", label=label)
                ax.fill_between(
                    x,
                    [m[f"{metric}_ci"][0] * scale for m in points],
                    [m[f"{metric}_ci"][1] * scale for m in points],
                    color=line.get_color(),
                    alpha=0.12,
                )
            if metric == "delta":
                ax.axhline(0, color="black", linewidth=0.8)
                ax.axhline(-1, color="0.6", linewidth=0.8, linestyle="--")
            ax.set_xlabel("full UNet passes")
            ax.set_ylabel(label)
            ax.set_title(f"{sampler}: {label}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def noise_verdict(delta: float, ci) -> str:
    """The protocol's "within noise of stock", or "above stock" when the whole interval is above 0."""
    if ci[0] > 0:
        return "above stock"
    return "yes" if within_noise(delta, ci) else "no"


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
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="write the report and plot again from a run's .json (nothing is generated)",
    )
    parser.add_argument(
        "--samplers",
        type=lambda text: [Sampler.parse(t) for t in text.split(",")],
        default=list(SAMPLERS),
        help="comma-separated samplers (default DPM-Solver-20,DDIM-50)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    argv_list = list(argv if argv is not None else sys.argv[1:])
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        header = args.out.read_text().splitlines()[:7] if args.out.is_file() else []
        stem = args.out.with_suffix("")
        plot(saved["results"], Path(f"{stem}.png"))
        body = report([], args, "", 0.0, saved["pairs"], saved["results"], saved["agreement"], True)
        args.out.write_text("\n".join(header + body.splitlines()[7:]) + "\n")
        return 0
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    classifier = reference.load_classifier(reference.CLASSIFIER_PATH)
    pairs = quality.Pairs.held_out(args.quick)
    n = len(pairs.prompts)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, n, n) for _ in range(args.boot or (20 if args.quick else 1000))]
    deepcache = have_deepcache()
    intervals = QUICK_INTERVALS if args.quick else INTERVALS
    guidance = reference.GUIDANCE_SCALE

    results: dict[str, dict[str, dict]] = {}
    agreement: dict[str, dict[str, float]] = {}
    for sampler in args.samplers:
        rows: dict[str, dict] = {}
        images: dict[str, np.ndarray] = {}
        judge = None
        for name, full, how in methods(sampler, intervals, deepcache):
            try:
                images[name] = run(pipe, sampler, how, pairs.prompts, pairs.seeds, guidance, args.batch)
            except Exception as error:  # a method that cannot run here (no calibration) is reported as such
                rows[name] = {"full_passes": full, "error": f"{type(error).__name__}: {error}"}
                print(f"{sampler.value} {name}: {rows[name]['error']}", flush=True)
                continue
            if judge is None:
                judge = Judge(classifier, pairs.labels, images["stock"], draws)
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

    args.out.parent.mkdir(parents=True, exist_ok=True)
    stem = args.out.with_suffix("")
    plot(results, Path(f"{stem}.png"))
    text = report(argv_list, args, started, time.perf_counter() - t0, n, results, agreement, deepcache)
    args.out.write_text(text)
    Path(f"{stem}.json").write_text(
        json.dumps({"pairs": n, "results": results, "agreement": agreement}, indent=1)
    )
    print(text)
    return 0


def forecast_verdict(rows: dict[str, dict], intervals) -> str:
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


def report(argv, args, started, wall, n, results, agreement, deepcache) -> str:
    intervals = QUICK_INTERVALS if args.quick else INTERVALS
    lines = [
        "# Reuse modes against DeepCache on the reference model",
        "",
        f"- Command: `{shlex.join(['python', 'benchmarks/modes_frontier.py', *argv])}`",
        f"- Date: {started}; wall time {wall / 60:.1f} min; {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"- Model: `{Path(args.model).name}`; {n} pairs (held-out combinations x seeds); guidance "
        f"{reference.GUIDANCE_SCALE}",
        "- DeepCache: "
        + (
            "installed; DeepCacheSDHelper, branch 0" if deepcache else "not installed (its rows are left out)"
        ),
        "",
    ]
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
                f"{ci[1] * 100:+.1f}] | {noise_verdict(m['delta'], ci)} | {m['psnr']:.2f} "
                f"[{m['psnr_ci'][0]:.2f}, {m['psnr_ci'][1]:.2f}] |"
            )
        lines += ["", forecast_verdict(rows, intervals), ""]
        if sampler in agreement:
            shown = ", ".join(f"interval {i}: {d:.3g}" for i, d in agreement[sampler].items())
            lines += [f"Largest pixel difference (0-255) of `deep:I` against `deepcache:I`: {shown}.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
