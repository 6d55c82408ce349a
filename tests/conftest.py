from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import USER_CACHE

# fixtures: `recorder` (a gRPC server in place of the sidecar), `redis_server` (tests.support.sidecar)
pytest_plugins = ["tests.support.recorder", "tests.support.sidecar"]


@pytest.fixture(scope="session")
def planted_v() -> np.ndarray:
    rng = np.random.default_rng(42)
    v = rng.normal(size=16)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="session")
def planted_model(tmp_path_factory: pytest.TempPathFactory, planted_v: np.ndarray) -> Path:
    from tests.support.planted import make_model

    return make_model(tmp_path_factory.mktemp("models") / "planted", planted_v)


@pytest.fixture(scope="session")
def planted_reader(planted_model: Path):  # type: ignore[no-untyped-def]
    from detectors.activations import ActivationReader

    return ActivationReader(planted_model)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real test model, prepared once into the user's cache (as `model prepare` does)."""
    from detectors.model_store import prepare_smollm2

    return prepare_smollm2(USER_CACHE, progress=False)


@pytest.fixture(autouse=True)
def _isolated_activation_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Activation caches written by tests never reach the user's cache."""
    monkeypatch.setenv("MISALIGN_MONITOR_CACHE", str(tmp_path / "cache"))
