"""What the reuse modes support, and the clear errors for the rest: the UNet (Stable Diffusion 1.x/2.x and
SDXL, no class or added embeddings but SDXL's, no IP-Adapter or GLIGEN), the inputs of a UNet call (no
ControlNet or adapter residuals), the schedulers, and the attention processors a batch of several steps can
run. The limits are the engine's, shared by every mode; a refusal names the mode in use (``mode``: its
config's ``mode_name``, such as ``"deep reuse"``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

#: The ``added_cond_kwargs`` of SDXL's ``addition_embed_type="text_time"``.
_TEXT_TIME_INPUTS = frozenset({"text_embeds", "time_ids"})

#: The ``encoder_hid_dim_type`` that diffusers' ``load_ip_adapter`` sets on a UNet.
_IP_ADAPTER_PROJECTION = "ip_image_proj"

#: UNet inputs that would change the cached modules' outputs at every step, so that a partial step could not
#: reuse those of a full step.
_UNSUPPORTED_INPUTS = (
    "class_labels",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)

#: Attention processors that treat every row of the batch on its own, so that a decoder batch of several steps
#: gives each step what a batch of that step alone would. A processor that splits the batch into parts, as
#: Perturbed-Attention Guidance's ``chunk(3)`` does, would mix the steps of a decoder batch.
ROW_WISE_PROCESSORS: tuple[type, ...] = (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)


class UnsupportedModelError(ValueError):
    """The pipeline or UNet uses a feature that faster diffusion does not support."""


def check_supported_call(unet: torch.nn.Module, inputs: dict[str, Any], mode: str) -> None:
    """Raise :class:`UnsupportedModelError`, naming ``mode``, unless a UNet call of ``inputs`` is one that
    reuse supports: no ControlNet, T2I-Adapter or class inputs, no added conditioning but SDXL's."""
    for name in _UNSUPPORTED_INPUTS:
        if inputs.get(name) is not None:
            raise UnsupportedModelError(
                f"faster_diffusion: the UNet input {name!r} (ControlNet, T2I-Adapter or class conditioning) "
                f"is not supported with {mode}; remove faster diffusion for this pipeline"
            )
    added = inputs.get("added_cond_kwargs")
    if added and not (unet.config.addition_embed_type == "text_time" and set(added) <= _TEXT_TIME_INPUTS):
        raise UnsupportedModelError(
            f"faster_diffusion: added_cond_kwargs {sorted(added)} are not supported with {mode} "
            "(supported: SDXL's text_embeds and time_ids on a UNet with addition_embed_type='text_time'; "
            "IP-Adapter's image_embeds are not)"
        )
    check_supported_unet(unet, mode)


def check_supported_unet(unet: torch.nn.Module, mode: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``unet`` is a Stable Diffusion 1.x/2.x or SDXL
    ``UNet2DConditionModel``: no class embedding, no encoder projection, and no added embedding other than
    SDXL's ``text_time``. A refusal of a feature names ``mode``."""
    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedModelError(
            f"faster_diffusion supports UNet2DConditionModel (Stable Diffusion 1.x/2.x and SDXL), got "
            f"{type(unet).__name__}"
        )
    config = unet.config
    unsupported = {
        "class_embed_type": config.class_embed_type,
        "num_class_embeds": config.num_class_embeds,
        "addition_embed_type": None
        if config.addition_embed_type == "text_time"
        else config.addition_embed_type,
        "encoder_hid_dim_type": config.encoder_hid_dim_type,
    }
    found = {name: value for name, value in unsupported.items() if value is not None}
    if getattr(config, "attention_type", "default") in ("gated", "gated-text-image"):
        raise UnsupportedModelError(
            f"faster_diffusion: GLIGEN (a UNet with attention_type={config.attention_type!r}, grounded by "
            f"boxes) is not supported with {mode}; remove faster diffusion for this pipeline"
        )
    if config.encoder_hid_dim_type == _IP_ADAPTER_PROJECTION:
        raise UnsupportedModelError(
            f"faster_diffusion: IP-Adapter is not supported with {mode} (an IP-Adapter is "
            f"loaded: this UNet has encoder_hid_dim_type={_IP_ADAPTER_PROJECTION!r}); call "
            "pipe.unload_ip_adapter() to use faster diffusion, or remove faster diffusion to use the "
            "IP-Adapter"
        )
    if found:
        details = ", ".join(f"{name}={value!r}" for name, value in found.items())
        raise UnsupportedModelError(
            f"faster_diffusion supports Stable Diffusion 1.x/2.x and SDXL UNets (added embedding: SDXL's "
            f"text_time only); this UNet has {details}"
        )


#: Scheduler classes that prior noise injection (``x_t + alpha * z_T``, Sec. 3.3 of the paper) supports. Each
#: starts from latents at unit scale (``init_noise_sigma == 1``), so alpha * z_T has the paper's weight, and
#: advances from the sample its ``step`` is given, so the injected prior noise takes effect. Heun and KDPM2
#: (their second call steps from the first call's sample), the EDM schedulers (another preconditioning), UniPC
#: (its corrector recomputes the sample), single-step DPM-Solver (steps from the sample of its group's start)
#: and PNDM (its warm-up repeats a step) are not among them, nor among
#: :data:`SIGMA_SCALED_INJECTION_SCHEDULERS`. Exact classes: a subclass may change ``step``. The feature reuse
#: itself does not depend on the scheduler: without injection, every scheduler of an SD or SDXL pipeline is
#: supported (:func:`check_supported_scheduler`).
INJECTION_SCHEDULERS: tuple[type, ...] = (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DEISMultistepScheduler,
    LCMScheduler,
)
#: Scheduler classes whose latents are scaled by ``sqrt(1 + sigma^2)`` (``init_noise_sigma != 1``) and whose
#: ``step`` advances from the sample it is given: prior noise injection scales its addition to them
#: (:func:`faster_diffusion.noise.latent_scales`).
SIGMA_SCALED_INJECTION_SCHEDULERS: tuple[type, ...] = (
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
)
#: The former name of :data:`INJECTION_SCHEDULERS`, from when every reuse needed them.
SUPPORTED_SCHEDULERS = INJECTION_SCHEDULERS


def _flow_matching(scheduler: Any) -> list[str]:
    """The settings that make ``scheduler`` a flow-matching sampler (which SD and SDXL UNets are not)."""
    config = getattr(scheduler, "config", {})
    found = []
    if config.get("use_flow_sigmas", False):
        found.append("use_flow_sigmas=True")
    if config.get("prediction_type") == "flow_prediction":
        found.append("prediction_type='flow_prediction'")
    return found


def check_supported_scheduler(scheduler: Any, mode: str, noise_injection: bool = True) -> None:
    """Raise :class:`UnsupportedModelError`, naming ``mode`` and the scheduler, unless ``scheduler`` can run
    ``mode``: any scheduler of an SD or SDXL pipeline that is not configured for flow matching, and, when
    ``noise_injection`` is on, one of :data:`INJECTION_SCHEDULERS` with latents at unit scale."""
    name = type(scheduler).__name__
    flow = _flow_matching(scheduler)
    if flow:
        raise UnsupportedModelError(
            f"faster_diffusion does not support the scheduler {name} with {', '.join(flow)} (flow matching, "
            f"which Stable Diffusion and SDXL UNets are not trained for) in {mode}; use the scheduler "
            "without those settings"
        )
    if not noise_injection:
        return
    if type(scheduler) in SIGMA_SCALED_INJECTION_SCHEDULERS:
        return
    supported = ", ".join(cls.__name__ for cls in INJECTION_SCHEDULERS + SIGMA_SCALED_INJECTION_SCHEDULERS)
    fix = (
        "switch prior noise injection off (noise_injection=NoiseInjection.off(); on the command line "
        "--no-noise-injection, in the Cog model noise_injection=false), or set one of those schedulers, such "
        "as with faster_diffusion.use_sampler(pipe, 'DDIM-50') before apply_faster_diffusion()"
    )
    found = []
    if type(scheduler) not in INJECTION_SCHEDULERS:
        found.append("its step")
    init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    if init_noise_sigma != 1.0:
        found.append(f"init_noise_sigma={init_noise_sigma:g} (sigma-scaled latents)")
    if found:
        raise UnsupportedModelError(
            f"faster_diffusion: prior noise injection in {mode} does not support the scheduler {name} "
            f"({' and '.join(found)}): it needs a step that advances from the sample it is given, with "
            f"latents at unit scale or scaled by sqrt(1 + sigma^2), as {supported} have; {fix}"
        )
