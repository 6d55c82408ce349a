"""A typed client of the sidecar: a request's score (long-polled), the loaded bundle, and scoring
rows, over gRPC (``MonitorClient``) or the JSON API (``HttpMonitorClient``), with the same
results (``service.api_models``) and the same errors (``MonitorClientError`` and its kinds).

    from service.client import MonitorClient

    with MonitorClient("127.0.0.1:50051", token=API_TOKEN) as mc:
        score = mc.get_score("my-x-request-id", wait=10)   # returns once it is scored
        print(score.flagged, score.feature("misaligned_persona").score)

``get_score(request_id, wait=S)`` waits on the server (one call, no polling) up to S seconds
(at most the sidecar's ``score_wait_max_s``) for the request to be scored; the id is the one the
tap sent or the client-visible one (the ``X-Request-Id`` sent to vLLM).
"""

from __future__ import annotations

import json
import math
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from detectors.errors import MisalignError
from service.api_models import BundleInfo, RequestScore
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc


class MonitorClientError(MisalignError):
    """The sidecar refused or could not answer a call; the message is the sidecar's."""


class ScoreNotFound(MonitorClientError):
    """No score for that id (unknown, not finished within the wait, or aged out)."""


class Unauthenticated(MonitorClientError):
    """No or a wrong api_token / client certificate."""


class InvalidArgument(MonitorClientError):
    """The call's arguments were refused; the message names the field."""


class Busy(MonitorClientError):
    """Too many callers wait for scores on the sidecar (score_waiters_max): ask again later."""


class Unavailable(MonitorClientError):
    """The sidecar cannot be reached, is shutting down, or did not answer in time."""


_GRPC_ERRORS: dict[grpc.StatusCode, type[MonitorClientError]] = {
    grpc.StatusCode.NOT_FOUND: ScoreNotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Busy,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}
_HTTP_ERRORS: dict[int, type[MonitorClientError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    404: ScoreNotFound,
    413: InvalidArgument,
    415: InvalidArgument,
    429: Busy,
    503: Unavailable,
}


def _deadline(wait: float, timeout_s: float) -> float:
    # A wait the server refuses (NaN, negative) still gets a deadline long enough for the refusal.
    return (wait if math.isfinite(wait) and wait > 0 else 0.0) + timeout_s


def _rows(
    projections: Any, is_response: Sequence[int | bool], token_ids: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    proj = np.asarray(projections, dtype=np.float32)
    if proj.ndim != 2:
        raise InvalidArgument(f"projections: expected rows x k numbers, got shape {proj.shape}")
    roles = np.asarray(is_response, dtype=np.int8)
    tok = np.zeros(len(proj), np.uint32) if token_ids is None else np.asarray(token_ids, np.uint32)
    return proj, roles, tok


class MonitorClient:
    """Over gRPC. ``target``: ``host:port`` or ``unix:/path/monitor.sock``. ``token``: the
    sidecar's api_token (sent as ``authorization: Bearer``). TLS: ``root_certificates`` (PEM,
    or ``tls=True`` for the system's roots), and ``certificate_chain`` + ``private_key`` for a
    client certificate. ``timeout_s``: each call's deadline beyond its wait."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if tls or root_certificates or certificate_chain:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, creds)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.MonitorStub(self._channel)
        # Metadata, not call credentials: grpc puts those only on TLS channels, and a plaintext
        # loopback sidecar may ask for a token too.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            kind = _GRPC_ERRORS.get(code, MonitorClientError)
            raise kind(f"{code.name}: {exc.details()}") from None

    def get_score(self, request_id: str, wait: float = 0.0) -> RequestScore:
        """The score of a finished request, waiting on the server up to ``wait`` seconds for
        it to be scored. Raises ``ScoreNotFound`` when it is not scored by then."""
        req = pb.GetRequestScoreRequest(request_id=request_id, wait_s=wait)
        got = self._call(self._stub.GetRequestScore, req, _deadline(wait, self.timeout_s))
        return RequestScore.from_proto(got)

    def describe_bundle(self) -> BundleInfo:
        got = self._call(self._stub.DescribeBundle, pb.DescribeBundleRequest(), self.timeout_s)
        return BundleInfo.from_proto(got)

    def score(
        self,
        projections: Any,
        is_response: Sequence[int | bool],
        *,
        token_ids: Sequence[int] | None = None,
        model: str = "",
        model_version: str = "",
        bundle_id: str = "",
    ) -> RequestScore:
        """Score token rows: ``projections`` rows x k (raw residual · direction), and per row
        0 (prompt) or 1 (response)."""
        proj, roles, tok = _rows(projections, is_response, token_ids)
        req = pb.ScoreRequest(
            bundle_id=bundle_id,
            k=proj.shape[1],
            projections=proj.astype("<f4").tobytes(),
            is_response=roles.tobytes(),
            token_ids=tok.astype("<u4").tobytes(),
            model=model,
            model_version=model_version,
        )
        return RequestScore.from_proto(self._call(self._stub.Score, req, self.timeout_s))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpMonitorClient:
    """Over the JSON API (``http_port``). ``base_url``: ``http://host:port`` or ``https://...``
    (``ssl_context`` for a private CA or a client certificate)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl_context
        self.timeout_s = timeout_s

    def _call(self, path: str, timeout: float, body: dict[str, Any] | None = None) -> Any:
        data = None
        headers = dict(self._headers)
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            kind = _HTTP_ERRORS.get(exc.code, MonitorClientError)
            raise kind(f"HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"{self.base_url}: {exc}") from None

    def get_score(self, request_id: str, wait: float = 0.0) -> RequestScore:
        """As ``MonitorClient.get_score``."""
        path = f"/v1/scores/{urllib.parse.quote(request_id, safe='')}?wait_s={wait:g}"
        return RequestScore.model_validate(self._call(path, _deadline(wait, self.timeout_s)))

    def describe_bundle(self) -> BundleInfo:
        return BundleInfo.model_validate(self._call("/v1/bundle", self.timeout_s))

    def score(
        self,
        projections: Any,
        is_response: Sequence[int | bool],
        *,
        token_ids: Sequence[int] | None = None,
        model: str = "",
        model_version: str = "",
        bundle_id: str = "",
    ) -> RequestScore:
        """As ``MonitorClient.score``."""
        proj, roles, tok = _rows(projections, is_response, token_ids)
        if not np.isfinite(proj).all():
            raise InvalidArgument("projections: NaN or infinite values (JSON cannot carry them)")
        body = {
            "bundle_id": bundle_id,
            "projections": proj.tolist(),
            "is_response": roles.tolist(),
            "token_ids": tok.tolist(),
            "model": model,
            "model_version": model_version,
        }
        return RequestScore.model_validate(self._call("/v1/score", self.timeout_s, body))
