"""Sidecar settings: command-line flags over environment variables (``MISALIGN_*``, nested
sections with ``__``: ``MISALIGN_REVIEW__SESSION_TTL_S``) over a YAML/TOML file over defaults.

Read once at start and validated; an error names the setting and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from detectors.bundle import default_bundle_path
from detectors.errors import SettingsError
from service import redis_keys
from service.auth import check_auth_settings
from service.redis_conn import check_redis_settings
from service.review_settings import ReviewSettings

RedactionName = Literal["email", "phone", "api_key"]  # service/redaction.py BUILTIN


def _state_dir() -> Path:
    import os

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "misalign-monitor"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MISALIGN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    bundle: Path = Field(
        default_factory=default_bundle_path,
        description="direction bundle; default: the shipped one",
    )
    tokenizer: Path | None = Field(
        default=None,
        description="tokenizer.json to detokenise flagged samples; default: the prepared "
        "SmolLM2's when the bundle is for it, else token ids only",
    )
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = Field(default=50051, ge=0, le=65535, description="0: any free port")
    unix_socket: Path | None = Field(
        default=None, description="plaintext always: the socket's permissions guard it"
    )
    unix_socket_mode: int = Field(
        default=0o660,
        ge=0,
        le=0o777,
        description="permissions of the Unix socket, octal: '0660' or '0o660' (a string from "
        "the environment is always read as octal)",
    )
    # TLS on the TCP listener (service/auth.py says who may call what on which listener).
    tls_cert: Path | None = Field(default=None, description="PEM certificate of the TCP listener")
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(
        default=None,
        description="require client certificates signed by this CA on TCP; Ingest over TCP "
        "needs one (except on a plaintext loopback listener)",
    )
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="a plaintext port on grpc_host serving only grpc.health.v1, for probes that "
        "cannot speak TLS (the kubelet's); 0: any free port; unset: none",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="bearer token client calls (Score, GetRequestScore, DescribeBundle, the JSON API) over "
        "TCP must send as 'authorization: Bearer TOKEN'; unset: not asked",
    )
    api_token_file: Path | None = Field(default=None, description="a file holding api_token")
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="the JSON API (GET /v1/scores/ID, GET /v1/bundle, POST /v1/score) on "
        "grpc_host, with the TCP listener's TLS and api_token; 0: any free port; unset: none",
    )
    http_max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1 << 30,
        description="largest JSON API request body; a larger one gets 413",
    )
    score_wait_max_s: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="longest wait a GetRequestScore (wait_s) or GET /v1/scores (?wait_s=) may "
        "ask for; a longer one is refused",
    )
    score_waiters_max: int = Field(
        default=1024,
        ge=0,
        le=1_000_000,
        description="callers waiting for a score at once; one more is refused "
        "(RESOURCE_EXHAUSTED, 429) and counted in misalign_score_waits_total{outcome='refused'}",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    redis_url: SecretStr | None = Field(
        default=None,
        description="redis://, rediss://, unix://, redis+cluster://host:port[,host:port], "
        "redis+sentinel://host:port[,host:port]/service[/db] (rediss+ for TLS; docs/redis.md); "
        "unset: start an embedded redis",
    )
    # Redis credentials and TLS (service/redis_conn.py): secrets from the environment
    # (MISALIGN_REDIS_PASSWORD) or from a file, never from a settings file checked into a repo.
    redis_url_file: Path | None = Field(default=None, description="a file holding redis_url")
    redis_username: str | None = Field(default=None, description="ACL user; default: 'default'")
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = Field(default=None, description="a file holding it")
    redis_tls_ca: Path | None = Field(default=None, description="CA bundle to verify Redis with")
    redis_tls_cert: Path | None = Field(default=None, description="client certificate (mTLS)")
    redis_tls_key: Path | None = None
    redis_tls_check_hostname: bool = True
    # A sample counts as pushed once this many replicas hold it (WAIT after each batch), so a
    # failover cannot lose what was counted (service/flags.py, docs/redis.md).
    redis_wait_replicas: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="replicas that must acknowledge each batch before its samples count as "
        "pushed; unset: 1 for redis+sentinel:// URLs, 0 otherwise (a Redis Cluster: 0 only)",
    )
    redis_wait_timeout_ms: int = Field(
        default=500,
        ge=1,
        le=1500,
        description="how long a batch waits for those replicas before it is sent again "
        "(below the 2 s Redis socket timeout)",
    )
    # Flagged samples are redacted before they are queued (service/redaction.py).
    redact: bool = Field(default=True, description="redact e-mails, phones, keys in samples")
    redact_builtin: list[RedactionName] = Field(
        default_factory=lambda: list(get_args(RedactionName)), description="built-in patterns"
    )
    redact_patterns: dict[str, str] = Field(
        default_factory=dict, description="more patterns, name: regular expression"
    )
    state_dir: Path = Field(
        default_factory=_state_dir,
        description="the embedded Redis' socket and files; default $XDG_STATE_HOME/misalign-monitor",
    )
    # One hash tag for every key a script touches together (service/redis_keys.py).
    stream: str = redis_keys.FLAGGED_STREAM
    dead_letter_stream: str = redis_keys.DEAD_LETTER_STREAM
    group: str = "reviewers"
    stream_maxlen: int = Field(default=100_000, gt=0)
    dedup_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    buffer_size: int = Field(
        default=10_000, gt=0, description="flagged samples held while Redis is away"
    )
    flag_batch_size: int = Field(
        default=100,
        gt=0,
        le=10_000,
        description="flagged samples sent to Redis in one pipeline (at most 8 MiB of them)",
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="expire unfinished requests")
    max_requests: int = Field(default=100_000, gt=0, description="requests tracked at once")
    max_tokens_per_request: int = Field(default=32_768, gt=0)
    max_rows: int = Field(
        default=4_000_000,
        gt=0,
        description="token rows held at once, all requests together: the memory bound. The "
        "pool holds at most max_rows / 16 + max_requests pages of 16 rows of 24 + 4 k bytes "
        "(a request's last page is partly filled): 207 MB at the defaults and k = 3",
    )
    # gRPC takes it as a 32-bit int, and the sidecar lets messages of up to twice it reach its
    # own check (to count them): 1 GiB at most.
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1 << 30)
    # Metric labels a client chooses (service/metrics.py LabelValues): any other value is
    # reported as "other" and counted in misalign_label_values_refused_total.
    label_models: list[str] = Field(
        default_factory=list, description="model_name label values kept; empty: the first seen"
    )
    label_model_versions: list[str] = Field(
        default_factory=list, description="model_version values kept; empty: the first seen"
    )
    label_max_models: int = Field(default=8, ge=1, le=1000, description="without label_models")
    label_max_model_versions: int = Field(
        default=16, ge=1, le=1000, description="without label_model_versions"
    )
    label_max_chars: int = Field(default=64, ge=1, le=1024, description="longer: other")
    label_adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapter names (vLLM's lora_name) kept as the adapter label; any other "
        'adapter is "other", the base model ""',
    )
    sample_text_chars: int = Field(
        default=32_768,
        ge=1024,
        le=10_000_000,
        description="prompt or response text kept whole in a flagged sample; a longer one keeps "
        "its first and last halves of this, with a line saying how much was cut",
    )
    recent_scores: int = Field(default=10_000, gt=0, description="finished scores kept for lookup")
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    score_delay_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="how long a finished request waits for others to be scored in one pass",
    )
    drift_window: int = Field(default=500, gt=0, description="request scores per drift window")
    drift_min_requests: int = Field(
        default=100, gt=0, description="scores in the window before drift gauges are reported"
    )
    # Score spans over OTLP/gRPC (service/tracing.py), for requests that came with a traceparent.
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC collector for score spans: http://host:4317 (plaintext) or "
        "https://host:4317 (TLS); unset: no spans are made",
    )
    otlp_tls_ca: Path | None = Field(
        default=None, description="CA bundle to verify an https:// collector; default: system's"
    )
    otlp_service_name: str = Field(
        default="misalign-sidecar", min_length=1, max_length=128, description="service.name"
    )
    otlp_queue_size: int = Field(
        default=2048,
        ge=1,
        le=1_000_000,
        description="spans waiting for export; past it a span is dropped and counted",
    )
    otlp_timeout_s: float = Field(
        default=10.0, gt=0, le=60, description="how long one export (with retries) may take"
    )
    review: ReviewSettings = Field(
        default_factory=ReviewSettings, description="the review page (review)"
    )

    @field_validator("unix_socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        # MISALIGN_UNIX_SOCKET_MODE=0660 is a string: as a decimal int it would be 0o1224.
        expected = "expected an octal mode such as '0660' or '0o660'"
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            if not text or any(c not in "01234567" for c in text):
                raise ValueError(f"{expected}, got {value!r}")
            value = int(text, 8)
        if isinstance(value, int) and not 0 <= value <= 0o777:
            raise ValueError(f"{expected} (at most 0o777), got {value} ({value:#o})")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.grpc_port is None and self.unix_socket is None:
            raise ValueError("set grpc_port or unix_socket (or both): the server needs a listener")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.drift_min_requests > self.drift_window:
            raise ValueError("drift_min_requests must not exceed drift_window")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        check_redis_settings(self)
        check_auth_settings(self)
        for name, pattern in self.redact_patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"redact_patterns.{name}: not a regular expression ({exc})"
                ) from None
        if self.otlp_endpoint is not None:
            from service.tracing import check_endpoint

            try:
                check_endpoint(self.otlp_endpoint)
            except ValueError as exc:
                raise ValueError(f"otlp_endpoint: {exc}") from None
        if self.otlp_tls_ca is not None and not self.otlp_tls_ca.is_file():
            raise ValueError(f"otlp_tls_ca: file not found: {self.otlp_tls_ca}")
        for name in ("bundle", "tokenizer"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{name}: file not found: {p}")
        if "" in self.label_adapters or "other" in self.label_adapters:
            raise ValueError(
                'label_adapters: "" is the base model and "other" every unlisted adapter; '
                "list adapter names only"
            )
        for name in ("label_models", "label_model_versions", "label_adapters"):
            long = [v for v in getattr(self, name) if len(v) > self.label_max_chars]
            if long:
                raise ValueError(
                    f"{name}: {long[0][:80]!r} is longer than label_max_chars "
                    f"({self.label_max_chars})"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # What the user typed last wins: a flag (init) over the environment over the file.
        path = _CONFIG_FILE.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, _file_source(settings_cls, path))

    def redacted(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        for name in ("redis_url", "redis_password", "api_token"):
            if getattr(self, name) is not None:
                out[name] = "**********"
        return out


# The file load_settings was given, for settings_customise_sources (a classmethod, so the path
# cannot travel on the instance).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("misalign_config_file", default=None)


def _checked(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


class _YamlFile(YamlConfigSettingsSource):
    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            return _checked(file_path, super()._read_file(file_path))
        except yaml.YAMLError as exc:
            raise SettingsError(f"{file_path}: not valid YAML: {exc}") from None


class _TomlFile(TomlConfigSettingsSource):
    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            return _checked(file_path, super()._read_file(file_path))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{file_path}: not valid TOML: {exc}") from None


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    # pydantic-settings skips a file that is not there; a file the user named must exist.
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read config file ({exc.strerror})") from None
    if path.suffix == ".toml":
        return _TomlFile(settings_cls, toml_file=path)
    return _YamlFile(settings_cls, yaml_file=path)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``path`` (YAML, or TOML by suffix), the environment and ``overrides`` (the
    command line's flags; ``None`` means the flag was not given)."""
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            env = "MISALIGN_" + "__".join(str(p) for p in err["loc"]).upper()
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"setting '{loc}' (env {env}): {msg}" if err["loc"] else msg)
        raise SettingsError(where + "; ".join(problems)) from None
    finally:
        _CONFIG_FILE.reset(token)
