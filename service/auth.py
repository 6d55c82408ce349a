"""Who may call what, on which listener.

- **Unix socket** (``unix_socket``): plaintext, every call. Its file permissions
  (``unix_socket_mode``, the directory's) decide who reaches it: in a pod, the tap beside the
  sidecar. TLS is never put on it.
- **TCP** (``grpc_host:grpc_port``), TLS when ``tls_cert``/``tls_key`` are set:
  - with ``tls_client_ca`` the handshake requires a client certificate signed by that CA, and a
    caller holding one may make every call (the tap over mTLS);
  - ``Ingest`` without a client certificate is refused (UNAUTHENTICATED), except on a plaintext
    listener bound to a loopback address, which only this host reaches (local development, as
    the tests and benchmarks run);
  - client calls (``Score``, ``GetRequestScore``, ``DescribeBundle``) without a certificate need
    ``authorization: Bearer <api_token>`` metadata when ``api_token`` is set.
- **JSON API** (``http_port``, service/http_api.py): the client calls over HTTP on
  ``grpc_host``, with the TCP listener's TLS (and ``tls_client_ca``: a client certificate is
  required, and a caller holding one needs no token); without a certificate, ``Authorization:
  Bearer <api_token>`` when ``api_token`` is set. There is no Ingest over HTTP.
- **Health port** (``health_port``): plaintext, a server of its own that holds only
  ``grpc.health.v1.Health``, for the kubelet's probes, which cannot present certificates.

Health and reflection on the main listeners answer everyone. Every refusal is counted in
``misalign_ingest_errors_total{rpc, reason="unauthenticated"}``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from service.metrics import Metrics
from wire.tls_files import check_server_pair, read_pem

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import SecretStr


class ListenerOptions(Protocol):
    """The settings read here (``service.settings.Settings`` has them): a Protocol, so that the
    settings can run this module's checks without a circle of imports."""

    @property
    def api_token(self) -> SecretStr | None: ...

    @property
    def api_token_file(self) -> Path | None: ...

    @property
    def grpc_host(self) -> str: ...

    @property
    def grpc_port(self) -> int | None: ...

    @property
    def http_port(self) -> int | None: ...

    @property
    def health_port(self) -> int | None: ...

    @property
    def metrics_port(self) -> int: ...

    @property
    def tls_cert(self) -> Path | None: ...

    @property
    def tls_client_ca(self) -> Path | None: ...

    @property
    def tls_key(self) -> Path | None: ...


log = logging.getLogger(__name__)
_LOG_EVERY_S = 10.0  # refusals are logged at most this often (a flood of guesses is counted)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_settings(s: ListenerOptions) -> None:
    """The listener and credential settings fit together; ValueError says which do not."""
    if s.tls_cert is not None:
        read_pem(s.tls_cert, "certificate", "tls_cert")
    if s.tls_key is not None:
        read_pem(s.tls_key, "private key", "tls_key")
    if s.tls_cert is not None and s.tls_key is not None:
        check_server_pair(s.tls_cert, s.tls_key)
    if s.tls_client_ca is not None:
        read_pem(s.tls_client_ca, "certificate", "tls_client_ca")
    if s.api_token is not None and s.api_token_file is not None:
        raise ValueError("api_token or api_token_file, not both")
    token = api_token(s)
    if token is not None and len(token) < 16:
        raise ValueError("api_token: at least 16 characters (a short token is soon guessed)")
    plaintext = s.tls_cert is None
    tcp = s.grpc_port is not None or s.http_port is not None
    if token is not None and plaintext and tcp and not is_loopback(s.grpc_host):
        raise ValueError(
            f"api_token on a plaintext listener on {s.grpc_host} would cross the network in "
            "clear; set tls_cert and tls_key"
        )
    ports = {
        "grpc_port": s.grpc_port,
        "metrics_port": s.metrics_port,
        "health_port": s.health_port,
        "http_port": s.http_port,
    }
    for own in ("health_port", "http_port"):
        mine = ports[own]
        if not mine:  # unset or 0 (any free port) clashes with nothing
            continue
        for name, port in ports.items():
            if name != own and port == mine:
                raise ValueError(f"{own} {mine} is also {name}; give it its own")


def api_token(s: ListenerOptions) -> bytes | None:
    if s.api_token is not None:
        value = s.api_token.get_secret_value().strip()
    elif s.api_token_file is not None:
        try:
            value = s.api_token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"api_token_file: cannot read {s.api_token_file} ({exc.strerror})"
            ) from None
    else:
        return None
    if not value:
        raise ValueError("api_token: empty")
    return value.encode()


def server_credentials(s: ListenerOptions) -> grpc.ServerCredentials | None:
    """The TCP listener's TLS (None: plaintext); the files were checked with the settings."""
    if s.tls_cert is None or s.tls_key is None:
        return None
    pair = [
        (
            read_pem(s.tls_key, "private key", "tls_key"),
            read_pem(s.tls_cert, "certificate", "tls_cert"),
        )
    ]
    if s.tls_client_ca is not None:
        ca = read_pem(s.tls_client_ca, "certificate", "tls_client_ca")
        return grpc.ssl_server_credentials(pair, ca, require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


@dataclass(frozen=True)
class AccessPolicy:
    # The TCP listener is plaintext on a loopback address: only this host reaches it.
    local_tcp: bool
    token: bytes | None

    @classmethod
    def from_settings(cls, s: ListenerOptions) -> AccessPolicy:
        return cls(s.tls_cert is None and is_loopback(s.grpc_host), api_token(s))

    def refusal(self, rpc: str, context: grpc.aio.ServicerContext) -> str | None:
        """Why this call may not go on (None: it may)."""
        if context.peer().startswith("unix:"):
            return None
        if "x509_pem_cert" in context.auth_context():
            return None  # the handshake verified it against tls_client_ca
        if rpc == "Ingest":
            if self.local_tcp:
                return None
            return (
                "Ingest over TCP needs a client certificate signed by the sidecar's "
                "tls_client_ca (or the Unix socket)"
            )
        if self.token is None:
            return None
        sent = dict(context.invocation_metadata() or ()).get("authorization", "")
        sent_b = sent.encode() if isinstance(sent, str) else bytes(sent)
        if hmac.compare_digest(sent_b, b"Bearer " + self.token):
            return None
        return f"{rpc} needs 'authorization: Bearer <api_token>' metadata (or a client certificate)"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Applies an ``AccessPolicy`` to this service's methods before their code runs (and, with
    the wire guard inside it, before a request byte is decoded)."""

    def __init__(self, policy: AccessPolicy, metrics: Metrics, service_prefix: str) -> None:
        self.policy = policy
        self.metrics = metrics
        self.prefix = service_prefix
        self._logged_at = -_LOG_EVERY_S

    async def _check(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        why = self.policy.refusal(rpc, context)
        if why is None:
            return
        self.metrics.ingest_errors.labels(rpc, "unauthenticated").inc()
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "refused %s from %s: %s (further refusals counted)", rpc, context.peer(), why
            )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.response_streaming:
            # The service has none; a new one must be guarded here before it can be called.
            raise TypeError(f"{method}: streaming responses are not guarded by AuthInterceptor")
        if handler.request_streaming:
            inner_su = handler.stream_unary

            async def stream_unary(it: AsyncIterator[Any], context: Any) -> Any:
                await self._check(rpc, context)
                return await inner_su(it, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, de, ser)
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await self._check(rpc, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, de, ser)
