"""What the tests share: servers and processes they start, the data they build, and the paths
below. Test modules import from here, never from one another."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV_DATA = ROOT / "data"


def _user_cache() -> Path:
    from detectors.model_store import cache_root

    return cache_root()


# The user's model cache (``model prepare`` writes SmolLM2 there once), read when the tests start:
# fixtures point the cache elsewhere for the test that runs.
USER_CACHE = _user_cache()
