"""The wider diffusers surface: what a diffusers user may do around an accelerated pipeline.

Each case gives a right image or a clear error that names the feature, never a silently wrong image: two
threads on one pipeline, Perturbed-Attention Guidance, FreeU, a scheduler or UNet shared between pipelines,
runs that end before or inside their loop, GLIGEN, a LoRA loaded after ``apply_faster_diffusion``, and
in-place changes made by a step callback part-way through a group.
"""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import StableDiffusionPipeline

from faster_diffusion import (
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    UnsupportedModelError,
    apply_faster_diffusion,
    use_sampler,
)
from fixtures.tiny import TINY_UNET_CONFIG
from fixtures.tiny import build_tiny_pipeline as build_tiny_sd
from fixtures.tiny import build_tiny_sdxl_pipeline as build_tiny_sdxl

from .conftest import (
    PAPER,
    PAPER_ONE_STEP_AT_A_TIME,
    STOCK_EQUIVALENT,
    assert_equal_up_to_rounding,
    generate_latents,
)

PROMPT = "a red circle above a blue square"


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    pipe = build_tiny_sd(seed, dtype=dtype)
    use_sampler(pipe, "DDIM-50")
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    pipe = build_tiny_sdxl(seed, dtype=dtype)
    use_sampler(pipe, "DDIM-50")
    return pipe


def float64(pipe):
    """``pipe`` in float64, for a comparison up to rounding (:func:`assert_equal_up_to_rounding`)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            torch.nn.Module.to(module, dtype=torch.float64)
    return pipe


rounding_equal = assert_equal_up_to_rounding


# --- 1. Two threads on one pipeline ------------------------------------------------------------------------


def run_interleaved(pipe, steps: int = 50):
    """Thread A pauses in its step callback at step 3; thread B runs a whole generation; then A finishes."""
    paused, resume = threading.Event(), threading.Event()
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def pause_at_three(pipeline, step, timestep, tensors):
        if step == 3:
            paused.set()
            assert resume.wait(60)
        return tensors

    def thread_a() -> None:
        try:
            results["a"] = generate_latents(
                pipe, "a red circle", steps=steps, callback_on_step_end=pause_at_three
            )
        except BaseException as error:
            errors.append(error)
            paused.set()

    def thread_b() -> None:
        try:
            results["b"] = generate_latents(pipe, "a blue square", steps=steps, seed=1)
        except BaseException as error:
            errors.append(error)

    first = threading.Thread(target=thread_a)
    first.start()
    assert paused.wait(60)
    second = threading.Thread(target=thread_b)
    second.start()
    second.join(120)
    resume.set()
    first.join(120)
    if errors:
        raise errors[0]
    return results["a"], results["b"]


@pytest.mark.parametrize("accelerated", [False, True], ids=["stock", "faster"])
def test_two_threads_on_one_pipeline_each_get_their_own_image(make_pipe, accelerated):
    pipe = make_pipe()
    if accelerated:
        apply_faster_diffusion(pipe, PAPER)
    alone_a = generate_latents(pipe, "a red circle", steps=50)
    alone_b = generate_latents(pipe, "a blue square", steps=50, seed=1)
    a, b = run_interleaved(pipe)
    assert torch.equal(a, alone_a)
    assert torch.equal(b, alone_b)


def test_last_run_of_another_thread_is_readable(make_pipe):
    pipe = make_pipe()
    handle = apply_faster_diffusion(pipe, PAPER)
    worker = threading.Thread(target=lambda: generate_latents(pipe, steps=50))
    worker.start()
    worker.join(120)
    assert handle.last_run.full_passes == 9 and handle.last_run.steps == 50


# --- 2. Attention processors that split the batch (Perturbed-Attention Guidance) ----------------------------


def pag_pipeline(pipe, layers):
    from diffusers import StableDiffusionPAGPipeline

    components = {name: module for name, module in pipe.components.items() if name != "image_encoder"}
    pag = StableDiffusionPAGPipeline(**components, pag_applied_layers=layers, requires_safety_checker=False)
    pag.set_progress_bar_config(disable=True)
    return pag


def test_pag_in_the_decoder_is_decoded_one_step_at_a_time_with_a_warning_that_names_it():
    """PAG's processor splits the batch with chunk(3), which would mix the steps of a decoder batch: the run
    decodes one step at a time instead, and equals a run configured so."""
    batched = float64(pag_pipeline(build_tiny_pipeline(0), ["up"]))
    handle = apply_faster_diffusion(batched, PAPER)
    with pytest.warns(
        UserWarning, match=r"PAGCFGIdentitySelfAttnProcessor2_0 on up_blocks.*one step at a time"
    ):
        fast = generate_latents(batched, steps=50, pag_scale=3.0)
    assert (handle.last_run.full_passes, handle.last_run.unet_batches) == (9, 50)
    sequential = float64(pag_pipeline(build_tiny_pipeline(0), ["up"]))
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    rounding_equal(fast, generate_latents(sequential, steps=50, pag_scale=3.0))
    # The pipeline's own processors are back after the run, and a run without PAG batches its decoder again.
    generate_latents(batched, steps=50, pag_scale=0.0)
    assert handle.last_run.unet_batches < 50
    # Every step a key step gives stock PAG's output.
    stock = generate_latents(pag_pipeline(build_tiny_pipeline(0), ["up"]), steps=50, pag_scale=3.0)
    same = pag_pipeline(build_tiny_pipeline(0), ["up"])
    apply_faster_diffusion(same, STOCK_EQUIVALENT)
    assert torch.equal(generate_latents(same, steps=50, pag_scale=3.0), stock)


def test_pag_in_the_mid_block_only_runs_batched():
    """PAG's default layer is the mid block, in the encoder: each key step computes it on its own rows."""
    batched = float64(pag_pipeline(build_tiny_pipeline(0), "mid"))
    sequential = float64(pag_pipeline(build_tiny_pipeline(0), "mid"))
    apply_faster_diffusion(batched, PAPER)
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    rounding_equal(
        generate_latents(batched, steps=50, pag_scale=3.0),
        generate_latents(sequential, steps=50, pag_scale=3.0),
    )


# --- 3. FreeU scales decoder inputs in place ---------------------------------------------------------------

FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


@pytest.mark.parametrize("family", ["SD", "SDXL"])
def test_freeu_one_step_at_a_time_equals_batched(family):
    build = build_tiny_pipeline if family == "SD" else build_tiny_sdxl_pipeline
    pipes = {}
    for name, config in [
        ("batched", PAPER),
        ("sequential", PAPER_ONE_STEP_AT_A_TIME),
        ("cap 1", FasterDiffusionConfig(max_decoder_batch=1)),
    ]:
        pipe = float64(build(0))
        pipe.enable_freeu(**FREEU)
        apply_faster_diffusion(pipe, config)
        pipes[name] = generate_latents(pipe, steps=20)
    rounding_equal(pipes["sequential"], pipes["batched"])
    rounding_equal(pipes["cap 1"], pipes["batched"])


def test_freeu_with_every_step_a_key_step_equals_stock():
    stock = build_tiny_pipeline(0)
    stock.enable_freeu(**FREEU)
    expected = generate_latents(stock, steps=20)
    for parallel in (True, False):
        pipe = build_tiny_pipeline(0)
        pipe.enable_freeu(**FREEU)
        apply_faster_diffusion(
            pipe,
            FasterDiffusionConfig(
                key_steps=KeySteps.every_step(), parallel=parallel, noise_injection=NoiseInjection.off()
            ),
        )
        assert torch.equal(generate_latents(pipe, steps=20), expected)


# --- 4. One scheduler shared by two pipelines --------------------------------------------------------------


def test_a_scheduler_shared_with_another_accelerated_pipeline_is_refused():
    first = build_tiny_pipeline(0)
    second = build_tiny_pipeline(1)
    second.scheduler = first.scheduler
    handle = apply_faster_diffusion(first, PAPER)
    with pytest.raises(UnsupportedModelError, match=r"scheduler.*shared.*from_config"):
        apply_faster_diffusion(second, PAPER)
    # Nothing of the refused call stays behind: the first pipeline still runs as before, and removing its
    # handle gives stock back.
    expected = generate_latents(build_tiny_pipeline(0), steps=50)
    reference = build_tiny_pipeline(0)
    apply_faster_diffusion(reference, PAPER)
    assert torch.equal(generate_latents(first, steps=50), generate_latents(reference, steps=50))
    handle.remove()
    assert torch.equal(generate_latents(first, steps=50), expected)
    assert torch.equal(generate_latents(second, steps=50), generate_latents(build_tiny_pipeline(1), steps=50))


# --- 5. Stale state after a run that ends early ------------------------------------------------------------


def direct_unet_call(pipe):
    """One UNet call outside any pipeline run, on fixed inputs."""
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, TINY_UNET_CONFIG["cross_attention_dim"], generator=generator)
    with torch.inference_mode():
        return pipe.unet(sample, 500, encoder_hidden_states=text).sample


def test_a_from_pipe_pipeline_whose_run_fails_leaves_no_stale_run(make_pipe):
    expected = direct_unet_call(make_pipe())
    pipe = make_pipe()
    handle = apply_faster_diffusion(pipe, PAPER)
    other = StableDiffusionPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)

    def fail_at_six(pipeline, step, timestep, tensors):
        if step == 6:
            raise KeyError("stop here")
        return tensors

    with pytest.raises(KeyError, match="stop here"):
        generate_latents(other, steps=50, callback_on_step_end=fail_at_six)
    assert not handle._state.active
    assert torch.equal(direct_unet_call(pipe), expected)
    # The from_pipe pipeline then runs as the original does.
    assert torch.equal(generate_latents(other, steps=50), generate_latents(pipe, steps=50))


def test_a_run_that_fails_before_its_loop_leaves_no_stale_run(make_pipe):
    expected = direct_unet_call(make_pipe())
    pipe = make_pipe()
    handle = apply_faster_diffusion(pipe, PAPER)
    with pytest.raises(ValueError, match="generators"), torch.inference_mode():
        pipe(
            PROMPT,
            num_inference_steps=50,
            height=16,
            width=16,
            output_type="latent",
            generator=[torch.Generator().manual_seed(0)] * 3,
        )
    assert torch.equal(direct_unet_call(pipe), expected)
    assert torch.equal(direct_unet_call(pipe), expected)
    assert not handle._state.active


# --- 6. GLIGEN ---------------------------------------------------------------------------------------------


def test_gligen_is_refused_by_name():
    pipe = build_tiny_sd(0, unet_kwargs=dict(attention_type="gated"))
    assert hasattr(pipe.unet, "position_net")  # GLIGEN's grounding projection
    use_sampler(pipe, "DDIM-50")
    with pytest.raises(UnsupportedModelError, match="GLIGEN"):
        apply_faster_diffusion(pipe, PAPER)


# --- 7. A LoRA loaded after apply_faster_diffusion ---------------------------------------------------------


def add_lora(pipe, targets, name="shift", seed=0):
    from peft import LoraConfig

    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapter_name=name
    )


@pytest.mark.parametrize("targets", [["conv_in"], ["conv_in", "to_q", "to_k", "to_v", "to_out.0"]])
def test_a_lora_loaded_after_apply_matches_one_loaded_before(targets):
    before = float64(build_tiny_pipeline(0))
    add_lora(before, targets)
    apply_faster_diffusion(before, PAPER)
    after = float64(build_tiny_pipeline(0))
    handle = apply_faster_diffusion(after, PAPER)
    add_lora(after, targets)
    sequential = float64(build_tiny_pipeline(0))
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    add_lora(sequential, targets)
    expected = generate_latents(before, steps=50)
    rounding_equal(generate_latents(after, steps=50), expected)
    rounding_equal(generate_latents(sequential, steps=50), expected)
    assert handle.last_run.full_passes == 9
    handle.remove()  # and off again: stock with the LoRA
    stock = float64(build_tiny_pipeline(0))
    add_lora(stock, targets)
    assert torch.equal(generate_latents(after, steps=50), generate_latents(stock, steps=50))


# --- 8. In-place changes part-way through a group ----------------------------------------------------------

#: DDIM-50 with the paper's key steps has the group [5, 10): a callback at the end of step 7 changes what
#: steps 8 and 9 are decoded with, after the batched decoder has made their predictions.
MIDDLE_OF_A_GROUP = 7


def lora_scale_schedule(pipeline, step, timestep, tensors):
    if step == MIDDLE_OF_A_GROUP:
        pipeline.set_adapters(["shift"], adapter_weights=[0.2])
    return tensors


def halve_prompt_embeds(pipeline, step, timestep, tensors):
    if step == MIDDLE_OF_A_GROUP:
        tensors["prompt_embeds"].mul_(0.5)
    return tensors


@pytest.mark.parametrize("inference_mode", [False, True], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("change", ["lora scale", "prompt_embeds in place"])
def test_an_in_place_change_inside_a_group_is_decoded_as_one_step_at_a_time(change, inference_mode):
    def build(config):
        pipe = float64(build_tiny_pipeline(0))
        if change == "lora scale":
            add_lora(pipe, ["to_q", "to_k", "to_v", "to_out.0"])
        apply_faster_diffusion(pipe, config)
        return pipe

    if change == "lora scale":
        call = dict(callback_on_step_end=lora_scale_schedule)
    else:
        call = dict(
            callback_on_step_end=halve_prompt_embeds,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )

    def run(pipe):
        context = torch.inference_mode() if inference_mode else torch.no_grad()
        with context:
            return pipe(
                PROMPT,
                num_inference_steps=50,
                height=16,
                width=16,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
                **call,
            ).images

    no_change = generate_latents(build(PAPER), steps=50)
    batched = run(build(PAPER))
    assert (batched - no_change).abs().max() > 1e-3  # the change matters
    rounding_equal(batched, run(build(PAPER_ONE_STEP_AT_A_TIME)))
    # With every step a key step, the change is seen exactly as stock sees it.
    stock = float64(build_tiny_pipeline(0))
    if change == "lora scale":
        add_lora(stock, ["to_q", "to_k", "to_v", "to_out.0"])
    assert torch.equal(run(build(STOCK_EQUIVALENT)), run(stock))
