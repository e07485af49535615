"""Tests for the tiny random-weight Stable Diffusion pipelines in ``fixtures.tiny``."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from fixtures.tiny import (
    TINY_PROMPT_WORDS,
    build_tiny_components,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    make_safety_checker_flag_everything,
    save_tiny_weights,
)

MODELS = ("unet", "vae", "text_encoder")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_is_deterministic_per_seed():
    first, again, other = build_tiny_components(0), build_tiny_components(0), build_tiny_components(1)
    for name in MODELS:
        assert _same_state(first[name], again[name]), name
        assert not _same_state(first[name], other[name]), name


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components(7)
    assert torch.equal(torch.rand(3), expected)


def test_components_are_sd_shaped():
    c = build_tiny_components(0)
    assert c["safety_checker"] is None and c["feature_extractor"] is None and c["image_encoder"] is None
    assert c["unet"].config.cross_attention_dim == c["text_encoder"].config.hidden_size
    assert c["vae"].config.scaling_factor == 0.18215
    assert c["text_encoder"].config.vocab_size == len(c["tokenizer"])
    sched = c["scheduler"].config
    assert type(c["scheduler"]).__name__ == "PNDMScheduler"
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sched.steps_offset == 1 and sched.skip_prk_steps and not sched.set_alpha_to_one
    assert sched.clip_sample is False  # kept in the config, as in SD v1.5, for DDIM etc. via from_config


def test_unet_kwargs_override():
    unet = build_tiny_components(
        0,
        unet_kwargs={
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        },
    )["unet"]
    assert len(unet.down_blocks) == 3
    with torch.no_grad():
        out = unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
    assert out.shape == (1, 4, 8, 8)


def test_tokenizer_round_trip():
    tok = build_tiny_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a red circle").input_ids
    assert len(ids) == 5
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    words = ids[1:-1]
    assert len(set(words)) == 3 and tok.unk_token_id not in words and tok.eos_token_id not in words
    assert tok.convert_ids_to_tokens(words) == ["a</w>", "red</w>", "circle</w>"]
    assert tok("A  Red CIRCLE").input_ids == ids  # lower-cased, whitespace collapsed
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"

    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(padded.input_ids) == 77 and padded.input_ids[:5] == ids

    for word in TINY_PROMPT_WORDS:
        assert len(tok(word).input_ids) == 3, word  # every vocabulary word is a single token

    unknown = tok("zebra 42, é!").input_ids[1:-1]  # falls back to byte-level characters
    assert len(unknown) > 3 and tok.unk_token_id not in unknown


@pytest.mark.parametrize("with_safety_checker", [True, False])
def test_save_load_round_trip(tmp_path, with_safety_checker):
    folder = save_tiny_weights(tmp_path / "tiny-sd", seed=3, with_safety_checker=with_safety_checker)
    assert folder == tmp_path / "tiny-sd"
    expected = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if with_safety_checker:
        expected |= {"safety_checker", "feature_extractor"}
    assert {p.name for p in folder.iterdir() if p.is_dir()} == expected
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    index = json.loads((folder / "model_index.json").read_text())
    assert index["requires_safety_checker"] is with_safety_checker

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    ref = build_tiny_components(3, with_safety_checker=with_safety_checker)
    for name in MODELS + (("safety_checker",) if with_safety_checker else ()):
        assert _same_state(getattr(pipe, name), ref[name]), name
    assert (pipe.safety_checker is None) is not with_safety_checker
    assert pipe.tokenizer("a red circle").input_ids == ref["tokenizer"]("a red circle").input_ids

    default = pipe("a red circle", num_inference_steps=2, output_type="np").images
    sized = pipe("a red circle", num_inference_steps=2, output_type="np", height=16, width=16).images
    assert default.shape == sized.shape == (1, 16, 16, 3)
    assert np.isfinite(sized).all()


def test_safety_checker_flags_nothing_then_everything():
    pipe = build_tiny_pipeline(0, with_safety_checker=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "num_images_per_prompt": 2}
    out = pipe("a red circle", **kwargs)
    assert out.nsfw_content_detected == [False, False]
    assert out.images.max() > 0

    make_safety_checker_flag_everything(pipe.safety_checker)
    out = pipe("a red circle", **kwargs)
    assert out.nsfw_content_detected == [True, True]
    assert not out.images.any()  # flagged images are blacked out


def test_pipeline_without_checker_is_cpu_float32():
    pipe = build_tiny_pipeline(0)
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    out = pipe("a photo of a cat", num_inference_steps=2, output_type="np", height=24, width=32)
    assert out.images.shape == (1, 24, 32, 3) and out.nsfw_content_detected is None
