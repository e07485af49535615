"""What the acceleration costs in image quality, measured on the trained reference model.

Generates a fixed set of prompt x seed pairs, all from attribute combinations that training never saw
(``shapes.HELD_OUT_COMBOS``, 80 combinations x 3 seeds = 240 pairs), with each configuration:

- ``stock``: plain diffusers;
- ``paper``: the paper's key steps, with prior noise injection (the default of this project);
- ``auto``: key steps calibrated on this model (``KeySteps.auto()``, the paper's budget: 9 of 50, 7 of 20),
  with noise injection, resolved from the calibration file committed in the model folder;
- ``paper, no noise``: the same without noise injection;
- ``uniform:k``: a key step every k steps, with noise injection;
- ``paper reversed``: a badly placed set of the same size as the paper's, with the paper's gaps in reverse
  order, so key steps are dense at the end of sampling and sparse at the start
  (``[0, 15, 25, 35, 40, 45, 47, 48, 49]`` for 50 steps).

and reports, per sampler (DDIM-50 and DPM-Solver-20):

- prompt faithfulness: how often the attribute classifier reads all five attributes of the prompt off the
  image, and each attribute alone (stands in for CLIP score);
- two distances between the classifier's 64-d features of generated and of real held-out images (stand in
  for FID): a Fréchet distance and the kernel distance (KID, unbiased, so it can be negative), with the floor
  of each given by a second real set;
- fidelity to stock: PSNR and SSIM of each accelerated image against the stock image from the same seed;
- cost: encoder and decoder passes per image trajectory, and wall time of the whole set.

Intervals are 95%: percentile bootstraps over the prompt x seed pairs for accuracies, PSNR and SSIM, and half
samples without replacement for Fréchet and kernel distances (see ``recentred_interval`` and
``half_kernel_distances``). The draws are shared by all
configurations, so a difference to stock gets an interval too. It also reproduces the paper's
analysis (its Fig. 2): the relative change of the encoder's (mid block) and the decoder's (last up block)
features between adjacent steps of stock sampling, plotted to ``feature-change.png``.

    python benchmarks/quality.py               # full run -> benchmarks/results/quality.md (+ .json, PNGs)
    python benchmarks/quality.py --quick --out /tmp/q.md   # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import itertools
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
    Sampler,
    reference,
    use_sampler,
)
from faster_diffusion.reference import shapes  # noqa: E402
from faster_diffusion.schedule import paper_key_steps  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SAMPLERS = (Sampler.DDIM, Sampler.DPM_SOLVER)
UNIFORM_KS = (2, 3, 5)
REAL_PER_COMBO = 4
REAL_SEED = 50_000  # jitter seeds of the real reference set
REAL_FLOOR_SEED = 60_000  # jitter seeds of the second real set (the floor of both distances)
#: KID is reported times this: the classifier's features have norms of about 70-390 in 64-d, so x . y / 64 is
#: in the hundreds and the cubic kernel's values are in the millions (Inception features give KIDs near 0.01).
KID_SCALE = 1e-6
#: Paper's numbers (SD v1.5, DDIM-50 / DPM-Solver-20, 10K MS-COCO prompts), quoted in the report beside ours.
PAPER = {
    Sampler.DDIM: {"fid": (21.75, 21.08), "clip": (0.773, 0.783), "fid_no_noise": 21.71},
    Sampler.DPM_SOLVER: {"fid": (21.36, 21.25), "clip": (0.780, 0.779)},
}


def configs_for(quick: bool) -> list[str]:
    """The configurations compared with each sampler: registered methods (``harness.methods``)."""
    if quick:
        return ["stock", "paper", "paper reversed"]
    # ``auto``: calibrated key steps at the paper's budget, resolved from the model folder's calibration file.
    return [
        "stock",
        "paper",
        "auto",
        "paper, no noise",
        *(f"uniform:{k}" for k in UNIFORM_KS),
        "paper reversed",
    ]


# ------------------------------------------------------------------------------------------------ metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N>=2, D) feature arrays of the same D, got {a.shape} and {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(A B)) = sum of sqrt(eig(sqrt(A) B sqrt(A))), all symmetric PSD.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel between the rows of ``a`` (N, D) and ``b`` (M, D): (x . y / D + 1)^3, (N, M) float64."""
    return (a.astype(np.float64) @ b.astype(np.float64).T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """The unbiased estimate of MMD^2 from the kernel matrices within ``a`` (N, N), within ``b`` (M, M) and
    across (N, M): the means of the off-diagonal entries within each set, less twice the mean across."""
    n, m = len(k_aa), len(k_bb)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel distance (KID) between feature sets ``a`` (N, D) and ``b`` (M, D), in float64.

    Bińkowski, Sutherland, Arbel and Gretton, "Demystifying MMD GANs" (ICLR 2018), Section 4: the squared
    maximum mean discrepancy with the cubic polynomial kernel k(x, y) = (x . y / D + 1)^3, estimated without
    bias as the U-statistic

        1 / (N (N-1)) sum_{i != j} k(a_i, a_j) + 1 / (M (M-1)) sum_{i != j} k(b_i, b_j)
        - 2 / (N M) sum_{i, j} k(a_i, b_j).

    Its expectation is 0 when the two sets come from the same distribution, whatever N and M, so values
    near 0 are read directly and can be negative; the Fréchet distance instead is biased upward by an amount
    that depends on N.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N>=2, D) feature arrays of the same D, got {a.shape} and {b.shape}")
    return mmd2_unbiased(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5), averaged over channels."""
    x = torch.from_numpy((a.astype(np.float64) + 1) / 2)
    y = torch.from_numpy((b.astype(np.float64) + 1) / 2)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, groups=t.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def half_samples(rng: np.random.Generator, n: int, count: int) -> list[np.ndarray]:
    """``count`` random halves of ``range(n)``, drawn without replacement."""
    return [rng.permutation(n)[: n // 2] for _ in range(count)]


def recentred_interval(point: float, half_values: np.ndarray) -> tuple[float, float]:
    """A 95% interval for a distance between feature sets from its values on half samples.

    A bootstrap with replacement does not work for a Fréchet distance: repeated rows shrink the covariance's
    rank and push every resample far above the full-set value. Half samples drawn without replacement have
    no repeats; their spread around their median is put around the full-set value, unscaled. That is the
    delete-d jackknife with d = n/2 (Shao and Wu 1989), whose variance factor (n - d) / d is 1. For a mean of
    rows of variance s^2, the mean of a half drawn from the fixed sample varies about the full mean with
    variance s^2 / (n/2) - s^2 / n = s^2 / n (the finite-population correction): as much as the full mean
    varies between samples. Scaling the spread by sqrt(1/2), as if the halves were fresh samples of n/2,
    gives intervals sqrt(2) too narrow.
    """
    spread = half_values - np.median(half_values)
    low, high = np.percentile(spread, [2.5, 97.5])
    return point + float(low), point + float(high)


def half_kernel_distances(
    a: np.ndarray,
    b: np.ndarray,
    halves: list[tuple[np.ndarray, np.ndarray]],
    kernel_bb: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`kernel_distance` of ``a[h]`` and ``b[r]`` for each pair of row indices ``(h, r)`` in ``halves``,
    from the kernel matrices of the full sets (``kernel_bb``: ``b``'s, if already computed).

    With :func:`half_samples` (without replacement) and :func:`recentred_interval`, this gives KID its
    interval. Each half is a sample without repeated rows, so its KID is the same unbiased U-statistic on
    n/2 rows; a bootstrap with replacement would put copies of a row off the diagonal of the within-set
    kernel matrices, whose terms then include k(x, x) and bias every resample upward.

    The variance of the unbiased MMD^2 is c1 / n + c2 / n^2. The first term dominates when the distributions
    differ, and there the half-sample spread estimates it as for a mean (see :func:`recentred_interval`). The
    second dominates when they are the same (the U-statistic is degenerate), and there the halves overstate
    the spread (a half's c2 / (n/2)^2 is four times the full set's), so intervals near the real-vs-real floor
    are conservative. In a simulation (Gaussian sets of 240 and 320 rows in 64-d, as here; 100 runs each)
    the half-sample spread was 1.9x the true standard deviation with no mean shift and 1.2-1.4x with a
    shift, and the interval covered the expected KID in 99, 100 and 98 of 100 runs for no, a small and a
    larger shift.
    """
    if kernel_bb is None:
        kernel_bb = polynomial_kernel(b, b)
    kernel_aa, kernel_ab = polynomial_kernel(a, a), polynomial_kernel(a, b)
    return np.array(
        [
            mmd2_unbiased(kernel_aa[np.ix_(h, h)], kernel_bb[np.ix_(r, r)], kernel_ab[np.ix_(h, r)])
            for h, r in halves
        ]
    )


# ---------------------------------------------------------------------------------------- feature change


def feature_change(pipe, sampler: Sampler, prompts, seeds, guidance: float) -> dict[str, list[float]]:
    """Mean relative change ||f_t - f_{t-1}|| / ||f_{t-1}|| of encoder and decoder features per step."""
    use_sampler(pipe, sampler)
    captured: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": []}
    modules = {"encoder": pipe.unet.mid_block, "decoder": pipe.unet.up_blocks[-1]}
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: captured[name].append(out.detach().clone())
        )
        for name, module in modules.items()
    ]
    try:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            pipe(
                list(prompts),
                num_inference_steps=sampler.default_steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="latent",
            )
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for name, features in captured.items():
        changes = []
        for previous, current in itertools.pairwise(features):
            diff = (current - previous).flatten(1).norm(dim=1)
            changes.append(float((diff / previous.flatten(1).norm(dim=1)).mean()))
        result[name] = changes
    return result


def plot_feature_change(changes: dict[Sampler, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(changes), figsize=(6 * len(changes), 3.8), squeeze=False)
    for ax, (sampler, curves) in zip(axes[0], changes.items(), strict=True):
        steps = np.arange(1, len(curves["encoder"]) + 1)
        ax.plot(steps, curves["encoder"], marker="o", markersize=3, label="encoder (mid block output)")
        ax.plot(steps, curves["decoder"], marker="o", markersize=3, label="decoder (last up block output)")
        for k in paper_key_steps(sampler.default_steps):
            ax.axvline(k, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xlabel("step (vertical lines: the paper's key steps)")
        ax.set_ylabel("relative change from the previous step")
        ax.set_yscale("log")
        ax.set_title(f"{sampler.value}, stock sampling")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_comparison_grid(real: np.ndarray, rows: dict[str, np.ndarray], path: Path, count: int = 12) -> None:
    """One row per configuration (real images first), ``count`` pairs per row, with row labels."""
    from PIL import Image, ImageDraw

    scale, pad, label_width = 3, 2, 150
    size = shapes.IMAGE_SIZE * scale
    all_rows = {"real (held out)": real, **rows}
    grid = Image.new("RGB", (label_width + count * (size + pad), len(all_rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(all_rows.items()):
        draw.text((4, r * (size + pad) + size // 2 - 6), name, fill="black")
        for c, tile in enumerate(harness.plots.tiles(images[:count], size)):
            grid.paste(tile, (label_width + c * (size + pad), r * (size + pad)))
    grid.save(path)


# ---------------------------------------------------------------------------------------------------- main


def evaluate(
    results: dict[str, harness.RunResult],
    labels: np.ndarray,
    real_features: np.ndarray,
    classifier,
    boot: int,
    rng: np.random.Generator,
) -> None:
    """Fill ``metrics`` of every result, with intervals over the prompt x seed pairs (drawn jointly for all
    configurations, so differences to stock get intervals too)."""
    n = len(labels)
    # The draws come from ``rng``, which the half samples below go on drawing from (see bootstrap_draws).
    draws = harness.bootstrap_draws(n, boot, rng=rng)
    stock = results["stock"]
    per_config = {}
    judge = None
    for name in ["stock", *(name for name in results if name != "stock")]:
        result = results[name]
        predicted, features = harness.classify(classifier, result.images)
        per_config[name] = ((predicted == labels).all(axis=1).astype(np.float64), features)
        if judge is None:
            judge = harness.Judge(classifier, labels, stock.images, draws, stock_correct=per_config[name][0])
        accuracy = reference.attribute_accuracy(predicted, labels)
        result.metrics["all"] = accuracy.pop("all")
        result.metrics["attributes"] = accuracy
        result.metrics["fd"] = frechet_distance(features, real_features)
        result.metrics["kid"] = kernel_distance(features, real_features)
        if name != "stock":
            s = ssim(result.images, stock.images)
            result.metrics["psnr"], psnr_ci = judge.fidelity(result.images)
            result.metrics["ssim"] = float(np.mean(s))
            result.metrics["psnr_ci"] = psnr_ci
            result.metrics["ssim_ci"] = harness.interval(judge.boot(s))
    stock_features = per_config["stock"][1]
    halves = list(zip(half_samples(rng, n, boot), half_samples(rng, len(real_features), boot), strict=True))
    real_kernel = polynomial_kernel(real_features, real_features)

    def half_fds(features: np.ndarray) -> np.ndarray:
        return np.array([frechet_distance(features[h], real_features[r]) for h, r in halves])

    stock_half = half_fds(stock_features)
    stock_half_kid = half_kernel_distances(stock_features, real_features, halves, real_kernel)
    for name, result in results.items():
        all_correct, features = per_config[name]
        fds = half_fds(features)
        kids = half_kernel_distances(features, real_features, halves, real_kernel)
        result.metrics["all_ci"] = judge.faithfulness(all_correct)[1]
        result.metrics["fd_ci"] = recentred_interval(result.metrics["fd"], fds)
        result.metrics["kid_ci"] = recentred_interval(result.metrics["kid"], kids)
        if name != "stock":
            result.metrics["all_delta_ci"] = judge.delta(all_correct)[1]
            delta = result.metrics["fd"] - stock.metrics["fd"]
            result.metrics["fd_delta_ci"] = recentred_interval(delta, fds - stock_half)
            delta = result.metrics["kid"] - stock.metrics["kid"]
            result.metrics["kid_delta_ci"] = recentred_interval(delta, kids - stock_half_kid)


#: The fields of a saved configuration that are not its metrics.
RUN_FIELDS = ("key_steps", "encoder_passes", "decoder_passes", "seconds")


def typed(data: dict) -> dict[Sampler, dict[str, harness.RunResult]]:
    """A saved run's results as the report reads them (without images)."""
    return {
        Sampler.parse(s): {
            name: harness.RunResult(
                images=None,
                seconds=m["seconds"],
                full_passes=m["encoder_passes"],
                steps=m["decoder_passes"],
                key_steps=tuple(m["key_steps"]),
                metrics={k: v for k, v in m.items() if k not in RUN_FIELDS},
            )
            for name, m in by_config.items()
        }
        for s, by_config in data["results"].items()
    }


def render(data: dict, args: argparse.Namespace) -> str:
    """The report of a run's JSON ``data``; ``args``: the settings its command line parses to."""
    floor, kid_floor = data["frechet_floor"], data["kid_floor"]
    return report(
        data["run"],
        args.model,
        data["boot"],
        data["guidance"],
        typed(data),
        floor[0],
        floor[1:],
        kid_floor[0],
        kid_floor[1:],
        data["real_accuracy"],
        data["pairs"],
    )


def report(
    run: dict,
    model: Path,
    boot: int,
    guidance: float,
    results: dict[Sampler, dict[str, harness.RunResult]],
    floor: float,
    floor_ci: tuple[float, float],
    kid_floor: float,
    kid_floor_ci: tuple[float, float],
    real_accuracy: dict,
    n_pairs: int,
) -> str:
    fmt_ci = harness.report.fmt_ci
    real_attrs = ", ".join(f"{a} {real_accuracy[a] * 100:.1f}%" for a in shapes.ATTRIBUTES)
    took = harness.report.minutes(run)
    lines = [
        "# Quality of faster diffusion on the reference model",
        "",
        f"Command: `{harness.report.command('quality.py', run['argv'])}`  ",
        f"Started {run['started']}; took {took} min. torch {run['torch']}, {run['machine']}, "
        f"{run['threads']} threads.  ",
        f"Model: `{harness.report.display_path(model)}` (trained by `training/train_reference.py`). "
        f"{n_pairs} prompt x seed pairs from attribute combinations that training never saw; guidance "
        f"{guidance}; 32x32 images. 95% intervals in brackets: bootstrap ({boot} resamples) for "
        "accuracies, PSNR and SSIM; half samples without replacement, recentred, for Fréchet and kernel "
        f"distances. KID is the unbiased MMD^2 of the cubic polynomial kernel (Bińkowski et al. 2018), "
        f"shown x {KID_SCALE:g}; it can be negative.",
        "",
        f"The classifier reads all five attributes correctly off {real_accuracy['all'] * 100:.1f}% of real "
        f"held-out images ({real_attrs}): the ceiling of the faithfulness column. Between two independent "
        f"real sets (the floor), Fréchet distance {fmt_ci(floor, floor_ci, 2)}, KID "
        f"{fmt_ci(kid_floor, kid_floor_ci, 2, KID_SCALE)}.",
        "",
    ]
    for sampler, by_config in results.items():
        stock = by_config["stock"]
        lines += [
            f"## {sampler.value}",
            "",
            "| configuration | key steps | encoder / decoder passes | wall time (s) | speedup "
            "| all 5 attributes correct (%) | Δ vs stock (pts) "
            "| shape / colour / size / position / background (%) "
            f"| Fréchet distance | Δ vs stock | KID (x {KID_SCALE:g}) | Δ vs stock "
            "| PSNR vs stock (dB) | SSIM vs stock |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in by_config.items():
            m = r.metrics
            attrs = " / ".join(f"{m['attributes'][a] * 100:.0f}" for a in shapes.ATTRIBUTES)
            keys = "all" if name == "stock" else ", ".join(map(str, r.key_steps))
            delta_all = (
                ""
                if name == "stock"
                else (
                    f"{(m['all'] - stock.metrics['all']) * 100:+.1f} [{m['all_delta_ci'][0] * 100:+.1f}, "
                    f"{m['all_delta_ci'][1] * 100:+.1f}]"
                )
            )
            delta_fd = (
                ""
                if name == "stock"
                else (
                    f"{m['fd'] - stock.metrics['fd']:+.2f} "
                    f"[{m['fd_delta_ci'][0]:+.2f}, {m['fd_delta_ci'][1]:+.2f}]"
                )
            )
            delta_kid = (
                ""
                if name == "stock"
                else (
                    f"{(m['kid'] - stock.metrics['kid']) * KID_SCALE:+.2f} "
                    f"[{m['kid_delta_ci'][0] * KID_SCALE:+.2f}, {m['kid_delta_ci'][1] * KID_SCALE:+.2f}]"
                )
            )
            fidelity = (
                ("–", "–")
                if name == "stock"
                else (
                    fmt_ci(m["psnr"], m["psnr_ci"], 1),
                    fmt_ci(m["ssim"], m["ssim_ci"], 3),
                )
            )
            lines.append(
                f"| {name} | {keys} | {r.full_passes} / {r.steps} | {r.seconds:.1f} | "
                f"{stock.seconds / r.seconds:.2f}x | {fmt_ci(m['all'], m['all_ci'], 1, 100)} | {delta_all} | "
                f"{attrs} | {fmt_ci(m['fd'], m['fd_ci'], 2)} | {delta_fd} | "
                f"{fmt_ci(m['kid'], m['kid_ci'], 2, KID_SCALE)} | {delta_kid} | "
                f"{fidelity[0]} | {fidelity[1]} |"
            )
        lines.append("")
    lines += [
        "Wall time is one pass over the whole set, batched, on this CPU; the configurations ran one after "
        "the other, so it is a rough cost (benchmarks/speed.py measures speed properly). Encoder / decoder "
        "passes are per image trajectory.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 8 pairs, DDIM-50, 3 configurations"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.md")
    harness.add_common_arguments(parser)
    harness.report.add_from_json(parser)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        harness.report.report_again(args, render, parser)
        return 0
    harness.apply_common_arguments(parser, args, argv)
    started, began = harness.report.started_now(), time.perf_counter()

    pipe = harness.load_reference(args.model)
    classifier = harness.load_classifier(args.classifier)
    pairs = harness.Pairs.held_out(args.quick)
    combos, per_combo, scenes = pairs.combos, pairs.per_combo, pairs.scenes
    prompts, seeds, labels = pairs.prompts, pairs.seeds, pairs.labels

    real_scenes = [shapes.Scene(*c) for c in combos for _ in range(REAL_PER_COMBO)]
    real = shapes.render_batch(real_scenes, [REAL_SEED + i for i in range(len(real_scenes))])
    real_labels, real_features = harness.classify(classifier, real)
    real_accuracy = reference.attribute_accuracy(real_labels, [s.labels() for s in real_scenes])
    floor_images = shapes.render_batch(scenes, [REAL_FLOOR_SEED + i for i in range(len(scenes))])
    _, floor_features = harness.classify(classifier, floor_images)
    rng = np.random.default_rng(0)
    floor = frechet_distance(floor_features, real_features)
    floor_halves = list(
        zip(half_samples(rng, len(scenes), args.boot), half_samples(rng, len(real), args.boot), strict=True)
    )
    floor_ci = recentred_interval(
        floor, np.array([frechet_distance(floor_features[h], real_features[r]) for h, r in floor_halves])
    )
    kid_floor = kernel_distance(floor_features, real_features)
    kid_floor_ci = recentred_interval(
        kid_floor, half_kernel_distances(floor_features, real_features, floor_halves)
    )

    results: dict[Sampler, dict[str, harness.RunResult]] = {}
    changes = {}
    for sampler in SAMPLERS:
        # One untimed call first, so one-off start-up costs land on no configuration.
        harness.generate(pipe, sampler, None, prompts[:2], seeds[:2], args.guidance, args.batch)
        results[sampler] = {}
        for name in configs_for(args.quick):
            result = harness.generate(pipe, sampler, name, prompts, seeds, args.guidance, args.batch)
            results[sampler][name] = result
            print(f"{sampler.value} {name}: {result.seconds:.1f} s", flush=True)
        evaluate(results[sampler], labels, real_features, classifier, args.boot, rng)
        n_change = 8 if args.quick else 64
        changes[sampler] = feature_change(pipe, sampler, prompts[:n_change], seeds[:n_change], args.guidance)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    stem = args.out.with_suffix("")
    plot_feature_change(changes, Path(f"{stem}-feature-change.png"))
    for sampler, by_config in results.items():
        save_comparison_grid(
            real[::REAL_PER_COMBO][: len(combos)],
            {name: r.images[::per_combo] for name, r in by_config.items()},
            Path(f"{stem}-samples-{sampler.name.lower()}.png"),
        )
    data = {
        "run": harness.report.run_facts(args.argv, started, began),
        "boot": args.boot,
        "guidance": args.guidance,
        "pairs": len(prompts),
        "real_accuracy": real_accuracy,
        "frechet_floor": [floor, *floor_ci],
        "kid_floor": [kid_floor, *kid_floor_ci],
        "feature_change": {s.value: c for s, c in changes.items()},
        "results": {
            s.value: {
                name: {
                    "key_steps": list(r.key_steps),
                    "encoder_passes": r.full_passes,
                    "decoder_passes": r.steps,
                    "seconds": r.seconds,
                    **r.metrics,
                }
                for name, r in by_config.items()
            }
            for s, by_config in results.items()
        },
    }
    harness.report.write(args.out, data, render, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
