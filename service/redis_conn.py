"""How the sidecar and the review tools reach Redis: URL, ACL user and password, TLS, and the one
factory that makes a client for a single Redis, a Redis Cluster or a Sentinel-managed primary.

The URL comes from ``redis_url`` or ``redis_url_file``; the password from ``redis_password``
(in practice ``MISALIGN_REDIS_PASSWORD``) or ``redis_password_file``. Files are read when a
client is made (and by `config check`, to validate them), so a mounted secret that rotates is
picked up on restart, and their contents never enter the settings object that `config check`
prints. Whatever prints a URL or puts one in an error goes through ``redact_url``.

URL forms (docs/redis.md):

    redis://[user:pw@]host:port[/db]   rediss://...   unix://[user:pw@]/path/redis.sock
    redis+cluster://[user:pw@]host:port[,host:port...]           rediss+cluster://...
    redis+sentinel://[user:pw@]host:port[,host:port...]/<service>[/db]   rediss+sentinel://...
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.asyncio.connection import parse_url as redis_parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from detectors.errors import RedisSettingsError
from service.redis_keys import slot_problem

if TYPE_CHECKING:
    from pydantic import SecretStr

    from service.review_settings import ReviewSettings


class RedisOptions(Protocol):
    """The settings read here (``service.settings.Settings`` has them): a Protocol, so that the
    settings can run this module's checks without a circle of imports."""

    @property
    def redis_url(self) -> SecretStr | None: ...

    @property
    def redis_url_file(self) -> Path | None: ...

    @property
    def redis_username(self) -> str | None: ...

    @property
    def redis_password(self) -> SecretStr | None: ...

    @property
    def redis_password_file(self) -> Path | None: ...

    @property
    def redis_tls_ca(self) -> Path | None: ...

    @property
    def redis_tls_cert(self) -> Path | None: ...

    @property
    def redis_tls_key(self) -> Path | None: ...

    @property
    def redis_tls_check_hostname(self) -> bool: ...

    @property
    def redis_wait_replicas(self) -> int | None: ...

    @property
    def stream(self) -> str: ...

    @property
    def dead_letter_stream(self) -> str: ...

    @property
    def review(self) -> ReviewSettings: ...


Kind = Literal["standalone", "cluster", "sentinel"]

# scheme -> (kind, TLS)
SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
# Query parameters redis-py reads as options whose values are no secret; any other parameter
# (password=, username=, sentinel_password=, or one redis-py passes on as it is) is hidden.
_PLAIN_QUERY = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {"ssl_cert_reqs"}
_SECRET_QUERY = frozenset({"password", "username", "sentinel_password", "sentinel_username"})
# What a cluster or sentinel URL may carry in its query (a standalone one: whatever redis-py reads).
_FLEET_QUERY: dict[str, type] = {
    "password": str,
    "username": str,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "health_check_interval": int,
}
_SENTINEL_QUERY: dict[str, type] = {"sentinel_password": str, "sentinel_username": str}


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._%-]+)(:\d{1,5})?")


def redact_url(url: str) -> str:
    """The URL as it may be printed: no user or password, no fragment, and of the query only the
    plain options' values (``password=``, ``sentinel_password=`` and any parameter that is not a
    known plain option show as ``***``). Never raises; whatever cannot be read is left out."""
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", scheme):
        return "<a redis URL without a scheme>"  # it may be nothing but the password
    # Everything up to the last '@' is user info, even where a password holds '/', '?' or '#'
    # unencoded; a '@' further on (in a query value) costs the host, never a secret.
    rest = rest.rpartition("@")[2].partition("#")[0]
    hosts, qsep, query = rest.partition("?")
    names, slash, path = hosts.partition("/")
    if names and not all(_HOST.fullmatch(h) for h in names.split(",")):
        # Not host[:port]: perhaps a password typed where the host goes ("redis://:pw").
        hosts = "<unreadable host>" + slash + path
    shown = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in _PLAIN_QUERY:
            shown.append(f"{key}={value}")
        elif key in _SECRET_QUERY:
            shown.append(f"{key}=***")
        else:
            shown.append("***")
    return f"{scheme}://{hosts}" + (qsep + "&".join(shown) if shown else "")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: what ``connect`` makes a client for."""

    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes, or the sentinels
    service_name: str = ""  # sentinel: the monitored primary's name
    db: int = 0
    # username/password from the user info or the query, socket options, sentinel credentials
    options: dict[str, Any] = field(default_factory=dict)


def _bad(url: str, problem: str) -> RedisSettingsError:
    return RedisSettingsError(f"redis URL {redact_url(url)}: {problem}")


def _node(url: str, text: str, kind: Kind) -> tuple[str, int]:
    host, port = text, str(_DEFAULT_PORT[kind])
    if text.startswith("["):  # [IPv6]:port
        host, _, tail = text[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise _bad(url, f"expected [address]:port, got {text!r}")
            port = tail[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host):
        raise _bad(url, f"expected host:port, got {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(url, f"port of {text!r}: expected 1-65535")
    return host, int(port)


def parse_target(url: str) -> RedisTarget:
    """Raises ``RedisSettingsError`` naming what is wrong (and never the secret)."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise _bad(url, f"expected a scheme among {', '.join(s + '://' for s in SCHEMES)}")
    kind, tls = SCHEMES[scheme]
    if kind == "standalone":
        try:
            redis_parse_url(url)
        except ValueError as exc:
            # urllib quotes what it took for the port, which may be part of a mistyped password.
            raise _bad(url, re.sub(r" as '.*'", "", str(exc))) from None
        return RedisTarget(kind, tls)
    # Read as redact_url reads it: the user info runs to the last '@', so a password holding an
    # unencoded '/', '?' or '#' is never taken for a host or a path, nor shown in an error.
    userinfo, _, rest = url.partition("://")[2].rpartition("@")
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    hosts = parts.netloc
    options: dict[str, Any] = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    allowed = _FLEET_QUERY | (_SENTINEL_QUERY if kind == "sentinel" else {})
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in allowed:
            name = repr(key) if re.fullmatch(r"[a-z_]{1,40}", key) else "a parameter"
            raise _bad(url, f"{name} is not read here; expected {', '.join(allowed)}")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise _bad(url, f"{key}: expected a {allowed[key].__name__}") from None
    if not hosts:
        raise _bad(url, f"expected host:port[,host:port...] after {scheme}://")
    nodes = tuple(_node(url, h, kind) for h in hosts.split(","))
    path = [unquote(p) for p in parts.path.split("/")[1:] if p]
    if kind == "cluster":
        if path:
            raise _bad(url, "a Redis Cluster has no database number or path")
        return RedisTarget(kind, tls, nodes, options=options)
    if not path or len(path) > 2:
        raise _bad(url, "expected /<service name>[/db] after the sentinels")
    if len(path) == 2 and not path[1].isdigit():
        raise _bad(url, f"database {path[1]!r}: expected a number")
    db = int(path[1]) if len(path) == 2 else 0
    return RedisTarget(kind, tls, nodes, path[0], db, options)


def check_redis_settings(s: RedisOptions) -> None:
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
    if s.redis_wait_replicas and not external:
        raise ValueError(
            "redis_wait_replicas needs redis_url or redis_url_file (the embedded redis has no "
            "replica: every batch would wait forever)"
        )
    if (s.redis_tls_cert is None) != (s.redis_tls_key is None):
        raise ValueError("redis_tls_cert and redis_tls_key go together")
    for name in ("redis_url_file", "redis_password_file", *_TLS_FILES):
        p = getattr(s, name)
        if p is not None and not Path(p).is_file():
            raise ValueError(f"{name}: file not found: {p}")
    try:
        url = redis_url(s)
        if url is not None:
            check_url(s, url)
    except RedisSettingsError as exc:
        raise ValueError(str(exc)) from None


def check_url(s: RedisOptions, url: str) -> RedisTarget:
    """The URL parsed, and what it needs of the other settings; raises ``RedisSettingsError``."""
    target = parse_target(url)
    if any((s.redis_tls_ca, s.redis_tls_cert, s.redis_tls_key)) and not target.tls:
        raise RedisSettingsError(
            "redis TLS options need a rediss:// redis_url (or rediss+cluster://, "
            f"rediss+sentinel://), got {url.partition('://')[0]}://"
        )
    if target.kind == "cluster":
        problem = slot_problem(s.stream, s.dead_letter_stream, s.review.labels_stream)
        if problem:
            raise RedisSettingsError(problem)
        if s.redis_wait_replicas:
            # WAIT covers the writes of its own connection; a cluster client spreads a batch
            # over several, so a WAIT could not vouch for it.
            raise RedisSettingsError(
                f"redis_wait_replicas: expected 0 with a redis+cluster:// URL, got "
                f"{s.redis_wait_replicas}"
            )
    return target


def wait_replicas(s: RedisOptions, url: str | None) -> int:
    """The replicas each batch of flagged samples waits for: ``redis_wait_replicas``, else 1
    for a Sentinel-managed primary (it has a replica to fail over to) and 0 for the rest."""
    if s.redis_wait_replicas is not None:
        return s.redis_wait_replicas
    return int(url is not None and parse_target(url).kind == "sentinel")


_TLS_FILES = ("redis_tls_ca", "redis_tls_cert", "redis_tls_key")


def _read_secret(path: Path, name: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise RedisSettingsError(f"setting '{name}': cannot read {path} ({exc.strerror})") from None
    if not value:
        raise RedisSettingsError(f"setting '{name}': {path} is empty")
    return value


def redis_url(s: RedisOptions) -> str | None:
    """The configured URL, or None for the embedded redis."""
    if s.redis_url is not None:
        return s.redis_url.get_secret_value()
    if s.redis_url_file is not None:
        return _read_secret(s.redis_url_file, "redis_url_file")
    return None


def client_options(s: RedisOptions) -> dict[str, Any]:
    """Keyword arguments for ``connect`` on top of the URL: credentials and TLS."""
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
    if url is not None and SCHEMES.get(url.partition("://")[0], ("", False))[1]:
        opts["ssl_check_hostname"] = s.redis_tls_check_hostname
    return opts


class ClusterClient(RedisCluster):
    """A Redis Cluster client whose failures are ``RedisError`` like every other client's
    (redis-py raises ``RedisClusterException``, outside that tree, when no node answers), so one
    ``except RedisError`` serves the three kinds of Redis."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise RedisError(f"redis cluster: {exc}") from exc


class SentinelPrimary(aioredis.Redis):
    """The primary a Sentinel names; closing it closes the connections to the sentinels too.

    redis-py asks the sentinels only when it opens a connection. After a planned ``SENTINEL
    FAILOVER`` the old primary is not down: it keeps taking writes until the sentinel makes it a
    replica (seconds later), and those writes are lost then. So commands re-ask at most every
    ``recheck_s``; when the answer changed, redis-py drops the connections to the old primary.
    (What it took meanwhile no replica acknowledges, so the flag writer's ``WAIT`` keeps and
    resends it: service/flags.py.)
    """

    recheck_s = 0.5
    _checked_at = -math.inf

    async def _recheck(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.recheck_s:
            return
        self._checked_at = now
        # The sentinels away: the command goes to the known primary and says what is wrong.
        with contextlib.suppress(RedisError):
            await self.connection_pool.get_master_address()  # type: ignore[attr-defined]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            await self._recheck()
            return await super().execute_command(*args, **options)
        except MasterNotFoundError as exc:
            # redis-py appends each sentinel client's whole repr; say which sentinels instead.
            pool = self.connection_pool
            asked = ", ".join(
                f"{c.connection_pool.connection_kwargs['host']}:"
                f"{c.connection_pool.connection_kwargs['port']}"
                for c in pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
            )
            why = (
                "none answered"
                if "ConnectionError" in str(exc) or "TimeoutError" in str(exc)
                else "none names it as a primary that is up"
            )
            raise MasterNotFoundError(
                f"no primary {pool.service_name!r} from the sentinels at {asked}: {why}"  # type: ignore[attr-defined]
            ) from None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.connection_pool.sentinel_manager.aclose()  # type: ignore[attr-defined]


RedisClient = aioredis.Redis | ClusterClient

_SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def connect(
    url: str,
    options: Mapping[str, Any] | None = None,
    *,
    timeout_s: float,
    decode_responses: bool = False,
) -> RedisClient:
    """The one place a client is made. ``options`` (``client_options``): credentials and TLS,
    over what the URL says. A sentinel URL's credentials are the data nodes'; the sentinels' own
    come from ``sentinel_username=`` / ``sentinel_password=`` in its query."""
    target = parse_target(url)
    common: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    if target.kind == "standalone":
        return aioredis.Redis.from_url(url, **common, **(options or {}))
    kw = {**common, **target.options, **(options or {})}
    ssl = {k: kw[k] for k in _SSL_OPTIONS if k in kw}
    if target.kind == "cluster":
        return ClusterClient(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], ssl=target.tls, **kw
        )
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": kw["socket_timeout"],
        "socket_connect_timeout": kw["socket_connect_timeout"],
        "username": kw.pop("sentinel_username", None),
        "password": kw.pop("sentinel_password", None),
        # Discovery asks each sentinel in turn; retrying one that does not answer only delays
        # the next (redis-py's default backs off for seconds per sentinel).
        "retry": Retry(NoBackoff(), 0),
    }
    if target.tls:
        sentinel_kwargs |= {"ssl": True, **ssl}
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
    primary: SentinelPrimary = sentinel.master_for(
        target.service_name, redis_class=SentinelPrimary, db=target.db, ssl=target.tls, **kw
    )
    return primary


async def ensure_group(client: Any, stream: str, group: str) -> None:
    """Create consumer group ``group`` on ``stream`` (and the stream), reading from its start;
    a group that already exists is left as it is. Other Redis errors propagate."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
