"""deploy/docker: what each image installs is pinned, hashed, covers the project, and resolves.

The images cannot be built here (no Docker engine), so the requirement file each Dockerfile
installs is resolved by pip against PyPI for the images' interpreter and platform (CPython 3.12,
Linux x86_64, wheels only) with ``--require-hashes``: the same pins and hashes a build would
check. The sidecar's file is resolved with its dependencies (python:3.12-slim brings none, so the
file must be closed under them); vllm-tap's with ``--no-deps`` (the rest is the vLLM image's).
A corrupted hash and a dropped dependency are shown to fail the same resolve. Needs PyPI.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from scripts import lock_images
from tap.plugin import SUPPORTED_VLLM
from tests.support import ROOT

DOCKER = ROOT / "deploy" / "docker"
IMAGES = ("sidecar", "vllm-tap")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")
PIP_TIMEOUT_S = 300


def lock_path(image: str) -> Path:
    return DOCKER / "requirements" / f"{image}.txt"


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (version, hashes); anything but ``name==version --hash=...`` fails."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for logical in re.sub(r"\\\n", " ", text).splitlines():
        if not logical.strip() or logical.startswith("#"):
            continue
        req, *options = logical.split()
        m = PIN.match(req)
        assert m, f"{req!r}: expected name==version"
        assert options, f"{req}: no --hash"
        for opt in options:
            assert HASH.match(opt), f"{req}: {opt!r} is not --hash=sha256:<64 hex>"
        name = canonicalize_name(m.group(1))
        assert name not in entries, f"{name} pinned twice"
        entries[name] = (m.group(2), options)
    return entries


def provided_by_base(text: str) -> dict[str, str]:
    lines = [ln for ln in text.splitlines() if ln.startswith(lock_images.PROVIDED)]
    if not lines:
        return {}
    pins = (pin.partition("==") for pin in lines[0][len(lock_images.PROVIDED) :].split())
    return {canonicalize_name(n): v for n, _, v in pins}


def run_pip_resolve(lock: Path, tmp: Path, *, no_deps: bool) -> subprocess.CompletedProcess[str]:
    """``pip install --dry-run --require-hashes`` of one lock file, for the images' platform."""
    try:
        urllib.request.urlopen(lock_images.INDEX + "/pip/", timeout=30).close()
    except OSError as exc:
        pytest.fail(
            f"PyPI ({lock_images.INDEX}) is unreachable, the locks cannot be resolved: {exc}"
        )
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--require-hashes"]
    cmd += ["--ignore-installed", "--quiet", "--target", str(tmp / "target")]
    cmd += lock_images.target_args()
    if no_deps:
        cmd.append("--no-deps")
    try:
        return subprocess.run(
            [*cmd, "-r", str(lock)],
            capture_output=True,
            text=True,
            env=lock_images.pip_env(),
            timeout=PIP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip did not resolve {lock} within {PIP_TIMEOUT_S} s (PyPI slow or stalled?)")


@pytest.mark.parametrize("image", IMAGES)
def test_the_dockerfile_installs_its_lock_with_hashes_then_the_project_without_deps(
    image: str,
) -> None:
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    copy = f"COPY deploy/docker/requirements/{image}.txt requirements.txt"
    locked = "pip install --no-cache-dir --require-hashes -r requirements.txt"
    project = "pip install --no-cache-dir --no-deps --no-build-isolation ."
    assert copy in text and locked in text and project in text
    assert text.index(copy) < text.index(locked) < text.index(project)
    # no other pip install could bring in something unpinned
    assert len(re.findall(r"pip install", text)) == 2


@pytest.mark.parametrize("image", IMAGES)
def test_every_line_of_the_lock_is_pinned_with_a_hash(image: str) -> None:
    text = lock_path(image).read_text()
    assert text.startswith(lock_images.HEADER)
    entries = parse_lock(text)
    assert entries
    base = re.search(r"^FROM (\S+)", (DOCKER / f"{image}.Dockerfile").read_text(), re.M)
    assert base
    header_image = re.search(r"^# image: (\S+)$", text, re.M)
    assert header_image
    if image == "vllm-tap":
        arg = re.search(r"^ARG BASE=(\S+)$", (DOCKER / "vllm-tap.Dockerfile").read_text(), re.M)
        assert arg and arg.group(1) == header_image.group(1)
    else:
        assert base.group(1) == header_image.group(1)


@pytest.mark.parametrize("image", IMAGES)
def test_the_lock_covers_the_projects_dependencies(image: str) -> None:
    """Each base dependency (and the build backend, the project is built without isolation) is
    pinned in the lock at a version the project accepts, or, for vllm-tap, is one the vLLM image
    provides."""
    text = lock_path(image).read_text()
    pins = {n: Version(v) for n, (v, _) in parse_lock(text).items()}
    provided = {n: Version(v) for n, v in provided_by_base(text).items()}
    if image == "sidecar":
        assert not provided
    else:
        # the image's vLLM is in the tap's supported range, and nothing of vLLM's is replaced
        assert Version(lock_images.VLLM) in SpecifierSet(SUPPORTED_VLLM)
        assert f"vllm/vllm-openai:v{lock_images.VLLM}" in text
        assert not {"vllm", "torch", "triton", "numpy", "setuptools"} & set(pins)
        assert not set(pins) & set(provided)
    for dep in lock_images.base_dependencies():
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        have = pins.get(name, provided.get(name))
        assert have is not None, f"{image}: {dep} is neither pinned nor provided by the base"
        assert have in req.specifier, f"{image}: {name}=={have} does not satisfy {dep}"


@pytest.mark.parametrize("image", IMAGES)
def test_the_lock_resolves_with_its_hashes_on_pypi(image: str, tmp_path: Path) -> None:
    done = run_pip_resolve(lock_path(image), tmp_path, no_deps=image == "vllm-tap")
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_wrong_hash_or_a_dropped_dependency_fails_the_resolve(tmp_path: Path) -> None:
    """The resolve above is a real check: the same command refuses a lock with one hash
    changed, and a sidecar lock missing one dependency of the closure."""
    text = lock_path("sidecar").read_text()
    entries = parse_lock(text)
    first = entries["annotated-types"][1][0]
    bad_hash = tmp_path / "bad-hash.txt"
    flipped = first[:-1] + ("0" if first[-1] != "0" else "1")
    bad_hash.write_text(text.replace(first, flipped))
    done = run_pip_resolve(bad_hash, tmp_path, no_deps=False)
    assert done.returncode != 0
    assert "DO NOT MATCH THE HASHES" in done.stderr, done.stderr[-3000:]

    # annotated-types is pydantic's dependency, not the project's own
    kept = [e for e in re.split(r"\n(?=[a-z])", text) if not e.startswith("annotated-types==")]
    dropped = tmp_path / "dropped.txt"
    dropped.write_text("\n".join(kept))
    assert "annotated-types" not in dropped.read_text()
    done = run_pip_resolve(dropped, tmp_path, no_deps=False)
    assert done.returncode != 0
    assert "annotated-types" in done.stderr and "--require-hashes" in done.stderr, done.stderr[
        -3000:
    ]
