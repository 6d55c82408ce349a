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
    # The overhead bench's A/B switch (bench/tap_ab_child.py): while set, the ops return at once
    # and the host side skips the step, as if the tap were not there. No setting, variable or RPC
    # reaches it; only code in the engine's own process can set it, and the steps it skips are
    # counted (``steps_paused``), which the bench checks against the steps it ran.
    paused: bool = False
    steps_paused: int = 0


_ACTIVE: Active | None = None


def active() -> Active | None:
    return _ACTIVE


def paused() -> bool:
    """The ops' check: one global read, so a paused step costs the op's dispatch and no more."""
    return _ACTIVE is not None and _ACTIVE.paused


def activate(settings: TapSettings, bundle: Bundle) -> Active:
    global _ACTIVE
    _ACTIVE = Active(settings, bundle)
    return _ACTIVE
