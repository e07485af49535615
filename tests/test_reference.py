"""The shapes world, the trained reference model, its attribute classifier and the quality benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faster_diffusion import FasterDiffusionConfig, KeySteps, Sampler, reference
from faster_diffusion.app.cli import main
from faster_diffusion.app.loading import inspect_weights, load_pipeline
from faster_diffusion.reference import shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402

from benchmarks import harness  # noqa: E402

# ------------------------------------------------------------------------------------------------- shapes


def test_render_is_a_pure_function_of_scene_and_seed():
    scene = shapes.Scene("circle", "red", "small", "top left", "black")
    a, b, c = (np.asarray(shapes.render(scene, s)) for s in (3, 3, 4))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_render_puts_the_shape_where_the_caption_says():
    for position, (_, column, row) in shapes.POSITIONS.items():
        image = np.asarray(
            shapes.render(shapes.Scene("square", "blue", "small", position, "white"), 0), float
        )
        blue = (image[..., 2] - image[..., 0]) > 100  # blue pixels on a white background
        ys, xs = np.nonzero(blue)
        assert blue.sum() > 20
        assert abs(xs.mean() - (8 + 8 * column)) < 2.5 and abs(ys.mean() - (8 + 8 * row)) < 2.5, position


def test_captions():
    scene = shapes.Scene("triangle", "orange", "large", "bottom right", "gray")
    assert shapes.caption(scene) == "a large orange triangle at the bottom right on a gray background"
    assert shapes.caption(scene, drop=["size", "background"]) == "a orange triangle at the bottom right"
    with pytest.raises(ValueError, match="only size, position and background can be dropped"):
        shapes.caption(scene, drop=["colour"])
    with pytest.raises(ValueError, match="colour must be one of red, green"):
        shapes.Scene("circle", "pink", "small", "top", "black")
    with pytest.raises(ValueError, match="got 1 scenes but 2 seeds"):
        shapes.render_batch([scene], [1, 2])


def test_held_out_combinations_never_reach_training_but_every_value_does():
    held_out, train = set(shapes.HELD_OUT_COMBOS), set(shapes.TRAIN_COMBOS)
    assert len(held_out) == 80 and len(train) == 892 and not held_out & train
    for i, (name, values) in enumerate(shapes.ATTRIBUTES.items()):
        assert {combo[i] for combo in train} == set(values), name
    rng = np.random.default_rng(0)
    assert all(shapes.sample_scene(rng).combo in train for _ in range(500))


def test_every_vocabulary_word_is_one_token_and_captions_fit():
    tokenizer = reference.build_tokenizer()
    for word in shapes.VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = max((shapes.caption(shapes.Scene(*c)) for c in shapes.TRAIN_COMBOS), key=len)
    assert len(tokenizer(longest).input_ids) <= reference.TEXT_MAX_LENGTH
    assert reference.unknown_words("A red Cat, on a dog cat") == ["cat", "dog"]


# ----------------------------------------------------------------------------------------- the classifier


def test_classifier_reads_held_out_real_images_far_above_chance():
    classifier = reference.load_classifier()
    scenes = [shapes.Scene(*c) for c in shapes.HELD_OUT_COMBOS for _ in range(2)]
    images = torch.from_numpy(shapes.render_batch(scenes, [777_000 + i for i in range(len(scenes))]))
    predicted = classifier.predict(images).numpy()
    correct = predicted == np.array([s.labels() for s in scenes])
    for i, (name, values) in enumerate(shapes.ATTRIBUTES.items()):
        accuracy = correct[:, i].mean()
        assert accuracy >= 0.9, f"{name}: {accuracy:.2f} (chance {1 / len(values):.2f})"
    assert correct.all(axis=1).mean() >= 0.8  # chance: 1 in 972


def test_attribute_accuracy():
    labels = np.array([[0, 1, 0, 2, 1], [1, 2, 1, 3, 0]])
    predicted = labels.copy()
    predicted[1, 3] = 4  # one position wrong
    accuracy = reference.attribute_accuracy(predicted, labels)
    assert accuracy == {
        "shape": 1.0,
        "colour": 1.0,
        "size": 1.0,
        "position": 0.5,
        "background": 1.0,
        "all": 0.5,
    }
    with pytest.raises(ValueError, match=r"expected \(N, 5\) labels, got shape \(2, 3\)"):
        reference.attribute_accuracy(labels[:, :3], labels[:, :3])


def test_classifier_rejects_wrong_shapes_and_missing_files(tmp_path):
    classifier = reference.AttributeClassifier()
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        classifier.features(torch.zeros(2, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match=r"train it with `python training/train_reference\.py"):
        reference.load_classifier(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------- the model itself


@pytest.fixture(scope="module")
def reference_pipe():
    return load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)


def test_reference_model_is_a_complete_sd_style_weights_folder():
    folder = inspect_weights(reference.MODEL_DIR)
    assert folder.variant is None and not folder.has_safety_checker
    index = json.loads((reference.MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    weights = sorted(
        p.relative_to(reference.MODEL_DIR).as_posix() for p in reference.MODEL_DIR.rglob("*.safetensors")
    )
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert sum(p.stat().st_size for p in reference.MODEL_DIR.rglob("*")) < 20 * 2**20


@pytest.mark.parametrize("sampler", [Sampler.DDIM, Sampler.DPM_SOLVER])
def test_reference_model_renders_held_out_prompts_faithfully(reference_pipe, sampler):
    """Stock sampling of prompts training never saw: the classifier must read them back, mostly right."""
    result = harness.generate(
        reference_pipe,
        sampler,
        None,
        [shapes.caption(shapes.Scene(*c)) for c in shapes.HELD_OUT_COMBOS[::8]],
        list(range(10)),
        reference.GUIDANCE_SCALE,
        batch=10,
    )
    assert result.images.shape == (10, 3, 32, 32)
    labels = np.array([shapes.Scene(*c).labels() for c in shapes.HELD_OUT_COMBOS[::8]])
    predicted, _ = harness.classify(reference.load_classifier(), result.images)
    assert (predicted == labels).all(axis=1).mean() >= 0.8  # chance: 1 in 972; the first model got 0.6


def test_the_sd15_layout_model_is_a_complete_folder_with_sd15_s_block_layout():
    folder = reference.SD15_LAYOUT_MODEL_DIR
    assert inspect_weights(folder).variant is None
    unet = json.loads((folder / "unet" / "config.json").read_text())
    for key, value in reference.SD15_LAYOUT_UNET_CONFIG.items():
        assert unet[key] == (list(value) if isinstance(value, tuple) else value), key
    assert not any("_name_or_path" in json.loads(p.read_text()) for p in folder.glob("*/config.json"))
    assert sum(p.stat().st_size for p in folder.rglob("*")) < 20 * 2**20
    assert reference.guidance_scale(folder) == reference.SD15_LAYOUT_GUIDANCE_SCALE
    with pytest.raises(ValueError, match="is not a reference model folder"):
        reference.guidance_scale(folder.parent)


def test_the_sd15_layout_model_renders_held_out_prompts_faithfully():
    pipe = load_pipeline(reference.SD15_LAYOUT_MODEL_DIR, device="cpu", safety_checker=False)
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 2
    combos = shapes.HELD_OUT_COMBOS[::8]
    result = harness.generate(
        pipe,
        Sampler.DPM_SOLVER,
        None,
        [shapes.caption(shapes.Scene(*c)) for c in combos],
        list(range(10)),
        reference.SD15_LAYOUT_GUIDANCE_SCALE,
        batch=10,
    )
    assert result.images.shape == (10, 3, 32, 32)
    labels = np.array([shapes.Scene(*c).labels() for c in combos])
    predicted, _ = harness.classify(reference.load_classifier(), result.images)
    assert (predicted == labels).all(axis=1).mean() >= 0.7  # chance: 1 in 972


@pytest.mark.parametrize("key_steps", [None, "paper", "auto"], ids=["stock", "paper", "auto"])
def test_the_quick_start_prompt_renders_right_for_nine_of_seeds_0_to_9(reference_pipe, key_steps):
    """The README's first command, as a newcomer runs it (DDIM-50, the model's guidance scale), with each of
    seeds 0-9: the classifier reads all five attributes of the prompt off at least 9 of the 10 images, for
    the faster output and for the stock one that --compare shows beside it."""
    scene = shapes.Scene("circle", "red", "large", "top left", "white")
    assert shapes.caption(scene) == reference.EXAMPLE_PROMPT
    keys = None if key_steps is None else KeySteps.parse(key_steps)
    config = None if keys is None else FasterDiffusionConfig(key_steps=keys)  # encoder propagation
    result = harness.generate(
        reference_pipe,
        Sampler.DDIM,
        config,
        [reference.EXAMPLE_PROMPT] * 10,
        list(range(10)),
        reference.GUIDANCE_SCALE,
        batch=10,
    )
    predicted, _ = harness.classify(reference.load_classifier(), result.images)
    right = (predicted == np.array(scene.labels())).all(axis=1)
    assert right.sum() >= 9, f"right for seeds {np.flatnonzero(right).tolist()}"


def test_cli_uses_the_reference_model_without_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    prompt = "a large blue square in the center on a white background"
    assert main([prompt, "--out", str(tmp_path / "out"), "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "Using the built-in reference model" in out and "Warning" not in out
    assert f"guidance {reference.GUIDANCE_SCALE}" in out
    image = np.asarray(Image.open(tmp_path / "out" / "faster-0.png"), float)
    assert image.shape == (32, 32, 3)
    # A blue square in the middle of a white image.
    assert image[14:18, 14:18, 2].mean() - image[14:18, 14:18, 0].mean() > 80
    assert image[:3, :3].mean() > 180


def test_cli_warns_about_words_the_reference_model_does_not_know(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    assert main(["a photo of a cat", "--out", str(tmp_path / "out"), "--steps", "4"]) == 0
    assert "the reference model was never trained on 'photo', 'cat'" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- benchmark


def test_frechet_distance_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert quality.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # Same covariance, mean shifted by (1, 2, 0): distance |shift|^2 = 5.
    assert quality.frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    # N(0, I) against N(0, 4I) in 3-D: 3 * (1 + 4 - 2 * 2) = 3.
    assert quality.frechet_distance(a, 2 * rng.normal(size=(4000, 3))) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="same D"):
        quality.frechet_distance(a, a[:, :2])
    images = rng.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    assert np.isinf(harness.psnr(images, images)).all()
    assert quality.ssim(images, images) == pytest.approx([1.0, 1.0])
    # A constant offset d has MSE d^2: PSNR = 10 log10(2^2 / d^2).
    assert harness.psnr(images * 0.5, images * 0.5 + 0.02) == pytest.approx([10 * np.log10(4 / 0.02**2)] * 2)
    assert quality.ssim(images, -images).max() < 0  # anti-correlated structure
    light, heavy = (np.clip(images + rng.normal(scale=s, size=images.shape), -1, 1) for s in (0.1, 0.5))
    assert (quality.ssim(images, heavy) < quality.ssim(images, light)).all()
    assert (quality.ssim(images, light) < 1).all()


def test_kernel_distance_by_hand():
    # Rows in 1-d, kernel (x y + 1)^3. a = (0, 1): k(0, 1) = 1. b = (1, 2): k(1, 2) = 27.
    # Across: k(0, 1) = 1, k(0, 2) = 1, k(1, 1) = 8, k(1, 2) = 27, mean 37 / 4.
    a, b = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert quality.kernel_distance(a, b) == pytest.approx(1 + 27 - 2 * 37 / 4)
    # 2-d: x . y / 2 + 1. a = (1, 1), (1, -1): k = (0 + 1)^3 = 1; b = (2, 0), (0, 0): k = 1;
    # across: (1 + 1)^3 = 8, 1, 8, 1, mean 4.5.
    a, b = np.array([[1.0, 1.0], [1.0, -1.0]]), np.array([[2.0, 0.0], [0.0, 0.0]])
    assert quality.kernel_distance(a, b) == pytest.approx(1 + 1 - 2 * 4.5)
    with pytest.raises(ValueError, match="same D"):
        quality.kernel_distance(a, a[:, :1])


def test_kernel_distance_is_unbiased_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(0)
    same = [quality.kernel_distance(rng.normal(size=(300, 8)), rng.normal(size=(400, 8))) for _ in range(40)]
    # Unbiased: values of two samples of one Gaussian scatter around 0, below it too; the biased
    # V-statistic (diagonal terms kept) would be positive every time.
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    b = rng.normal(size=(2000, 8))
    near = quality.kernel_distance(rng.normal(size=(2000, 8)), b)
    shifts = [
        quality.kernel_distance(rng.normal(size=(2000, 8)) + np.eye(8)[0] * s, b) for s in (0.5, 1.0, 2.0)
    ]
    assert abs(near) < 0.1 * shifts[0]
    assert 0 < shifts[0] < shifts[1] < shifts[2]


def test_kernel_distance_half_sample_interval_contains_the_estimate():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(120, 8)) + 0.3, rng.normal(size=(160, 8))
    halves = list(zip(quality.half_samples(rng, 120, 200), quality.half_samples(rng, 160, 200), strict=True))
    values = quality.half_kernel_distances(a, b, halves)
    h, r = halves[0]
    assert values[0] == pytest.approx(quality.kernel_distance(a[h], b[r]))
    point = quality.kernel_distance(a, b)
    low, high = quality.recentred_interval(point, values)
    assert low < point < high and low > 0  # a shift of 0.3 in every dimension is seen


def test_half_sample_interval_of_a_mean_is_as_wide_as_its_sampling_interval():
    """Halves of a fixed sample vary about it as much as the full sample's mean varies (finite-population
    correction): the interval must be about 2 x 1.96 sigma / sqrt(n) wide, not sqrt(1/2) of that."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    halves = quality.half_samples(rng, len(x), 4000)
    low, high = quality.recentred_interval(x.mean(), np.array([x[h].mean() for h in halves]))
    assert low < x.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.1)


def test_reversed_paper_key_steps():
    assert harness.methods.reversed_paper_key_steps(50) == (0, 15, 25, 35, 40, 45, 47, 48, 49)
    assert harness.methods.reversed_paper_key_steps(20) == (0, 5, 10, 15, 17, 18, 19)


def test_quality_benchmark_quick_run_writes_a_report(tmp_path):
    out = tmp_path / "quality.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    for sampler in ("DDIM-50", "DPM-Solver-20"):
        assert f"## {sampler}" in report
    assert "| paper | 0, 1, 2, 3, 5, 10, 15, 25, 35 | 9 / 50 |" in report
    assert "| paper reversed | 0, 5, 10, 15, 17, 18, 19 | 7 / 20 |" in report
    assert "| Fréchet distance | Δ vs stock | KID (x 1e-06) | Δ vs stock |" in report
    assert "real sets (the floor), Fréchet distance " in report and ", KID " in report
    # Every row has its KID: 14 cells (the stock row's Δ cells are empty), and a signed Δ with an interval.
    rows = [line for line in report.splitlines() if line.startswith("| paper")]
    assert len(rows) == 4 and all(len(line.split("|")) == 16 for line in rows)
    assert all(line.split("|")[12].strip()[0] in "+-" for line in rows)
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]["DDIM-50"]) == {"stock", "paper", "paper reversed"}
    assert len(data["kid_floor"]) == 3 and len(data["results"]["DDIM-50"]["paper"]["kid_delta_ci"]) == 2
    for name in ("feature-change.png", "samples-ddim.png", "samples-dpm_solver.png"):
        assert (tmp_path / f"quality-{name}").stat().st_size > 1000
