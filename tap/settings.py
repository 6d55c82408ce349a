"""Tap settings, read once from ``MISALIGN_TAP_*`` environment variables in each vLLM process."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import grpc
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detectors.errors import TapConfigError
from wire.tls_files import read_pem

# What a request's extra_args may choose. on: only switch mitigation on (the default, since
# whoever calls the API sends them); switch: on or off; rules: on, off or its own rules; none.
ClientChoice = Literal["on", "switch", "rules", "none"]
# The strongest steer (residual-stream units along the feature's unit direction) allowed unless
# the operator sets MISALIGN_TAP_MITIGATION_MAX_ALPHA: twice bench/steer.py's largest.
DEFAULT_MAX_ALPHA = 16.0


class TapSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MISALIGN_TAP_", extra="ignore", frozen=True)

    bundle: Path | None = Field(default=None, description="direction bundle; unset: tap inactive")
    sidecar: str = Field(default="127.0.0.1:50051", description="host:port or unix:/path")
    model_version: str = Field(default="unknown", description="label for metrics and samples")
    model_name: str | None = Field(default=None, description="label; default the bundle's model")
    # TLS to a sidecar over TCP (tap/publisher.py); the Unix socket is plaintext.
    tls_ca: Path | None = Field(
        default=None, description="PEM CA to verify the sidecar with; set: TLS over TCP"
    )
    tls_cert: Path | None = Field(
        default=None,
        description="the tap's PEM client certificate (mTLS), signed by the CA "
        "the sidecar's tls_client_ca names",
    )
    tls_key: Path | None = Field(default=None, description="its PEM private key, unencrypted")
    tls_server_name: str | None = Field(
        default=None, description="the name in the sidecar's certificate, if not the host"
    )
    queue_size: int = Field(default=1024, gt=0, description="steps held for the publisher")
    backoff_max_s: float = Field(default=5.0, gt=0)
    mitigation: str = Field(
        default="", description="rules, e.g. misaligned_persona=ablate@flagged; empty: off"
    )
    mitigation_default: Literal["on", "off"] = Field(
        default="on", description="off: only requests that ask (extra_args) are mitigated"
    )
    mitigation_clients: ClientChoice = Field(
        default="on",
        description="what a request's extra_args may choose: on (only switch it on), switch "
        "(on or off), rules (on, off or its own rules), none (nothing)",
    )
    mitigation_max_alpha: float = Field(
        default=DEFAULT_MAX_ALPHA,
        gt=0,
        allow_inf_nan=False,
        description="the strongest steer:ALPHA a rule (the operator's or a request's) may ask",
    )

    allow_untested_vllm: bool = Field(
        default=False,
        description="start on a vLLM outside the tap's supported range (with a warning)",
    )

    @model_validator(mode="after")
    def _tls(self) -> TapSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("MISALIGN_TAP_TLS_CERT and MISALIGN_TAP_TLS_KEY go together")
        tls = self.tls_ca is not None
        if not tls and (self.tls_cert is not None or self.tls_server_name is not None):
            raise ValueError(
                "MISALIGN_TAP_TLS_CERT/_KEY/_SERVER_NAME need MISALIGN_TAP_TLS_CA, the CA that "
                "signed the sidecar's certificate"
            )
        if tls and self.sidecar.startswith("unix:"):
            raise ValueError(
                f"MISALIGN_TAP_SIDECAR is {self.sidecar}: the Unix socket is plaintext (its "
                "permissions guard it); unset MISALIGN_TAP_TLS_*, or give a host:port"
            )
        self.channel_credentials()  # every file readable and PEM
        return self

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for the channel to the sidecar (None: plaintext)."""
        if self.tls_ca is None:
            return None
        ca = read_pem(self.tls_ca, "certificate", "MISALIGN_TAP_TLS_CA")
        key = cert = None
        if self.tls_cert is not None and self.tls_key is not None:
            key = read_pem(self.tls_key, "private key", "MISALIGN_TAP_TLS_KEY")
            cert = read_pem(self.tls_cert, "certificate", "MISALIGN_TAP_TLS_CERT")
        return grpc.ssl_channel_credentials(ca, key, cert)

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
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across settings: its message names them
            raise TapConfigError(f"misalign tap: {msg}") from None
        name = "MISALIGN_TAP_" + str(err["loc"][0]).upper()
        raise TapConfigError(f"misalign tap: {name}: {msg}") from None
