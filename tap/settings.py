"""Tap settings, read once from ``MISALIGN_TAP_*`` environment variables in each vLLM process."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detectors.errors import MisalignError


class TapConfigError(MisalignError):
    pass


class TapSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MISALIGN_TAP_", extra="ignore", frozen=True)

    bundle: Path | None = Field(default=None, description="direction bundle; unset: tap inactive")
    sidecar: str = Field(default="127.0.0.1:50051", description="host:port or unix:/path")
    model_version: str = Field(default="unknown", description="label for metrics and samples")
    model_name: str | None = Field(default=None, description="label; default the bundle's model")
    queue_size: int = Field(default=1024, gt=0, description="steps held for the publisher")
    backoff_max_s: float = Field(default=5.0, gt=0)
    mitigation: str = Field(
        default="", description="rules, e.g. misaligned_persona=ablate@flagged; empty: off"
    )
    mitigation_default: Literal["on", "off"] = Field(
        default="on", description="off: only requests that ask (extra_args) are mitigated"
    )
    mitigation_clients: Literal["rules", "switch", "none"] = Field(
        default="rules",
        description="what a request's extra_args may choose: its own rules, only on/off, nothing",
    )
    allow_untested_vllm: bool = Field(
        default=False,
        description="start on a vLLM outside the tap's supported range (with a warning)",
    )

    @model_validator(mode="after")
    def _someone_mitigated(self) -> TapSettings:
        if (
            self.mitigation
            and self.mitigation_default == "off"
            and self.mitigation_clients == "none"
        ):
            raise ValueError(
                "MISALIGN_TAP_MITIGATION_DEFAULT=off with MISALIGN_TAP_MITIGATION_CLIENTS=none "
                "mitigates no request; change one of them"
            )
        return self


def read_settings() -> TapSettings:
    try:
        return TapSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "MISALIGN_TAP_" + str(err["loc"][0]).upper() if err["loc"] else "MISALIGN_TAP_*"
        raise TapConfigError(f"misalign tap: {name}: {err['msg']}") from None
