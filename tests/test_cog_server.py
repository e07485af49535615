"""The Cog model through the real Cog HTTP server, as Replicate calls it.

``python -m cog.server.http`` runs ``predict.py:Predictor`` on 127.0.0.1 with a tiny SD-shaped weights folder
(random weights, an SD-like VAE, a safety checker), and every test posts the JSON body Replicate sends. The
server runs without the schema ``cog build`` generates, so every check of the inputs is the predictor's own.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from .cog_server import UploadReceiver, WebhookReceiver, decode_outputs, running_server, save_server_weights

#: A cheap request for the tiny model: 64 x 64 px is its smallest size, 8 x 8 latents.
SMALL = dict(prompt="a red circle above a blue square", width=64, height=64, output_format="png")

#: A request that takes the tiny model seconds (256 x 256 px, DDIM with 50 steps), to cancel.
SLOW = dict(prompt="a photo of a cat", width=256, height=256, sampler="DDIM-50", seed=1)

MIME_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cog")
    with running_server(save_server_weights(folder / "weights"), folder / "server.log") as server:
        health = server.wait_for_setup()
        assert health["status"] == "READY", health
        yield server


@pytest.fixture(scope="module")
def compared(server):
    """Two images from faster diffusion, then two from stock diffusers, with the same seed."""
    prediction = server.predict(**SMALL, num_outputs=2, seed=5, compare_with_baseline=True)
    assert prediction["status"] == "succeeded", prediction.get("error")
    return prediction


def pixels(prediction) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for _, image in decode_outputs(prediction)]


def same_pixels(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("sampler", "output_format", "width", "height", "key_steps"),
    [
        # The default, deep reuse: auto:13 of 50 full passes (DDIM), auto:6@feature of 20 (DPM-Solver), every
        # third of 20 (DPM-Solver++).
        ("DDIM-50", "png", 64, 64, 13),
        ("DPM-Solver-20", "jpg", 128, 64, 6),
        ("DPM-Solver++-20", "webp", 64, 96, 7),
    ],
)
def test_each_sampler_returns_images_of_the_requested_size_and_format(
    server, sampler, output_format, width, height, key_steps
):
    request = dict(SMALL, sampler=sampler, output_format=output_format, width=width, height=height)
    prediction = server.predict(**request, num_outputs=2, seed=7)

    assert prediction["status"] == "succeeded", prediction.get("error")
    outputs = [(mime, image.format, image.size) for mime, image in decode_outputs(prediction)]
    assert outputs == [(MIME_TYPES[output_format], PIL_FORMATS[output_format], (width, height))] * 2
    metrics = prediction["metrics"]
    steps = 50 if sampler == "DDIM-50" else 20
    assert (metrics["full_passes"], metrics["partial_passes"]) == (key_steps, steps - key_steps)
    assert (metrics["encoder_passes"], metrics["decoder_passes"]) == (key_steps, steps)  # the former names
    assert metrics["image_output_count"] == 2
    assert metrics["unet_seconds"] > 0


def test_the_same_seed_gives_identical_pixels_and_the_seed_is_logged(server):
    first = server.predict(**SMALL, seed=1234)
    second = server.predict(**SMALL, seed=1234)
    other = server.predict(**SMALL, seed=1235)

    assert "Using seed: 1234\n" in first["logs"]
    assert same_pixels(pixels(first), pixels(second))
    assert not same_pixels(pixels(first), pixels(other))


def test_without_a_seed_a_random_one_is_logged_and_reproduces_the_images(server):
    unseeded = server.predict(**SMALL)
    seed = int(re.search(r"^Using seed: (\d+)$", unseeded["logs"], re.MULTILINE).group(1))

    assert same_pixels(pixels(unseeded), pixels(server.predict(**SMALL, seed=seed)))


def test_compare_with_baseline_returns_the_faster_images_then_the_stock_ones(server, compared):
    faster = server.predict(**SMALL, num_outputs=2, seed=5)

    images = pixels(compared)
    assert len(images) == 4
    assert same_pixels(images[:2], pixels(faster))
    assert not same_pixels(images[:2], images[2:])
    assert compared["metrics"]["image_output_count"] == 4
    assert compared["metrics"]["speedup"] > 0 and compared["metrics"]["baseline_unet_seconds"] > 0
    assert re.search(r"^Stock diffusers: [\d.]+ s", compared["logs"], re.MULTILINE)
    assert re.search(r"^Speedup: [\d.]+x end to end, [\d.]+x denoising$", compared["logs"], re.MULTILINE)


def test_uploaded_outputs_are_named_faster_and_stock_whatever_order_the_uploads_finish_in(
    server, compared, tmp_path
):
    """Replicate uploads the outputs and lists them in the order their uploads finish. Here the faster images'
    uploads are held back, and their names still tell them apart."""
    uploads = UploadReceiver(hold_back="faster-", delay=1.0)
    try:
        with running_server(server.weights, tmp_path / "server.log", upload_url=uploads.url) as uploading:
            assert uploading.wait_for_setup()["status"] == "READY"
            prediction = uploading.predict(**SMALL, num_outputs=2, seed=5, compare_with_baseline=True)
    finally:
        uploads.close()

    assert prediction["status"] == "succeeded", prediction.get("error")
    names = {url.rsplit("/", 1)[-1]: url for url in prediction["output"]}
    assert sorted(names) == ["faster-0.png", "faster-1.png", "stock-0.png", "stock-1.png"]
    by_name = [np.asarray(uploads.image(names[name]).convert("RGB")) for name in sorted(names)]
    assert same_pixels(by_name, pixels(compared))


def test_all_key_steps_without_noise_injection_give_the_stock_pixels(server, compared):
    every_step = server.predict(**SMALL, num_outputs=2, seed=5, key_steps="all", noise_injection=False)

    assert every_step["metrics"]["encoder_passes"] == 50
    assert same_pixels(pixels(every_step), pixels(compared)[2:])


def test_num_inference_steps_runs_that_many_steps_with_key_steps_calibrated_and_saved_for_it(server):
    from faster_diffusion.calibration import load_calibrations

    prediction = server.predict(**SMALL, num_inference_steps=12, seed=3)

    assert prediction["status"] == "succeeded", prediction.get("error")
    assert prediction["metrics"]["decoder_passes"] == 12
    # The default, deep reuse's auto:13 of 50, keeps its fraction: auto:3 of 12, calibrated for deep:0 reuse.
    assert "Calibrating key steps of deep:0 reuse for this model (DDIM-50, 12 steps)" in prediction["logs"]
    assert prediction["metrics"]["encoder_passes"] == 3
    assert 12 in [c.num_steps for c in load_calibrations(server.weights)]
    again = server.predict(**SMALL, num_inference_steps=12, seed=3)
    assert "Calibrating" not in again["logs"] and same_pixels(pixels(again), pixels(prediction))
    paper = server.predict(**SMALL, num_inference_steps=12, key_steps="paper")
    assert paper["metrics"]["encoder_passes"] == 6  # the paper's preset at 12 steps: 0, 1, 2, 3, 5, 10


def test_mode_deep_runs_deep_reuse_and_every_step_full_gives_the_stock_pixels(server, compared):
    deep = server.predict(**SMALL, num_outputs=2, seed=5, mode="deep", sampler="DPM-Solver-20")

    assert deep["status"] == "succeeded", deep.get("error")
    assert deep["metrics"]["encoder_passes"] == 6  # auto:6@feature of 20 steps by default
    assert re.search(
        r"^Faster diffusion \(deep reuse\): .* 6 full / 14 partial UNet passes$", deep["logs"], re.M
    )
    assert "Noise injection: off" in deep["logs"]
    all_full = server.predict(**SMALL, num_outputs=2, seed=5, mode="deep", key_steps="all", branch=2)
    assert same_pixels(pixels(all_full), pixels(compared)[2:])


def test_choose_branch_times_the_branches_and_runs_what_it_echoes(server):
    chosen = server.predict(**SMALL, seed=5, mode="deep", sampler="DPM-Solver-20", choose_branch=True)

    assert chosen["status"] == "succeeded", chosen.get("error")
    logs = chosen["logs"]
    assert "Timing a partial step of each branch here (64x64, batch of 1), once" in logs
    line = re.search(r"^Branch: auto: .*$", logs, re.M)
    assert line is not None, logs
    # The choice rests on this machine's timings: branch 0 keeps the default key steps (6 of 20); a deeper
    # branch runs its own calibrated full steps, echoed as such.
    if line[0].endswith("key steps asked for"):
        assert "Key steps: auto:6@feature" in logs and chosen["metrics"]["encoder_passes"] == 6
    else:
        found = re.match(r"Branch: auto: branch (\d+) with (\d+) full steps", line[0])
        assert found is not None and found[1] != "0", line[0]
        assert f"full passes, branch {found[1]}, calibrated by prediction error of deep:{found[1]}" in logs
        assert chosen["metrics"]["encoder_passes"] == int(found[2])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(mode="encoder", choose_branch=True), "choose_branch applies to deep reuse only (mode deep)"),
        (dict(mode="deep", branch=11), "branch: branch must be a whole number from 0 to 5 for this UNet"),
        (
            dict(mode="encoder", branch=1),
            "branch applies to mode 'deep' only, got branch 1 with mode 'encoder'",
        ),
        (dict(key_steps="0,2,x"), "key_steps: invalid value '0,2,x'"),
        (dict(key_steps="0,60"), "key_steps: index 60 is out of range for 50 steps"),
        (dict(width=100), "width must be a multiple of 8, got 100"),
        (dict(width=2056), "width must be between 64 and 2048, got 2056"),
        (dict(sampler="Euler"), "sampler must be one of 'DDIM-50', 'DPM-Solver-20', 'DPM-Solver++-20'"),
        (dict(num_outputs=0), "num_outputs must be between 1 and 4, got 0"),
        (dict(num_inference_steps=501), "num_inference_steps must be between 1 and 500, got 501"),
        (dict(num_outputs=5), "num_outputs must be between 1 and 4, got 5"),
        (dict(noise_strength=-0.001), "noise_strength must be between 0.0 and 0.1, got -0.001"),
        (dict(max_decoder_batch=-1), "max_decoder_batch must be between 0 and 50, got -1"),
        (dict(output_format="gif"), "output_format must be one of 'webp', 'jpg', 'png', got 'gif'"),
    ],
)
def test_a_bad_input_fails_naming_it_and_the_next_request_succeeds(server, bad, message):
    failed = server.predict(**dict(SMALL, **bad))

    assert failed["status"] == "failed"
    assert message in failed["error"]
    assert server.predict(**SMALL, sampler="DPM-Solver-20")["status"] == "succeeded"


def test_a_canceled_async_prediction_stops_between_steps_and_the_server_carries_on(server):
    webhook = WebhookReceiver()
    try:
        body = dict(id="cancel-me", input=SLOW, webhook=webhook.url, webhook_events_filter=["completed"])
        status, _ = server.request("PUT", "/predictions/cancel-me", body, {"Prefer": "respond-async"})
        assert status == 202
        server.wait_for_log("cancel-me", "Noise injection")  # printed just before the denoising loop starts
        time.sleep(0.3)
        assert server.request("POST", "/predictions/cancel-me/cancel")[0] == 200
        ended = webhook.wait_for(lambda update: update.get("id") == "cancel-me")
    finally:
        webhook.close()

    assert ended["status"] == "canceled"
    stopped = re.search(r"^Canceled: faster diffusion stopped after (\d+) of 50 steps$", ended["logs"], re.M)
    assert stopped and 1 <= int(stopped.group(1)) < 50, ended["logs"]
    after = server.predict(**SMALL)
    assert after["status"] == "succeeded"
    assert (after["metrics"]["encoder_passes"], after["metrics"]["decoder_passes"]) == (13, 50)


def test_setup_logs_the_cpu_threads_and_leaves_omp_num_threads_as_set(server):
    _, health = server.request("GET", "/health-check")

    assert "CPU threads: 1 (OMP_NUM_THREADS=1 set, so left as is)" in health["setup"]["logs"]


def test_a_prediction_while_one_runs_is_refused_with_409_and_the_server_carries_on(server):
    """Cog has no queue: one prediction at a time, and 409 "At capacity" for another (docs/cog.md)."""
    webhook = WebhookReceiver()
    try:
        body = dict(id="busy", input=SLOW, webhook=webhook.url, webhook_events_filter=["completed"])
        assert server.request("PUT", "/predictions/busy", body, {"Prefer": "respond-async"})[0] == 202
        try:
            server.wait_for_log("busy", "Noise injection")  # running its denoising loop
            status, refused = server.request("POST", "/predictions", {"input": SMALL})
        finally:
            server.request("POST", "/predictions/busy/cancel")
            webhook.wait_for(lambda update: update.get("id") == "busy")  # the slot is free again
    finally:
        webhook.close()

    assert status == 409
    assert refused == {"error": "At capacity - all prediction slots busy", "status": "failed"}
    assert server.predict(**SMALL)["status"] == "succeeded"


def test_the_server_log_has_no_deprecation_warning(server):
    assert server.predict(**SMALL)["status"] == "succeeded"
    _, health = server.request("GET", "/health-check")

    assert "Detected sync run()" in server.log_text()
    assert "deprecat" not in (server.log_text() + health["setup"]["logs"]).lower()


def test_flagged_images_fail_the_run_unless_the_safety_checker_is_disabled(tmp_path):
    weights = save_server_weights(tmp_path / "weights", flag_everything=True)
    with running_server(weights, tmp_path / "server.log") as server:
        assert server.wait_for_setup()["status"] == "READY"
        flagged = server.predict(**SMALL, num_outputs=2)
        unchecked = server.predict(**SMALL, num_outputs=2, disable_safety_checker=True)
        checked_again = server.predict(**SMALL)

    assert flagged["status"] == "failed"
    assert "NSFW content detected in all 2 outputs. Try running it again" in flagged["error"]
    assert unchecked["status"] == "succeeded"
    assert len(decode_outputs(unchecked)) == 2
    assert checked_again["status"] == "failed"


def test_setup_without_weights_offline_fails_and_names_the_download_command(tmp_path):
    """Online, setup would fetch the weights into the missing folder (tests/test_download.py)."""
    missing = tmp_path / "no-weights-here"
    with running_server(missing, tmp_path / "server.log", env={"HF_HUB_OFFLINE": "1"}) as server:
        health = server.wait_for_setup()

    assert health["status"] == "SETUP_FAILED"
    assert f"No weights folder at {missing}" in health["setup"]["logs"]
    assert "Fill it with `script/download-weights`" in health["setup"]["logs"]
    assert (
        "Not fetched from the Hugging Face hub at setup: HF_HUB_OFFLINE=1 is set." in health["setup"]["logs"]
    )
    assert not missing.exists()


def test_an_input_image_as_a_data_uri_runs_image_to_image_at_its_size(server):
    """Replicate sends a file input as a URL; the server fetches it (here a data URI) into a local file."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (72, 64), "orange").save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    request = dict(SMALL, image=image, prompt_strength=0.5, key_steps="all", noise_injection=False, seed=3)
    prediction = server.predict(**request, compare_with_baseline=True)

    assert prediction["status"] == "succeeded", prediction.get("error")
    outputs = decode_outputs(prediction)
    # The input image's size, not width x height.
    assert [image.size for _, image in outputs] == [(72, 64)] * 2
    assert same_pixels(*([np.asarray(image.convert("RGB"))] for _, image in outputs))
    assert "Image-to-image: strength 0.5, 25 of 50 steps run, output 72x64" in prediction["logs"]


def test_an_input_that_is_not_an_image_fails_naming_it(server):
    text = "data:text/plain;base64,aGVsbG8="
    prediction = server.predict(**SMALL, image=text)
    assert prediction["status"] == "failed"
    error = prediction["error"]
    assert re.search(r"image: \S+ is not an image file that can be read", error), error


def _data_uri(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_mask_inpaints_and_a_mask_of_another_size_fails_naming_mask(server):
    from PIL import Image

    image = _data_uri(Image.new("RGB", (72, 64), "orange"))
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, (36, 0, 72, 64))  # repaint the right half
    request = dict(SMALL, image=image, mask=_data_uri(mask), prompt_strength=0.8, seed=3)
    prediction = server.predict(**request)
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert [image.size for _, image in decode_outputs(prediction)] == [(72, 64)]
    assert "Inpainting (white of the mask repainted): strength 0.8, 40 of 50 steps run" in prediction["logs"]
    failed = server.predict(**dict(request, mask=_data_uri(Image.new("L", (64, 64), 255))))
    assert failed["status"] == "failed"
    assert ": mask: 64x64 px (rounded down to a multiple of 8), but the image is 72x64" in failed["error"]


def test_lora_weights_load_by_path_and_bad_ones_fail_naming_lora_weights(server, tmp_path):
    from faster_diffusion.app.loading import load_pipeline

    from .test_lora import make_lora

    lora = make_lora(load_pipeline(server.weights, device="cpu"), tmp_path / "tiny-lora.safetensors")
    base = server.predict(**SMALL, seed=11, key_steps="uniform:3")
    loaded = server.predict(**SMALL, seed=11, key_steps="uniform:3", lora_weights=str(lora), lora_scale=1.0)
    assert loaded["status"] == "succeeded", loaded.get("error")
    assert not same_pixels(pixels(loaded), pixels(base))
    again = server.predict(**SMALL, seed=11, key_steps="uniform:3")  # no LoRA: the base model again
    assert same_pixels(pixels(again), pixels(base))
    missing = server.predict(**SMALL, lora_weights=str(tmp_path / "missing.safetensors"))
    assert missing["status"] == "failed" and ": lora_weights: no such file: " in missing["error"], missing[
        "error"
    ]
    scale = server.predict(**SMALL, lora_weights=str(lora), lora_scale=1.5)
    assert "lora_scale must be between 0.0 and 1.0, got 1.5" in scale["error"]
    assert server.predict(**SMALL, apply_watermark=False)["status"] == "succeeded"  # SD: nothing to mark
