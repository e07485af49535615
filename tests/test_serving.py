"""The predictor's parts without the server: its input declarations and checks, stopping between steps on a
cancel, the safety checker per request, outputs and metrics."""

from __future__ import annotations

import ast
import ctypes
import inspect
import io
import threading
import time
import tokenize
from pathlib import Path

import numpy as np
import pytest
from cog import CancelationException, FieldInfo
from PIL import Image

import predict
from faster_diffusion import (
    PRIOR_NOISE_ALPHA,
    PRIOR_NOISE_TAU,
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    Sampler,
    reference,
)
from faster_diffusion.app.cancel import StoppedBetweenSteps, run_stoppable
from faster_diffusion.app.generate import MAX_SEED, MODE_NAMES, GenerationRequest, generate
from faster_diffusion.app.serving import (
    IMAGE_FORMATS,
    NSFWError,
    Outcome,
    TextToImage,
    check_inputs,
    save_images,
)
from faster_diffusion.policy import DEFAULT_KEY_STEPS, DEFAULT_MODE
from fixtures.tiny import (
    build_tiny_pipeline,
    make_safety_checker_flag_everything,
    save_tiny_weights,
)

PREDICT_PY = Path(predict.__file__)
RUN = predict.Predictor().run


def defaults() -> dict:
    return {name: getattr(predict.Inputs, name).default for name in inspect.signature(RUN).parameters}


def tiny_request(**overrides) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red cat", "width": 16, "height": 16, "seed": 1, **overrides})


# ------------------------------------------------------------------------------------------ declarations


def test_every_run_input_is_declared_once_in_inputs_with_a_description():
    tree = ast.parse(PREDICT_PY.read_text())
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run")
    parameters = [a.arg for a in run.args.args[1:]]
    references = [(d.value.id, d.attr) for d in run.args.defaults]

    assert references == [("Inputs", name) for name in parameters]
    declared = [name for name, value in vars(predict.Inputs).items() if isinstance(value, FieldInfo)]
    assert declared == parameters
    assert all(getattr(predict.Inputs, name).description for name in declared)


def test_input_declarations_are_single_literals_that_cog_build_can_read():
    """cog build reads the schema statically: descriptions must be one string literal (an implicitly joined
    string reaches the schema garbled), bounds number literals, choices a list of literals."""
    source = PREDICT_PY.read_text()
    inputs = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Inputs")
    for statement in inputs.body:
        if not isinstance(statement, ast.Assign):
            continue
        call = statement.value
        assert isinstance(call, ast.Call) and call.func.id == "Input"
        for keyword in call.keywords:
            segment = ast.get_source_segment(source, keyword.value)
            tokens = tokenize.generate_tokens(io.StringIO(segment).readline)
            strings = [token for token in tokens if token.type == tokenize.STRING]
            if keyword.arg == "description":
                assert len(strings) == 1 and segment == strings[0].string, segment
            elif keyword.arg == "choices":
                assert isinstance(keyword.value, ast.List)
                assert all(isinstance(item, ast.Constant) for item in keyword.value.elts), segment
            else:
                assert isinstance(keyword.value, ast.Constant), segment


def test_input_limits_agree_with_the_core():
    inputs = predict.Inputs
    assert tuple(inputs.sampler.choices) == Sampler.names()
    assert Sampler.parse(inputs.sampler.default)
    assert inputs.key_steps.default == DEFAULT_KEY_STEPS
    assert (inputs.mode.default, inputs.mode.choices) == (DEFAULT_MODE, list(MODE_NAMES))
    assert inputs.noise_strength.default == PRIOR_NOISE_ALPHA
    assert inputs.noise_threshold.default == PRIOR_NOISE_TAU
    assert (inputs.seed.ge, inputs.seed.le) == (0, MAX_SEED)
    assert inputs.output_format.choices == list(IMAGE_FORMATS)
    for size in (inputs.width, inputs.height):
        assert size.ge % 8 == size.le % 8 == 0
        assert size.default is None  # the model's size (TextToImage.default_size)
    # 0 is automatic; a cap of the most steps a sampler takes already decodes any group in one batch.
    assert (inputs.max_decoder_batch.ge, inputs.max_decoder_batch.default) == (0, 0)
    assert inputs.max_decoder_batch.le == max(sampler.default_steps for sampler in Sampler)


# ------------------------------------------------------------------------------------------ input checks


def test_the_defaults_pass_the_input_checks():
    check_inputs(RUN, predict.Inputs, defaults())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("width", 2056, "width must be between 64 and 2048, got 2056"),
        ("height", 32, "height must be between 64 and 2048, got 32"),
        ("width", "512", "width must be a whole number, got '512'"),
        ("num_outputs", True, "num_outputs must be a whole number, got True"),
        ("num_outputs", 5, "num_outputs must be between 1 and 4, got 5"),
        ("guidance_scale", "7", "guidance_scale must be a finite number, got '7'"),
        ("guidance_scale", float("nan"), "guidance_scale must be a finite number, got nan"),
        ("guidance_scale", 0.5, "guidance_scale must be between 1.0 and 20.0, got 0.5"),
        ("seed", -1, "seed must be between 0 and 4294967295, got -1"),
        ("prompt", None, "prompt is required"),
        ("parallel_decoder", "yes", "parallel_decoder must be true or false, got 'yes'"),
        (
            "sampler",
            "ddim",
            "sampler must be one of 'DDIM-50', 'DPM-Solver-20', 'DPM-Solver++-20', 'DDIM', "
            "'DPMSolverMultistep', 'KarrasDPM', 'K_EULER', 'K_EULER_ANCESTRAL', 'HeunDiscrete', 'PNDM', "
            "'KLMS', 'UniPCMultistep', got 'ddim'",
        ),
        ("output_format", "jpeg", "output_format must be one of 'webp', 'jpg', 'png', got 'jpeg'"),
        ("output_quality", 101, "output_quality must be between 0 and 100, got 101"),
        ("noise_strength", -0.5, "noise_strength must be between 0.0 and 0.1, got -0.5"),
        ("noise_threshold", 1001, "noise_threshold must be between 0 and 1000, got 1001"),
        ("max_decoder_batch", -1, "max_decoder_batch must be between 0 and 50, got -1"),
        ("max_decoder_batch", 51, "max_decoder_batch must be between 0 and 50, got 51"),
        ("max_decoder_batch", 2.5, "max_decoder_batch must be a whole number, got 2.5"),
    ],
)
def test_a_bad_input_is_rejected_naming_it(name, value, message):
    with pytest.raises(ValueError) as error:
        check_inputs(RUN, predict.Inputs, {**defaults(), name: value})
    assert str(error.value) == message


@pytest.mark.parametrize(("name", "value"), [("guidance_scale", 7), ("seed", None), ("seed", MAX_SEED)])
def test_whole_numbers_pass_as_floats_and_the_seed_may_be_left_out(name, value):
    check_inputs(RUN, predict.Inputs, {**defaults(), name: value})


class _Stop(Exception):
    pass


#: The options ``run()`` passed to ``generate`` in each :func:`run_request`.
GENERATE_OPTIONS: list[dict] = []


def run_request(**inputs) -> GenerationRequest:
    """The request that ``run()`` builds from ``inputs`` (over the defaults), without running it."""
    predictor, requests = predict.Predictor(), []

    class Recorder:
        default_size = 1024
        default_guidance = 6.0

        def key_steps(self, text, sampler, mode="encoder", num_steps=None):
            if text != DEFAULT_KEY_STEPS:
                return text
            return "paper" if mode == "encoder" else "uniform:3"

        def generate(self, request, **options):
            requests.append(request)
            GENERATE_OPTIONS.append(options)
            raise _Stop

    predictor.model = Recorder()
    with pytest.raises(_Stop):
        predictor.run(**{**defaults(), **inputs})
    return requests[0]


def test_sdxl_s_sizes_pass_and_the_pixel_cap_bounds_the_rest_naming_width_and_height():
    for width, height in ((1344, 768), (768, 1344), (1216, 832), (1536, 640), (1024, 1024), (2048, 512)):
        request = run_request(width=width, height=height)
        assert (request.width, request.height) == (width, height)
    with pytest.raises(ValueError, match=r"^width x height must be at most 1048576 pixels .* got 1536x768"):
        run_request(width=1536, height=768)
    with pytest.raises(ValueError, match=r"^width must be a multiple of 8, got 1340$"):
        run_request(width=1340, height=768)


def test_apply_watermark_reaches_the_request():
    assert run_request().watermark is True
    assert run_request(apply_watermark=False).watermark is False
    with pytest.raises(ValueError, match=r"^apply_watermark must be true or false, got 'no'$"):
        run_request(apply_watermark="no")


def test_max_decoder_batch_0_is_automatic_and_a_number_caps_the_decoder_batch():
    assert run_request(mode="encoder", max_decoder_batch=0).faster.max_decoder_batch == "auto"
    capped = run_request(mode="encoder", max_decoder_batch=5).faster
    assert (capped.max_decoder_batch, capped.decoder_batch_cap) == (5, 5)
    sequential = run_request(mode="encoder", max_decoder_batch=5, parallel_decoder=False).faster
    assert sequential.decoder_batch_cap == 1


def test_num_inference_steps_sets_the_request_s_step_count_and_blank_is_the_sampler_s():
    assert run_request(num_inference_steps=30).steps == 30
    assert run_request(sampler="DPM-Solver-20").steps == 20
    assert run_request(num_inference_steps=None).num_steps is None
    with pytest.raises(ValueError, match=r"^num_inference_steps must be between 1 and 500, got 0$"):
        run_request(num_inference_steps=0)
    with pytest.raises(ValueError, match=r"^num_inference_steps must be a whole number, got 7.5$"):
        run_request(num_inference_steps=7.5)
    # Image-to-image checks the strength against the steps asked: int(4 * 0.2) = 0 steps would run.
    with pytest.raises(ValueError, match=r"prompt_strength 0.2 with 4 steps runs no step .*at least 0.25"):
        run_request(image=Path("unused.png"), num_inference_steps=4, prompt_strength=0.2)


def test_a_blank_guidance_scale_is_the_model_s_own_as_on_the_command_line():
    assert run_request().guidance_scale == 6.0  # the loaded model's (the recorder's)
    assert run_request(guidance_scale=3).guidance_scale == 3
    assert TextToImage(build_tiny_pipeline(0)).default_guidance == 7.5
    assert TextToImage.load(reference.MODEL_DIR).default_guidance == reference.GUIDANCE_SCALE
    sd15_layout = TextToImage.load(reference.SD15_LAYOUT_MODEL_DIR)
    assert sd15_layout.default_guidance == reference.SD15_LAYOUT_GUIDANCE_SCALE


def test_the_reference_model_refuses_sizes_it_was_not_trained_for_naming_the_input():
    model = TextToImage.load(reference.MODEL_DIR)
    assert model.default_size == reference.IMAGE_SIZE
    request = GenerationRequest(prompt=reference.EXAMPLE_PROMPT, width=64, height=64)
    with pytest.raises(ValueError, match=r"^width and height: the built-in reference model draws 32x32"):
        model.generate(request)
    with pytest.raises(ValueError, match=r"^image: .* 32x32 images only .*got 48x32$"):
        model.generate(GenerationRequest(prompt="a red circle", image=Image.new("RGB", (48, 32))))


def test_the_default_key_steps_follow_the_step_count_asked(tmp_path):
    model = TextToImage(build_tiny_pipeline(0))
    assert model.key_steps("default", "DDIM-50") == KeySteps.auto(13)
    assert model.key_steps("default", "DDIM-50", num_steps=30) == KeySteps.auto(8)  # 13/50 of 30
    assert model.key_steps("default", "DPM-Solver-20", num_steps=30) == KeySteps.auto(9, "feature")  # 6/20
    assert model.key_steps("default", "DPM-Solver++-20", num_steps=30) == KeySteps.uniform(3)
    assert model.key_steps("default", "DPM-Solver-20", "encoder") == KeySteps.auto(9)
    assert model.key_steps("default", "DPM-Solver-20", "encoder", num_steps=30) == KeySteps.auto(14)  # 9/20
    assert model.key_steps("default", "DDIM-50", "encoder", num_steps=30) == KeySteps.auto()


def test_mode_deep_gives_deep_reuse_with_its_branch_and_forecast():
    faster = run_request(mode="deep", branch=3, forecast=True, key_steps="uniform:4").faster
    assert isinstance(faster, DeepReuseConfig)
    assert (faster.branch, faster.forecast, faster.key_steps) == (3, 1, KeySteps.uniform(4))
    assert not faster.noise_injection.enabled  # deep reuse's own default
    assert run_request(mode="deep").faster.key_steps == KeySteps.uniform(3)  # the mode's default
    assert isinstance(run_request().faster, DeepReuseConfig)  # the default mode
    encoder = run_request(mode="encoder", forecast=True).faster
    assert isinstance(encoder, FasterDiffusionConfig) and encoder.forecast == 1


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"mode": "encoder", "branch": 2},
            "branch applies to mode 'deep' only, got branch 2 with mode 'encoder'",
        ),
        (
            {"max_decoder_batch": 4},
            "max_decoder_batch applies to mode 'encoder' only (deep reuse runs one step at a time), got 4",
        ),
        ({"mode": "cache"}, "mode must be one of 'encoder', 'deep', got 'cache'"),
        ({"mode": "deep", "branch": 12}, "branch must be between 0 and 11, got 12"),
        ({"forecast": 1}, "forecast must be true or false, got 1"),
    ],
)
def test_mode_inputs_that_do_not_fit_fail_naming_the_input(inputs, message):
    with pytest.raises(ValueError) as error:
        run_request(**inputs)
    assert str(error.value).startswith(message)


def test_choose_branch_is_passed_to_generate_and_off_by_default():
    run_request(mode="deep")
    assert GENERATE_OPTIONS[-1]["choose_branch"] is False
    faster = run_request(mode="deep", choose_branch=True).faster
    assert GENERATE_OPTIONS[-1]["choose_branch"] is True and faster.branch == 0
    with pytest.raises(ValueError, match=r"^choose_branch applies to deep reuse only"):
        run_request(mode="encoder", choose_branch=True)


def test_a_branch_the_unet_does_not_have_fails_before_the_run():
    model = TextToImage(build_tiny_pipeline(0))
    with pytest.raises(ValueError, match=r"^branch: branch must be a whole number from 0 to 5 for this UNet"):
        model.generate(tiny_request(faster=DeepReuseConfig(branch=6)))


# ------------------------------------------------------------------------------------------ stopping


def test_an_exception_raised_into_the_waiting_thread_stops_the_run_at_the_next_step():
    """What Cog does to cancel a synchronous run(): raise CancelationException inside its thread."""
    pipe = build_tiny_pipeline(0)
    request = tiny_request()
    at_step_2 = threading.Event()
    steps, ended, raised = [], [], []

    def work(stop):
        def callback(pipe, step, timestep, tensors):
            steps.append(step)
            if step == 2:
                at_step_2.set()
                time.sleep(0.5)  # the cancel arrives in the waiting thread meanwhile
            return stop.callback(pipe, step, timestep, tensors)

        return generate(pipe, request, step_callback=callback)

    def caller():
        try:
            run_stoppable(work, on_interrupt=ended.append)
        except CancelationException:
            raised.append(True)

    thread = threading.Thread(target=caller)
    thread.start()
    assert at_step_2.wait(30)
    cancel = ctypes.py_object(CancelationException)
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), cancel) == 1
    thread.join(30)

    assert raised == [True]
    assert steps == [0, 1, 2]
    assert isinstance(ended[0], StoppedBetweenSteps) and ended[0].steps_done == 3
    assert generate(pipe, request).stats.full_passes == 9  # the pipeline is whole again


def interrupt_thread_start(monkeypatch, *, start_first: bool, wait_for: threading.Event | None = None):
    """Make the worker's ``Thread.start()`` raise a cancellation, as Cog can at any line: after really
    starting the thread (and, with ``wait_for``, once that event is set), or before starting it.

    Returns the list the worker threads are put in."""
    real_start = threading.Thread.start
    workers = []

    def start(self):
        if self.name != "generate":
            return real_start(self)
        workers.append(self)
        if start_first:
            real_start(self)
            if wait_for is not None:
                assert wait_for.wait(10)
        raise CancelationException("canceled in Thread.start")

    monkeypatch.setattr(threading.Thread, "start", start)
    return workers


def slow_to_stop_work(running: threading.Event, events: list):
    """Work that runs until it is asked to stop (or 10 s pass), then takes a moment to stop."""

    def work(stop):
        running.set()
        events.append("work began")
        deadline = time.monotonic() + 10
        while not stop.is_set and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        events.append(f"work ended, stop requested: {stop.is_set}")
        return "done"

    return work


def test_a_cancel_that_lands_once_the_worker_runs_waits_for_it_to_stop(monkeypatch):
    running, events, ended = threading.Event(), [], []
    interrupt_thread_start(monkeypatch, start_first=True, wait_for=running)

    with pytest.raises(CancelationException, match=r"canceled in Thread\.start"):
        try:
            run_stoppable(slow_to_stop_work(running, events), on_interrupt=ended.append)
        finally:
            events.append("cancel raised")

    assert events == ["work began", "work ended, stop requested: True", "cancel raised"]
    assert ended == [None]


def test_a_cancel_that_lands_before_the_worker_starts_starts_no_work(monkeypatch):
    running, events = threading.Event(), []
    workers = interrupt_thread_start(monkeypatch, start_first=False)

    with pytest.raises(CancelationException):
        run_stoppable(slow_to_stop_work(running, events))

    assert len(workers) == 1 and not workers[0].is_alive() and events == []


def test_a_cancel_that_lands_as_the_thread_starts_never_leaves_work_running(monkeypatch):
    """The thread exists but may not have begun the work: either it never does, or it is waited for."""
    running, events = threading.Event(), []
    workers = interrupt_thread_start(monkeypatch, start_first=True)

    with pytest.raises(CancelationException):
        try:
            run_stoppable(slow_to_stop_work(running, events))
        finally:
            events.append("cancel raised")
    workers[0].join(10)

    assert not workers[0].is_alive()
    assert events in (
        ["cancel raised"],
        ["work began", "work ended, stop requested: True", "cancel raised"],
    )


def test_without_an_interruption_the_result_or_the_error_of_the_run_comes_back():
    assert run_stoppable(lambda stop: 42) == 42
    with pytest.raises(ValueError, match="bad things"):
        run_stoppable(lambda stop: (_ for _ in ()).throw(ValueError("bad things")))


# ------------------------------------------------------------------------------------------ safety checker


def flag_odd_images(pipe) -> None:
    def check(clip_input, images):
        return images, [index % 2 == 1 for index in range(len(images))]

    pipe.safety_checker.forward = check


def test_the_unchecked_pipeline_shares_the_models_and_leaves_the_checked_one_alone():
    pipe = build_tiny_pipeline(0, with_safety_checker=True)
    checker, config = pipe.safety_checker, dict(pipe.config)
    model = TextToImage(pipe)

    assert model.pipe_without_checker.safety_checker is None
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(model.pipe_without_checker, name) is getattr(pipe, name)
    assert pipe.safety_checker is checker and dict(pipe.config) == config


def test_a_folder_without_a_safety_checker_loads_runs_and_says_so(tmp_path, capsys):
    model = TextToImage.load(save_tiny_weights(tmp_path / "weights", with_safety_checker=False))

    assert f"safety checker: none ({tmp_path / 'weights'} has no safety checker)" in capsys.readouterr().out
    assert model.pipe_without_checker is model.pipe
    assert len(model.generate(tiny_request()).images) == 1


def test_flagged_images_are_left_out_and_the_rest_returned_in_order(capsys):
    pipe = build_tiny_pipeline(0, with_safety_checker=True)
    flag_odd_images(pipe)
    model = TextToImage(pipe)

    outcome = model.generate(tiny_request(num_outputs=3), compare=True)
    unchecked = model.generate(tiny_request(num_outputs=3), safety_checker=False)

    assert len(outcome.images) == 4  # images 0 and 2 of each run
    kept = [np.asarray(image) for image in outcome.images]
    assert np.array_equal(kept[0], np.asarray(outcome.faster.images[0]))
    assert np.array_equal(kept[2], np.asarray(outcome.stock.images[0]))
    assert outcome.names == ["faster-0", "faster-2", "stock-0", "stock-2"]
    assert "NSFW content detected in faster image 1; it is left out" in capsys.readouterr().out
    assert len(unchecked.images) == 3


def test_a_run_whose_images_are_all_flagged_fails():
    pipe = build_tiny_pipeline(0, with_safety_checker=True)
    make_safety_checker_flag_everything(pipe.safety_checker)

    with pytest.raises(NSFWError, match="NSFW content detected in all 2 outputs"):
        TextToImage(pipe).generate(tiny_request(num_outputs=2))


# ------------------------------------------------------------------------------------------ outputs


def test_comparing_starts_with_an_untimed_warm_up_so_both_timed_runs_start_warm(monkeypatch):
    from faster_diffusion.app import generate as generate_module
    from faster_diffusion.app import serving

    calls = []
    for module in (generate_module, serving):
        original = module.generate

        def recording(pipe, request, *, accelerate=True, _original=original, **options):
            calls.append((request.steps, request.num_outputs, accelerate))
            return _original(pipe, request, accelerate=accelerate, **options)

        monkeypatch.setattr(module, "generate", recording)
    model = TextToImage(build_tiny_pipeline(0))
    request = tiny_request(
        num_steps=4, num_outputs=2, faster=FasterDiffusionConfig(key_steps=KeySteps.paper())
    )
    model.generate(request, compare=True)
    assert calls == [(2, 1, False), (4, 2, True), (4, 2, False)]
    calls.clear()
    model.generate(request)
    assert calls == [(4, 2, True)]  # no warm-up when nothing is timed against it


def test_metrics_report_passes_unet_seconds_and_the_speedup_only_when_comparing():
    model = TextToImage(build_tiny_pipeline(0))

    alone = model.generate(tiny_request()).metrics
    compared = model.generate(tiny_request(), compare=True).metrics

    assert set(alone) == {
        "full_passes",
        "partial_passes",
        "encoder_passes",  # the former names of the pass counts
        "decoder_passes",
        "unet_seconds",
        "image_output_count",
    }
    assert (alone["full_passes"], alone["partial_passes"], alone["image_output_count"]) == (9, 41, 1)
    assert (alone["encoder_passes"], alone["decoder_passes"]) == (9, 50)
    assert compared["image_output_count"] == 2
    assert compared["speedup"] == compared["baseline_unet_seconds"] / compared["unet_seconds"]


def test_metrics_leave_out_times_that_were_not_measured():
    model = TextToImage(build_tiny_pipeline(0))
    outcome = model.generate(tiny_request())
    outcome.faster.loop_seconds = float("nan")

    assert "unet_seconds" not in Outcome(outcome.images, outcome.faster, None).metrics


def saved_names(outcome: Outcome, folder: Path) -> list[str]:
    return [path.name for path in save_images(outcome.images, folder, "png", 80, outcome.names)]


def test_compared_outputs_are_named_by_run_so_their_order_survives_any_upload_order(tmp_path):
    """Replicate lists uploaded outputs in the order their uploads finish: the names must tell them apart."""
    model = TextToImage(build_tiny_pipeline(0))
    compared = model.generate(tiny_request(num_outputs=2), compare=True)
    alone = model.generate(tiny_request(num_outputs=2))

    assert saved_names(compared, tmp_path / "compared") == [
        "faster-0.png",
        "faster-1.png",
        "stock-0.png",
        "stock-1.png",
    ]
    assert saved_names(alone, tmp_path / "alone") == ["out-0.png", "out-1.png"]
    for index in range(2):
        faster = np.asarray(Image.open(tmp_path / "compared" / f"faster-{index}.png"))
        stock = np.asarray(Image.open(tmp_path / "compared" / f"stock-{index}.png"))
        assert np.array_equal(faster, np.asarray(alone.images[index]))
        assert np.array_equal(stock, np.asarray(compared.stock.images[index]))
        assert not np.array_equal(faster, stock)


def test_an_output_keeps_its_number_in_the_request_when_a_flagged_one_is_left_out(tmp_path, capsys):
    pipe = build_tiny_pipeline(0, with_safety_checker=True)
    flag_odd_images(pipe)
    model = TextToImage(pipe)

    compared = model.generate(tiny_request(num_outputs=3), compare=True)
    alone = model.generate(tiny_request(num_outputs=3))

    assert saved_names(compared, tmp_path / "compared") == [
        "faster-0.png",
        "faster-2.png",
        "stock-0.png",
        "stock-2.png",
    ]
    assert saved_names(alone, tmp_path / "alone") == ["out-0.png", "out-2.png"]
    out = capsys.readouterr().out
    assert "NSFW content detected in stock image 1; it is left out" in out
    assert "NSFW content detected in image 1; it is left out" in out


def test_run_returns_the_files_under_the_names_of_the_outcome(tmp_path):
    outcome = TextToImage(build_tiny_pipeline(0)).generate(tiny_request(num_outputs=2), compare=True)
    predictor = predict.Predictor()
    predictor.outputs = tmp_path

    class Done:
        default_size = 16
        default_guidance = 7.5

        def key_steps(self, text, sampler, mode="encoder", num_steps=None):
            return "paper" if text == DEFAULT_KEY_STEPS else text

        def generate(self, request, **options):
            return outcome

    predictor.model = Done()
    paths = predictor.run(**{**defaults(), "output_format": "jpg"})

    assert [path.name for path in paths] == ["faster-0.jpg", "faster-1.jpg", "stock-0.jpg", "stock-1.jpg"]


@pytest.mark.parametrize("output_format", ["webp", "jpg", "png"])
def test_images_are_saved_as_numbered_files_in_the_requested_format(tmp_path, output_format):
    (tmp_path / "out-7.png").write_bytes(b"from an earlier prediction")
    (tmp_path / "stock-3.png").write_bytes(b"from an earlier prediction")
    images = [Image.new("RGB", (64, 48), color) for color in ("red", "blue")]

    paths = save_images(images, tmp_path, output_format, 80)

    assert [p.name for p in paths] == [f"out-0.{output_format}", f"out-1.{output_format}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == (IMAGE_FORMATS[output_format], (64, 48))


def test_output_quality_changes_lossy_files(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    low = save_images([image], tmp_path / "low", "jpg", 5)[0].stat().st_size
    high = save_images([image], tmp_path / "high", "jpg", 95)[0].stat().st_size
    assert low < high


def test_a_request_looks_its_calibration_up_once_and_attaches_once(tmp_path, monkeypatch, capsys):
    """One request with 'auto' key steps: the calibration is looked up once, the pipeline's sampler is set and
    faster diffusion attached only by the run itself, once (plus the warm-up's and the stock run's sampler
    when comparing)."""
    from faster_diffusion import calibration as calibration_module
    from faster_diffusion.app import generate as generate_module

    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    model = TextToImage.load(folder)
    model.prepare_default_key_steps("DDIM-50")  # calibrates deep:0 once, as script/prepare-weights does
    assert "Calibrating" in capsys.readouterr().out
    calls = {"find": 0, "apply": 0, "use_sampler": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        calibration_module, "find_calibration", counting("find", calibration_module.find_calibration)
    )
    monkeypatch.setattr(
        generate_module, "apply_faster_diffusion", counting("apply", generate_module.apply_faster_diffusion)
    )
    monkeypatch.setattr(generate_module, "use_sampler", counting("use_sampler", generate_module.use_sampler))
    request = tiny_request(faster=DeepReuseConfig(key_steps=KeySteps.auto(13)))
    outcome = model.generate(request, safety_checker=False, compare=True)
    assert calls == {"find": 1, "apply": 1, "use_sampler": 3}
    assert outcome.faster.stats.full_passes == 13
    assert "Calibrating" not in capsys.readouterr().out
