"""How the sidecar and the review tools reach Redis: URL, ACL user and password, TLS.

The URL comes from ``redis_url`` or ``redis_url_file``; the password from ``redis_password``
(in practice ``MISALIGN_REDIS_PASSWORD``) or ``redis_password_file``. Files are read when a
client is made, so a mounted secret that rotates is picked up on restart, and their contents
never enter the settings object that `config check` prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from detectors.errors import MisalignError

if TYPE_CHECKING:
    from service.settings import Settings


class RedisSettingsError(MisalignError):
    pass


def check_redis_settings(s: Settings) -> None:
    """Raises ``ValueError`` (the settings validator turns it into a named setting error)."""
    if s.redis_url is not None and s.redis_url_file is not None:
        raise ValueError("redis_url or redis_url_file, not both")
    if s.redis_password is not None and s.redis_password_file is not None:
        raise ValueError("redis_password or redis_password_file, not both")
    has_password = s.redis_password is not None or s.redis_password_file is not None
    if s.redis_username is not None and not has_password:
        raise ValueError("redis_username needs redis_password or redis_password_file")
    external = s.redis_url is not None or s.redis_url_file is not None
    tls = (s.redis_tls_ca, s.redis_tls_cert, s.redis_tls_key)
    if (has_password or any(tls)) and not external:
        raise ValueError(
            "redis credentials and TLS options need redis_url or redis_url_file "
            "(the embedded redis is reached over a private Unix socket)"
        )
    if (s.redis_tls_cert is None) != (s.redis_tls_key is None):
        raise ValueError("redis_tls_cert and redis_tls_key go together")
    if s.redis_url is not None and any(tls):
        scheme = s.redis_url.get_secret_value().split(":", 1)[0]
        if scheme != "rediss":
            raise ValueError(f"redis TLS options need a rediss:// redis_url, got {scheme}://")
    for name in ("redis_url_file", "redis_password_file", *_TLS_FILES):
        p = getattr(s, name)
        if p is not None and not Path(p).is_file():
            raise ValueError(f"{name}: file not found: {p}")


_TLS_FILES = ("redis_tls_ca", "redis_tls_cert", "redis_tls_key")


def _read_secret(path: Path, name: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise RedisSettingsError(f"setting '{name}': cannot read {path} ({exc.strerror})") from None
    if not value:
        raise RedisSettingsError(f"setting '{name}': {path} is empty")
    return value


def redis_url(s: Settings) -> str | None:
    """The configured URL, or None for the embedded redis."""
    if s.redis_url is not None:
        return s.redis_url.get_secret_value()
    if s.redis_url_file is not None:
        return _read_secret(s.redis_url_file, "redis_url_file")
    return None


def client_options(s: Settings) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url`` on top of the URL: credentials and TLS."""
    opts: dict[str, Any] = {}
    if s.redis_password is not None:
        opts["password"] = s.redis_password.get_secret_value()
    elif s.redis_password_file is not None:
        opts["password"] = _read_secret(s.redis_password_file, "redis_password_file")
    if s.redis_username is not None:
        opts["username"] = s.redis_username
    if s.redis_tls_ca is not None:
        opts["ssl_ca_certs"] = str(s.redis_tls_ca)
    if s.redis_tls_cert is not None:
        opts["ssl_certfile"] = str(s.redis_tls_cert)
        opts["ssl_keyfile"] = str(s.redis_tls_key)
    url = redis_url(s)
    if url is not None and url.startswith("rediss://"):
        opts["ssl_check_hostname"] = s.redis_tls_check_hostname
    return opts


def where(url: str) -> str:
    """The URL without credentials, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rsplit("@", 1)[-1]
