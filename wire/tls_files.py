"""PEM files named in settings (the sidecar's TLS, the tap's mTLS), read and checked once.

A wrong path, a certificate given as the key, or a key gRPC cannot use would otherwise surface
as a traceback from grpc at start, or as a handshake that fails with no word on why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

_BLOCKS = {
    "certificate": re.compile(rb"-----BEGIN CERTIFICATE-----"),
    "private key": re.compile(rb"-----BEGIN (?:EC |RSA )?PRIVATE KEY-----"),
}


def read_pem(path: Path, what: Literal["certificate", "private key"], setting: str) -> bytes:
    """The bytes of ``path`` if it holds a PEM ``what``; else ValueError naming ``setting``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path} ({exc.strerror})") from None
    if what == "private key" and b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise ValueError(
            f"{setting}: {path} is an encrypted private key; gRPC needs it unencrypted"
        )
    if not _BLOCKS[what].search(data):
        raise ValueError(
            f"{setting}: {path} holds no PEM {what} (expected a '-----BEGIN "
            f"{'CERTIFICATE' if what == 'certificate' else 'PRIVATE KEY'}-----' block)"
        )
    return data


def check_server_pair(cert: Path, key: Path) -> None:
    """Load the pair as the server will, so a key that does not belong to the certificate is
    named here rather than by a traceback from grpc at start."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"tls_cert, tls_key: {cert} and {key} are not a certificate and its private key "
            f"({getattr(exc, 'reason', None) or exc})"
        ) from None
