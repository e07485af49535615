"""``cog.yaml`` checked against Cog's documented schema: ``cog build`` cannot run here (no Docker engine).

The schema below is Cog's ``cog.yaml`` reference (https://cog.run/yaml, ``docs/yaml.md`` in replicate/cog) and
its JSON schema (``pkg/config/data/config_schema_v1.0.json``): every key, with its type. Cog 0.21 renamed the
predictor key ``predict`` to ``run`` (replicate/cog#2925, "support 'run:' key in cog.yaml alongside
'predict:'"); both are accepted, one at a time.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import yaml
from cog import BaseRunner
from cog.predictor import load_predictor_from_ref

from .cog_server import REPO_ROOT

COG_YAML = REPO_ROOT / "cog.yaml"

#: Top-level keys of cog.yaml and their types.
TOP_LEVEL_KEYS = {
    "build": dict,
    "image": str,
    "run": str,  # "module.py:Class"; since cog 0.21
    "predict": str,  # the name of "run" before cog 0.21, still accepted
    "train": str,
    "concurrency": dict,
    "environment": list,
    "tests": list,
    "weights": list,
}

#: Keys of the build stanza and their types. python_version is a string: YAML reads 3.10 as the number 3.1.
BUILD_KEYS = {
    "cuda": str,
    "cudnn": str,
    "gpu": bool,
    "python_version": str,
    "python_requirements": str,
    "python_packages": list,  # deprecated in favour of python_requirements
    "pre_install": list,  # deprecated
    "python_overrides": str,
    "system_packages": list,
    "run": list,
    "environment": list,
    "fast": bool,
    "sdk_version": str,
}

CONCURRENCY_KEYS = {"max": int, "default_target": int}

#: CUDA builds of torch: the CUDA version of the default Linux wheels on PyPI, and the Pythons checked to
#: have a wheel. Read from the wheel metadata, without installing anything (pip install --dry-run
#: --no-deps --report): torch 2.10.0 requires nvidia-cuda-runtime-cu12==12.8.90 and Python >= 3.10, and
#: its cp311 wheel exists.
TORCH_BUILDS = {"2.10.0": {"cuda": "12.8", "pythons": {"3.11"}}}

#: The torch each xformers release is built against (its Requires-Dist: torch==...), read the same way.
XFORMERS_TORCH = {
    "0.0.31.post1": "2.7.1",
    "0.0.32.post2": "2.8.0",
    "0.0.33.post2": "2.9.1",
    "0.0.34": "2.10.0",
}

#: What the image needs: a CUDA torch, the libraries the pipeline uses, and xformers attention.
REQUIRED_PACKAGES = {
    "torch",
    "xformers",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "pillow",
    "huggingface_hub",
}

PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>[A-Za-z0-9_.+!-]+)$")


def load_config() -> dict:
    return yaml.safe_load(COG_YAML.read_text())


def pins(path) -> dict[str, str]:
    """``name==version`` lines of a requirements file (every requirement line must be one)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not pinned as name==version"
        found[match["name"].lower().replace("-", "_")] = match["version"]
    return found


def check_keys(stanza: dict, schema: dict, where: str) -> None:
    for key, value in stanza.items():
        assert key in schema, f"{where}: unknown key {key!r}; Cog knows {sorted(schema)}"
        assert isinstance(value, schema[key]), f"{where}.{key}: {value!r} is not a {schema[key].__name__}"


def test_every_key_is_one_cog_documents_with_the_documented_type():
    config = load_config()

    check_keys(config, TOP_LEVEL_KEYS, "cog.yaml")
    check_keys(config["build"], BUILD_KEYS, "build")
    check_keys(config.get("concurrency", {}), CONCURRENCY_KEYS, "concurrency")
    for item in config["build"].get("system_packages", []) + config["build"].get("run", []):
        assert isinstance(item, (str, dict))


def test_the_model_runs_on_a_gpu():
    assert load_config()["build"]["gpu"] is True


def test_the_predictor_is_predict_py_predictor_a_runner_that_loads_without_deprecation_warnings():
    config = load_config()
    assert ("run" in config) != ("predict" in config), "set one of run and predict"
    reference = config.get("run") or config["predict"]
    assert reference == "predict.py:Predictor"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = _load(reference)

    assert isinstance(predictor, BaseRunner)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not deprecations


def _load(reference: str):
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # Cog loads the reference relative to the project folder (/src in the image)
    try:
        return load_predictor_from_ref(reference)
    finally:
        os.chdir(cwd)


def test_the_gpu_requirements_are_pinned_and_complete():
    requirements = REPO_ROOT / load_config()["build"]["python_requirements"]

    assert requirements == REPO_ROOT / "requirements" / "cog.txt"
    assert set(pins(requirements)) >= REQUIRED_PACKAGES


def test_cuda_python_torch_and_xformers_fit_together():
    build = load_config()["build"]
    gpu = pins(REPO_ROOT / build["python_requirements"])

    torch_build = TORCH_BUILDS[gpu["torch"]]
    assert build["cuda"] == torch_build["cuda"]
    assert build["python_version"] in torch_build["pythons"]
    assert XFORMERS_TORCH[gpu["xformers"]] == gpu["torch"]


def test_the_image_runs_what_the_tests_run_except_torch_and_xformers():
    build = load_config()["build"]
    gpu = pins(REPO_ROOT / build["python_requirements"])
    cpu = pins(REPO_ROOT / "requirements" / "cpu.txt")

    assert "xformers" not in cpu and "cog" not in gpu
    assert build["sdk_version"] == cpu["cog"]
    image_only = {"torch", "xformers", "invisible_watermark"}  # the watermark: SDXL's, in the image only
    for name in sorted(set(gpu) - image_only):
        assert gpu[name] == cpu.get(name), f"{name}: {gpu[name]} in the image, {cpu.get(name)} in the tests"


@pytest.mark.parametrize("path", ["requirements/cpu.txt", "requirements/cog.txt"])
def test_every_requirement_is_pinned(path):
    assert pins(REPO_ROOT / path)


#: A command of build.run that installs a pinned coglet: ``... install ... coglet==X.Y.Z``.
COGLET_PIN = re.compile(r"\binstall\b.*(?<![\w.-])coglet==(?P<version>[0-9][A-Za-z0-9_.+!-]*)(?:\s|$)")


def coglet_pins(build: dict) -> list[str]:
    commands = [item if isinstance(item, str) else item.get("command", "") for item in build.get("run", [])]
    return [match["version"] for command in commands if (match := COGLET_PIN.search(command))]


def test_coglet_is_pinned_in_the_image_to_the_version_the_tests_run_against():
    """cog's sdk_version pins the SDK, whose dependency on coglet is a range (``coglet<1.0,>=0.23.1``):
    without a pin the image gets the latest coglet below 1.0. cog build drops cog and coglet from
    python_requirements (with a warning), and runs build.run after it has installed the SDK, so coglet is
    pinned there."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    build = load_config()["build"]
    assert coglet_pins(build) == [version("coglet")]
    assert build["sdk_version"] == version("cog")
    (needed,) = [r for r in map(Requirement, requires("cog") or []) if r.name == "coglet" and not r.marker]
    assert needed.specifier.contains(version("coglet")), f"cog {version('cog')} needs {needed}"
    assert not {"cog", "coglet"} & set(pins(REPO_ROOT / build["python_requirements"]))


def test_the_coglet_pin_is_read_from_install_commands_only():
    uv = "uv pip install --break-system-packages --no-cache coglet==0.23.1"
    assert coglet_pins({"run": [uv]}) == ["0.23.1"]
    assert coglet_pins({"run": [{"command": "pip install coglet==1.2.3 other==4"}]}) == ["1.2.3"]
    assert coglet_pins({"run": ["echo coglet==0.1.0", "pip install notcoglet==0.1.0"]}) == []
    assert coglet_pins({}) == []
