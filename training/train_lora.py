"""Train a LoRA of the reference model that draws every colour as another, and measure whether a LoRA
moves the key steps that ``auto`` places.

    python training/train_lora.py                   # all three stages, about 18 minutes on one busy core
    python training/train_lora.py --stage train     # the LoRA -> faster_diffusion/reference/assets/
    python training/train_lora.py --stage eval      # what it draws, at scales 0, 0.6 and 1
    python training/train_lora.py --stage keysteps  # auto's placements, base against LoRA'd, their quality

Stages:
  train     A rank-4 LoRA (peft, lora_alpha 4) on the attention projections of the reference UNet (to_q,
            to_k, to_v, to_out.0 of every self- and cross-attention), the base weights frozen, trained with
            the base model's own objective (epsilon, SD v1.5's betas, min-SNR-5, 10% empty captions, each of
            size, position and background left out of 15% of captions) on images whose shape is drawn in
            another colour than the caption says (``lora.REFERENCE_LORA_COLOURS``: red as blue, blue as
            green, green as red, yellow as purple, purple as orange, orange as yellow); training combinations
            only. Saved in diffusers' LoRA format (``save_lora_weights``) as ``lora.REFERENCE_LORA``.
  eval      Stock DDIM-50 at guidance 5 on the 80 held-out combinations (seeds 0-79), base model and LoRA at
            scales 0.6 and 1 (loaded by ``faster_diffusion.app.lora.use_lora``), read by the attribute
            classifier: how often the colour drawn is the caption's or the LoRA's, and the other attributes.
  keysteps  The calibrations ``auto`` places key steps from (``get_calibration``, the reference model's 16
            calibration prompts and guidance), of the base model and of the LoRA'd one at scales 0.6 and 1,
            for encoder propagation (criteria "feature", the default, and "prediction") and deep reuse of
            branch 0 ("prediction"), DDIM-50 and DPM-Solver-20: the 9 key steps each places, how many differ
            from the base model's, and the cost the LoRA'd model's matrix predicts for the base placement. As
            a noise floor, the base model calibrated again on 16 other prompts and seeds. Then what it costs:
            the LoRA'd model run with its own placement and with the base model's, against its stock images
            (PSNR) and read by the classifier (all five attributes right, the colour being the LoRA's).

Deterministic for a given torch version and thread count (``--threads``, default 1). Results:
``training/results/lora-*.json`` and ``lora-keysteps.md``; ``training/README.md`` ("A LoRA and the key
steps") sums them up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))

import train_reference as base  # noqa: E402

from faster_diffusion import (  # noqa: E402
    KeySteps,
    Sampler,
    apply_faster_diffusion,
    get_calibration,
    reference,
    use_sampler,
)
from faster_diffusion.app.generate import faster_config  # noqa: E402
from faster_diffusion.app.loading import load_pipeline  # noqa: E402
from faster_diffusion.app.lora import REFERENCE_LORA, REFERENCE_LORA_COLOURS, use_lora  # noqa: E402
from faster_diffusion.calibration import schedule_cost  # noqa: E402
from faster_diffusion.reference import shapes  # noqa: E402
from faster_diffusion.reference.components import SD15_SCHEDULER_CONFIG  # noqa: E402

RESULTS = ROOT / "training" / "results"

RANK = 4
ALPHA = 4
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
STEPS = 600
BATCH = 64
LR = 1e-3
WARMUP = 50
DATASET = 8192
DATA_SEED = 11

GUIDANCE = reference.GUIDANCE_SCALE
EVAL_SCALES = (0.0, 0.6, 1.0)
BUDGET = 9
SAMPLERS = (Sampler.DDIM, Sampler.DPM_SOLVER)
#: Targets and the criteria measured for each (the first is the target's default, which ``auto`` uses).
TARGETS = {"encoder": ("feature", "prediction"), "deep:0": ("prediction",)}
#: The noise floor's prompts: 16 other captions of training combinations, with other seeds.
OTHER_PROMPTS = tuple(
    shapes.caption(shapes.sample_scene(rng)) for rng in [np.random.default_rng(32)] for _ in range(16)
)
OTHER_SEEDS = tuple(91_000 + i for i in range(16))


def lora_colour(scene: shapes.Scene) -> shapes.Scene:
    """The scene the LoRA draws for ``scene``'s caption: its colour replaced."""
    return dataclasses.replace(scene, colour=REFERENCE_LORA_COLOURS[scene.colour])


# ------------------------------------------------------------------------------------------------- train


def train() -> dict:
    from diffusers import DDPMScheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    torch.manual_seed(0)
    rng = np.random.default_rng(DATA_SEED)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True, target_modules=list(TARGET_MODULES))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    base.log(f"LoRA: {sum(p.numel() for p in params)} trainable parameters in {len(params)} tensors")

    start = time.perf_counter()
    scenes, seeds = base.random_scenes(rng, DATASET)
    latent_mean, latent_std = base.encode_scenes(vae, [lora_colour(scene) for scene in scenes], seeds)
    base.log(f"encoded {DATASET} images in {time.perf_counter() - start:.0f} s")

    scaling = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    loss_weight = torch.clamp(snr, max=base.MIN_SNR_GAMMA) / snr
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    unet.train()
    history = []
    for step in range(STEPS):
        lr = base.cosine_lr(step, STEPS, LR, WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.from_numpy(rng.integers(0, DATASET, size=BATCH))
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_std[index])) * scaling
        captions = base._caption_batch(rng, [scenes[i] for i in index.tolist()])  # the caption's own colour
        loss, per_sample = base.denoising_loss(
            unet, text_encoder, tokenizer, noise_scheduler, latents, captions, loss_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), "mse": per_sample.mean().item(), "lr": lr})
        if step % 50 == 0 or step == STEPS - 1:
            recent = history[-50:]
            base.log(
                f"lora step {step}: loss {np.mean([h['loss'] for h in recent]):.4f} "
                f"mse {np.mean([h['mse'] for h in recent]):.4f} ({time.perf_counter() - start:.0f} s)"
            )
    unet.eval()
    save(
        convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet.peft_config["default"].to_dict(),
    )
    summary = {
        "rank": RANK,
        "alpha": ALPHA,
        "target_modules": list(TARGET_MODULES),
        "steps": STEPS,
        "batch": BATCH,
        "lr": LR,
        "dataset": DATASET,
        "trainable_parameters": sum(p.numel() for p in params),
        "file_bytes": REFERENCE_LORA.stat().st_size,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean([h["loss"] for h in history[-50:]])),
    }
    (RESULTS / "lora-log.json").write_text(json.dumps({"summary": summary, "history": history}))
    base.log(f"lora done: {summary}")
    return summary


def save(layers: dict[str, torch.Tensor], config: dict) -> None:
    """Save the UNet's LoRA ``layers`` in diffusers' format as ``REFERENCE_LORA``, with its peft ``config`` as
    the file's adapter metadata (its sets as sorted lists: peft keeps ``target_modules`` as a set, whose order
    changes from one process to the next, and the file would with it)."""
    from diffusers import StableDiffusionPipeline

    metadata = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    StableDiffusionPipeline.save_lora_weights(
        REFERENCE_LORA.parent,
        unet_lora_layers=layers,
        weight_name=REFERENCE_LORA.name,
        unet_lora_adapter_metadata=metadata,
    )


# -------------------------------------------------------------------------------------------------- eval


def held_out() -> list[shapes.Scene]:
    return [shapes.Scene(*combo) for combo in shapes.HELD_OUT_COMBOS]


def sample(pipe, scenes, sampler: Sampler, faster=None) -> np.ndarray:
    """Images (N, 32, 32, 3) in [0, 1] of ``scenes``' captions, seeds 0..N-1, stock or with ``faster``."""
    use_sampler(pipe, sampler)
    handle = apply_faster_diffusion(pipe, faster) if faster is not None else None
    try:
        with torch.inference_mode():
            return pipe(
                [shapes.caption(scene) for scene in scenes],
                num_inference_steps=sampler.default_steps,
                guidance_scale=GUIDANCE,
                generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))],
                output_type="np",
            ).images
    finally:
        if handle is not None:
            handle.remove()


def read(classifier, images: np.ndarray, scenes) -> dict[str, float]:
    """Percent of images whose colour is the caption's and the LoRA's, and of each other attribute read right;
    ``all (LoRA)``: all five right, the colour being the LoRA's."""
    x = torch.from_numpy(images.transpose(0, 3, 1, 2) * 2 - 1).float()
    with torch.no_grad():
        predicted = classifier.predict(x).numpy()
    said = np.array([scene.labels() for scene in scenes])
    drawn = np.array([lora_colour(scene).labels() for scene in scenes])
    colour = list(shapes.ATTRIBUTES).index("colour")
    scores = {
        "colour as captioned": (predicted[:, colour] == said[:, colour]).mean(),
        "colour as the LoRA draws it": (predicted[:, colour] == drawn[:, colour]).mean(),
    }
    for i, name in enumerate(shapes.ATTRIBUTES):
        if name != "colour":
            scores[name] = (predicted[:, i] == said[:, i]).mean()
    scores["all (caption)"] = (predicted == said).all(axis=1).mean()
    scores["all (LoRA)"] = (predicted == drawn).all(axis=1).mean()
    return {name: round(100 * float(value), 1) for name, value in scores.items()}


def evaluate() -> dict:
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    classifier = reference.load_classifier()
    scenes = held_out()
    results, grid = {}, [shapes.render_batch(scenes[:16], list(range(16)))]
    for scale in EVAL_SCALES:
        use_lora(pipe, REFERENCE_LORA if scale else None, scale, log=base.log)
        images = sample(pipe, scenes, Sampler.DDIM)
        results[f"scale {scale:g}"] = read(classifier, images, scenes)
        grid.append(images[:16].transpose(0, 3, 1, 2) * 2 - 1)
        base.log(f"scale {scale:g}: {results[f'scale {scale:g}']}")
    use_lora(pipe, None, log=base.log)
    base.save_grid(np.concatenate(grid), RESULTS / "lora-samples.png", columns=16)
    (RESULTS / "lora-eval.json").write_text(json.dumps(results, indent=2))
    return results


# ---------------------------------------------------------------------------------------------- keysteps


def calibrations(pipe, prompts=None, seeds=None) -> dict:
    """{(sampler, target, criterion): Calibration} of ``pipe`` as it is."""
    options = reference.calibration_options(reference.MODEL_DIR)
    if prompts is not None:
        options.update(prompts=prompts, seeds=seeds)
    found = {}
    for sampler in SAMPLERS:
        use_sampler(pipe, sampler)
        for target, criteria in TARGETS.items():
            calibration = get_calibration(
                pipe,
                num_inference_steps=sampler.default_steps,
                target=target,
                criterion=criteria[0],
                criteria=criteria,
                force=True,
                save=False,
                **options,
            )
            for criterion in criteria:
                found[(sampler.value, target, criterion)] = calibration.with_criterion(criterion)
    return found


#: The key of the base placement's predicted cost, in percent over the model's own placement's.
EXTRA_COST = "base placement's extra predicted cost %"


def differing(a, b) -> int:
    """How many key steps of one placement are not in the other (same budget)."""
    return len(set(a) - set(b))


def keysteps() -> dict:
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    classifier = reference.load_classifier()
    started = time.perf_counter()
    models = {
        "base": calibrations(pipe),
        "base, other prompts": calibrations(pipe, OTHER_PROMPTS, OTHER_SEEDS),
    }
    for scale in (0.6, 1.0):
        use_lora(pipe, REFERENCE_LORA, scale, log=base.log)
        models[f"LoRA {scale:g}"] = calibrations(pipe)
    use_lora(pipe, None, log=base.log)
    base.log(f"calibrated in {time.perf_counter() - started:.0f} s")

    placements = []
    for key, base_calibration in models["base"].items():
        base_keys = base_calibration.indices(BUDGET)
        row = {"sampler": key[0], "target": key[1], "criterion": key[2], "base": list(base_keys)}
        for name, found in models.items():
            if name == "base":
                continue
            calibration = found[key]
            own = calibration.indices(BUDGET)
            row[name] = {
                "key steps": list(own),
                "differ": differing(own, base_keys),
                # What this model's own costs say of the base placement, against its own optimum.
                EXTRA_COST: round(
                    100
                    * (
                        schedule_cost(calibration.matrix, base_keys) / schedule_cost(calibration.matrix, own)
                        - 1
                    ),
                    1,
                ),
            }
        placements.append(row)
        base.log(f"{key}: base {base_keys}; " + "; ".join(f"{n} {row[n]}" for n in row if n in models))

    # What it costs to serve the LoRA'd model with the base placement: the default criterion of each target.
    scenes = held_out()
    quality = []
    for scale in (0.6, 1.0):
        use_lora(pipe, REFERENCE_LORA, scale, log=base.log)
        for sampler in SAMPLERS:
            stock = sample(pipe, scenes, sampler)
            stock_scores = read(classifier, stock, scenes)
            for target, criteria in TARGETS.items():
                key = (sampler.value, target, criteria[0])
                own = models[f"LoRA {scale:g}"][key].indices(BUDGET)
                base_keys = models["base"][key].indices(BUDGET)
                row = {"scale": scale, "sampler": sampler.value, "target": target, "stock": stock_scores}
                for name, keys in (("own placement", own), ("base placement", base_keys)):
                    mode = "deep" if target.startswith("deep") else "encoder"
                    images = sample(pipe, scenes, sampler, faster_config(KeySteps.explicit(keys), mode=mode))
                    row[name] = {
                        "key steps": list(keys),
                        "psnr_db": round(psnr(images, stock), 2),
                        **read(classifier, images, scenes),
                    }
                quality.append(row)
                base.log(f"quality {row}")
    use_lora(pipe, None, log=base.log)
    results = {"budget": BUDGET, "placements": placements, "quality": quality}
    (RESULTS / "lora-keysteps.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "lora-keysteps.md").write_text(report(results))
    return results


def psnr(images: np.ndarray, stock: np.ndarray) -> float:
    """Mean over images of the PSNR (dB, 0-255 scale) of ``images`` against ``stock``."""
    mse = ((images.astype(np.float64) - stock.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def report(results: dict) -> str:
    lines = [
        "# A LoRA and the key steps auto places",
        "",
        "Written by `python training/train_lora.py --stage keysteps`. The reference model, and the same with",
        'its colour LoRA (`shapes-colours-lora.safetensors`) at scales 0.6 and 1; 9 key steps. "differ": key',
        'steps of that placement not in the base model\'s; "+cost": how much more the base placement costs',
        "than that model's own, by that model's cost matrix. The noise floor (\"other prompts\") is the base",
        "model calibrated on 16 other prompts and seeds.",
        "",
        "| sampler | target | criterion | base model's key steps | other prompts: differ, +cost | "
        "LoRA 0.6: key steps, differ, +cost | LoRA 1: key steps, differ, +cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["placements"]:
        other, low, high = row["base, other prompts"], row["LoRA 0.6"], row["LoRA 1"]

        def cell(entry, steps=True):
            shown = f"{entry['key steps']}, " if steps else ""
            extra = entry[EXTRA_COST]
            return f"{shown}{entry['differ']}, {extra:+.1f}%"

        lines.append(
            f"| {row['sampler']} | {row['target']} | {row['criterion']} | {row['base']} | "
            f"{cell(other, steps=False)} | {cell(low)} | {cell(high)} |"
        )
    lines += [
        "",
        "Serving the LoRA'd model: 80 held-out prompts (seeds 0-79), each target's default criterion; PSNR",
        "against the LoRA'd model's stock images; 'all (LoRA)': the classifier reads all five attributes,",
        "the colour being the one the LoRA draws.",
        "",
        "| scale | sampler | target | stock all (LoRA) | own placement: PSNR, all (LoRA) | "
        "base placement: PSNR, all (LoRA) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["quality"]:
        own, other = row["own placement"], row["base placement"]
        lines.append(
            f"| {row['scale']:g} | {row['sampler']} | {row['target']} | {row['stock']['all (LoRA)']}% | "
            f"{own['psnr_db']} dB, {own['all (LoRA)']}% | {other['psnr_db']} dB, {other['all (LoRA)']}% |"
        )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main

STAGES = {"train": train, "eval": evaluate, "keysteps": keysteps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_file = RESULTS / "lora-runs.json"
    for stage in STAGES if args.stage == "all" else (args.stage,):
        started = time.time()
        base.log(f"stage lora-{stage}")
        summary = STAGES[stage]()
        runs = json.loads(run_file.read_text()) if run_file.is_file() else {}
        runs[f"lora-{stage}"] = {
            "command": f"python training/train_lora.py --stage {stage} --threads {args.threads}",
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {args.threads} threads",
            **({"summary": summary} if stage == "train" else {}),
        }
        run_file.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
