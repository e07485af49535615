"""Why does a reference model put shapes in the wrong place? One cheap experiment per hypothesis.

    python training/diagnose_position.py                         # the shipped model
    python training/diagnose_position.py --model DIR --out F.md  # another model folder

Each experiment answers one question, on held-out prompts (``shapes.HELD_OUT_COMBOS``) unless it says
otherwise, scored by the attribute classifier:

1. Confusion matrix of requested against rendered position (stock DDIM-50), and where the shapes land: the
   distance of each shape's centroid from the nearest of the nine grid points, against real images.
2. VAE: does an encode/decode round trip of real images keep the position?
3. Text encoder: are the nine position phrases separable in its output (nearest-centroid accuracy over all
   972 captions, and the smallest distance between two phrases with everything else the same)?
4. Conditioning: how much does the UNet's noise prediction improve with the right position in the caption
   over a wrong one, per noise level? Near zero means the UNet barely reads the position words.
5. Guidance scale: position accuracy at several scales.
6. Sampling steps: DDIM-50 against DDIM-200.
7. The held-out split: position accuracy on prompts of training combinations against held-out ones.

Writes a Markdown report (default ``training/results/position-diagnosis.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faster_diffusion import Sampler, reference, use_sampler  # noqa: E402
from faster_diffusion.app.loading import load_pipeline  # noqa: E402
from faster_diffusion.reference import shapes  # noqa: E402

POSITIONS = shapes.ATTRIBUTES["position"]
POS = list(shapes.ATTRIBUTES).index("position")
GRID = (8.0, 16.0, 24.0)


def held_out(seeds_per_combo: int = 3) -> tuple[list[shapes.Scene], list[int]]:
    scenes = [shapes.Scene(*c) for c in shapes.HELD_OUT_COMBOS for _ in range(seeds_per_combo)]
    return scenes, list(range(len(scenes)))


def train_prompts(count: int = 240, seed: int = 11) -> tuple[list[shapes.Scene], list[int]]:
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(count)]
    return scenes, list(range(count))


def sample(pipe, scenes, seeds, *, guidance: float, steps: int = 50, batch: int = 120) -> np.ndarray:
    use_sampler(pipe, Sampler.DDIM)
    out = []
    for i in range(0, len(scenes), batch):
        with torch.inference_mode():
            images = pipe(
                [shapes.caption(s) for s in scenes[i : i + batch]],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + batch]],
                output_type="np",
            ).images
        out.append(images.transpose(0, 3, 1, 2) * 2 - 1)
    return np.concatenate(out).astype(np.float32)


def predict(classifier, images: np.ndarray) -> np.ndarray:
    return torch.cat([classifier.predict(c) for c in torch.from_numpy(images).split(256)]).numpy()


def labels_of(scenes) -> np.ndarray:
    return np.array([s.labels() for s in scenes])


def centroids(images: np.ndarray) -> np.ndarray:
    """Centroid (x, y) in pixels of the pixels that differ from the background (the median border colour)."""
    out = np.empty((len(images), 2))
    ys, xs = np.mgrid[0 : images.shape[2], 0 : images.shape[3]] + 0.5
    for i, image in enumerate(images):
        border = np.concatenate([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], axis=1)
        background = np.median(border, axis=1)[:, None, None]
        mask = (np.abs(image - background).max(axis=0) > 0.3).astype(np.float64)
        if mask.sum() == 0:
            out[i] = np.nan
            continue
        out[i] = (xs * mask).sum() / mask.sum(), (ys * mask).sum() / mask.sum()
    return out


def grid_distance(points: np.ndarray) -> np.ndarray:
    grid = np.array(list(itertools.product(GRID, GRID)))
    return np.sqrt(((points[:, None, :] - grid[None]) ** 2).sum(-1)).min(axis=1)


def requested_distance(points: np.ndarray, scenes) -> np.ndarray:
    targets = np.array(
        [[GRID[shapes.POSITIONS[s.position][1]], GRID[shapes.POSITIONS[s.position][2]]] for s in scenes]
    )
    return np.sqrt(((points - targets) ** 2).sum(-1))


def confusion(requested: np.ndarray, rendered: np.ndarray) -> np.ndarray:
    matrix = np.zeros((len(POSITIONS), len(POSITIONS)), dtype=int)
    for r, p in zip(requested, rendered, strict=True):
        matrix[r, p] += 1
    return matrix


def confusion_md(matrix: np.ndarray) -> list[str]:
    lines = [
        "| requested \\ rendered | " + " | ".join(POSITIONS) + " | right |",
        "|---" * (len(POSITIONS) + 2) + "|",
    ]
    for i, name in enumerate(POSITIONS):
        total = matrix[i].sum()
        share = f"{matrix[i, i] / total:.0%}" if total else "–"
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in matrix[i]) + f" | {share} |")
    return lines


@torch.no_grad()
def text_separability(pipe) -> dict:
    """Nearest-centroid accuracy of position from the text encoder's output, and the closest two phrases."""
    combos = list(itertools.product(*shapes.ATTRIBUTES.values()))
    scenes = [shapes.Scene(*c) for c in combos]
    ids = pipe.tokenizer(
        [shapes.caption(s) for s in scenes],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    hidden = torch.cat([pipe.text_encoder(c)[0] for c in ids.split(256)]).flatten(1).numpy()
    labels = labels_of(scenes)[:, POS]
    centres = np.stack([hidden[labels == p].mean(0) for p in range(len(POSITIONS))])
    nearest = ((hidden[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    # Distance between the embeddings of two captions that differ only in position, relative to the norm.
    base = {c: hidden[i] for i, c in enumerate(combos)}
    closest: dict[tuple[str, str], list[float]] = {}
    for c in combos:
        for other in POSITIONS:
            if other <= c[3]:
                continue
            d = base[c] - base[(*c[:3], other, c[4])]
            closest.setdefault((c[3], other), []).append(float(np.linalg.norm(d) / np.linalg.norm(base[c])))
    pairs = sorted(((float(np.mean(v)), k) for k, v in closest.items()))
    colour_pairs = []
    colours = shapes.ATTRIBUTES["colour"]
    for c in combos:
        for other in colours:
            if other <= c[1]:
                continue
            d = base[c] - base[(c[0], other, *c[2:])]
            colour_pairs.append(float(np.linalg.norm(d) / np.linalg.norm(base[c])))
    return {
        "nearest_centroid_accuracy": float((nearest == labels).mean()),
        "closest_position_pairs": [(f"{a} / {b}", d) for d, (a, b) in pairs[:4]],
        "farthest_position_pair": (f"{pairs[-1][1][0]} / {pairs[-1][1][1]}", pairs[-1][0]),
        "mean_colour_pair_distance": float(np.mean(colour_pairs)),
    }


@torch.no_grad()
def conditioning_gain(pipe, count: int = 512, seed: int = 5) -> list[dict]:
    """Noise-prediction error with the right caption, with the position changed, and with no caption."""
    from diffusers import DDPMScheduler

    rng = np.random.default_rng(seed)
    scenes, seeds = train_prompts(count, seed)
    x = torch.from_numpy(shapes.render_batch(scenes, seeds))
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    wrong = []
    for s in scenes:
        others = [p for p in POSITIONS if p != s.position]
        wrong.append(
            shapes.Scene(s.shape, s.colour, s.size, others[int(rng.integers(len(others)))], s.background)
        )

    def embed(captions):
        ids = pipe.tokenizer(
            captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder(ids)[0]

    right_h = embed([shapes.caption(s) for s in scenes])
    wrong_h = embed([shapes.caption(s) for s in wrong])
    empty_h = embed([""] * count)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in (999, 900, 700, 500, 300, 100):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((count,), t)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        errors = {}
        for name, hidden in (("right", right_h), ("wrong position", wrong_h), ("empty", empty_h)):
            pred = pipe.unet(noisy, timesteps, hidden).sample
            errors[name] = float(((pred - noise) ** 2).mean())
        rows.append({"t": t, **errors})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=reference.MODEL_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "training" / "results" / "position-diagnosis.md")
    parser.add_argument("--guidance", type=float, default=reference.GUIDANCE_SCALE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="experiments 1-4 only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    classifier = reference.load_classifier()
    results: dict = {
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model)
    }
    lines = [
        "# Where the reference model's position errors come from",
        "",
        f"Model: `{results['model']}`. Command: `python training/diagnose_position.py"
        + (f" --model {args.model}" if args.model != reference.MODEL_DIR else "")
        + (" --quick" if args.quick else "")
        + "`. Held-out prompts: 80 combinations x 3 seeds = 240, stock DDIM-50, "
        f"guidance {args.guidance} unless stated.",
        "",
    ]

    # 1. Confusion matrix and where shapes land.
    scenes, seeds = held_out()
    labels = labels_of(scenes)
    images = sample(pipe, scenes, seeds, guidance=args.guidance)
    predicted = predict(classifier, images)
    matrix = confusion(labels[:, POS], predicted[:, POS])
    real = shapes.render_batch(scenes, [50_000 + s for s in seeds])
    gen_points, real_points = centroids(images), centroids(real)
    accuracy = reference.attribute_accuracy(predicted, labels)
    results["stock"] = accuracy
    results["confusion"] = matrix.tolist()
    off = {
        "generated": (
            float(np.nanmedian(requested_distance(gen_points, scenes))),
            float(np.nanmedian(grid_distance(gen_points))),
        ),
        "real": (
            float(np.nanmedian(requested_distance(real_points, scenes))),
            float(np.nanmedian(grid_distance(real_points))),
        ),
    }
    far = float(np.nanmean(requested_distance(gen_points, scenes) > 4.0))
    results["centroid"] = {**off, "generated_share_over_4px": far}
    lines += [
        "## 1. Requested against rendered position",
        "",
        f"All five attributes right: {accuracy['all']:.1%}; position {accuracy['position']:.1%}, shape "
        f"{accuracy['shape']:.1%}, colour {accuracy['colour']:.1%}, size {accuracy['size']:.1%}, background "
        f"{accuracy['background']:.1%}.",
        "",
        *confusion_md(matrix),
        "",
        "Centroid of the shape (pixels that differ from the background), median distance in pixels of 32:",
        "",
        "| images | to the requested grid point | to the nearest grid point |",
        "|---|---|---|",
        f"| real (same prompts, jitter ±1.5 px) | {off['real'][0]:.2f} | {off['real'][1]:.2f} |",
        f"| generated | {off['generated'][0]:.2f} | {off['generated'][1]:.2f} |",
        "",
        f"{far:.0%} of generated shapes land more than 4 px (half a cell) from the requested point.",
        "",
    ]

    # 2. VAE round trip.
    with torch.no_grad():
        x = torch.from_numpy(real)
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).numpy()
    vae_real = reference.attribute_accuracy(predict(classifier, real), labels)
    vae_recon = reference.attribute_accuracy(predict(classifier, recon), labels)
    shift = float(np.nanmedian(np.sqrt(((centroids(recon) - real_points) ** 2).sum(-1))))
    results["vae"] = {"real": vae_real, "round_trip": vae_recon, "centroid_shift_px": shift}
    lines += [
        "## 2. VAE round trip",
        "",
        f"Real held-out images: position read right {vae_real['position']:.1%}; after encode/decode "
        f"{vae_recon['position']:.1%} (all five {vae_real['all']:.1%} → {vae_recon['all']:.1%}). "
        f"Median centroid shift {shift:.2f} px.",
        "",
    ]

    # 3. Text encoder.
    text = text_separability(pipe)
    results["text"] = text
    lines += [
        "## 3. Text encoder",
        "",
        f"Nearest-centroid accuracy of position from the encoder's output over all 972 captions: "
        f"{text['nearest_centroid_accuracy']:.1%}. Relative distance between the outputs of two captions "
        "that differ only in position, closest pairs: "
        + ", ".join(f"{name} {d:.3f}" for name, d in text["closest_position_pairs"])
        + f"; farthest {text['farthest_position_pair'][0]} {text['farthest_position_pair'][1]:.3f}. "
        f"Two captions that differ only in colour: {text['mean_colour_pair_distance']:.3f} on average.",
        "",
    ]

    # 4. Conditioning gain.
    gain = conditioning_gain(pipe)
    results["conditioning"] = gain
    lines += [
        "## 4. Does the UNet read the position words?",
        "",
        "Noise-prediction MSE on 512 training-combination images, by timestep: with the right caption, with "
        "only the position changed, with an empty caption.",
        "",
        "| t | right | wrong position | empty | wrong − right |",
        "|---|---|---|---|---|",
        *(
            f"| {r['t']} | {r['right']:.4f} | {r['wrong position']:.4f} | {r['empty']:.4f} | "
            f"{r['wrong position'] - r['right']:+.4f} |"
            for r in gain
        ),
        "",
    ]

    if not args.quick:
        # 5. Guidance.
        rows = []
        for g in (1.0, 3.0, 5.0, 7.5, 10.0, 15.0):
            acc = (
                accuracy
                if g == args.guidance
                else reference.attribute_accuracy(
                    predict(classifier, sample(pipe, scenes, seeds, guidance=g)), labels
                )
            )
            rows.append((g, acc))
        results["guidance"] = {str(g): a for g, a in rows}
        lines += [
            "## 5. Guidance scale",
            "",
            "| guidance | position | all five |",
            "|---|---|---|",
            *(f"| {g} | {a['position']:.1%} | {a['all']:.1%} |" for g, a in rows),
            "",
        ]
        # 6. Steps.
        acc200 = reference.attribute_accuracy(
            predict(classifier, sample(pipe, scenes, seeds, guidance=args.guidance, steps=200)), labels
        )
        results["ddim200"] = acc200
        lines += [
            "## 6. Sampling steps",
            "",
            f"DDIM-50: position {accuracy['position']:.1%}, all five {accuracy['all']:.1%}. "
            f"DDIM-200: position {acc200['position']:.1%}, all five {acc200['all']:.1%}.",
            "",
        ]
        # 7. Held-out split.
        t_scenes, t_seeds = train_prompts()
        acc_train = reference.attribute_accuracy(
            predict(classifier, sample(pipe, t_scenes, t_seeds, guidance=args.guidance)), labels_of(t_scenes)
        )
        results["train_combos"] = acc_train
        lines += [
            "## 7. Held-out combinations against training ones",
            "",
            f"240 prompts of training combinations: position {acc_train['position']:.1%}, all five "
            f"{acc_train['all']:.1%}; held-out: position {accuracy['position']:.1%}, "
            f"all five {accuracy['all']:.1%}.",
            "",
        ]
    results["seconds"] = time.perf_counter() - started
    lines.append(f"Wall time: {results['seconds']:.0f} s on {args.threads} CPU threads.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
