"""The real Cog HTTP server running ``predict.py:Predictor`` on loopback, and tiny weights for it to load.

Shared by ``tests/test_cog_server.py`` and ``benchmarks/server_load.py``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from fixtures.tiny import (
    TINY_VAE_CONFIG,
    build_tiny_components,
    make_safety_checker_flag_everything,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The tiny VAE with four resolutions, like SD's: ``vae_scale_factor == 8``. Images of real SD sizes
#: (multiples of 8 from 64 px, the predictor's smallest) then have SD-sized latents, cheap for the tiny UNet.
SD_SHAPED_VAE = {
    **TINY_VAE_CONFIG,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
}


def save_server_weights(folder: Path, *, seed: int = 0, flag_everything: bool = False) -> Path:
    """A tiny SD-shaped weights folder (diffusers layout, safetensors, with a safety checker) for the server.

    With ``flag_everything`` the safety checker flags every image as NSFW.
    """
    components = build_tiny_components(seed, with_safety_checker=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components["vae"] = AutoencoderKL(**SD_SHAPED_VAE).eval()
    if flag_everything:
        make_safety_checker_flag_everything(components["safety_checker"])
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CogServer:
    """``python -m cog.server.http`` on 127.0.0.1 and a free port, serving ``predict.py:Predictor``."""

    def __init__(
        self, weights: Path, log: Path, *, upload_url: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        """``upload_url``: where the server uploads output files (as on Replicate), instead of sending them
        inline. ``env``: more environment variables for the server."""
        self.weights = weights
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(self.port),
            "FASTER_DIFFUSION_WEIGHTS": str(weights),
            # The tiny model gains nothing from threads; spare the other processes. When set, it wins over the
            # thread count setup() fits to the CPUs the process may use (faster_diffusion.app.threads).
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            # coglet starts its worker with the `python` on PATH: make that this interpreter.
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            **(env or {}),
        }
        command = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
        if upload_url is not None:
            command += ["--upload-url", upload_url]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for_setup(self, timeout: float = 120) -> dict[str, Any]:
        """Poll ``GET /health-check`` until setup has finished (READY or SETUP_FAILED); return the health."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"the Cog server exited with {code}:\n{self.log_text()}")
            with contextlib.suppress(OSError):
                _, health = self.request("GET", "/health-check")
                if health.get("status") not in (None, "STARTING", "UNKNOWN"):
                    return health
            time.sleep(0.2)
        raise TimeoutError(f"the Cog server did not finish setup in {timeout} s:\n{self.log_text()}")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One HTTP request; the status and the JSON body (``{}`` when empty)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        return status, json.loads(text) if text else {}

    def predict(self, **inputs: Any) -> dict[str, Any]:
        """``POST /predictions`` with the body Replicate sends; the finished prediction.

        Right after a prediction ends, coglet can still answer 409 "At capacity" for a few milliseconds while
        it frees the slot; like any client, this retries then (for up to 10 s).
        """
        deadline = time.monotonic() + 10
        while True:
            status, prediction = self.request("POST", "/predictions", {"input": inputs})
            if status != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert status == 200, (status, prediction)
        return prediction

    def wait_for_log(self, *fragments: str, timeout: float = 60) -> None:
        """Wait until a line of the server's log holds all ``fragments`` (e.g. a prediction id and a text)."""
        deadline = time.monotonic() + timeout
        while not any(all(f in line for f in fragments) for line in self.log_text().splitlines()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line with {fragments} in {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def decode_outputs(prediction: dict[str, Any]) -> list[tuple[str, Image.Image]]:
    """The output files of a prediction, sent inline as ``data:`` URLs: (mime type, decoded image) each."""
    images = []
    for url in prediction["output"]:
        header, _, payload = url.partition(",")
        assert header.startswith("data:") and header.endswith(";base64"), header
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
        image.load()
        images.append((header.removeprefix("data:").removesuffix(";base64"), image))
    return images


class WebhookReceiver:
    """A loopback HTTP server that keeps the prediction updates Cog posts to it (``webhook`` in a request)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.events.append(json.loads(body))
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, condition, timeout: float = 60) -> dict[str, Any]:
        """The first update for which ``condition(update)`` holds, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for event in self.events:
                    if condition(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no such webhook update in {timeout} s; got {self.events}")
                self.arrived.wait(remaining)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class UploadReceiver:
    """A loopback file store for the server's ``--upload-url``: it keeps each ``PUT <url><name>`` and answers
    with the file's URL, as Replicate's does. Uploads whose name starts with ``hold_back`` are answered only
    after ``delay`` seconds, so that they finish after the others."""

    def __init__(self, hold_back: str | None = None, delay: float = 1.0) -> None:
        self.files: dict[str, bytes] = {}
        self.finished: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hold_back is not None and name.startswith(hold_back):
                    time.sleep(delay)
                receiver.files[name] = body
                receiver.finished.append(name)
                self.send_response(200)
                self.send_header("Location", f"{receiver.url}{name}")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/uploads/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def image(self, url: str) -> Image.Image:
        """The uploaded image at ``url`` (an output of a prediction)."""
        assert url.startswith(self.url), url
        image = Image.open(io.BytesIO(self.files[url.removeprefix(self.url)]))
        image.load()
        return image

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def running_server(
    weights: Path, log: Path, *, upload_url: str | None = None, env: dict[str, str] | None = None
) -> Iterator[CogServer]:
    server = CogServer(weights, log, upload_url=upload_url, env=env)
    try:
        yield server
    finally:
        server.stop()
