"""What the tap knows in one vLLM process: its settings, the bundle, the tapped layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detectors.bundle import Bundle
from tap.settings import TapSettings


@dataclass
class Active:
    settings: TapSettings
    bundle: Bundle
    layer: Any = None  # the tapped decoder layer holding tap_out (tap.layer_tap)
    publisher: Any = None
    mitigation: Any = None  # tap.mitigation.Mitigation when rules are configured
    publishes: bool | None = (
        None  # this rank sends rows to the sidecar (rank 0); None: not known yet
    )
    runner: str = "?"  # the model runner class whose load_model the tap wrapped
    # The worker's self-check (tap.runner_hook.self_check): steps the runner wrappers captured,
    # steps the worker served that they did not, and when the last empty batch carried the count.
    steps_captured: int = 0
    steps_uncaptured: int = 0
    last_heartbeat: float = float("-inf")


_ACTIVE: Active | None = None


def active() -> Active | None:
    return _ACTIVE


def activate(settings: TapSettings, bundle: Bundle) -> Active:
    global _ACTIVE
    _ACTIVE = Active(settings, bundle)
    return _ACTIVE
