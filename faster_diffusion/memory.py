"""The automatic cap on the decoder batch: how many steps of a group one stock UNet call decodes.

A decoder batch of ``g`` steps runs the UNet on ``g * rows`` rows (``rows`` = the CFG batch of one step). Its
activations grow with ``rows * g * latent pixels``: DDIM-50's group of 15 steps at 512 px decodes 30 rows at
once, and ``key_steps="0"`` at 1024 px with 4 images decodes 400 rows, tens of GB. The automatic cap keeps a
whole group where it fits the budget below and splits larger groups into near-equal chunks. For SD v1.5 in
fp16, one image (2 CFG rows) and 70 GB free, that is whole groups (up to 32 steps) at 256 px, at most 9 steps
a batch at 512 px (the paper's groups of 10 and 15 steps go as 5 + 5 and 8 + 7) and at most 3 at 1024 px.

**The memory model.** The bytes one row of a stock UNet forward needs at its peak are estimated from the UNet
config and the latent size (:func:`decoder_row_bytes`): every skip feature the encoder hands to the decoder
(``conv_in``'s output, each down block's residuals, the mid block's output), which a decoder batch holds
repeated for all its rows, plus the working set of the widest level, :data:`TOP_LEVEL_WORKING_SET` times
``block_out_channels[0] * latent pixels`` (the up block's concatenated input, the resnets' hidden states and
the transformer's feed-forward, with memory-efficient attention: PyTorch SDPA or xformers). The factor was
measured on the CPU only: the live tensor bytes of stock diffusers UNet forwards (SD v1.5's block layout at
widths 32 to 64 and 16 to 64 latent pixels a side) grew by 25.0 to 26.0 ``block_out_channels[0] * latent
pixels`` elements per row, of which the skip features are 4.2 to 5.1; ``tests/test_memory.py`` checks the
estimate against such a measurement. It has not been checked on a GPU, where the CUDA allocator's caching and
rounding and other attention kernels may need more.

**The budget** (:func:`decoder_budget_bytes`) is the smaller of two limits:

- what the device has: :data:`CUDA_FREE_FRACTION` of the free GPU memory (``torch.cuda.mem_get_info``, plus
  the memory PyTorch has cached but not allocated, which ``mem_get_info`` counts as taken), or
  :data:`CPU_AVAILABLE_FRACTION` of the available RAM on the CPU;
- the peak-memory aim, at most :data:`MAX_PEAK_RATIO` times the stock run's peak (the paper's parallel
  decoder used 3.95 GB against stock's 2.62 GB, 1.5x): the weights the stock run holds on the device plus the
  decoder batch stay within 1.5 times those weights plus one stock step. The weights are the parameters and
  buffers of the pipeline's torch modules on the sample's device (:func:`resident_weight_bytes`): UNet, text
  encoder and VAE after ``pipe.to(device)``; the UNet alone under model CPU offload.

The engine (:mod:`faster_diffusion.engine`) reads the free memory and the resident weights once per run, at
its first batch of steps, and sizes every batch of the run from them, so runs with the same inputs batch alike
within a run (the free memory, and so the cap, can still differ between runs).

**Speed.** On a GPU, whole groups are the fastest where they fit (the paper's setting); the budget above
trades some of that for memory at 512 px and up. On the CPU, the decoder cost per step is lowest at about 5
steps per batch (0.66x of one step at a time, against 0.81x in batches of 15, on a 2-core CPU with SD v1.5 at
256 px), so the CPU cap is at most :data:`CPU_MAX_STEPS` steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "AUTO",
    "CPU_AVAILABLE_FRACTION",
    "CPU_MAX_STEPS",
    "CUDA_FREE_FRACTION",
    "MAX_PEAK_RATIO",
    "TOP_LEVEL_WORKING_SET",
    "auto_decoder_batch_cap",
    "available_memory_bytes",
    "decoder_budget_bytes",
    "decoder_row_bytes",
    "decoder_steps_per_batch",
    "resident_weight_bytes",
]

#: The value of ``FasterDiffusionConfig.max_decoder_batch`` that asks for the automatic cap.
AUTO = "auto"
#: Working set of a stock UNet forward at its widest level, per row, in ``block_out_channels[0] * latent
#: pixels`` elements (measured; see the module docstring).
TOP_LEVEL_WORKING_SET = 21
#: Share of the free GPU memory a decoder batch may use (the rest is left for the VAE, the allocator's
#: fragmentation and other work on the device).
CUDA_FREE_FRACTION = 0.5
#: Share of the available RAM a decoder batch may use on the CPU.
CPU_AVAILABLE_FRACTION = 0.25
#: The resident weights plus a decoder batch stay within this many times the stock run's peak (the resident
#: weights plus one stock step).
MAX_PEAK_RATIO = 1.5
#: Steps per decoder batch at most on the CPU, where larger batches are slower per step.
CPU_MAX_STEPS = 5


def _per_block(value: int | tuple[int, ...] | list[int], blocks: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * blocks


def decoder_row_bytes(
    config: Mapping[str, Any] | Any, latent_height: int, latent_width: int, element_size: int
) -> int:
    """Estimated peak bytes of one batch row of a stock ``UNet2DConditionModel`` forward.

    ``config`` is the UNet's config (``unet.config``, or a dict of the same keys); ``element_size`` the bytes
    of one value (4 for fp32, 2 for fp16). See the module docstring for the model and its measurement.
    """
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key)
    skip = encoder_row_values(config, latent_height, latent_width)
    working = TOP_LEVEL_WORKING_SET * get("block_out_channels")[0] * latent_height * latent_width
    return (skip + working) * element_size


def encoder_row_values(config: Mapping[str, Any] | Any, latent_height: int, latent_width: int) -> int:
    """Values the encoder outputs for one batch row: ``conv_in``'s, every down-block resnet's and
    down-sampler's (the skip features), and the mid block's."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key)
    channels = list(get("block_out_channels"))
    blocks = len(channels)
    layers = _per_block(get("layers_per_block"), blocks)
    height, width = latent_height, latent_width
    values = channels[0] * height * width  # conv_in
    for index, (width_channels, count) in enumerate(zip(channels, layers, strict=True)):
        values += count * width_channels * height * width
        if index < blocks - 1:  # the down-sampler's output, at the next resolution
            height, width = -(-height // 2), -(-width // 2)
            values += width_channels * height * width
    return values + channels[-1] * height * width  # the mid block's output


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``.

    On CUDA, ``torch.cuda.mem_get_info``'s free bytes plus what PyTorch's caching allocator holds unused
    (``memory_reserved - memory_allocated``), which ``mem_get_info`` counts as taken; the available RAM
    otherwise.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_weight_bytes(modules: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Bytes of the parameters and buffers of ``modules`` that lie on ``device``, each tensor counted once.

    For a pipeline's torch modules (``pipe.components``) at a UNet call, that is what the stock run holds on
    the device besides its activations: the UNet, text encoder and VAE when the pipeline was moved there with
    ``pipe.to(device)``; the UNet alone under model CPU offload (the others wait on the CPU).
    """
    seen: set[tuple[int, torch.device]] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            key = (tensor.data_ptr(), tensor.device)
            if tensor.device != device or key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def decoder_budget_bytes(*, device_type: str, available: int, weight_bytes: int, step_bytes: int) -> int:
    """Bytes a decoder batch's activations may take: the smaller of the device's share and the peak aim.

    ``available`` is the device's free memory, ``weight_bytes`` the weights the stock run holds on the device
    (:func:`resident_weight_bytes`), ``step_bytes`` the activations of one stock step (its CFG rows times
    :func:`decoder_row_bytes`). The peak aim: ``weight_bytes`` plus the batch stay within
    :data:`MAX_PEAK_RATIO` times ``weight_bytes + step_bytes``, the stock run's peak.
    """
    fraction = CUDA_FREE_FRACTION if device_type == "cuda" else CPU_AVAILABLE_FRACTION
    peak_aim = MAX_PEAK_RATIO * (weight_bytes + step_bytes) - weight_bytes
    return int(min(fraction * available, peak_aim))


def decoder_steps_per_batch(
    *, rows: int, group_steps: int, row_bytes: int, budget_bytes: int, max_steps: int | None = None
) -> int:
    """Steps one decoder batch holds, out of the ``group_steps`` steps left in a group.

    A whole group where it fits ``budget_bytes`` (each step takes ``rows * row_bytes``) and ``max_steps``;
    otherwise the group is split into as few chunks as fit, of near-equal size (15 steps under a limit of 7
    go as 5, 5, 5 rather than 7, 7, 1). Always at least 1.
    """
    limit = budget_bytes // max(1, rows * row_bytes)
    if max_steps is not None:
        limit = min(limit, max_steps)
    limit = max(1, int(limit))
    chunks = -(-group_steps // limit)
    return max(1, -(-group_steps // chunks))


def auto_decoder_batch_cap(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    group_steps: int,
    *,
    weight_bytes: int | None = None,
    available: int | None = None,
) -> int:
    """The automatic cap for decoding ``group_steps`` steps of ``sample`` (one step's UNet input) at once.

    ``weight_bytes``: the weights the stock run holds on the sample's device (:func:`resident_weight_bytes` of
    the pipeline's modules); by default the UNet's alone. ``available``: the device's free memory; by default
    read now (:func:`available_memory_bytes`). The engine passes both, read once per run at its first batch of
    steps, so that runs with the same inputs batch alike.
    """
    rows = sample.shape[0]
    row_bytes = decoder_row_bytes(unet.config, sample.shape[-2], sample.shape[-1], sample.element_size())
    if weight_bytes is None:
        weight_bytes = resident_weight_bytes([unet], sample.device)
    if available is None:
        available = available_memory_bytes(sample.device)
    budget = decoder_budget_bytes(
        device_type=sample.device.type,
        available=available,
        weight_bytes=weight_bytes,
        step_bytes=rows * row_bytes,
    )
    max_steps = CPU_MAX_STEPS if sample.device.type == "cpu" else None
    return decoder_steps_per_batch(
        rows=rows, group_steps=group_steps, row_bytes=row_bytes, budget_bytes=budget, max_steps=max_steps
    )
