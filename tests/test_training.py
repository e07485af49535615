"""The reference model's training script: resuming from a checkpoint, and the text encoder's captions."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from faster_diffusion import reference
from faster_diffusion.reference import shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_reference", ROOT / "training" / "train_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toy_run(train, checkpoint, steps: range, state=None):
    """A few steps of a toy training loop with the shape of the real ones: a data stream from a numpy
    generator, torch noise, AdamW. Returns the objects, to resume or compare."""
    if state is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
        state = {
            "model": model,
            "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2),
            "rng": np.random.default_rng(1),
        }
    objects = {"model": state["model"], "optimizer": state["optimizer"]}
    first, history = checkpoint.resume(objects, state["rng"]) if steps.start else (0, [])
    assert first == steps.start
    for step in steps:
        x = torch.from_numpy(state["rng"].normal(size=(16, 4))).float() + torch.randn(16, 4)
        loss = state["model"](x).pow(2).mean()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        history.append(loss.item())
        checkpoint.maybe_save(step + 1, objects, state["rng"], history)
    return state, history


def test_a_resumed_stage_ends_with_the_weights_of_an_uninterrupted_one(train, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "WORK", tmp_path)
    straight, straight_history = _toy_run(train, train.Checkpoint("toy", {"lr": 1e-2}, every=5), range(20))

    (tmp_path / "toy-checkpoint.pt").unlink()
    _toy_run(train, train.Checkpoint("toy", {"lr": 1e-2}, every=5), range(12))  # interrupted after 12
    assert torch.load(tmp_path / "toy-checkpoint.pt", weights_only=False)["step"] == 10
    # A new process: fresh objects (other random state), resumed from the checkpoint of step 10.
    torch.manual_seed(123)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    fresh = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2)}
    fresh["rng"] = np.random.default_rng(99)
    resumed, resumed_history = _toy_run(
        train, train.Checkpoint("toy", {"lr": 1e-2}, every=5), range(10, 20), fresh
    )
    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_history == straight_history


def test_a_checkpoint_of_other_settings_is_not_resumed(train, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "WORK", tmp_path)
    _toy_run(train, train.Checkpoint("toy", {"lr": 1e-2}, every=5), range(10))
    model = torch.nn.Linear(4, 1)
    objects = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    rng = np.random.default_rng(0)
    assert train.Checkpoint("toy", {"lr": 2e-2}).resume(objects, rng) == (0, [])
    assert train.Checkpoint("toy", {"lr": 1e-2}).resume(objects, rng, fresh=True) == (0, [])


def test_caption_variants_label_what_the_caption_leaves_out(train):
    variants = train.caption_variants(shapes.TRAIN_COMBOS[:2])
    assert len(variants) == 2 * 8 + 1  # each subset of size, position, background left out; the empty one
    by_caption = dict(variants)
    scene = shapes.Scene(*shapes.TRAIN_COMBOS[0])
    not_said = tuple(len(values) for values in shapes.ATTRIBUTES.values())
    assert by_caption[shapes.caption(scene)] == scene.labels()
    short = shapes.caption(scene, drop=["size", "position", "background"])
    assert by_caption[short] == (*scene.labels()[:2], not_said[2], not_said[3], not_said[4])
    assert by_caption[""] == not_said


def test_the_reference_text_encoder_tells_every_position_apart():
    """The text encoder's output separates the nine positions, "top left" against "top right" included,
    for captions of every combination (the old jointly trained encoder got 65% here, and its model put
    shapes in the wrong column of the top and bottom rows)."""
    from transformers import CLIPTextModel

    tokenizer = reference.build_tokenizer()
    encoder = CLIPTextModel.from_pretrained(reference.MODEL_DIR / "text_encoder").eval()
    combos = list(itertools.product(*shapes.ATTRIBUTES.values()))
    ids = tokenizer(
        [shapes.caption(shapes.Scene(*c)) for c in combos],
        padding="max_length",
        max_length=reference.TEXT_MAX_LENGTH,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        pooled = encoder(ids).pooler_output.numpy()
    position = np.array([shapes.Scene(*c).labels()[3] for c in combos])
    centres = np.stack([pooled[position == p].mean(0) for p in range(9)])
    nearest = ((pooled[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == position).mean() >= 0.95


def _calibrate_reference():
    spec = importlib.util.spec_from_file_location(
        "calibrate_reference", ROOT / "training" / "calibrate_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--no-such-flag"], ["--target", "nowhere"], ["--model", "/no/such/model"]],
    ids=["help", "unknown-flag", "bad-target", "bad-model"],
)
def test_calibrate_reference_parses_its_flags_before_it_writes_anything(argv, monkeypatch):
    """``--help`` and a bad flag stop before the model loads: the shipped calibration file stays as it is."""
    script = _calibrate_reference()
    shipped = reference.MODEL_DIR / "faster_diffusion_calibration.json"
    before = shipped.read_bytes()

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(script, "load_pipeline", never)
    monkeypatch.setattr(script, "replace_target", never)
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == (0 if argv == ["--help"] else 2)
    assert shipped.read_bytes() == before


def test_calibrate_reference_takes_its_rank_correlation_from_the_package_not_a_benchmark():
    from faster_diffusion.calibration import spearman

    script = _calibrate_reference()
    assert script.spearman is spearman
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 2.0], [5.0, 5.0, 6.0]) == pytest.approx(1.0)  # ties


def test_calibrate_reference_replaces_one_target_s_entries_and_keeps_the_others(tmp_path):
    """What the script writes when every sampler is measured: the target's new entries in place of its old
    ones, the other targets' entries as they were."""
    import shutil

    from faster_diffusion.calibration import CALIBRATION_FILE, load_calibrations

    script = _calibrate_reference()
    shutil.copy(reference.MODEL_DIR / CALIBRATION_FILE, tmp_path / CALIBRATION_FILE)
    shipped = load_calibrations(tmp_path)
    deep = [c for c in shipped if c.target == "deep:0"]
    encoder = [c for c in shipped if c.target == "encoder"]
    assert deep and encoder
    renewed = [dataclasses.replace(c, seconds=c.seconds + 1.0) for c in deep]
    script.replace_target(tmp_path, "deep:0", renewed)
    written = load_calibrations(tmp_path)
    assert [c for c in written if c.target == "encoder"] == encoder
    assert [c for c in written if c.target == "deep:0"] == renewed
