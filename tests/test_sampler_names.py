"""The sampler input's names: the paper's presets, unchanged, and the scheduler names Replicate's Stable
Diffusion models use (cog-sdxl, stability-ai/stable-diffusion), each built as cog-sdxl builds it; their
default steps and key steps; the command line and the Cog model running them on the tiny pipelines; and the
refusals that name the inputs before any model work."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import predict
from faster_diffusion import DeepReuseConfig, KeySteps, Sampler
from faster_diffusion.app import cli, prepare
from faster_diffusion.app.generate import (
    GenerationRequest,
    check_sampler_choice,
    faster_config,
    generate,
    prepare_key_steps,
)
from faster_diffusion.app.serving import TextToImage
from faster_diffusion.calibration import scheduler_timesteps
from faster_diffusion.policy import DEFAULT_KEY_STEPS, default_key_steps, resolve_key_steps
from faster_diffusion.samplers import PAPER_SAMPLERS, make_scheduler, scheduler_config_of, use_sampler
from faster_diffusion.schedule import KeyStepKind
from fixtures.tiny import SD15_SCHEDULER_CONFIG, build_tiny_pipeline, save_tiny_weights

#: Replicate's names: the class and the options cog-sdxl passes to ``from_config``.
REPLICATE = {
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "PNDM": (PNDMScheduler, {}),
    "KLMS": (LMSDiscreteScheduler, {}),
    "UniPCMultistep": (UniPCMultistepScheduler, {}),
}


RUN = predict.Predictor().run


def cog_defaults() -> dict:
    return {name: getattr(predict.Inputs, name).default for name in inspect.signature(RUN).parameters}


def config_of(scheduler) -> dict:
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


@pytest.mark.parametrize("name", REPLICATE)
def test_each_replicate_name_builds_cog_sdxl_s_scheduler_from_the_pipeline_s_config(name):
    cls, options = REPLICATE[name]
    pipe = build_tiny_pipeline(0)  # SD v1.5's PNDM config
    built = make_scheduler(name, pipe.scheduler.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cls.from_config(pipe.scheduler.config, **options)
    assert type(built) is cls and config_of(built) == config_of(expected)
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "steps_offset"):
        assert built.config[key] == SD15_SCHEDULER_CONFIG[key]  # the model's noise schedule carries over
    assert Sampler.parse(name).scheduler_class is cls


def test_the_dpm_solver_names_differ_as_replicate_s_do():
    multistep = make_scheduler("DPMSolverMultistep", SD15_SCHEDULER_CONFIG).config
    karras = make_scheduler("KarrasDPM", SD15_SCHEDULER_CONFIG).config
    assert (multistep.algorithm_type, multistep.solver_order, multistep.use_karras_sigmas) == (
        "dpmsolver++",
        2,
        False,
    )
    assert (karras.algorithm_type, karras.solver_order, karras.use_karras_sigmas) == ("dpmsolver++", 2, True)


def test_the_paper_s_presets_build_the_schedulers_they_always_did():
    ddim = make_scheduler("DDIM-50", SD15_SCHEDULER_CONFIG)
    dpm = make_scheduler("DPM-Solver-20", SD15_SCHEDULER_CONFIG)
    plus = make_scheduler("DPM-Solver++-20", SD15_SCHEDULER_CONFIG)
    assert type(ddim) is DDIMScheduler
    assert config_of(ddim) == config_of(DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG))
    assert type(dpm) is type(plus) is DPMSolverMultistepScheduler
    assert (dpm.config.algorithm_type, dpm.config.solver_order, dpm.config.final_sigmas_type) == (
        "dpmsolver",
        2,
        "sigma_min",
    )
    assert (plus.config.algorithm_type, plus.config.solver_order, plus.config.use_karras_sigmas) == (
        "dpmsolver++",
        2,
        False,
    )
    assert [s.default_steps for s in PAPER_SAMPLERS] == [50, 20, 20]
    assert [s.value for s in PAPER_SAMPLERS] == ["DDIM-50", "DPM-Solver-20", "DPM-Solver++-20"]


def test_use_sampler_builds_every_sampler_from_the_model_s_config_whatever_the_one_before():
    """No sampler's settings carry over to the next, as they would with ``from_config(pipe.scheduler.config)``
    of the scheduler just set: a server that switches samplers gives each request the same scheduler."""
    pipe = build_tiny_pipeline(0)
    fresh = {name: config_of(make_scheduler(name, SD15_SCHEDULER_CONFIG)) for name in Sampler.names()}
    for before in ("KarrasDPM", "DPM-Solver-20", "HeunDiscrete"):
        for name in Sampler.names():
            use_sampler(pipe, before)
            use_sampler(pipe, name)
            assert config_of(pipe.scheduler) == fresh[name], (before, name)
    use_sampler(pipe, "KarrasDPM")
    assert not make_scheduler("K_EULER", scheduler_config_of(pipe)).config.use_karras_sigmas
    # A scheduler set by other means is the new base.
    pipe.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG, timestep_spacing="trailing")
    use_sampler(pipe, "DDIM")
    assert pipe.scheduler.config.timestep_spacing == "trailing"


@pytest.mark.parametrize(
    ("text", "sampler"),
    [
        ("DDIM-50", Sampler.DDIM),
        ("ddim", Sampler.DDIM),
        ("DDIM", Sampler.DDIM),
        ("dpm-solver", Sampler.DPM_SOLVER),
        ("DPMSolver", Sampler.DPM_SOLVER),
        ("dpm_solver++_20", Sampler.DPM_SOLVER_PP),
        ("dpmsolver++", Sampler.DPM_SOLVER_PP),
        ("dpmsolvermultistep", Sampler.DPM_MULTISTEP),
        ("KARRASDPM", Sampler.KARRAS_DPM),
        ("k_euler", Sampler.K_EULER),
        (" K-Euler-Ancestral ", Sampler.K_EULER_ANCESTRAL),
        ("heundiscrete", Sampler.HEUN),
        ("pndm", Sampler.PNDM),
        ("Klms", Sampler.KLMS),
        ("unipcmultistep", Sampler.UNIPC),
    ],
)
def test_names_are_read_case_insensitively_with_every_former_alias(text, sampler):
    assert Sampler.parse(text) is sampler


def test_an_unknown_name_lists_every_allowed_one():
    with pytest.raises(ValueError) as error:
        Sampler.parse("euler-a")
    message = str(error.value)
    assert message.startswith("sampler: unknown value 'euler-a'; allowed: 'DDIM-50', 'DPM-Solver-20'")
    assert all(repr(name) in message for name in Sampler.names())


def test_default_steps_and_calls_per_step():
    steps = {name: Sampler.parse(name).default_steps for name in Sampler.names()}
    assert steps == {
        "DDIM-50": 50,
        "DPM-Solver-20": 20,
        "DPM-Solver++-20": 20,
        "DDIM": 50,
        "DPMSolverMultistep": 25,
        "KarrasDPM": 25,
        "K_EULER": 25,
        "K_EULER_ANCESTRAL": 25,
        "HeunDiscrete": 25,
        "PNDM": 50,
        "KLMS": 25,
        "UniPCMultistep": 25,
    }
    for sampler in Sampler:  # one_call_per_step says what the scheduler's loop does
        calls = len(scheduler_timesteps(make_scheduler(sampler, SD15_SCHEDULER_CONFIG), 5))
        assert (calls == 5) is sampler.one_call_per_step, sampler


def test_default_key_steps_need_no_calibration_for_replicate_s_names_and_are_unchanged_for_the_presets():
    from faster_diffusion import policy

    pipe = build_tiny_pipeline(0)
    for sampler in Sampler:
        if sampler.is_paper:
            continue
        family = policy.SAMPLER_FAMILIES.get(sampler)  # the measured ones: their own interval
        expected = KeySteps.uniform(3) if family is None else policy.SCHEDULER_DEFAULTS[family]
        assert default_key_steps(pipe, sampler, mode="deep") == expected
        assert default_key_steps(pipe, sampler, 30, mode="encoder") == KeySteps.paper()
    # The presets, as before (weights that are not SD v1.5's base: encoder propagation calibrates).
    assert default_key_steps(pipe, "DDIM-50") == KeySteps.auto(13)
    assert default_key_steps(pipe, "DDIM") == KeySteps.auto(13)
    assert default_key_steps(pipe, "DPM-Solver-20") == KeySteps.auto(6, "feature")
    assert default_key_steps(pipe, "DPM-Solver++-20") == KeySteps.uniform(3)
    assert default_key_steps(pipe, "DDIM-50", mode="encoder") == KeySteps.auto()
    assert default_key_steps(pipe, "DPM-Solver++-20", mode="encoder") == KeySteps.auto(9)
    # The paper's preset at 25 steps: its 50-step list cut at 25.
    assert KeySteps.paper().resolve(25).indices == (0, 1, 2, 3, 5, 10, 15)


def test_every_default_the_cog_model_offers_is_calibration_free_or_one_prepare_weights_makes(monkeypatch):
    """Each (sampler choice x mode) default of the Cog model, on SD v1.5's base weights and on any other: key
    steps that need no calibration, or 'auto' on a sampler that can be calibrated, which prepare-weights
    covers (it walks every choice in every mode; tests/test_auto_key_steps.py runs it)."""
    from faster_diffusion import policy

    assert tuple(predict.Inputs.sampler.choices) == prepare.SAMPLERS
    assert tuple(predict.Inputs.mode.choices) == prepare.MODES
    pipe = build_tiny_pipeline(0)
    auto = {}
    for source in (None, sorted(policy.SD15_REPOS)[0]):
        monkeypatch.setattr(policy, "read_source", lambda folder, source=source: source)
        auto[source] = set()
        for mode in predict.Inputs.mode.choices:
            for choice in predict.Inputs.sampler.choices:
                keys = resolve_key_steps(DEFAULT_KEY_STEPS, pipe, choice, mode=mode)
                if keys.kind is KeyStepKind.AUTO:
                    assert Sampler.parse(choice).one_call_per_step, (choice, mode)
                    auto[source].add((Sampler.parse(choice).value, mode))
    # Only the paper's samplers have calibrated defaults; Replicate's names measure nothing.
    assert auto[None] == {
        ("DDIM-50", "deep"),
        ("DPM-Solver-20", "deep"),
        ("DDIM-50", "encoder"),
        ("DPM-Solver-20", "encoder"),
        ("DPM-Solver++-20", "encoder"),
    }
    assert auto[sorted(policy.SD15_REPOS)[0]] == {("DDIM-50", "deep"), ("DPM-Solver-20", "deep")}


def test_prepare_weights_calibrates_only_the_presets_and_setup_then_finds_every_default(tmp_path, capsys):
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    model = TextToImage.load(folder)
    for name in ("K_EULER", "HeunDiscrete", "PNDM", "UniPCMultistep"):
        for mode in ("deep", "encoder"):
            described = model.prepare_default_key_steps(name, mode, calibrate=False)  # measures nothing
            assert "Calibrating" not in capsys.readouterr().out
            every = {"K_EULER": 4, "UniPCMultistep": 4}.get(name, 3)  # policy.SCHEDULER_DEFAULTS
            assert described.startswith(f"uniform:{every}" if mode == "deep" else "paper")
    assert model.prepare_default_key_steps("HeunDiscrete", "deep", calibrate=False) == (
        "uniform:3: 17 of 49 steps are key steps [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, "
        "45, 48] (HeunDiscrete, 25 steps (49 UNet calls, each a step of the key steps))"
    )
    assert model.check_default_key_steps(["K_EULER", "KarrasDPM"], ["deep", "encoder"]) == []


# ------------------------------------------------------------------------------------------ running


def test_a_heun_request_echoes_its_unet_calls_and_times_the_whole_loop():
    pipe = build_tiny_pipeline(0)
    request = GenerationRequest(
        prompt="a red circle", sampler="HeunDiscrete", num_steps=4, width=16, height=16, seed=1
    )
    request = prepare_key_steps(pipe, dataclasses.replace(request, faster=DeepReuseConfig()))
    assert request.unet_calls == (7, 0) and request.calls_run == 7
    assert request.describe_sampler() == "HeunDiscrete, 4 steps (7 UNet calls, each a step of the key steps)"
    result = generate(pipe, request)
    assert result.stats.full_passes == request.schedule.num_key_steps == 3  # calls 0, 3 and 6 of 7
    assert result.stats.full_passes + result.stats.partial_passes == 7
    # The loop ends at the 7th call's callback, not at the 4th.
    assert np.isfinite(result.loop_seconds) and 0 < result.loop_seconds <= result.seconds


def test_image_to_image_with_heun_starts_at_the_call_diffusers_starts_at():
    from PIL import Image

    pipe = build_tiny_pipeline(0)
    request = GenerationRequest(
        prompt="a red circle",
        sampler="HeunDiscrete",
        num_steps=4,
        image=Image.new("RGB", (32, 32), "white"),
        strength=0.5,
        faster=DeepReuseConfig(key_steps=KeySteps.uniform(2)),
    )
    request = prepare_key_steps(pipe, request)
    assert request.unet_calls == (7, 4) and request.calls_run == 3  # the last 2 of 4 steps: 3 calls
    result = generate(pipe, request)
    assert result.stats.full_passes + result.stats.partial_passes == 3
    assert result.stats.full_passes == request.schedule.num_key_steps


@pytest.mark.parametrize("sampler", ["K_EULER", "HeunDiscrete"])
def test_the_command_line_runs_replicate_s_names_with_fewer_full_passes_than_unet_calls(
    sampler, tmp_path, capsys
):
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    out = tmp_path / "out"
    argv = ["a red circle", "--weights", str(weights), "--out", str(out), "--sampler", sampler]
    assert cli.main([*argv, "--steps", "6", "--width", "16", "--height", "16"]) == 0
    printed = capsys.readouterr().out
    calls = 11 if sampler == "HeunDiscrete" else 6
    every = 4 if sampler == "K_EULER" else 3  # the default: Euler's measured interval, else every third call
    full = len(range(0, calls, every))
    if sampler == "HeunDiscrete":
        assert (
            "Sampler: HeunDiscrete, 6 steps (11 UNet calls, each a step of the key steps), 16x16" in printed
        )
    else:
        assert "Sampler: K_EULER, 6 steps, 16x16" in printed
    assert f"Key steps: uniform:{every}: {full} of {calls} steps are key steps" in printed
    assert f"{full} full / {calls - full} partial UNet passes" in printed
    assert (out / "faster-0.png").exists()


@pytest.mark.parametrize("sampler", ["K_EULER", "HeunDiscrete"])
def test_the_cog_model_runs_replicate_s_names_with_fewer_full_passes_than_unet_calls(
    sampler, tmp_path, capsys
):
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    predictor = predict.Predictor()
    predictor.model = TextToImage.load(folder)
    predictor.outputs = tmp_path / "outputs"
    metrics = {}
    predictor.record_metric = lambda name, value: metrics.update({name: value})
    inputs = cog_defaults()
    inputs.update(sampler=sampler, num_inference_steps=5, width=64, height=64, seed=2, output_format="png")
    paths = predictor.run(**inputs)
    assert [path.name for path in paths] == ["out-0.png"]
    calls = 9 if sampler == "HeunDiscrete" else 5
    assert metrics["full_passes"] == len(range(0, calls, 3)) < calls
    assert metrics["full_passes"] + metrics["partial_passes"] == calls
    assert f"Sampler: {sampler}, 5 steps" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ refusals


def test_check_sampler_choice_names_the_cog_inputs():
    encoder = faster_config("paper", mode="encoder")
    for name in ("HeunDiscrete", "PNDM", "UniPCMultistep"):
        with pytest.raises(ValueError) as error:
            check_sampler_choice(name, encoder)
        message = str(error.value)
        assert message.startswith(f"sampler {name!r} does not work with noise_injection on (mode 'encoder')")
        assert "set noise_injection to false" in message and "'K_EULER'" in message
        assert "'HeunDiscrete'" not in message.split("supports it: ")[1]
    for name in ("K_EULER", "K_EULER_ANCESTRAL", "KLMS", "DPMSolverMultistep", "KarrasDPM", "DDIM"):
        check_sampler_choice(name, encoder)  # prior noise injection supports these
    check_sampler_choice("HeunDiscrete", faster_config("paper", mode="encoder", noise_injection=False))
    check_sampler_choice("HeunDiscrete", faster_config("paper", mode="encoder", noise_strength=0))
    auto = faster_config("auto:5", mode="deep")
    with pytest.raises(ValueError, match=r"^key_steps 'auto:5' needs a calibration, which sampler 'PNDM'"):
        check_sampler_choice("PNDM", auto)
    with pytest.raises(ValueError, match=r"^choose_branch calibrates each branch, which sampler 'Heun"):
        check_sampler_choice("HeunDiscrete", faster_config("uniform:3", mode="deep"), choose_branch=True)
    check_sampler_choice("K_EULER", auto, choose_branch=True)  # one call a step: it calibrates


def cog_run(**inputs) -> None:
    """``run()`` on the tiny pipeline, failing the test if a UNet call is made."""
    predictor = predict.Predictor()
    predictor.model = TextToImage(build_tiny_pipeline(0))

    def no_model_work(*args, **kwargs):
        raise AssertionError("model work started")

    predictor.model.pipe.unet.register_forward_pre_hook(no_model_work)
    predictor.outputs = None  # nothing is saved: every case fails first
    predictor.run(**{**cog_defaults(), "width": 64, "height": 64, **inputs})


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"sampler": "HeunDiscrete", "mode": "encoder"},
            "sampler 'HeunDiscrete' does not work with noise_injection on (mode 'encoder'): ",
        ),
        (
            {"sampler": "PNDM", "key_steps": "auto"},
            "key_steps 'auto' needs a calibration, which sampler 'PNDM' cannot have: it calls the UNet N + 1",
        ),
        (
            {"sampler": "HeunDiscrete", "choose_branch": True},
            "choose_branch calibrates each branch, which sampler 'HeunDiscrete' cannot have",
        ),
        (
            {"sampler": "k_euler"},
            "sampler must be one of 'DDIM-50', 'DPM-Solver-20', 'DPM-Solver++-20', 'DDIM', ",
        ),
    ],
)
def test_the_cog_model_refuses_what_a_sampler_cannot_do_naming_the_inputs(inputs, message):
    with pytest.raises(ValueError) as error:
        cog_run(**inputs)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--sampler", "HeunDiscrete", "--mode", "encoder"],
            "error: --sampler 'HeunDiscrete' does not work with prior noise injection (on in --mode "
            "encoder): ",
        ),
        (
            ["--sampler", "pndm", "--key-steps", "auto:4"],
            "error: --key-steps 'auto:4' needs a calibration, which --sampler 'PNDM' cannot have",
        ),
        (
            ["--sampler", "HeunDiscrete", "--branch", "auto"],
            "error: --branch auto calibrates each branch, which --sampler 'HeunDiscrete' cannot have",
        ),
        (["--sampler", "euler"], "error: --sampler: unknown value 'euler'; allowed: 'DDIM-50', "),
    ],
)
def test_the_command_line_refuses_what_a_sampler_cannot_do_before_loading(
    flags, message, tmp_path, monkeypatch, capsys
):
    def load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", load)
    assert cli.main(["a red circle", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "--no-noise-injection" in err or "--no-noise-injection" not in message


def test_heun_in_encoder_mode_without_noise_injection_runs_the_paper_s_preset_over_its_calls(
    tmp_path, capsys
):
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    argv = ["a red circle", "--weights", str(weights), "--out", str(tmp_path / "out"), "--steps", "4"]
    argv += ["--sampler", "HeunDiscrete", "--mode", "encoder", "--no-noise-injection"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Key steps: paper: 5 of 7 steps are key steps [0, 1, 2, 3, 5]" in printed
    assert "5 full / 2 partial UNet passes" in printed
