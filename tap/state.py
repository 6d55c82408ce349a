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


_ACTIVE: Active | None = None


def active() -> Active | None:
    return _ACTIVE


def activate(settings: TapSettings, bundle: Bundle) -> Active:
    global _ACTIVE
    _ACTIVE = Active(settings, bundle)
    return _ACTIVE
