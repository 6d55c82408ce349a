"""Settings of the review page: the ``review`` section of the sidecar's settings file.

Secrets never sit in the settings themselves: each user names an environment variable or a file
holding a password or a token, read when the review page starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

from detectors.errors import ReviewSettingsError
from service.redis_keys import LABELS_STREAM

# The consumer of the reviewers' group that holds samples no reviewer has claimed.
HOLDER = "unassigned"


class ReviewUser(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,31}$")
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ReviewUser:
        if self.name == HOLDER:
            raise ValueError(f"user name {HOLDER!r} is reserved for the unclaimed queue")
        if self.password_env and self.password_file:
            raise ValueError(f"user {self.name!r}: password_env or password_file, not both")
        if self.token_env and self.token_file:
            raise ValueError(f"user {self.name!r}: token_env or token_file, not both")
        if not (self.password_env or self.password_file or self.token_env or self.token_file):
            raise ValueError(
                f"user {self.name!r}: needs a password (password_env or password_file) "
                "or a token (token_env or token_file)"
            )
        return self

    def _secret(self, env: str | None, file: Path | None, kind: str) -> str | None:
        if env:
            value = os.environ.get(env)
            if not value:
                raise ReviewSettingsError(
                    f"review user {self.name!r}: {kind}_env names ${env}, which is not set"
                )
            return value
        if file:
            try:
                value = file.read_text().strip()
            except OSError as exc:
                raise ReviewSettingsError(
                    f"review user {self.name!r}: cannot read {kind}_file {file} ({exc.strerror})"
                ) from None
            if not value:
                raise ReviewSettingsError(f"review user {self.name!r}: {kind}_file {file} is empty")
            return value
        return None

    def credentials(self) -> Credentials:
        return Credentials(
            self.name,
            self._secret(self.password_env, self.password_file, "password"),
            self._secret(self.token_env, self.token_file, "token"),
        )


@dataclass(frozen=True)
class Credentials:
    name: str
    password: str | None
    token: str | None

    def __repr__(self) -> str:
        return f"Credentials({self.name!r}, password=**********, token=**********)"


class ReviewSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8642, ge=0, le=65535, description="0: any free port")
    users: tuple[ReviewUser, ...] = ()
    labels_stream: str = LABELS_STREAM  # in the flagged stream's hash slot: decide writes both
    claim_idle_s: float = Field(
        default=900.0, gt=0, description="a claim idle this long returns to the queue"
    )
    max_deliveries: int = Field(
        default=5, ge=1, description="claims of one sample before it goes to the dead letters"
    )
    session_ttl_s: float = Field(default=12 * 3600.0, ge=1)  # a cookie's Max-Age is whole seconds
    secure_cookie: bool = Field(default=False, description="set when served over HTTPS")
    # The login throttle (review/throttle.py): failures within the window, per scope.
    login_failures_per_user: int = Field(
        default=10, ge=1, description="failed logins of one user name before it gets 429s"
    )
    login_failures_per_address: int = Field(
        default=50,
        ge=1,
        description="failed logins and bearer tokens from one client address before it gets 429s",
    )
    login_window_s: float = Field(
        default=900.0, ge=1, le=7 * 86400, description="how long a failed login counts"
    )
    trusted_proxies: tuple[IPvAnyNetwork, ...] = Field(
        default=(),
        description="proxies whose X-Forwarded-For names the client address the throttle counts",
    )
    backlog_refresh_s: float = Field(
        default=5.0, gt=0, description="how often the sidecar refreshes the review gauges"
    )

    @model_validator(mode="after")
    def _unique(self) -> ReviewSettings:
        names = [u.name for u in self.users]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"review users must be unique, repeated: {dupes}")
        return self

    def credentials(self) -> list[Credentials]:
        if not self.users:
            raise ReviewSettingsError(
                "setting 'review.users' is empty: the review page serves no one without a login; "
                "add users with password_env/password_file or token_env/token_file"
            )
        return [u.credentials() for u in self.users]
