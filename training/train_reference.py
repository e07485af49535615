"""Train the reference model (faster_diffusion/reference/assets/shapes-ldm) and its attribute classifier, on
the CPU.

    python training/train_reference.py                    # all three stages, in order
    python training/train_reference.py --stage unet       # one stage (the later ones read the earlier output)
    python training/train_reference.py --layout sd15      # the second model, with SD v1.5's UNet layout

Stages:
  vae         AutoencoderKL, 32x32x3 images <-> 8x8x4 latents (reconstruction + a small KL term); its
              ``scaling_factor`` is set to 1 / std of the training latents, as SD does.
  text        CLIPTextModel, pretrained on captions alone: heads on its pooled output read each attribute
              (or "not said") back off the caption, so that every attribute, "top left" against
              "top right" included, is a distinct direction of the text embedding. Stands in for the
              pretrained CLIP text encoder of Stable Diffusion.
  unet        UNet2DConditionModel, trained with the DDPM objective (epsilon prediction, SD v1.5's beta
              schedule, min-SNR-5 weighting) on the frozen text encoder's output, as SD trains its UNet
              on a frozen CLIP; 10% empty captions for classifier-free guidance, an EMA copy of the
              weights (decay 0.999) that is what gets saved.
  classifier  AttributeClassifier on rendered images (with noise augmentation); scored on held-out scenes.
  guidance    The classifier-free guidance scale for the command line: stock DDIM-50 at a few scales on
              prompts of training combinations, scored by the classifier (reference.GUIDANCE_SCALE).

``--layout sd15`` trains the second reference model (reference.SD15_LAYOUT_MODEL_DIR): SD v1.5's UNet layout
at 16x16 latents, with a VAE of its own (32x32x3 images <-> 16x16x4 latents). Its ``text`` stage copies the
first model's text encoder (the same frozen encoder, as SD versions share CLIP), and it uses the first model's
classifier (the same images); its checkpoints and results go to sd15/ subfolders.

Every stage is deterministic for a given torch version and thread count (``--threads``, default 2; runs.json
records each stage's): data come from fixed seeds and torch is seeded at the start of each stage. The vae,
text, unet and classifier stages save a checkpoint (weights, optimizer, data stream and random number
generator states) to training/work/ every few hundred steps; a stage started again resumes from it and ends
with the same weights as an uninterrupted run (``--fresh`` ignores it). Logs, the loss curve and sample
grids go to training/results/.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faster_diffusion import Sampler, reference, use_sampler  # noqa: E402
from faster_diffusion.reference import shapes  # noqa: E402
from faster_diffusion.reference.components import SD15_SCHEDULER_CONFIG, write_vocab_files  # noqa: E402

RESULTS = ROOT / "training" / "results"
WORK = ROOT / "training" / "work"  # checkpoints and snapshots during training; not committed
FRESH = False  # --fresh: ignore saved checkpoints

VAE_STEPS = 1500
VAE_BATCH = 64
VAE_LR = 1e-3
VAE_KL_WEIGHT = 1e-5

UNET_STEPS = 8000
UNET_BATCH = 64
UNET_LR = 6e-4
UNET_WARMUP = 500
UNET_DATASET = 64000
EMA_DECAY = 0.999
CAPTION_DROPOUT = 0.1  # empty caption, for classifier-free guidance
ATTRIBUTE_DROPOUT = 0.15  # each of size, position, background left out of the caption
MIN_SNR_GAMMA = 5.0
SNAPSHOT_EVERY = 2000  # a sample-ready pipeline folder in training/work/snapshot
CHECKPOINT_EVERY = 250  # training state to resume from

TEXT_STEPS = 1500
TEXT_BATCH = 256
TEXT_LR = 2e-3

CLASSIFIER_STEPS = 3000
CLASSIFIER_BATCH = 128
CLASSIFIER_LR = 2e-3

#: What differs for the SD v1.5-layout model (--layout sd15): its UNet costs about 6x as much a step, so it
#: trains on smaller batches for fewer steps, from a smaller encoded dataset.
SD15_LAYOUT = {"UNET_STEPS": 5000, "UNET_BATCH": 32, "UNET_DATASET": 32000, "UNET_WARMUP": 300}

# Seeds of the data streams (kept apart so stages never see each other's images).
VAE_DATA_SEED = 1
UNET_DATA_SEED = 2
CLASSIFIER_DATA_SEED = 3
TEXT_DATA_SEED = 5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 1e-2 * peak + (peak - 1e-2 * peak) * 0.5 * (1 + math.cos(math.pi * progress))


def random_scenes(rng: np.random.Generator, count: int, combos=shapes.TRAIN_COMBOS):
    scenes = [shapes.sample_scene(rng, combos) for _ in range(count)]
    seeds = rng.integers(0, 2**31 - 1, size=count)
    return scenes, seeds


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 3) -> None:
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * (w + 2), rows * (h + 2)), (255, 255, 255))
    pixels = ((images.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i, image in enumerate(pixels):
        grid.paste(Image.fromarray(image), ((i % columns) * (w + 2), (i // columns) * (h + 2)))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


class Checkpoint:
    """The training state of one stage in ``training/work/{stage}-checkpoint.pt``, to resume from.

    It holds the step, the state of every module and optimizer, the loss history, and the states of the
    stage's numpy data stream and of torch's random number generator, so a resumed stage continues exactly
    where it stopped: the weights at the end are those of an uninterrupted run (same torch, same threads).
    ``settings`` (the stage's hyperparameters) must match, or the checkpoint is ignored.
    """

    def __init__(self, stage: str, settings: dict, every: int = CHECKPOINT_EVERY) -> None:
        self.path = WORK / f"{stage}-checkpoint.pt"
        self.settings = json.loads(json.dumps(settings))
        self.every = every

    def resume(self, objects: dict, rng: np.random.Generator, fresh: bool = False) -> tuple[int, list]:
        """Load the saved state into ``objects`` (modules, optimizers) and ``rng``: (step, history)."""
        if fresh or not self.path.is_file():
            return 0, []
        saved = torch.load(self.path, weights_only=False)
        if saved["settings"] != self.settings:
            log(f"{self.path.name}: saved with other settings, starting afresh")
            return 0, []
        for name, obj in objects.items():
            obj.load_state_dict(saved["state"][name])
        rng.bit_generator.state = saved["numpy_rng"]
        torch.set_rng_state(saved["torch_rng"])
        log(f"resuming from {self.path.name} at step {saved['step']}")
        return saved["step"], saved["history"]

    def maybe_save(self, step: int, objects: dict, rng: np.random.Generator, history: list) -> None:
        """Save after ``step`` steps if it is a multiple of ``every`` (written to a temporary file first)."""
        if step % self.every:
            return
        state = {
            "settings": self.settings,
            "step": step,
            "state": {name: obj.state_dict() for name, obj in objects.items()},
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": history,
        }
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- vae


def train_vae(out: Path) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    rng = np.random.default_rng(VAE_DATA_SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    checkpoint = Checkpoint(
        "vae", {"steps": VAE_STEPS, "batch": VAE_BATCH, "lr": VAE_LR, "kl": VAE_KL_WEIGHT}
    )
    state = {"vae": vae, "optimizer": optimizer}
    first, history = checkpoint.resume(state, rng, FRESH)
    start = time.perf_counter()
    for step in range(first, VAE_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, VAE_STEPS, VAE_LR, 100)
        scenes, seeds = random_scenes(rng, VAE_BATCH)
        x = torch.from_numpy(shapes.render_batch(scenes, seeds))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + VAE_KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step, "mse": mse.item(), "kl": kl.item()})
        if step % 100 == 0 or step == VAE_STEPS - 1:
            log(f"vae step {step}: mse {mse.item():.5f} kl {kl.item():.2f}")
        checkpoint.maybe_save(step + 1, state, rng, history)
    vae.eval()
    # SD's scaling_factor: 1 / std of the latents, so the UNet sees unit-variance inputs.
    eval_rng = np.random.default_rng(100)
    scenes, seeds = random_scenes(eval_rng, 2048)
    x = torch.from_numpy(shapes.render_batch(scenes, seeds))
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(256)])
        recon = torch.cat([vae.decode(chunk).sample for chunk in latents.split(256)])
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    psnr = (10 * torch.log10(4.0 / ((recon - x) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    vae.save_pretrained(out / "vae", safe_serialization=True)
    save_grid(np.concatenate([x[:16].numpy(), recon[:16].clamp(-1, 1).numpy()]), RESULTS / "vae-recon.png")
    summary = {
        "steps": VAE_STEPS,
        "seconds": time.perf_counter() - start,
        "scaling_factor": scaling,
        "latent_mean": latents.mean().item(),
        "recon_psnr_db": psnr,
    }
    (RESULTS / "vae-log.json").write_text(json.dumps({"summary": summary, "history": history}))
    checkpoint.clear()
    log(f"vae done: {summary}")
    return summary


# -------------------------------------------------------------------------------------------------- unet


def encode_scenes(vae, scenes: list[shapes.Scene], seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and standard deviation of each scene, rendered with its seed (512 at a time)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 512):
            x = torch.from_numpy(shapes.render_batch(scenes[i : i + 512], seeds[i : i + 512]))
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _encode_dataset(vae, rng: np.random.Generator) -> tuple[list[shapes.Scene], torch.Tensor, torch.Tensor]:
    scenes, seeds = random_scenes(rng, UNET_DATASET)
    return scenes, *encode_scenes(vae, scenes, seeds)


def _caption_batch(rng: np.random.Generator, scenes: list[shapes.Scene]) -> list[str]:
    captions = []
    for scene in scenes:
        if rng.random() < CAPTION_DROPOUT:
            captions.append("")
            continue
        drop = [name for name in ("size", "position", "background") if rng.random() < ATTRIBUTE_DROPOUT]
        captions.append(shapes.caption(scene, drop=drop))
    return captions


def _build_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_pipeline(pipe, folder: Path) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    for config in folder.glob("*/config.json"):  # a component loaded from disk records this machine's path
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_vocab_files(folder / "tokenizer", shapes.VOCABULARY)


def _sample_grid(pipe, path: Path, guidance: float = 5.0) -> None:
    rng = np.random.default_rng(7)
    scenes = [shapes.Scene(*shapes.HELD_OUT_COMBOS[int(i)]) for i in rng.permutation(80)[:16]]
    prompts = [shapes.caption(s) for s in scenes]
    use_sampler(pipe, Sampler.DDIM)  # the pipeline has been saved already; its scheduler can change
    images = pipe(
        prompts,
        num_inference_steps=50,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    real = shapes.render_batch(scenes, list(range(16)))
    save_grid(np.concatenate([real, images.transpose(0, 3, 1, 2) * 2 - 1]), path)


def denoising_loss(unet, text_encoder, tokenizer, noise_scheduler, latents, captions, loss_weight):
    """The UNet's training loss on one batch: epsilon prediction at random timesteps, each sample's squared
    error weighted by ``loss_weight`` at its timestep (min-SNR); the text encoder is frozen. Returns the loss
    and the per-sample errors (for the log). The reference models and the LoRA train with it."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=reference.TEXT_MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    pred = unet(noisy, timesteps, hidden).sample
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    return (per_sample * loss_weight[timesteps]).mean(), per_sample


def train_unet(out: Path) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    text_encoder.requires_grad_(False)  # frozen, as SD keeps CLIP frozen
    torch.manual_seed(0)
    rng = np.random.default_rng(UNET_DATA_SEED)
    tokenizer = reference.build_tokenizer()
    unet = UNet2DConditionModel(**UNET_CONFIG)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params")
    start = time.perf_counter()
    scenes, latent_mean, latent_std = _encode_dataset(vae, rng)
    log(f"encoded {UNET_DATASET} training images in {time.perf_counter() - start:.0f} s")
    scaling = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    loss_weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # min-SNR-gamma for epsilon prediction

    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=1e-2)
    ema_unet = copy.deepcopy(unet).eval()
    ema_params = list(ema_unet.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    unet.train()
    checkpoint = Checkpoint(
        "unet",
        {
            "config": UNET_CONFIG,
            "steps": UNET_STEPS,
            "batch": UNET_BATCH,
            "lr": UNET_LR,
            "warmup": UNET_WARMUP,
            "dataset": UNET_DATASET,
            "ema": EMA_DECAY,
            "dropout": [CAPTION_DROPOUT, ATTRIBUTE_DROPOUT],
            "min_snr": MIN_SNR_GAMMA,
        },
    )
    state = {"unet": unet, "ema_unet": ema_unet, "optimizer": optimizer}
    first, history = checkpoint.resume(state, rng, FRESH)
    for step in range(first, UNET_STEPS):
        lr = cosine_lr(step, UNET_STEPS, UNET_LR, UNET_WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.from_numpy(rng.integers(0, UNET_DATASET, size=UNET_BATCH))
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_std[index])) * scaling
        captions = _caption_batch(rng, [scenes[i] for i in index.tolist()])
        loss, per_sample = denoising_loss(
            unet, text_encoder, tokenizer, noise_scheduler, latents, captions, loss_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        history.append({"step": step, "loss": loss.item(), "mse": per_sample.mean().item(), "lr": lr})
        if step % 100 == 0 or step == UNET_STEPS - 1:
            recent = history[-100:]
            log(
                f"unet step {step}: loss {np.mean([h['loss'] for h in recent]):.4f} "
                f"mse {np.mean([h['mse'] for h in recent]):.4f} lr {lr:.2e} "
                f"({time.perf_counter() - start:.0f} s)"
            )
        checkpoint.maybe_save(step + 1, state, rng, history)
        if (step + 1) % SNAPSHOT_EVERY == 0 and step + 1 < UNET_STEPS:
            pipe = _build_pipeline(ema_unet, vae, text_encoder, tokenizer)
            _save_pipeline(pipe, WORK / "snapshot")
            (RESULTS / "unet-log.json").write_text(json.dumps({"history": history}))
            log(f"snapshot at step {step + 1} in {WORK / 'snapshot'}")
    pipe = _build_pipeline(ema_unet, vae, text_encoder, tokenizer)
    _save_pipeline(pipe, out)
    summary = {"steps": UNET_STEPS, "seconds": time.perf_counter() - start, "resumed_at": first or None}
    (RESULTS / "unet-log.json").write_text(json.dumps({"summary": summary, "history": history}))
    checkpoint.clear()
    _sample_grid(pipe, RESULTS / "samples.png")
    log(f"unet done: {summary}")
    return summary


# -------------------------------------------------------------------------------------------------- text

TEXT_DROPPABLE = ("size", "position", "background")


def caption_variants(combos) -> list[tuple[str, tuple[int, ...]]]:
    """Every caption of ``combos``, with each subset of size, position and background left out, and the
    empty caption; each with its labels: the class index of each attribute, ``len(values)`` for "not said"."""
    names = list(shapes.ATTRIBUTES)
    variants = []
    for combo in combos:
        scene = shapes.Scene(*combo)
        labels = scene.labels()
        for count in range(len(TEXT_DROPPABLE) + 1):
            for drop in itertools.combinations(TEXT_DROPPABLE, count):
                said = tuple(
                    len(shapes.ATTRIBUTES[name]) if name in drop else labels[i]
                    for i, name in enumerate(names)
                )
                variants.append((shapes.caption(scene, drop=drop), said))
    variants.append(("", tuple(len(values) for values in shapes.ATTRIBUTES.values())))
    return variants


def train_text(out: Path) -> dict:
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    rng = np.random.default_rng(TEXT_DATA_SEED)
    tokenizer = reference.build_tokenizer()
    text_encoder = CLIPTextModel(reference.text_encoder_config(tokenizer))
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict(
        {name: torch.nn.Linear(width, len(values) + 1) for name, values in shapes.ATTRIBUTES.items()}
    )

    def encode(captions):
        ids = tokenizer(
            captions, padding="max_length", max_length=reference.TEXT_MAX_LENGTH, return_tensors="pt"
        ).input_ids
        return text_encoder(ids).pooler_output

    train = caption_variants(shapes.TRAIN_COMBOS)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=TEXT_LR, weight_decay=1e-2)
    checkpoint = Checkpoint("text", {"steps": TEXT_STEPS, "batch": TEXT_BATCH, "lr": TEXT_LR})
    state = {"text_encoder": text_encoder, "heads": heads, "optimizer": optimizer}
    first, history = checkpoint.resume(state, rng, FRESH)
    start = time.perf_counter()
    text_encoder.train()
    for step in range(first, TEXT_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, TEXT_STEPS, TEXT_LR, 100)
        batch = [train[int(i)] for i in rng.integers(0, len(train), size=TEXT_BATCH)]
        pooled = encode([caption for caption, _ in batch])
        labels = torch.tensor([said for _, said in batch])
        loss = sum(
            F.cross_entropy(heads[name](pooled), labels[:, i]) for i, name in enumerate(shapes.ATTRIBUTES)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
        if step % 100 == 0 or step == TEXT_STEPS - 1:
            log(f"text step {step}: loss {loss.item():.4f}")
        checkpoint.maybe_save(step + 1, state, rng, history)
    text_encoder.eval()
    # Captions of the held-out combinations: never seen here either.
    held_out = caption_variants(shapes.HELD_OUT_COMBOS)
    with torch.no_grad():
        pooled = torch.cat(
            [encode([c for c, _ in held_out[i : i + 512]]) for i in range(0, len(held_out), 512)]
        )
    labels = torch.tensor([said for _, said in held_out])
    accuracy = {
        name: float((heads[name](pooled).argmax(1) == labels[:, i]).float().mean())
        for i, name in enumerate(shapes.ATTRIBUTES)
    }
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    summary = {
        "steps": TEXT_STEPS,
        "seconds": time.perf_counter() - start,
        "held_out_caption_accuracy": accuracy,
    }
    (RESULTS / "text-log.json").write_text(json.dumps({"summary": summary, "history": history}))
    checkpoint.clear()
    log(f"text done: {summary}")
    return summary


# -------------------------------------------------------------------------------------------- classifier


def _labels(scenes: list[shapes.Scene]) -> torch.Tensor:
    return torch.tensor([scene.labels() for scene in scenes])


def classifier_accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predicted = torch.cat([model.predict(chunk) for chunk in images.split(512)])
    return reference.attribute_accuracy(predicted.numpy(), labels.numpy())


def held_out_real(count_per_combo: int = 4, seed: int = 10_000) -> tuple[list[shapes.Scene], torch.Tensor]:
    scenes = [shapes.Scene(*combo) for combo in shapes.HELD_OUT_COMBOS for _ in range(count_per_combo)]
    seeds = [seed + i for i in range(len(scenes))]
    return scenes, torch.from_numpy(shapes.render_batch(scenes, seeds))


def train_classifier() -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rng = np.random.default_rng(CLASSIFIER_DATA_SEED)
    model = reference.AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLASSIFIER_LR, weight_decay=1e-2)
    checkpoint = Checkpoint(
        "classifier", {"steps": CLASSIFIER_STEPS, "batch": CLASSIFIER_BATCH, "lr": CLASSIFIER_LR}
    )
    state = {"classifier": model, "optimizer": optimizer}
    first, history = checkpoint.resume(state, rng, FRESH)
    start = time.perf_counter()
    for step in range(first, CLASSIFIER_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, CLASSIFIER_STEPS, CLASSIFIER_LR, 100)
        scenes, seeds = random_scenes(rng, CLASSIFIER_BATCH)
        x = torch.from_numpy(shapes.render_batch(scenes, seeds))
        # Robust to what samplers leave behind: additive noise of random strength.
        x = x + torch.randn_like(x) * torch.rand(len(x), 1, 1, 1) * 0.2
        logits = model(x)
        labels = _labels(scenes)
        loss = sum(F.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(shapes.ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
        if step % 200 == 0 or step == CLASSIFIER_STEPS - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
        checkpoint.maybe_save(step + 1, state, rng, history)
    model.eval()
    scenes, images = held_out_real()
    accuracy = classifier_accuracy(model, images, _labels(scenes))
    save_file(model.state_dict(), reference.CLASSIFIER_PATH)
    summary = {
        "steps": CLASSIFIER_STEPS,
        "seconds": time.perf_counter() - start,
        "held_out_accuracy": accuracy,
    }
    (RESULTS / "classifier-log.json").write_text(json.dumps({"summary": summary, "history": history}))
    checkpoint.clear()
    log(f"classifier done: {summary}")
    return summary


# ---------------------------------------------------------------------------------------------- guidance

GUIDANCE_CANDIDATES = (1.0, 3.0, 5.0, 7.5, 10.0)
GUIDANCE_PROMPTS = 160


def choose_guidance(out: Path) -> dict:
    """Stock DDIM-50 at each candidate guidance scale, on prompts of *training* combinations (the quality
    benchmark's held-out prompts are not used), scored by the classifier; the best scale wins."""
    from faster_diffusion.app.loading import load_pipeline

    pipe = load_pipeline(out, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, Sampler.DDIM)
    classifier = reference.load_classifier()
    rng = np.random.default_rng(4)
    scenes = [shapes.sample_scene(rng) for _ in range(GUIDANCE_PROMPTS)]
    labels = _labels(scenes)
    scores = {}
    for guidance in GUIDANCE_CANDIDATES:
        generators = [torch.Generator().manual_seed(i) for i in range(len(scenes))]
        with torch.inference_mode():
            images = pipe(
                [shapes.caption(s) for s in scenes],
                num_inference_steps=50,
                guidance_scale=guidance,
                generator=generators,
                output_type="np",
            ).images
        x = torch.from_numpy(images.transpose(0, 3, 1, 2) * 2 - 1).float()
        scores[guidance] = classifier_accuracy(classifier, x, labels)
        log(f"guidance {guidance}: {scores[guidance]}")
    best = max(GUIDANCE_CANDIDATES, key=lambda g: scores[g]["all"])
    summary = {"candidates": {str(g): scores[g] for g in GUIDANCE_CANDIDATES}, "best": best}
    log(f"best guidance scale: {best}")
    return summary


# ------------------------------------------------------------------------------------------------- report


def plot_losses() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (name, key, title)
        for name, key, title in [
            ("vae", "mse", "VAE reconstruction MSE"),
            ("text", "loss", "Text encoder pretraining loss (5 heads)"),
            ("unet", "loss", "UNet loss (min-SNR-5 weighted)"),
            ("classifier", "loss", "Classifier loss (sum of 5 heads)"),
        ]
        if (RESULTS / f"{name}-log.json").is_file()  # stages copied from the first model have no log
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.25 * len(panels), 3.6), squeeze=False)
    for ax, (name, key, title) in zip(axes[0], panels, strict=True):
        path = RESULTS / f"{name}-log.json"
        history = json.loads(path.read_text())["history"]
        values = np.array([h[key] for h in history])
        window = max(1, len(values) // 100)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(values, color="0.8", linewidth=0.5, label="per step")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, color="C0", label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "loss.png", dpi=110)


STAGES = ("vae", "text", "unet", "classifier", "guidance")

UNET_CONFIG = reference.UNET_CONFIG
VAE_CONFIG = reference.VAE_CONFIG


def copy_text_encoder(out: Path) -> dict:
    """The SD v1.5-layout model's text stage: the first model's text encoder, unchanged."""
    import shutil

    shutil.copytree(reference.MODEL_DIR / "text_encoder", out / "text_encoder", dirs_exist_ok=True)
    return {"copied_from": str((reference.MODEL_DIR / "text_encoder").relative_to(ROOT))}


def use_layout(layout: str) -> Path:
    """Point the stages at ``layout``'s configs, settings and folders; returns its model folder."""
    global RESULTS, WORK, UNET_CONFIG, VAE_CONFIG
    if layout == "shapes-ldm":
        return reference.MODEL_DIR
    RESULTS = RESULTS / "sd15"
    WORK = WORK / "sd15"
    UNET_CONFIG = reference.SD15_LAYOUT_UNET_CONFIG
    VAE_CONFIG = reference.SD15_LAYOUT_VAE_CONFIG
    globals().update(SD15_LAYOUT)
    return reference.SD15_LAYOUT_MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument(
        "--layout",
        choices=("shapes-ldm", "sd15"),
        default="shapes-ldm",
        help="which reference model: the first (3 levels, 8x8 latents) or SD v1.5's layout (4 levels, 16x16)",
    )
    parser.add_argument("--out", type=Path, help="the model folder to write (default: the layout's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--fresh", action="store_true", help="ignore saved checkpoints in training/work/")
    args = parser.parse_args(argv)
    global FRESH
    FRESH = args.fresh
    default_out = use_layout(args.layout)
    args.out = args.out or default_out
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.layout == "sd15":
        # The classifier is the first model's: the same 32x32 images.
        stages = tuple(stage for stage in stages if stage != "classifier")
    run_file = RESULTS / "runs.json"
    runs = json.loads(run_file.read_text()) if run_file.is_file() else {}
    for stage in stages:
        started = time.time()
        log(f"stage {stage}")
        summary = {
            "vae": lambda: train_vae(args.out),
            "text": lambda: (
                train_text(args.out) if args.layout == "shapes-ldm" else copy_text_encoder(args.out)
            ),
            "unet": lambda: train_unet(args.out),
            "classifier": train_classifier,
            "guidance": lambda: choose_guidance(args.out),
        }[stage]()
        runs[stage] = {
            "command": f"python training/train_reference.py --stage {stage} --threads {args.threads}"
            + ("" if args.layout == "shapes-ldm" else f" --layout {args.layout}")
            + ("" if args.out == default_out else f" --out {args.out}"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {args.threads} threads",
            **summary,
        }
        run_file.write_text(json.dumps(runs, indent=2))
        plot_losses()
    return 0


if __name__ == "__main__":
    sys.exit(main())
