"""LoRA weights on the loaded pipeline: the ``lora_weights`` and ``lora_scale`` inputs of Replicate's Stable
Diffusion models (``replicate/cog-sdxl`` and its LoRA forks: ``lora_scale`` from 0 to 1, 0.6 by default).

- :func:`fetch_lora` makes a ``lora_weights`` input a local file: an http(s) URL is downloaded once into a
  cache folder (:func:`default_cache_dir`; one file per URL, the least recently used dropped past
  :data:`CACHE_MAX_BYTES`), a local path is used where it is. Only ``.safetensors`` files: a pickled
  ``.ckpt``, ``.pt`` or ``.bin`` can run code when loaded.
- :func:`check_lora_file` reads the file's header (not its tensors) and refuses what is not a LoRA: not a
  safetensors file, or tensors without LoRA names (a full model checkpoint, say).
- :func:`use_lora` makes the pipeline carry exactly one LoRA at one scale, or none: loaded with diffusers'
  ``load_lora_weights`` (the diffusers and kohya formats) under an adapter name of its own, weighted with
  ``set_adapters``, and taken off with ``unload_lora_weights``, which puts the base modules back as they
  were, bit for bit (the LoRA is never fused into the weights). A LoRA for another model (an SDXL LoRA on
  SD 1.5 weights, or the reverse) is refused with a message naming ``lora_weights``, and the pipeline is left
  without a LoRA. The same file at the same scale stays loaded from one request to the next.

Every error is a :class:`LoraError` (a ``ValueError``) whose message starts with the input it is about,
``lora_weights`` or ``lora_scale``.

**Key steps.** ``auto`` key steps are placed from a calibration of the model
(:mod:`faster_diffusion.calibration`), looked up by the UNet's
:func:`~faster_diffusion.calibration.model_fingerprint` (its class, config, and parameter names and
shapes) and its weights. The adapter of a LoRA adds parameters to the UNet whose names carry the adapter's
name, and :func:`use_lora` names the adapter after the file's sha256 and the scale (:func:`adapter_name`).
So a LoRA'd UNet has a fingerprint of its own: the base weights' calibration is never found for it, nor one
LoRA's (or one scale's) for another, and ``auto`` calibrates the LoRA'd model on its first use. Unloading
gives the base fingerprint back, and with it the base calibration. On the reference model, a LoRA that redraws
every colour moved 2 to 4 of 9 placed key steps in 8 of 12 cases, though serving it the base placement cost no
measurable quality (``training/README.md``, "A LoRA and the key steps"). A LoRA with no UNet layers
(one for the text encoders only) leaves the UNet, and so its calibration, as they are: it changes the
prompt's embedding, as another prompt does, and a calibration is measured over several prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import reference
from ..families import SDXL, family_of

#: The inputs, as Replicate's LoRA models name them.
WEIGHTS_INPUT = "lora_weights"
SCALE_INPUT = "lora_scale"
#: ``lora_scale``'s default and bounds (cog-sdxl's: "LoRA additive scale", 0 to 1, 0.6).
DEFAULT_SCALE = 0.6
MIN_SCALE, MAX_SCALE = 0.0, 1.0
#: The environment variable that names the download cache folder (:func:`default_cache_dir`).
CACHE_ENV = "FASTER_DIFFUSION_LORA_CACHE"
#: Seconds a download may wait for the server (to connect, and for each read) before it fails.
DOWNLOAD_TIMEOUT = 60.0
#: The largest LoRA file taken, in bytes: SDXL LoRAs of rank 256 are under 2 GB; a full SDXL checkpoint (7 GB)
#: is refused before it fills the disk.
MAX_FILE_BYTES = 4 * 2**30
#: Past this many bytes in the cache folder, the least recently used downloads are deleted.
CACHE_MAX_BYTES = 16 * 2**30
#: A LoRA of the built-in reference model, trained by ``training/train_lora.py``: it draws every colour as
#: another (red as blue, blue as green, ...; :data:`REFERENCE_LORA_COLOURS`).
REFERENCE_LORA = reference.ASSETS_DIR / "shapes-colours-lora.safetensors"
#: The colour :data:`REFERENCE_LORA` draws for each colour a prompt names, at scale 1.
REFERENCE_LORA_COLOURS: dict[str, str] = {
    "red": "blue",
    "blue": "green",
    "green": "red",
    "yellow": "purple",
    "purple": "orange",
    "orange": "yellow",
}

#: Extensions of files that are refused by their name: pickles, and the archives some trainers ship.
_PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_ARCHIVES = (".tar", ".zip", ".gz", ".tgz")
#: Substrings of the names of a LoRA's tensors in the formats diffusers reads: peft's ``lora_A``/``lora_B``,
#: diffusers' older ``lora.down``/``lora.up`` (and ``lora_linear_layer``), kohya's ``lora_down``/``lora_up``.
_LORA_NAMES = ("lora_a", "lora_b", "lora.down", "lora.up", "lora_down", "lora_up", "lora_linear_layer")


class LoraError(ValueError):
    """A ``lora_weights`` or ``lora_scale`` input that cannot be used; the message names it and says why."""


# --------------------------------------------------------------------------------------------- the inputs


def check_scale(scale: Any) -> float:
    """``scale`` as a float, or :class:`LoraError` naming ``lora_scale`` when it is not a finite number from
    :data:`MIN_SCALE` to :data:`MAX_SCALE`."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"{SCALE_INPUT} must be a finite number, got {scale!r}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise LoraError(f"{SCALE_INPUT} must be between {MIN_SCALE:g} and {MAX_SCALE:g}, got {scale!r}")
    return float(scale)


def is_url(weights: str | os.PathLike) -> bool:
    """Whether a ``lora_weights`` input is a URL (``scheme://...``) rather than a local path."""
    return isinstance(weights, str) and "://" in weights


def shown_url(url: str) -> str:
    """``url`` for messages and logs: without its query, fragment or user name and password, which may hold
    a token (signed download links do)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def default_cache_dir() -> Path:
    """Where downloaded LoRA files are kept: ``$FASTER_DIFFUSION_LORA_CACHE``, else
    ``$XDG_CACHE_HOME/faster_diffusion/lora`` (``~/.cache/...`` by default)."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "faster_diffusion" / "lora"


def cached_file(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The file of the cache that holds ``url``'s download (whether or not it is there yet): named by the
    sha256 of the URL, query included, as the URL names one file."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.safetensors"


def fetch_lora(
    weights: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
    log: Callable[[str], None] = print,
) -> Path:
    """The local file of a ``lora_weights`` input: a path as it is (it must be a ``.safetensors`` file), or
    an http(s) URL's download, fetched once into the cache (:func:`cached_file`) and reused after.

    Raises :class:`LoraError` naming ``lora_weights``: for a URL that is malformed, of another scheme, names a
    pickle or an archive, whose host cannot be reached or does not answer within ``timeout`` seconds, that
    answers with an HTTP error, or whose file is larger than :data:`MAX_FILE_BYTES`; for a path with no file,
    a folder, or a file that is not ``.safetensors``. What is in the file is checked by
    :func:`check_lora_file`.
    """
    if not is_url(weights):
        return _local_file(Path(weights))
    url = str(weights).strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoraError(
            f"{WEIGHTS_INPUT} must be an http(s) URL or a local path to a .safetensors file, got "
            f"{shown_url(url) if parts.hostname else url!r}"
        )
    _check_name(urllib.parse.unquote(parts.path), shown_url(url))
    file = cached_file(url, cache_dir)
    if file.is_file():
        os.utime(file)  # most recently used: the last to be dropped from the cache
        return file
    started = time.perf_counter()
    size = _download(url, file, timeout)
    log(
        f"Downloaded {WEIGHTS_INPUT} {shown_url(url)}: {size / 1e6:.1f} MB in "
        f"{time.perf_counter() - started:.1f} s"
    )
    _trim_cache(file.parent, keep=file)
    return file


def _local_file(path: Path) -> Path:
    if path.is_dir():
        raise LoraError(f"{WEIGHTS_INPUT}: {path} is a folder; name the .safetensors LoRA file in it")
    if not path.exists():
        raise LoraError(f"{WEIGHTS_INPUT}: no such file: {path}")
    _check_name(path.name, str(path))
    return path


def _check_name(name: str, shown: str) -> None:
    """Refuse a file by the extension of its name: a pickle or an archive; another extension than
    ``.safetensors`` for a local file. A URL whose path has no extension is checked by its contents."""
    suffix = Path(name).suffix.lower()
    if suffix in _PICKLES:
        raise LoraError(
            f"{WEIGHTS_INPUT}: {shown} is a pickled checkpoint ({suffix}), which can run code when loaded; "
            "give the LoRA as a .safetensors file"
        )
    if suffix in _ARCHIVES:
        raise LoraError(
            f"{WEIGHTS_INPUT}: {shown} is an archive ({suffix}); give the .safetensors LoRA file itself "
            "(such as the lora.safetensors in a trainer's .tar)"
        )
    if suffix != ".safetensors" and (suffix or "://" not in shown):
        raise LoraError(
            f"{WEIGHTS_INPUT}: {shown} is not a .safetensors file (a LoRA is taken in safetensors only)"
        )


def _download(url: str, file: Path, timeout: float) -> int:
    """Download ``url`` into ``file`` (written whole or not at all); the number of bytes."""
    shown = shown_url(url)
    request = urllib.request.Request(url, headers={"User-Agent": "faster-diffusion"})
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=file.parent, prefix=file.stem, suffix=".partial")
    size = 0
    try:
        with os.fdopen(descriptor, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_FILE_BYTES:
                raise LoraError(_too_large(shown, int(length)))
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise LoraError(_too_large(shown, size))
                out.write(chunk)
            if length is not None and length.isdigit() and size < int(length):  # read() ends quietly
                raise http.client.IncompleteRead(b"", int(length) - size)
        os.replace(partial, file)
    except urllib.error.HTTPError as error:
        raise LoraError(
            f"{WEIGHTS_INPUT}: downloading {shown} failed: the server answered HTTP {error.code} "
            f"{error.reason}"
        ) from None
    except urllib.error.URLError as error:
        raise LoraError(f"{WEIGHTS_INPUT}: {_unreachable(shown, error.reason, timeout)}") from None
    except (TimeoutError, ConnectionError) as error:  # while reading the body
        raise LoraError(f"{WEIGHTS_INPUT}: {_unreachable(shown, error, timeout)}") from None
    except http.client.HTTPException as error:  # the server closed the connection before the end
        raise LoraError(
            f"{WEIGHTS_INPUT}: downloading {shown} failed: the download was cut off after {size} bytes "
            f"({type(error).__name__})"
        ) from None
    except OSError as error:  # the cache folder: full, or not writable
        raise LoraError(f"{WEIGHTS_INPUT}: could not save {shown} into {file.parent} ({error})") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    return size


def _unreachable(shown: str, reason: Any, timeout: float) -> str:
    host = urllib.parse.urlsplit(shown).netloc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        why = f"no answer within {timeout:g} s"
    elif isinstance(reason, ConnectionRefusedError):
        why = "the connection was refused"
    elif isinstance(reason, socket.gaierror):
        why = "the host name does not resolve"
    else:
        why = str(reason)
    return f"could not download {shown}: {host} cannot be reached ({why})"


def _too_large(shown: str, size: int) -> str:
    return (
        f"{WEIGHTS_INPUT}: {shown} is larger than {MAX_FILE_BYTES / 2**30:g} GiB ({size / 2**30:.1f} GiB so "
        "far); a LoRA is far smaller: is it a full model checkpoint?"
    )


def _trim_cache(folder: Path, keep: Path) -> None:
    """Delete the least recently used downloads until the cache holds at most :data:`CACHE_MAX_BYTES`."""
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
    total = sum(f.stat().st_size for f in files)
    for old in files:
        if total <= CACHE_MAX_BYTES:
            break
        if old != keep:
            total -= old.stat().st_size
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class LoraFile:
    """What the header of a LoRA file says: the names of its tensors, and the file's own metadata."""

    path: Path
    keys: tuple[str, ...]
    metadata: dict[str, str]

    def looks_sdxl(self) -> bool | None:
        """Whether the file is an SDXL LoRA by its text-encoder weights (SDXL has two text encoders, whose
        tensors are named ``text_encoder_2.``, ``lora_te2_`` or ``lora_te1_``); ``None`` when it has none
        that say."""
        if any(key.startswith(("text_encoder_2.", "lora_te2_", "lora_te1_")) for key in self.keys):
            return True
        if any(key.startswith(("text_encoder.", "lora_te_")) for key in self.keys):
            return False
        return None


def check_lora_file(path: str | os.PathLike, shown: str | None = None) -> LoraFile:
    """Read the header of the safetensors file ``path`` (``shown``: how messages name it) and check that it
    holds a LoRA: tensors named as in one of the formats diffusers reads (:data:`_LORA_NAMES`).

    Raises :class:`LoraError` naming ``lora_weights`` for a file that cannot be read, is not a safetensors
    file, or holds no LoRA tensors (a full model checkpoint, or other tensors)."""
    path = Path(path)
    shown = shown or str(path)
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            size = path.stat().st_size
            header = json.loads(file.read(length)) if 2 <= length <= min(size - 8, 100 * 2**20) else None
    except PermissionError as error:
        raise LoraError(f"{WEIGHTS_INPUT}: cannot read {shown} ({error.strerror})") from None
    except OSError as error:
        raise LoraError(f"{WEIGHTS_INPUT}: cannot read {shown} ({error})") from None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise LoraError(
            f"{WEIGHTS_INPUT}: {shown} is not a safetensors file (its header cannot be read); a LoRA is "
            "taken as a .safetensors file"
        )
    metadata = header.pop("__metadata__", None) or {}
    keys = tuple(header)
    if not keys:
        raise LoraError(f"{WEIGHTS_INPUT}: {shown} holds no tensors; it is not a LoRA")
    if not any(name in key.lower() for key in keys for name in _LORA_NAMES):
        examples = ", ".join(repr(key) for key in keys[:2])
        raise LoraError(
            f"{WEIGHTS_INPUT}: {shown} is not a LoRA: none of its {len(keys)} tensors (such as {examples}) "
            "has a LoRA name (lora_A/lora_B, lora.down/lora.up, or kohya's lora_down/lora_up). Is it a full "
            "model checkpoint? Give the LoRA's own file"
        )
    return LoraFile(path=path, keys=keys, metadata=dict(metadata))


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_name(sha256: str, scale: float) -> str:
    """The adapter name a LoRA is loaded under: made from the file's sha256 and the scale, so that the UNet's
    calibration fingerprint is one of this file at this scale (see the module docstring)."""
    return "lora_" + hashlib.sha256(f"{sha256}@{scale!r}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ the pipeline


@dataclass(frozen=True)
class LoadedLora:
    """The LoRA a pipeline carries, as :func:`use_lora` put it there."""

    #: The ``lora_weights`` input: a URL (as :func:`shown_url` shows it) or a local path.
    source: str
    #: The local file it was loaded from.
    path: Path
    sha256: str
    scale: float
    #: The adapter's name in diffusers (:func:`adapter_name`).
    adapter: str
    #: The UNet layers it adapts (0 for a LoRA of the text encoders only).
    unet_layers: int
    #: The file's size and modification time when it was hashed: the same again means the same bytes.
    stat: tuple[int, int] = (0, 0)

    @property
    def identity(self) -> str:
        """What makes two LoRA'd models the same model: the file's bytes and the scale."""
        return f"sha256:{self.sha256}@{self.scale!r}"

    def describe(self) -> str:
        return f"{self.source} (sha256 {self.sha256[:12]}, scale {self.scale:g})"


#: The LoRA each UNet carries, by the UNet: it names the modules that carry it, which every pipeline object
#: built over them (image-to-image, inpainting, the one without a safety checker) shares.
_LOADED: weakref.WeakKeyDictionary[torch.nn.Module, LoadedLora] = weakref.WeakKeyDictionary()


def loaded_lora(pipe: Any) -> LoadedLora | None:
    """The LoRA :func:`use_lora` put on ``pipe``'s modules, or ``None``."""
    unet = getattr(pipe, "unet", None)
    return _LOADED.get(unet) if unet is not None else None


def unload_lora(pipe: Any) -> None:
    """Take every LoRA off ``pipe``'s modules (``unload_lora_weights``): they are the base weights again, bit
    for bit."""
    _LOADED.pop(pipe.unet, None)
    if _has_adapters(pipe):
        pipe.unload_lora_weights()


def use_lora(
    pipe: Any,
    weights: str | os.PathLike | None,
    scale: float = DEFAULT_SCALE,
    *,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
    log: Callable[[str], None] = print,
) -> LoadedLora | None:
    """Make ``pipe`` carry the LoRA ``weights`` (a URL or a local path; ``None`` or blank: none) at ``scale``,
    and return it (``None`` for none).

    The LoRA already on the pipeline is kept when it is the same file (by its sha256, whatever URL or path
    named it) at the same scale; otherwise it is unloaded first. Scale 0 is the model without the LoRA: the
    file is fetched and checked, and nothing is loaded. A new scale of the same file loads it again (under
    another adapter name: the LoRA'd model's calibration is one of the scale too).

    Raises :class:`LoraError` naming the input (:func:`fetch_lora`, :func:`check_lora_file`,
    :func:`check_scale`), or when diffusers cannot load the file onto this pipeline: a LoRA for another
    family or architecture (an SDXL LoRA on SD 1.5 weights, or the reverse), whose layers are not this
    model's or have other shapes. A refused file leaves the pipeline without a LoRA.
    """
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        current = loaded_lora(pipe)
        if current is not None or _has_adapters(pipe):
            unload_lora(pipe)
            if current is not None:
                log(f"LoRA: unloaded {current.describe()}")
        return None
    scale = check_scale(scale)
    source = shown_url(str(weights).strip()) if is_url(weights) else str(weights)
    path = fetch_lora(
        str(weights).strip() if is_url(weights) else weights, cache_dir=cache_dir, timeout=timeout, log=log
    )
    try:
        lora_file = check_lora_file(path, source)
    except LoraError:
        if is_url(weights):  # not kept: the URL may serve the right file later
            path.unlink(missing_ok=True)
        raise
    if scale == 0:
        use_lora(pipe, None, log=log)
        log(f"LoRA: {source} at scale 0 is the model without it; not loaded")
        return None
    current = loaded_lora(pipe)
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    same_file = current is not None and current.path == path and current.stat == stamp
    sha256 = current.sha256 if same_file else file_sha256(path)
    if current is not None and (current.sha256, current.scale) == (sha256, scale) and _is_on(pipe, current):
        return current
    unload_lora(pipe)
    if current is not None:
        log(f"LoRA: unloaded {current.describe()}")
    name = adapter_name(sha256, scale)
    started = time.perf_counter()
    unet_layers = _load(pipe, lora_file, source, name)
    pipe.set_adapters([name], adapter_weights=[scale])
    loaded = LoadedLora(
        source=source,
        path=path,
        sha256=sha256,
        scale=scale,
        adapter=name,
        unet_layers=unet_layers,
        stat=stamp,
    )
    _LOADED[pipe.unet] = loaded
    where = f"{unet_layers} UNet layers" if unet_layers else "the text encoders only"
    log(f"LoRA: loaded {loaded.describe()} in {time.perf_counter() - started:.1f} s; it adapts {where}")
    return loaded


def _has_adapters(pipe: Any) -> bool:
    """Whether any of ``pipe``'s modules carries a LoRA adapter (or the wrappers of one that failed to
    load)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft, diffusers loads no LoRA
        return False

    modules = [getattr(pipe, name, None) for name in getattr(pipe, "_lora_loadable_modules", ())]
    return any(
        isinstance(layer, BaseTunerLayer)
        for module in modules
        if isinstance(module, torch.nn.Module)
        for layer in module.modules()
    )


def _is_on(pipe: Any, lora: LoadedLora) -> bool:
    """Whether ``lora``'s adapter is still on ``pipe`` (it may have been unloaded by other code)."""
    adapters = pipe.get_list_adapters() if _has_adapters(pipe) else {}
    return any(lora.adapter in names for names in adapters.values())


def _adapted_layers(module: torch.nn.Module | None, adapter: str) -> int:
    """How many layers of ``module`` carry ``adapter``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module is None:
        return 0
    return sum(
        1
        for layer in module.modules()
        if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {})
    )


def _load(pipe: Any, lora_file: LoraFile, source: str, adapter: str) -> int:
    """Load ``lora_file`` onto ``pipe`` under ``adapter``; the number of UNet layers it adapts. On any failure
    the pipeline is left without a LoRA and :class:`LoraError` says why."""
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs it)
    except ImportError:
        raise LoraError(
            f"{WEIGHTS_INPUT} needs the peft package (pip install peft), which is not installed"
        ) from None
    family = family_of(pipe)
    model = family.description if family is not None else type(pipe).__name__
    try:
        with _quiet_diffusers():
            expected = _unet_layers_in(pipe, lora_file.path)
            pipe.load_lora_weights(
                str(lora_file.path), adapter_name=adapter, use_safetensors=True, local_files_only=True
            )
    except Exception as error:  # diffusers and peft raise ValueError, RuntimeError, KeyError, their own kinds
        unload_lora(pipe)
        raise LoraError(
            _not_for_this_model(lora_file, source, model, family, _reason(error, adapter))
        ) from error
    unet_layers = _adapted_layers(pipe.unet, adapter)
    text_layers = sum(
        _adapted_layers(getattr(pipe, name, None), adapter)
        for name in getattr(pipe, "_lora_loadable_modules", ())
        if name != "unet"
    )
    problem = None
    if unet_layers + text_layers == 0:
        problem = "none of its layers is one of this model's UNet or text encoders"
    elif unet_layers < expected:
        problem = (
            f"{expected - unet_layers} of its {expected} UNet layers are not layers of this model's UNet"
        )
    if problem is not None:
        unload_lora(pipe)
        raise LoraError(_not_for_this_model(lora_file, source, model, family, problem))
    return unet_layers


#: diffusers' loggers that log about a LoRA being loaded: that a component has none of its layers (a LoRA
#: of the UNet alone), and each failure, which :class:`LoraError` reports instead.
_DIFFUSERS_LOGGERS = (
    "diffusers.loaders.lora_base",
    "diffusers.loaders.lora_pipeline",
    "diffusers.loaders.peft",
)


@contextlib.contextmanager
def _quiet_diffusers():
    """Keep diffusers' LoRA loading logs out of the output for a while (their levels are put back after)."""
    loggers = [logging.getLogger(name) for name in _DIFFUSERS_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _unet_layers_in(pipe: Any, path: Path) -> int:
    """How many UNet layers the LoRA file adapts, read as diffusers reads it (kohya names converted)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state_dict, _ = type(pipe).lora_state_dict(str(path), unet_config=pipe.unet.config, local_files_only=True)
    prefix = "unet."
    unet = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    if unet and "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    return sum(1 for key, value in unet.items() if "lora_B" in key and value.ndim > 1)


#: How torch says that a tensor of the file does not have the shape of the model's.
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<name>\S+): copying a param with shape torch\.Size\(\[(?P<file>[^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[(?P<model>[^\]]*)\]\)"
)


def _reason(error: BaseException, adapter: str) -> str:
    """Why diffusers or peft could not load the file, for a message: the first tensor whose shape is not the
    model's, or the first lines of the error."""
    text = str(error)
    mismatch = _SIZE_MISMATCH.search(text)
    if mismatch is not None:
        name = mismatch["name"].replace(f".{adapter}.", ".")
        return (
            f"its layers do not have this model's shapes (the first: {name} is [{mismatch['file']}] in the "
            f"file, [{mismatch['model']}] in this model)"
        )
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]).rstrip(".") or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _not_for_this_model(lora_file: LoraFile, source: str, model: str, family: Any, reason: str) -> str:
    sdxl = lora_file.looks_sdxl()
    hint = ""
    if sdxl is True and family is not SDXL:
        hint = " It is an SDXL LoRA (it has weights for SDXL's second text encoder)."
    elif sdxl is False and family is SDXL:
        hint = " It is a LoRA for Stable Diffusion 1.x/2.x (it has weights for one text encoder only)."
    return (
        f"{WEIGHTS_INPUT}: {source} is not a LoRA for this model ({model}): {reason}.{hint} A LoRA loads "
        "only on the model family it was trained for (an SDXL LoRA does not load on SD 1.5 weights, nor the "
        "reverse)"
    )
