"""What the acceleration costs in image quality for image-to-image, measured on the trained reference model.

Protocol (fixed before any result was seen):

- Pairs: the same 240 held-out prompt x seed pairs as quality.py (same construction).
- Input image of pair i: the stock text-to-image output (DDIM-50, the reference guidance scale, seed of
  pair i) of the prompt of ANOTHER held-out combination: combo (i + 1) mod 80 of the list, i.e. the next one.
  The image-to-image prompt is pair i's own prompt. So the run must change the image into the prompt.
- Strengths 0.8 (Replicate's default) and 0.6. Samplers DDIM-50 and DPM-Solver-20.
- Configurations: ``stock`` (no faster diffusion), ``default`` (encoder propagation's default key steps for
  the reference model: ``faster_diffusion.policy.default_key_steps(pipe, sampler, mode="encoder")``, i.e. auto
  for DDIM, auto:9 for DPM-Solver, from the committed calibration; the product's default until deep reuse
  became it), ``paper`` (KeySteps.paper()); noise injection on
  (the default) for the accelerated ones. Image-to-image pipeline built with ``image_to_image_pipeline(pipe)``
  from the loaded reference pipeline.
- Metrics per sampler x strength x configuration: faithfulness (classifier reads all 5 attributes of pair i's
  prompt) with a 95% bootstrap interval over pairs, its difference to stock with an interval (draws shared
  across configurations, as quality.py's evaluate does), PSNR against stock's image of the same pair with
  interval, encoder/decoder passes per image (from handle.last_run), the key steps used (the cut schedule's
  describe()), wall time. Also report the faithfulness of the input images themselves to pair i's prompt
  (should be low: they show another combination) as a sanity row.
- Judgement line per row, stated in advance: "within noise of stock" when the 95% interval of the
  faithfulness difference contains 0 and its point estimate is >= -1 point (the rule of the key-steps issue).
- Outputs: ``benchmarks/results/img2img-quality.md`` (+ ``.json``), and a PNG grid
  ``benchmarks/results/img2img-samples.png``: for ~8 pairs, columns input | stock | default | paper at
  strength 0.8, DDIM-50 (upscaled with nearest so 32 px images are visible).

Reading of the protocol: pair i belongs to held-out combination c = i // 3 (3 seeds per combination, as in
quality.py), and its input shows combination (c + 1) mod 80, the next one in ``shapes.HELD_OUT_COMBOS``, so
that no input shows its own pair's combination. Input images reach the image-to-image pipeline as 8-bit
images, as a saved file holds them. A second sanity line reads the input images against their own prompts
(should be high: the inputs are good pictures of the other combination).

    python benchmarks/img2img_quality.py   # full run -> benchmarks/results/img2img-quality.md (+ .json, PNG)
    python benchmarks/img2img_quality.py --quick --out /tmp/i.md   # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from faster_diffusion import KeySteps, Sampler, apply_faster_diffusion, use_sampler  # noqa: E402
from faster_diffusion.app.generate import image_to_image_pipeline, image_to_image_steps  # noqa: E402
from faster_diffusion.policy import default_key_steps  # noqa: E402
from faster_diffusion.reference import shapes  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SAMPLERS = (Sampler.DDIM, Sampler.DPM_SOLVER)
STRENGTHS = (0.8, 0.6)
#: The sampler that makes the input images (stock, the reference guidance scale).
INPUT_SAMPLER = Sampler.DDIM
#: Pairs shown in the sample grid (DDIM-50, strength 0.8).
GRID_PAIRS = 8


def input_combos(combos: list[tuple[str, ...]], per_combo: int) -> list[tuple[str, ...]]:
    """The combination each pair's input image shows: for pair i (combination ``i // per_combo``), the next
    combination of ``combos``, wrapping round at the end."""
    if len(combos) < 2:
        raise ValueError(f"need at least 2 combinations, so that inputs show another one, got {len(combos)}")
    return [combos[(c + 1) % len(combos)] for c in range(len(combos)) for _ in range(per_combo)]


def configs_for(pipe, sampler: Sampler) -> list[harness.EncoderSetting]:
    """``stock``, the product's ``default`` key steps for ``pipe`` and ``sampler``, and ``paper``."""
    return [
        harness.EncoderSetting("stock", None),
        harness.EncoderSetting("default", default_key_steps(pipe, sampler, mode="encoder")),
        harness.EncoderSetting("paper", KeySteps.paper()),
    ]


def to_input_images(images: np.ndarray) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W), as the image-to-image pipeline takes them from 8-bit files: in [0, 1],
    on the 256 levels of a byte."""
    levels = ((images.clip(-1, 1) + 1) * 127.5).round()
    return torch.from_numpy((levels / 255.0).astype(np.float32))


@dataclass
class Img2ImgRun:
    images: np.ndarray  # (N, 3, 32, 32) in [-1, 1]
    seconds: float
    #: Full UNet passes (the encoder's), and steps that run (the decoder's passes).
    full_passes: int
    steps: int
    #: What the run used: the cut schedule's ``describe()``, or for stock the steps that ran.
    key_steps: str
    metrics: dict = field(default_factory=dict)


def generate_img2img(
    pipe,
    sampler: Sampler,
    config: harness.EncoderSetting,
    prompts: list[str],
    seeds: list[int],
    inputs: torch.Tensor,
    strength: float,
    guidance: float,
    batch: int,
) -> Img2ImgRun:
    """Image-to-image of ``inputs`` (in [0, 1]) into ``prompts``, one seeded generator per pair, on
    ``image_to_image_pipeline(pipe)`` with ``config`` attached for the run."""
    use_sampler(pipe, sampler)
    runner = image_to_image_pipeline(pipe)  # after use_sampler: it holds the sampler's scheduler
    handle = apply_faster_diffusion(runner, config.faster()) if config.key_steps is not None else None
    steps = sampler.default_steps
    steps_run = image_to_image_steps(steps, strength)
    try:
        images, seconds = harness.run_in_batches(
            runner,
            prompts,
            seeds,
            batch,
            images=inputs,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
        )
    finally:
        if handle is not None:
            handle.remove()
    if handle is None:
        encoder = decoder = steps_run
        described = f"all {steps_run} steps that run ({steps - steps_run} to {steps - 1} of {steps})"
    else:
        stats = handle.last_run
        encoder, decoder = stats.full_passes, stats.full_passes + stats.partial_passes
        described = stats.schedule.describe()
    return Img2ImgRun(images, seconds, encoder, decoder, described)


# ------------------------------------------------------------------------------------------------ metrics


def evaluate(runs: dict[str, Img2ImgRun], judge: harness.Judge) -> None:
    """Fill ``metrics`` of every run: faithfulness (``judge``'s labels) with its interval and, against
    ``runs["stock"]`` (``judge``'s stock), its difference with a paired interval, the protocol's judgement,
    and PSNR with its interval; every configuration on ``judge``'s draws."""
    for name, run in runs.items():
        correct = judge.stock_correct if name == "stock" else judge.correct(run.images)
        run.metrics["all"], run.metrics["all_ci"] = judge.faithfulness(correct)
        if name == "stock":
            continue
        run.metrics["all_delta"], run.metrics["all_delta_ci"] = judge.delta(correct)
        run.metrics["judgement"] = harness.judgement(run.metrics["all_delta"], run.metrics["all_delta_ci"])
        run.metrics["psnr"], run.metrics["psnr_ci"] = judge.fidelity(run.images)


def faithfulness(classifier, images: np.ndarray, labels: np.ndarray, draws: list[np.ndarray]) -> dict:
    """How often all five attributes of ``labels`` are read off ``images``, with its bootstrap interval."""
    judge = harness.Judge(classifier, labels, images, draws)  # ``images`` in stock's place: only read
    share, ci = judge.faithfulness(judge.stock_correct)
    return {"all": share, "all_ci": ci}


# ------------------------------------------------------------------------------------------------- output


def save_samples_grid(columns: dict[str, np.ndarray], captions: list[str], path: Path) -> None:
    """One row per pair, one column per entry of ``columns`` (headed by its name), the pair's prompt to the
    right of its row; images upscaled with nearest neighbours."""
    from PIL import Image, ImageDraw

    scale, pad, header, caption_width = 4, 4, 16, 420
    size = shapes.IMAGE_SIZE * scale
    rows = len(captions)
    grid = Image.new(
        "RGB", (len(columns) * (size + pad) + caption_width, header + rows * (size + pad)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(columns.items()):
        draw.text((c * (size + pad) + 2, 2), name, fill="black")
        for r, tile in enumerate(harness.plots.tiles(images[:rows], size)):
            grid.paste(tile, (c * (size + pad), header + r * (size + pad)))
    for r, text in enumerate(captions):
        draw.text(
            (len(columns) * (size + pad) + 4, header + r * (size + pad) + size // 2 - 6), text, fill="black"
        )
    grid.save(path)


def typed(data: dict) -> dict[Sampler, dict[float, dict[str, Img2ImgRun]]]:
    """A saved run's results as the report reads them (without images)."""
    return {
        Sampler.parse(s): {
            float(strength): {
                name: Img2ImgRun(
                    images=None,
                    seconds=m["seconds"],
                    full_passes=m["encoder_passes"],
                    steps=m["decoder_passes"],
                    key_steps=m["key_steps"],
                    metrics={k: v for k, v in m.items() if k not in RUN_FIELDS},
                )
                for name, m in runs.items()
            }
            for strength, runs in by_strength.items()
        }
        for s, by_strength in data["results"].items()
    }


#: The fields of a saved run that are not its metrics.
RUN_FIELDS = ("key_steps", "encoder_passes", "decoder_passes", "seconds")


def render(data: dict, args: argparse.Namespace) -> str:
    """The report of a run's JSON ``data``; ``args``: the settings its command line parses to."""
    return report(data["run"], args, data, typed(data))


def report(run: dict, args, data: dict, results: dict) -> str:
    fmt_ci, model = harness.report.fmt_ci, harness.report.display_path(args.model)
    sanity, n_pairs = data["input_faithfulness"], data["pairs"]
    to_pair, to_own = sanity["pair prompt"], sanity["own prompt"]
    input_all = fmt_ci(to_pair["all"], to_pair["all_ci"], 1, 100)
    took = harness.report.minutes(run)
    lines = [
        "# Image-to-image quality of faster diffusion on the reference model",
        "",
        f"Command: `{harness.report.command('img2img_quality.py', run['argv'])}`  ",
        f"Started {run['started']}; took {took} min. torch {run['torch']}, {run['machine']}, "
        f"{run['threads']} threads.  ",
        f"Model: `{model}` (trained by `training/train_reference.py`). {n_pairs} prompt x "
        "seed pairs from attribute combinations that training never saw (quality.py's pairs); guidance "
        f"{data['guidance']}; 32x32 images. The input image of each pair is the stock DDIM-50 text-to-image "
        "output, with the pair's seed, of the next held-out combination's prompt; the image-to-image prompt "
        "is the pair's own. 95% bootstrap intervals over the pairs in brackets "
        f"({data['boot']} resamples, shared by all rows). The protocol, fixed before any result was seen, is "
        "in the docstring of `benchmarks/img2img_quality.py`.",
        "",
        "Judgement, stated in advance: **within noise of stock** when the 95% interval of the faithfulness "
        f"difference contains 0 and its point estimate is >= {harness.WITHIN_NOISE_POINTS:g} point.",
        "",
        "Sanity rows (the input images, before image-to-image): the classifier reads all five attributes "
        f"of the pair's prompt off {input_all}% of them (should be low: they "
        "show another combination), and all five attributes of their own prompt off "
        f"{fmt_ci(to_own['all'], to_own['all_ci'], 1, 100)}%.",
        "",
    ]
    for sampler, by_strength in results.items():
        for strength, runs in by_strength.items():
            lines += [
                f"## {sampler.value}, strength {strength:g}",
                "",
                "| configuration | key steps used | encoder / decoder passes | wall time (s) "
                "| all 5 attributes correct (%) | Δ vs stock (pts) | PSNR vs stock (dB) | judgement |",
                "|---|---|---|---|---|---|---|---|",
                f"| input images (sanity) | – | – | – | {input_all} | – | – | – |",
            ]
            for name, run in runs.items():
                m = run.metrics
                if name == "stock":
                    delta = fidelity = judgement = "–"
                else:
                    low, high = m["all_delta_ci"]
                    delta = f"{m['all_delta'] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"
                    fidelity, judgement = fmt_ci(m["psnr"], m["psnr_ci"], 1), m["judgement"]
                lines.append(
                    f"| {name} | {run.key_steps} | {run.full_passes} / {run.steps} | "
                    f"{run.seconds:.1f} | {fmt_ci(m['all'], m['all_ci'], 1, 100)} | {delta} | {fidelity} | "
                    f"{judgement} |"
                )
            lines.append("")
    lines += [
        "Encoder / decoder passes are per image trajectory, over the steps that run. Wall time is one pass "
        "over the whole set, batched, on this CPU: a rough cost (benchmarks/speed.py measures speed).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 combinations x 2 seeds")
    parser.add_argument("--out", type=Path, default=RESULTS / "img2img-quality.md")
    parser.add_argument(
        "--samples", type=Path, default=None, help="the PNG grid (default: img2img-samples.png beside --out)"
    )
    harness.add_common_arguments(parser)
    harness.report.add_from_json(parser)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        harness.report.report_again(args, render, parser)
        return 0
    harness.apply_common_arguments(parser, args, argv)
    samples_path = args.samples or args.out.with_name("img2img-samples.png")
    started, began = harness.report.started_now(), time.perf_counter()

    pipe = harness.load_reference(args.model)
    classifier = harness.load_classifier(args.classifier)
    pairs = harness.Pairs.held_out(args.quick)  # quality.py's pairs
    scenes, prompts, seeds, labels = pairs.scenes, pairs.prompts, pairs.seeds, pairs.labels
    input_scenes = [shapes.Scene(*c) for c in input_combos(pairs.combos, pairs.per_combo)]
    input_prompts = [shapes.caption(s) for s in input_scenes]
    input_labels = np.array([s.labels() for s in input_scenes])
    draws = harness.bootstrap_draws(len(scenes), args.boot)

    made = harness.generate(pipe, INPUT_SAMPLER, None, input_prompts, seeds, args.guidance, args.batch)
    print(f"input images: {made.seconds:.1f} s", flush=True)
    inputs = to_input_images(made.images)
    input_images = inputs.numpy() * 2.0 - 1.0  # what the pipeline was given, in [-1, 1]
    sanity = {
        "pair prompt": faithfulness(classifier, input_images, labels, draws),
        "own prompt": faithfulness(classifier, input_images, input_labels, draws),
    }

    results: dict[Sampler, dict[float, dict[str, Img2ImgRun]]] = {}
    for sampler in SAMPLERS:
        results[sampler] = {}
        for strength in STRENGTHS:
            runs = {}
            for config in configs_for(pipe, sampler):
                runs[config.name] = generate_img2img(
                    pipe, sampler, config, prompts, seeds, inputs, strength, args.guidance, args.batch
                )
                print(
                    f"{sampler.value} {strength:g} {config.name}: {runs[config.name].seconds:.1f} s",
                    flush=True,
                )
            judge = harness.Judge(classifier, labels, runs["stock"].images, draws)
            evaluate(runs, judge)
            results[sampler][strength] = runs

    args.out.parent.mkdir(parents=True, exist_ok=True)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    shown = results[Sampler.DDIM][STRENGTHS[0]]
    # Pairs spread over the combinations, one seed each.
    picks = np.linspace(0, len(scenes) - 1, min(GRID_PAIRS, len(scenes))).round().astype(int)
    save_samples_grid(
        {"input": input_images[picks], **{name: run.images[picks] for name, run in shown.items()}},
        [f"{i}: {prompts[i]}" for i in picks],
        samples_path,
    )
    data = {
        "run": harness.report.run_facts(args.argv, started, began),
        "guidance": args.guidance,
        "pairs": len(prompts),
        "boot": args.boot,
        "input_faithfulness": sanity,
        "results": {
            s.value: {
                f"{strength:g}": {
                    name: {
                        "key_steps": run.key_steps,
                        "encoder_passes": run.full_passes,
                        "decoder_passes": run.steps,
                        "seconds": run.seconds,
                        **run.metrics,
                    }
                    for name, run in runs.items()
                }
                for strength, runs in by_strength.items()
            }
            for s, by_strength in results.items()
        },
    }
    harness.report.write(args.out, data, render, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
