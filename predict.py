"""The Cog model: Stable Diffusion text-to-image, image-to-image and inpainting, faster by reusing UNet
features: deep reuse by default (DeepCache's rule, with calibrated full steps), or the paper's encoder
propagation with its parallel decoder and prior noise injection (Faster Diffusion; Li et al., NeurIPS 2024).

``run()`` maps its inputs to a request for the ``faster_diffusion`` package and saves the images; the work is
in ``faster_diffusion.app.serving``.
"""

import tempfile

from cog import BaseRunner, Input, Path

from faster_diffusion.app.download import fetch_at_setup
from faster_diffusion.app.generate import GenerationRequest, check_image_to_image_steps, faster_config
from faster_diffusion.app.images import load_image, load_mask
from faster_diffusion.app.loading import default_weights_dir
from faster_diffusion.app.serving import (
    TextToImage,
    check_inputs,
    check_mode_inputs,
    describe_unused_size,
    random_seed,
    save_images,
)
from faster_diffusion.samplers import Sampler


class Inputs:
    """Every input, declared once. Descriptions, choices, bounds and defaults are single literals, so that
    ``cog build`` can read them into the model's schema; ``run()`` checks its values against these same
    declarations."""

    prompt = Input(
        description="The text to render.", default="a photo of an astronaut riding a horse on mars"
    )
    negative_prompt = Input(description="Text to steer away from.", default="")
    image = Input(
        description="Input image for img2img mode. The outputs have its size, rounded down to a multiple of 8 (width and height are not used). 32 to 2048 px a side and at most 1024x1024 pixels; RGB or greyscale (RGBA and palette images only without transparent pixels); a still image, not an animation.",  # noqa: E501
        default=None,
    )
    mask = Input(
        description="Input mask for inpaint mode, with image. Black areas will be preserved, white areas will be inpainted. Must have the image's size.",  # noqa: E501
        default=None,
    )
    prompt_strength = Input(
        description="Prompt strength when using img2img or inpainting. 1.0 corresponds to full destruction of information in image. The run takes the last int(steps x prompt_strength) steps of the sampler's.",  # noqa: E501
        ge=0.0,
        le=1.0,
        default=0.8,
    )
    sampler = Input(
        description="The sampler (scheduler). The paper's, with their step counts: 'DDIM-50' (DDIM, 50 steps), 'DPM-Solver-20' (multistep DPM-Solver, 20 steps) and 'DPM-Solver++-20' (multistep DPM-Solver++, 20 steps). Replicate's scheduler names, each the diffusers scheduler built from the model's own scheduler config as cog-sdxl builds it: 'DDIM' (the same as 'DDIM-50'), 'DPMSolverMultistep' (DPM-Solver++, order 2), 'KarrasDPM' (the same with Karras sigmas), 'K_EULER' (Euler), 'K_EULER_ANCESTRAL' (Euler ancestral), 'HeunDiscrete' (Heun), 'PNDM', 'KLMS' (LMS) and 'UniPCMultistep' (UniPC); 50 steps for DDIM and PNDM, 25 for the others. Their default key steps need no calibration and were not measured for quality. In mode 'encoder', prior noise injection does not work with HeunDiscrete, PNDM and UniPCMultistep (set noise_injection to false), and 'auto' key steps do not work with HeunDiscrete and PNDM (they call the UNet more than once a step).",  # noqa: E501
        choices=[
            "DDIM-50",
            "DPM-Solver-20",
            "DPM-Solver++-20",
            "DDIM",
            "DPMSolverMultistep",
            "KarrasDPM",
            "K_EULER",
            "K_EULER_ANCESTRAL",
            "HeunDiscrete",
            "PNDM",
            "KLMS",
            "UniPCMultistep",
        ],
        default="DDIM-50",
    )
    num_inference_steps = Input(
        description="Number of denoising steps (the sampler's steps; HeunDiscrete calls the UNet 2N - 1 times for N steps and PNDM N + 1 times, and key_steps then index those UNet calls). Leave blank for the sampler's own: 50 for DDIM-50, DDIM and PNDM, 20 for DPM-Solver-20 and DPM-Solver++-20, 25 for the other samplers. Key steps are placed for the count asked: the paper's preset scales to it, and 'auto' calibrates for it once (saved next to the weights).",  # noqa: E501
        ge=1,
        le=500,
        default=None,
    )
    key_steps = Input(
        description="The key steps: in mode 'deep', the steps where the whole UNet runs (the others run only its shallowest layers); in mode 'encoder', the steps where the UNet encoder runs. 'default': in mode 'deep', 'auto:13' for DDIM (13 of 50, placed by a calibration on the model), 'auto:6@feature' for DPM-Solver-20 (6 of 20, placed by the same calibration read with its 'feature' criterion), every fourth step for K_EULER and UniPCMultistep, and every third step for DPM-Solver++-20 and the other scheduler names; in mode 'encoder', 'paper' for SD v1.5 base weights, otherwise 'auto' for DDIM and 'auto:9' for the paper's DPM-Solvers, and 'paper' for Replicate's scheduler names (but DDIM) on any weights (not measured on them). 'auto' (the paper's number of key steps, placed by a calibration on the model itself, made once and saved), 'auto:B' (B key steps, placed the same way), 'auto:B@C' (the same, read with the calibration's criterion C: 'feature', 'prediction' or 'final'; one not yet measured is measured by the first request that needs it, and 'final' takes about N^3/6 UNet calls per calibration prompt), 'paper' (the paper's key steps), 'all' (every step; in mode 'deep', or with noise_injection off, the stock result), 'uniform:K' (every K-th step), or a comma-separated list of step indices that starts with 0, such as '0,1,2,3,5,10,15,25,35'.",  # noqa: E501 (one literal, for cog build)
        default="default",
    )
    mode = Input(
        description="How UNet features are reused. 'deep' (the default: the fastest setting that kept stock quality on both reference models): deep reuse, as DeepCache does: at a partial step only the shallowest layers run and everything deeper comes from the latest full step; key_steps says which steps are full. 'encoder': the paper's encoder propagation: at a non-key step the UNet decoder runs on the latest key step's encoder features.",  # noqa: E501
        choices=["encoder", "deep"],
        default="deep",
    )
    branch = Input(
        description="For mode 'deep': how deep a partial step reaches (DeepCache's cache_branch_id). 0 runs the least and is the fastest; up to 11 on SD v1.5 and 8 on SDXL (up blocks x layers per block, minus 1). Must be 0 for mode 'encoder'.",  # noqa: E501
        ge=0,
        le=11,
        default=0,
    )
    choose_branch = Input(
        description="For mode 'deep', text-to-image: choose the branch for this model instead of giving it (leave branch at 0). At the cost of key_steps at branch 0, each branch that affords at least 2 full steps gets them, placed by its own calibration; a deeper branch runs only when it predicts less error than branch 0, otherwise the request runs as asked. The first such request of a process times a partial step of each branch on this machine (per image size and batch) and calibrates each compared branch that is not calibrated yet, so it takes longer.",  # noqa: E501
        default=False,
    )
    forecast = Input(
        description="Extrapolate the reused features linearly from the latest two full (or key) steps instead of copying them (as TaylorSeer does for transformers). On the reference model it helps DDIM-50 and hurts DPM-Solver-20.",  # noqa: E501
        default=False,
    )
    parallel_decoder = Input(
        description="Run the decoder passes between two key steps as one batch (the paper's parallel decoder). Off: one step at a time, with the same images up to float rounding. Mode 'deep' always runs one step at a time.",  # noqa: E501
        default=True,
    )
    max_decoder_batch = Input(
        description="Most steps decoded in one batch by the parallel decoder; larger groups are split, which bounds GPU memory. 0: automatic: whole groups where they fit a memory budget (1.5x the stock run's peak, and half the free GPU memory), otherwise near-equal chunks; for SD v1.5 in fp16, one image: whole groups at 256 px, at most 9 steps a batch at 512 px, 3 at 1024 px; at most 5 steps on the CPU.",  # noqa: E501
        ge=0,
        le=50,
        default=0,
    )
    noise_injection = Input(
        description="Prior noise injection: add a little of the initial noise back in late in sampling, which restores the fine texture that encoder propagation loses. For mode 'encoder'; mode 'deep' runs without it (a partial step keeps its own texture), as DeepCache does.",  # noqa: E501
        default=True,
    )
    noise_strength = Input(
        description="Strength of the injected noise (the paper's alpha: 0.003).",
        ge=0.0,
        le=0.1,
        default=0.003,
    )
    noise_threshold = Input(
        description="Noise is injected at the steps whose timestep is below this (the paper's tau: 500).",
        ge=0,
        le=1000,
        default=500,
    )
    width = Input(
        description="Width of the output images in pixels: a multiple of 8, up to 2048, with width x height at most 1024x1024 pixels (SDXL's sizes such as 1344x768, 1216x832 and 1536x640 fit). Leave blank for the size the model was trained at: 1024 for SDXL, 512 for SD v1.5.",  # noqa: E501
        ge=64,
        le=2048,
        default=None,
    )
    height = Input(
        description="Height of the output images in pixels: a multiple of 8, up to 2048, with width x height at most 1024x1024 pixels (SDXL's sizes such as 1344x768, 1216x832 and 1536x640 fit). Leave blank for the size the model was trained at: 1024 for SDXL, 512 for SD v1.5.",  # noqa: E501
        ge=64,
        le=2048,
        default=None,
    )
    num_outputs = Input(description="Number of images to generate.", ge=1, le=4, default=1)
    guidance_scale = Input(
        description="Scale for classifier-free guidance. Leave blank for the model's own: 7.5 for Stable Diffusion, 5.0 for the built-in reference model (as on the command line).",  # noqa: E501
        ge=1.0,
        le=20.0,
        default=None,
    )
    seed = Input(
        description="Random seed. Leave blank to pick one at random.", ge=0, le=4294967295, default=None
    )
    output_format = Input(
        description="Format of the output images.", choices=["webp", "jpg", "png"], default="webp"
    )
    output_quality = Input(
        description="Quality of the output images, from 0 to 100 (best). Not used for png.",
        ge=0,
        le=100,
        default=80,
    )
    disable_safety_checker = Input(
        description="Disable the safety checker for the generated images.", default=False
    )
    apply_watermark = Input(
        description="SDXL: mark the images with diffusers' invisible watermark, as Replicate's SDXL model does. Turn it off to leave them unmarked. SD 1.x/2.x images are never marked.",  # noqa: E501
        default=True,
    )
    lora_weights = Input(
        description="LoRA weights to use: a URL or a path to a .safetensors LoRA in the diffusers or kohya format, for the loaded model's family (an SD 1.5 LoRA on SD 1.x weights, an SDXL LoRA on SDXL). Leave blank for none. A URL is downloaded once and kept. With 'auto' key steps, the LoRA'd model is calibrated on its first use at each lora_scale (a stock run of the calibration prompts), never served the base model's calibration.",  # noqa: E501
        default=None,
    )
    lora_scale = Input(
        description="LoRA additive scale, from 0 (the model without the LoRA) to 1. Only applicable with lora_weights.",  # noqa: E501
        ge=0.0,
        le=1.0,
        default=0.6,
    )
    compare_with_baseline = Input(
        description="Also run stock diffusers with the same seed. The output then holds both sets of images, named faster-0, faster-1, ... and stock-0, stock-1, ... (the number is the image's number in its run; uploaded outputs can come back in any order), and the log prints both timings and the speedup.",  # noqa: E501
        default=False,
    )


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load the weights from weights/, or from the folder named by FASTER_DIFFUSION_WEIGHTS. An empty or
        missing folder is first filled from the Hugging Face hub (as script/download-weights does), unless
        HF_HUB_OFFLINE=1 or FASTER_DIFFUSION_FETCH_AT_SETUP=0. The default key steps of every sampler in every
        mode are looked up and logged; setup measures nothing (script/prepare-weights calibrates before cog
        build, and a missing calibration is made by the first request that needs it, with a warning here)."""
        from faster_diffusion.app.threads import fit_torch_threads  # torch's threads: the CPUs it may use

        fit_torch_threads()
        folder = default_weights_dir().absolute()
        fetch_at_setup(folder)
        self.model = TextToImage.load(folder)
        self.model.check_default_key_steps(Inputs.sampler.choices, Inputs.mode.choices)  # measures nothing
        self.outputs = Path(tempfile.mkdtemp(prefix="faster-diffusion-"))

    def run(
        self,
        prompt: str = Inputs.prompt,
        negative_prompt: str = Inputs.negative_prompt,
        image: Path | None = Inputs.image,
        mask: Path | None = Inputs.mask,
        prompt_strength: float = Inputs.prompt_strength,
        sampler: str = Inputs.sampler,
        num_inference_steps: int | None = Inputs.num_inference_steps,
        key_steps: str = Inputs.key_steps,
        mode: str = Inputs.mode,
        branch: int = Inputs.branch,
        choose_branch: bool = Inputs.choose_branch,
        forecast: bool = Inputs.forecast,
        parallel_decoder: bool = Inputs.parallel_decoder,
        max_decoder_batch: int = Inputs.max_decoder_batch,
        noise_injection: bool = Inputs.noise_injection,
        noise_strength: float = Inputs.noise_strength,
        noise_threshold: int = Inputs.noise_threshold,
        width: int | None = Inputs.width,
        height: int | None = Inputs.height,
        num_outputs: int = Inputs.num_outputs,
        guidance_scale: float | None = Inputs.guidance_scale,
        seed: int | None = Inputs.seed,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        disable_safety_checker: bool = Inputs.disable_safety_checker,
        apply_watermark: bool = Inputs.apply_watermark,
        lora_weights: str | None = Inputs.lora_weights,
        lora_scale: float = Inputs.lora_scale,
        compare_with_baseline: bool = Inputs.compare_with_baseline,
    ) -> list[Path]:
        """Generate images with faster diffusion (and with stock diffusers too, when comparing)."""
        check_inputs(self.run, Inputs, locals())
        check_mode_inputs(mode, branch, max_decoder_batch, choose_branch, image is not None, forecast)
        if image is not None:
            steps = num_inference_steps or Sampler.parse(sampler).default_steps
            check_image_to_image_steps(steps, prompt_strength, "prompt_strength", f": at least {1 / steps:g}")
        seed = random_seed() if seed is None else seed
        print(f"Using seed: {seed}")
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            sampler=sampler,
            num_steps=num_inference_steps,
            width=width or self.model.default_size,
            height=height or self.model.default_size,
            num_outputs=num_outputs,
            guidance_scale=self.model.default_guidance if guidance_scale is None else guidance_scale,
            seed=seed,
            image=load_image(image) if image is not None else None,
            mask=load_mask(mask) if mask is not None else None,
            strength=prompt_strength,
            watermark=apply_watermark,
            faster=faster_config(
                self.model.key_steps(key_steps, sampler, mode, num_inference_steps),
                mode=mode,
                branch=branch,
                forecast=int(forecast),
                parallel=parallel_decoder,
                max_decoder_batch=max_decoder_batch,
                noise_injection=noise_injection and mode == "encoder",
                noise_strength=noise_strength,
                noise_threshold=noise_threshold,
            ),
        )
        unused = describe_unused_size(request, width, height)
        if unused is not None:
            print(unused)
        outcome = self.model.generate(
            request,
            safety_checker=not disable_safety_checker,
            compare=compare_with_baseline,
            lora_weights=lora_weights,
            lora_scale=lora_scale,
            choose_branch=choose_branch,
        )
        for name, value in outcome.metrics.items():
            self.record_metric(name, value)
        paths = save_images(outcome.images, self.outputs, output_format, output_quality, outcome.names)
        return [Path(path) for path in paths]
