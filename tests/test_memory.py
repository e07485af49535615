"""The automatic decoder-batch cap: its memory model, its budget and its use as the default."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.models import SD15_UNET_CONFIG
from faster_diffusion import FasterDiffusionConfig, KeySteps, apply_faster_diffusion
from faster_diffusion.memory import (
    AUTO,
    CPU_MAX_STEPS,
    MAX_PEAK_RATIO,
    auto_decoder_batch_cap,
    decoder_budget_bytes,
    decoder_row_bytes,
    decoder_steps_per_batch,
)
from fixtures.tiny import SD_SHAPED_UNET, build_tiny_components

from .conftest import assert_equal_up_to_rounding, generate_latents

GB = 10**9
#: What SD v1.5 in fp16 holds on the GPU after ``pipe.to("cuda")``: the UNet (860M parameters, 1.72 GB), the
#: CLIP text encoder (123M, 0.25 GB) and the VAE (84M, 0.17 GB).
SD15_FP16_WEIGHTS = 2_132_000_000


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages made by ops under this mode, and their peak.

    Storages that existed before (weights, inputs) are not counted. Every op's output storage is counted
    once, from its creation until the last tensor that uses it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.live[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def measured_peak(unet: torch.nn.Module, rows: int, latent: tuple[int, int]) -> int:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, 4, *latent, generator=generator)
    text = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.inference_mode(), LiveTensorBytes() as tracker:
        unet(sample, torch.full((rows,), 500), encoder_hidden_states=text)
    return tracker.peak


@pytest.mark.parametrize(
    ("unet_kwargs", "latent"),
    [
        (SD_SHAPED_UNET, (16, 16)),
        (SD_SHAPED_UNET, (12, 20)),
        ({**SD_SHAPED_UNET, "block_out_channels": (32, 64, 128, 128)}, (16, 16)),
    ],
)
def test_row_estimate_matches_the_measured_growth_of_a_stock_unet_forward(unet_kwargs, latent):
    unet = build_tiny_components(unet_kwargs=unet_kwargs)["unet"]
    per_row = (measured_peak(unet, 4, latent) - measured_peak(unet, 2, latent)) / 2
    estimate = decoder_row_bytes(unet.config, *latent, element_size=4)
    assert 0.9 * per_row <= estimate <= 1.15 * per_row


def test_row_estimate_of_sd15_grows_with_latent_pixels_and_value_size():
    at_512 = decoder_row_bytes(SD15_UNET_CONFIG, 64, 64, element_size=2)
    assert 50e6 < at_512 < 90e6  # tens of MB per row in fp16
    assert decoder_row_bytes(SD15_UNET_CONFIG, 128, 128, element_size=2) == pytest.approx(
        4 * at_512, rel=0.01
    )
    assert decoder_row_bytes(SD15_UNET_CONFIG, 64, 64, element_size=4) == 2 * at_512


def sd15_fp16_cap(pixels: int, rows: int, group_steps: int, available: int = 70 * GB) -> int:
    """The automatic cap for SD v1.5 in fp16 on a CUDA device with ``available`` bytes free."""
    row_bytes = decoder_row_bytes(SD15_UNET_CONFIG, pixels // 8, pixels // 8, element_size=2)
    budget = decoder_budget_bytes(
        device_type="cuda", available=available, weight_bytes=SD15_FP16_WEIGHTS, step_bytes=rows * row_bytes
    )
    return decoder_steps_per_batch(
        rows=rows, group_steps=group_steps, row_bytes=row_bytes, budget_bytes=budget
    )


def test_cap_at_1024_px_with_four_images_in_one_group_is_far_below_400_rows():
    # key_steps="0" with DDIM-50: one group of 50 steps, 4 images -> 8 CFG rows a step, 400 rows in all.
    steps = sd15_fp16_cap(1024, rows=8, group_steps=50)
    assert 1 <= steps * 8 <= 40
    # The batch stays within the peak aim: weights + batch <= 1.5 x (weights + one stock step).
    row_bytes = decoder_row_bytes(SD15_UNET_CONFIG, 128, 128, element_size=2)
    assert SD15_FP16_WEIGHTS + steps * 8 * row_bytes <= MAX_PEAK_RATIO * (SD15_FP16_WEIGHTS + 8 * row_bytes)


def test_small_cases_keep_whole_groups_on_a_gpu_like_budget():
    # DDIM-50's largest paper group (15 steps) at 256 px, one image, with 24 GB or 70 GB free.
    assert sd15_fp16_cap(256, rows=2, group_steps=15, available=24 * GB) == 15
    assert sd15_fp16_cap(256, rows=2, group_steps=15) == 15
    assert sd15_fp16_cap(512, rows=2, group_steps=5) == 5


def test_sd15_caps_quoted_in_the_docs():
    # One image (2 CFG rows), 70 GB free: at 512 px at most 9 steps a batch (the paper's groups of 10 and 15
    # go as 5 + 5 and 8 + 7), at 1024 px at most 3.
    assert [sd15_fp16_cap(512, rows=2, group_steps=steps) for steps in (5, 9, 10, 15)] == [5, 9, 5, 8]
    assert [sd15_fp16_cap(1024, rows=2, group_steps=steps) for steps in (3, 5, 15)] == [3, 3, 3]


def test_a_group_too_large_is_split_into_near_equal_chunks():
    assert decoder_steps_per_batch(rows=2, group_steps=15, row_bytes=100, budget_bytes=1400) == 5
    assert decoder_steps_per_batch(rows=2, group_steps=7, row_bytes=100, budget_bytes=10**9, max_steps=5) == 4
    assert (
        decoder_steps_per_batch(rows=2, group_steps=10, row_bytes=100, budget_bytes=10**9, max_steps=5) == 5
    )


@pytest.mark.parametrize("budget", [0, 1, 199, -5])
def test_cap_is_at_least_one_step_whatever_the_budget(budget):
    assert decoder_steps_per_batch(rows=2, group_steps=15, row_bytes=100, budget_bytes=budget) == 1
    assert sd15_fp16_cap(1024, rows=8, group_steps=50, available=budget) == 1


def test_budget_is_the_smaller_of_the_device_share_and_the_peak_aim():
    tight = decoder_budget_bytes(device_type="cuda", available=GB, weight_bytes=GB, step_bytes=GB // 10)
    assert tight == GB // 2  # half the free GPU memory
    roomy = decoder_budget_bytes(device_type="cuda", available=100 * GB, weight_bytes=GB, step_bytes=GB // 10)
    assert roomy == int(MAX_PEAK_RATIO * 1.1 * GB - GB)
    assert decoder_budget_bytes(device_type="cpu", available=4 * GB, weight_bytes=GB, step_bytes=GB) == GB


def test_cpu_cap_is_at_most_the_fastest_cpu_batch():
    unet = build_tiny_components()["unet"]
    sample = torch.zeros(2, 4, 8, 8)
    assert auto_decoder_batch_cap(unet, sample, group_steps=15) == CPU_MAX_STEPS == 5
    assert auto_decoder_batch_cap(unet, sample, group_steps=3) == 3


def test_config_default_is_the_automatic_cap_and_none_means_whole_groups():
    assert FasterDiffusionConfig().max_decoder_batch == AUTO == "auto"
    assert FasterDiffusionConfig().decoder_batch_cap == AUTO
    assert FasterDiffusionConfig(max_decoder_batch=None).decoder_batch_cap is None
    assert FasterDiffusionConfig(max_decoder_batch="auto", parallel=False).decoder_batch_cap == 1


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "automatic", "8"])
def test_config_rejects_other_caps_naming_the_field_and_allowed_values(value):
    with pytest.raises(ValueError, match=r"max_decoder_batch must be 'auto', a whole number >= 1 or None"):
        FasterDiffusionConfig(max_decoder_batch=value)


def test_default_config_splits_large_groups_on_the_cpu_and_matches_one_step_at_a_time(make_pipe):
    batched = make_pipe("DDIM-50", dtype=torch.float64)
    sequential = make_pipe("DDIM-50", dtype=torch.float64)
    handle = apply_faster_diffusion(batched, FasterDiffusionConfig(key_steps=KeySteps.paper()))
    apply_faster_diffusion(sequential, FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=False))
    latents = generate_latents(batched, steps=50)
    assert_equal_up_to_rounding(latents, generate_latents(sequential, steps=50))
    # Paper groups 1, 1, 1, 2, 5, 5, 10, 10, 15 steps; at most 5 steps a batch on the CPU: 1+1+1+1+1+1+2+2+3.
    assert handle.last_run.unet_batches == 13
    assert handle.last_run.full_passes + handle.last_run.partial_passes == 50


def test_decoder_cross_attention_projects_the_text_once_per_batch(make_pipe):
    """In a decoder batch of g steps the text rows repeat g times; their keys and values are computed once."""
    pipe = make_pipe("DDIM-50")
    attention = pipe.unet.up_blocks[-1].attentions[0].transformer_blocks[0].attn2
    projected_rows = []
    for projection in (attention.to_k, attention.to_v):
        stock_forward = projection.forward

        def counting(hidden, *args, _forward=stock_forward, **kwargs):
            projected_rows.append(hidden.shape[0])
            return _forward(hidden, *args, **kwargs)

        projection.forward = counting
    handle = apply_faster_diffusion(
        pipe, FasterDiffusionConfig(key_steps=KeySteps.paper(), max_decoder_batch=5)
    )
    generate_latents(pipe, steps=50)
    assert handle.last_run.unet_batches == 13 < 50  # batches of up to 5 steps ran
    assert set(projected_rows) == {2}  # the CFG rows of one step, never 2 x 5
    assert len(projected_rows) == 2 * 13


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def test_peak_aim_counts_the_weights_of_every_pipeline_module_on_the_device(make_pipe, monkeypatch):
    """The stock run's peak holds the text encoder and the VAE too, not only the UNet."""
    import faster_diffusion.memory as memory

    pipe = make_pipe("DDIM-50")
    weights = []
    budget = memory.decoder_budget_bytes

    def spy(**kwargs):
        weights.append(kwargs["weight_bytes"])
        return budget(**kwargs)

    monkeypatch.setattr(memory, "decoder_budget_bytes", spy)
    apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.paper()))
    generate_latents(pipe, steps=50)
    resident = sum(module_bytes(pipe.components[name]) for name in ("unet", "text_encoder", "vae"))
    assert resident > module_bytes(pipe.unet)
    assert set(weights) == {resident}
    assert memory.resident_weight_bytes([pipe.unet, pipe.vae], torch.device("meta")) == 0


def test_free_memory_is_read_once_per_run(make_pipe, monkeypatch):
    """Same-seed runs batch alike: the budget does not follow the free memory from batch to batch."""
    import faster_diffusion.memory as memory

    reads = []
    read = memory.available_memory_bytes

    def counting(device):
        reads.append(device)
        return read(device)

    import faster_diffusion.engine as engine

    monkeypatch.setattr(memory, "available_memory_bytes", counting)
    monkeypatch.setattr(engine, "available_memory_bytes", counting)
    pipe = make_pipe("DDIM-50")
    handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.paper()))
    for run in range(1, 3):
        generate_latents(pipe, steps=50)
        assert handle.last_run.unet_batches == 13
        assert len(reads) == run
