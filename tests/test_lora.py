"""LoRA weights (``lora_weights``, ``lora_scale``): fetched from a URL or a path, loaded onto the pipeline
and unloaded to the base weights bit for bit, refused with a message naming the input when they cannot be
used, and calibrated for on their own when ``auto`` places the key steps."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from faster_diffusion import reference, use_sampler
from faster_diffusion.app import lora
from faster_diffusion.app.generate import GenerationRequest, faster_config, generate, prepare_key_steps
from faster_diffusion.app.loading import load_pipeline
from faster_diffusion.app.lora import (
    REFERENCE_LORA,
    REFERENCE_LORA_COLOURS,
    LoraError,
    fetch_lora,
    loaded_lora,
    use_lora,
)
from faster_diffusion.calibration import CALIBRATION_FILE, find_calibration, model_fingerprint
from faster_diffusion.reference import shapes
from faster_diffusion.samplers import make_scheduler
from fixtures.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline, save_tiny_weights

from .conftest import assert_equal_up_to_rounding, generate_latents

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def quiet(message: str) -> None:
    """A ``log`` that drops what it is given."""


# ----------------------------------------------------------------------------------------- LoRA files


def make_lora(pipe, path: Path, *, text_encoders: bool = True, seed: int = 0) -> Path:
    """Save a LoRA of ``pipe``'s family to ``path`` in diffusers' format: rank 2 on the UNet's attention
    projections (and the text encoders' q and v, when ``text_encoders``), with random weights (``pipe`` is
    changed: build one for it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=UNET_TARGETS))
        names = ["text_encoder", "text_encoder_2"] if text_encoders else []
        encoders = {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}
        for encoder in encoders.values():
            encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for module in [pipe.unet, *encoders.values()]:
                for name, parameter in module.named_parameters():
                    if "lora_B" in name:  # peft starts B at zero: a LoRA that changes nothing
                        parameter.normal_(0, 0.3)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    layers.update({f"{name}_lora_layers": get_peft_model_state_dict(m) for name, m in encoders.items()})
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """LoRA files of the tiny pipelines: ``sd`` (UNet and text encoder), ``sd_unet`` (the UNet alone) and the
    same weights in kohya's format (``sd_kohya``), ``sdxl`` (UNet and both text encoders), ``partial`` (``sd``
    with layers the tiny SD UNet does not have), and ``unet_checkpoint`` (a full UNet, not a LoRA)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("loras")
    files = {
        "sd": make_lora(build_tiny_pipeline(1), folder / "sd.safetensors"),
        "sd_other": make_lora(build_tiny_pipeline(1), folder / "sd_other.safetensors", seed=1),
        "sdxl": make_lora(build_tiny_sdxl_pipeline(1), folder / "sdxl.safetensors"),
    }
    pipe = build_tiny_pipeline(1)
    files["sd_unet"] = make_lora(pipe, folder / "sd_unet.safetensors", text_encoders=False)
    kohya = convert_state_dict_to_kohya(get_peft_model_state_dict(pipe.unet))
    files["sd_kohya"] = folder / "sd_kohya.safetensors"
    save_file({f"lora_unet_{key}": value.contiguous() for key, value in kohya.items()}, files["sd_kohya"])
    partial = load_file(files["sd_unet"])
    missing = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # tiny SD: no attention there
    partial.update(
        {f"{missing}.lora_A.weight": torch.zeros(2, 64), f"{missing}.lora_B.weight": torch.zeros(64, 2)}
    )
    files["partial"] = folder / "partial.safetensors"
    save_file(partial, files["partial"])
    files["unet_checkpoint"] = folder / "unet_checkpoint.safetensors"
    save_file(dict(build_tiny_pipeline(1).unet.state_dict()), files["unet_checkpoint"])
    return files


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before)


# ------------------------------------------------------------------------------------ load and unload


def test_a_lora_changes_the_output_and_unloading_restores_the_base_bit_for_bit(loras):
    pipe = build_tiny_pipeline(0)
    unet, text = state(pipe.unet), state(pipe.text_encoder)
    fingerprint = model_fingerprint(pipe.unet)
    stock = generate_latents(pipe, steps=4)
    loaded = use_lora(pipe, loras["sd"], 1.0, log=quiet)
    assert loaded is not None and loaded_lora(pipe) is loaded
    assert loaded.unet_layers == 6 * 2 * 4  # 6 transformer blocks, 2 attentions each, 4 projections each
    assert not torch.equal(generate_latents(pipe, steps=4), stock)
    assert use_lora(pipe, None, log=quiet) is None and loaded_lora(pipe) is None
    assert_same_state(pipe.unet, unet)
    assert_same_state(pipe.text_encoder, text)
    assert model_fingerprint(pipe.unet) == fingerprint
    assert torch.equal(generate_latents(pipe, steps=4), stock)


def test_lora_scale_0_is_stock_and_loads_nothing(loras):
    pipe = build_tiny_pipeline(0)
    stock = generate_latents(pipe, steps=4)
    use_lora(pipe, loras["sd"], 0.6, log=quiet)
    assert use_lora(pipe, loras["sd"], 0.0, log=quiet) is None
    assert loaded_lora(pipe) is None and not pipe.get_list_adapters().get("unet")
    assert torch.equal(generate_latents(pipe, steps=4), stock)


def test_the_scale_weights_the_lora(loras):
    pipe = build_tiny_pipeline(0)
    stock = generate_latents(pipe, steps=4)
    use_lora(pipe, loras["sd"], 0.3, log=quiet)
    low = generate_latents(pipe, steps=4)
    use_lora(pipe, loras["sd"], 1.0, log=quiet)
    high = generate_latents(pipe, steps=4)
    assert 0 < (low - stock).abs().mean() < (high - stock).abs().mean()


def test_the_same_lora_stays_loaded_and_another_file_or_scale_replaces_it(loras, monkeypatch):
    pipe = build_tiny_pipeline(0)
    loads = []
    original = type(pipe).load_lora_weights
    monkeypatch.setattr(
        type(pipe), "load_lora_weights", lambda self, *a, **k: loads.append(a) or original(self, *a, **k)
    )
    first = use_lora(pipe, loras["sd"], 0.6, log=quiet)
    assert use_lora(pipe, str(loras["sd"]), 0.6, log=quiet) is first
    assert len(loads) == 1
    other_scale = use_lora(pipe, loras["sd"], 0.8, log=quiet)
    assert other_scale.sha256 == first.sha256 and other_scale.adapter != first.adapter
    other_file = use_lora(pipe, loras["sd_other"], 0.8, log=quiet)
    assert other_file.sha256 != first.sha256
    assert len(loads) == 3
    assert list(pipe.get_list_adapters()["unet"]) == [other_file.adapter]  # one LoRA at a time
    # Unloaded by other code: loaded again.
    pipe.unload_lora_weights()
    assert use_lora(pipe, loras["sd_other"], 0.8, log=quiet) is not other_file
    assert len(loads) == 4


def test_the_kohya_format_loads_as_the_diffusers_format_of_the_same_weights(loras):
    pipe = build_tiny_pipeline(0)
    use_lora(pipe, loras["sd_unet"], 1.0, log=quiet)
    diffusers_format = generate_latents(pipe, steps=4)
    kohya = use_lora(pipe, loras["sd_kohya"], 1.0, log=quiet)
    assert kohya.unet_layers == loaded_lora(pipe).unet_layers > 0
    assert torch.equal(generate_latents(pipe, steps=4), diffusers_format)


def test_faster_diffusion_runs_on_the_lora_d_model(loras):
    """Every step a key step without noise injection is stock, in either reuse mode, with the LoRA's layers in
    the UNet (float64: equal up to rounding)."""
    pipe = build_tiny_pipeline(0, dtype=torch.float64)
    use_lora(pipe, loras["sd"], 0.6, log=quiet)
    for mode in ("encoder", "deep"):
        request = GenerationRequest(
            prompt="a red circle",
            sampler="DPM-Solver-20",
            num_steps=6,
            width=16,
            height=16,
            faster=faster_config("all", mode=mode, noise_injection=False),
        )
        stock = generate(pipe, request, accelerate=False, output_type="latent").images[0]
        faster = generate(pipe, request, output_type="latent")
        assert faster.stats.full_passes == 6
        assert_equal_up_to_rounding(faster.images[0], stock)


# ------------------------------------------------------------------------------------ refused inputs


@pytest.mark.parametrize("scale", [-0.1, 1.5, float("nan"), True, "0.6"])
def test_a_scale_out_of_bounds_is_refused_naming_lora_scale(loras, scale):
    with pytest.raises(LoraError, match=r"^lora_scale must be"):
        use_lora(build_tiny_pipeline(0), loras["sd"], scale, log=quiet)


def test_files_that_are_not_loras_are_refused_naming_lora_weights(loras, tmp_path):
    pipe = build_tiny_pipeline(0)
    (tmp_path / "a.ckpt").write_bytes(b"pickle")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(64))
    save_file({"foo.weight": torch.zeros(2, 2)}, tmp_path / "tensors.safetensors")
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        tmp_path: "is a folder",
        tmp_path / "a.ckpt": "pickled checkpoint",
        tmp_path / "notes.txt": "is not a .safetensors file",
        tmp_path / "garbage.safetensors": "is not a safetensors file",
        tmp_path / "tensors.safetensors": "is not a LoRA: none of its 1 tensors",
        loras["unet_checkpoint"]: "is not a LoRA: none of its",
    }
    for path, message in cases.items():
        with pytest.raises(LoraError, match=r"^lora_weights") as raised:
            use_lora(pipe, path, 0.6, log=quiet)
        assert message in str(raised.value), path
        assert loaded_lora(pipe) is None


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused_naming_lora_weights(loras, tmp_path):
    path = tmp_path / "locked.safetensors"
    path.write_bytes(loras["sd"].read_bytes())
    path.chmod(0)
    with pytest.raises(LoraError, match=r"^lora_weights: cannot read"):
        use_lora(build_tiny_pipeline(0), path, 0.6, log=quiet)


def test_a_lora_for_the_other_family_is_refused_and_leaves_the_base_model(loras):
    """An SDXL LoRA on SD weights, and the reverse: diffusers' shape errors become a message naming the input
    and the family; the pipeline is left with no LoRA and its own weights."""
    for pipe, wrong, family, hint in [
        (build_tiny_pipeline(0), loras["sdxl"], "Stable Diffusion 1.x/2.x", "It is an SDXL LoRA"),
        (build_tiny_sdxl_pipeline(0), loras["sd"], "SDXL base", "It is a LoRA for Stable Diffusion 1.x/2.x"),
    ]:
        unet, fingerprint = state(pipe.unet), model_fingerprint(pipe.unet)
        stock = generate_latents(pipe, steps=3)
        with pytest.raises(LoraError) as raised:
            use_lora(pipe, wrong, 0.6, log=quiet)
        message = str(raised.value)
        assert message.startswith(f"lora_weights: {wrong} is not a LoRA for this model ({family})")
        assert "do not have this model's shapes" in message and hint in message
        assert loaded_lora(pipe) is None and model_fingerprint(pipe.unet) == fingerprint
        assert_same_state(pipe.unet, unet)
        assert torch.equal(generate_latents(pipe, steps=3), stock)
    # The right family loads on the SDXL pipeline left behind.
    assert use_lora(pipe, loras["sdxl"], 0.6, log=quiet).unet_layers > 0


def test_a_lora_with_layers_this_unet_lacks_is_refused(loras):
    """peft loads the layers it finds and only warns about the others: the count of layers catches it."""
    pipe = build_tiny_pipeline(0)
    fingerprint = model_fingerprint(pipe.unet)
    with pytest.raises(LoraError, match=r"1 of its \d+ UNet layers are not layers of this model's UNet"):
        use_lora(pipe, loras["partial"], 0.6, log=quiet)
    assert loaded_lora(pipe) is None and model_fingerprint(pipe.unet) == fingerprint
    tensors = {
        "unet.nothing.here.lora_A.weight": torch.zeros(2, 4),
        "unet.nothing.here.lora_B.weight": torch.zeros(4, 2),
    }
    save_file(tensors, loras["partial"].with_name("nowhere.safetensors"))
    with pytest.raises(LoraError, match=r"^lora_weights: .* is not a LoRA for this model"):
        use_lora(pipe, loras["partial"].with_name("nowhere.safetensors"), 0.6, log=quiet)
    assert loaded_lora(pipe) is None and model_fingerprint(pipe.unet) == fingerprint


# ------------------------------------------------------------------------------------------------ URLs


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An http server on 127.0.0.1 serving ``root``; ``requests`` lists the paths asked for. ``/cut`` says it
    sends 1000 bytes and closes the connection after 10."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if self.path != "/cut":
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True

        def log_message(self, format, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_port}", requests=requests)
    httpd.shutdown()
    httpd.server_close()


def test_a_url_is_downloaded_once_into_the_cache_and_loaded(loras, server, tmp_path):
    (server.root / "style.safetensors").write_bytes(loras["sd"].read_bytes())
    cache = tmp_path / "cache"
    url = f"{server.url}/style.safetensors?token=secret"
    pipe = build_tiny_pipeline(0)
    logs: list[str] = []
    loaded = use_lora(pipe, url, 0.6, cache_dir=cache, log=logs.append)
    assert loaded.source == f"{server.url}/style.safetensors"  # the token is not shown, nor logged
    assert not [line for line in logs if "secret" in line]
    assert loaded.path.parent == cache and loaded.path.read_bytes() == loras["sd"].read_bytes()
    assert loaded.sha256 == use_lora(build_tiny_pipeline(0), loras["sd"], 0.6, log=quiet).sha256
    assert len(server.requests) == 1
    assert use_lora(pipe, url, 0.6, cache_dir=cache, log=quiet) is loaded
    assert fetch_lora(url, cache_dir=cache, log=quiet) == loaded.path
    assert len(server.requests) == 1  # from the cache
    assert not list(cache.glob("*.partial"))


def test_bad_urls_are_refused_naming_lora_weights(loras, server, tmp_path, monkeypatch):
    monkeypatch.setattr(lora, "MAX_FILE_BYTES", 1000)
    (server.root / "big.safetensors").write_bytes(loras["sd"].read_bytes())
    with socket.socket() as unused:  # a port nothing listens on: the connection is refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    (server.root / "page").write_text("<html>not a LoRA</html>")
    cache = tmp_path / "cache"
    cases = {
        f"{server.url}/missing.safetensors": "the server answered HTTP 404",
        f"http://127.0.0.1:{port}/x.safetensors": "cannot be reached (the connection was refused)",
        f"{server.url}/model.ckpt": "pickled checkpoint",
        f"{server.url}/trained_model.tar": "is an archive",
        "ftp://example.com/x.safetensors": "must be an http(s) URL",
        "https:///x.safetensors": "must be an http(s) URL",
        f"{server.url}/page": "is not a safetensors file",
        f"{server.url}/cut": "the download was cut off after 10 bytes",
        f"{server.url}/big.safetensors": "is larger than",
    }
    for url, message in cases.items():
        with pytest.raises(LoraError, match=r"^lora_weights") as raised:
            use_lora(build_tiny_pipeline(0), url, 0.6, cache_dir=cache, log=quiet)
        assert message in str(raised.value), url
    # The others were refused by their names; nothing is kept, so a URL that serves a LoRA later gets it.
    assert server.requests == ["/missing.safetensors", "/page", "/cut", "/big.safetensors"]
    assert not list(cache.iterdir())


def test_a_server_that_does_not_answer_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections wait in the backlog, and nothing is ever sent
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.safetensors"
        with pytest.raises(LoraError, match=r"cannot be reached \(no answer within 0.5 s\)"):
            fetch_lora(url, cache_dir=tmp_path, timeout=0.5, log=quiet)


def test_the_cache_drops_the_least_recently_used_files(tmp_path, monkeypatch):
    monkeypatch.setattr(lora, "CACHE_MAX_BYTES", 250)
    files = []
    for index in range(3):
        files.append(tmp_path / f"{index}.safetensors")
        files[-1].write_bytes(b"x" * 100)
        os.utime(files[-1], (index, index))
    lora._trim_cache(tmp_path, keep=files[0])
    assert [f.exists() for f in files] == [True, False, True]


# -------------------------------------------------------------------------------------------- key steps


def auto_request(mode: str) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red circle",
        sampler="DPM-Solver-20",
        num_steps=8,
        width=16,
        height=16,
        faster=faster_config("auto:4", mode=mode),
    )


@pytest.fixture
def weights_pipe(tmp_path):
    """A tiny pipeline loaded from a weights folder, where calibrations are saved."""
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    return load_pipeline(folder, device="cpu", safety_checker=False), folder


@pytest.mark.parametrize("mode, target", [("encoder", "encoder"), ("deep", "deep:0")])
def test_auto_key_steps_with_a_lora_come_from_its_own_calibration(loras, weights_pipe, mode, target):
    """The base weights' calibration is not found for the LoRA'd model, which is calibrated on its first use
    (once), nor one scale's for another; unloading gives the base calibration back."""
    pipe, _ = weights_pipe
    request = auto_request(mode)
    scheduler = make_scheduler(request.sampler, pipe.scheduler.config)
    base_fingerprint = model_fingerprint(pipe.unet)
    prepare_key_steps(pipe, request, log=quiet)  # calibrates the base model
    base = find_calibration(pipe, 8, scheduler, target=target)

    use_lora(pipe, loras["sd"], 1.0, log=quiet)
    logs: list[str] = []
    with_lora = prepare_key_steps(pipe, request, log=logs.append)
    assert logs[0].startswith("Calibrating key steps")
    own = find_calibration(pipe, 8, scheduler, target=target)
    assert own.model == model_fingerprint(pipe.unet) != base_fingerprint == base.model
    assert own.cost != base.cost
    assert with_lora.faster.key_steps == own.key_steps(4)
    logs.clear()
    prepare_key_steps(pipe, request, log=logs.append)
    assert logs == []  # measured once

    use_lora(pipe, loras["sd"], 0.5, log=quiet)  # another scale: another model
    assert find_calibration(pipe, 8, scheduler, target=target) is None
    use_lora(pipe, None, log=quiet)
    assert find_calibration(pipe, 8, scheduler, target=target) == base
    assert prepare_key_steps(pipe, request, log=quiet).faster.key_steps == base.key_steps(4)


def test_the_lora_d_model_s_calibration_is_not_written_into_the_base_weights_file(loras, weights_pipe):
    """It is kept for this process only: the base weights' file is the base model's."""
    pipe, folder = weights_pipe
    request = auto_request("encoder")
    prepare_key_steps(pipe, request, log=quiet)
    saved = (folder / CALIBRATION_FILE).read_bytes()
    use_lora(pipe, loras["sd"], 1.0, log=quiet)
    logs: list[str] = []
    prepare_key_steps(pipe, request, log=logs.append)
    assert logs[-1].endswith("kept for this process")
    assert (folder / CALIBRATION_FILE).read_bytes() == saved


# ------------------------------------------------------------------------------------- reference model


@pytest.fixture(scope="module")
def reference_pipe():
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    yield pipe
    use_lora(pipe, None, log=quiet)


def test_the_reference_lora_is_small_and_in_diffusers_format():
    assert REFERENCE_LORA.stat().st_size < 1_000_000
    found = lora.check_lora_file(REFERENCE_LORA)
    assert found.looks_sdxl() is None and all(key.startswith("unet.") for key in found.keys)


def test_the_reference_lora_draws_the_colours_it_was_trained_to(reference_pipe):
    """Stock DPM-Solver-20 on 12 held-out prompts (two of each colour), read by the attribute classifier: the
    base model draws the colour the caption names, the LoRA at scale 1 the colour it maps it to
    (``REFERENCE_LORA_COLOURS``), and unloading it gives the base model's images back. 12 of 12 of each when
    written; ``training/README.md`` has the full held-out set."""
    classifier = reference.load_classifier()
    held_out = [shapes.Scene(*combo) for combo in shapes.HELD_OUT_COMBOS]
    scenes = [scene for colour in shapes.COLOURS for scene in [s for s in held_out if s.colour == colour][:2]]
    colours = shapes.ATTRIBUTES["colour"]

    def drawn():
        use_sampler(reference_pipe, "DPM-Solver-20")
        with torch.inference_mode():
            images = reference_pipe(
                [shapes.caption(scene) for scene in scenes],
                num_inference_steps=20,
                guidance_scale=reference.GUIDANCE_SCALE,
                generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))],
                output_type="np",
            ).images
        x = torch.from_numpy(images.transpose(0, 3, 1, 2) * 2 - 1).float()
        read = classifier.predict(x)[:, list(shapes.ATTRIBUTES).index("colour")]
        return images, [colours[int(i)] for i in read]

    stock, base_colours = drawn()
    use_lora(reference_pipe, REFERENCE_LORA, 1.0, log=quiet)
    _, lora_colours = drawn()
    use_lora(reference_pipe, None, log=quiet)
    again, _ = drawn()
    said = [scene.colour for scene in scenes]
    assert sum(a == b for a, b in zip(base_colours, said, strict=True)) >= 11
    mapped = [REFERENCE_LORA_COLOURS[colour] for colour in said]
    assert sum(a == b for a, b in zip(lora_colours, mapped, strict=True)) >= 9
    assert (stock == again).all()
