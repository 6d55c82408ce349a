"""The ``vllm.general_plugins`` entry point. vLLM calls it in every process it starts."""

from __future__ import annotations

import logging

from detectors import bundle as bundle_io
from tap import state
from tap.settings import TapConfigError, read_settings

log = logging.getLogger(__name__)


def register() -> None:
    settings = read_settings()
    if settings.bundle is None:
        return  # not configured: vLLM runs as if the plugin were not installed
    if state.active() is not None:
        return
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
        "misalign tap active: bundle %s layer %d, %d features, sidecar %s",
        bundle.bundle_id,
        bundle.spec.layer,
        bundle.k,
        settings.sidecar,
    )
