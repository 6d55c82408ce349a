"""gRPC over TLS and mutual TLS, with certificates the test makes."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest

from service.rpc import monitor_pb2 as pb
from service.rpc import monitor_pb2_grpc as pb_grpc
from service.server import start
from service.settings import Settings
from tests.sidecar import RedisServer


def make_pki(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    for stem, san in (("server", [x509.DNSName("localhost")]), ("client", [x509.DNSName("tap")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(stem))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)
    return {p.stem + p.suffix: p for p in d.iterdir()}


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_tls_and_mutual_tls(tmp_path: Path, mutual: bool) -> None:
    pki = make_pki(tmp_path)
    redis_server = RedisServer(tmp_path / "redis").start()
    sc = await start(
        Settings(
            grpc_port=0,
            metrics_port=0,
            redis_url=redis_server.url,
            state_dir=tmp_path / "state",
            tls_cert=pki["server.pem"],
            tls_key=pki["server.key"],
            tls_client_ca=pki["ca.pem"] if mutual else None,
        )
    )
    target = f"localhost:{sc.tcp_port}"
    try:
        ca = pki["ca.pem"].read_bytes()
        client = (
            (pki["client.key"].read_bytes(), pki["client.pem"].read_bytes())
            if mutual
            else (None, None)
        )
        creds = grpc.ssl_channel_credentials(ca, *client)
        async with grpc.aio.secure_channel(target, creds) as ch:
            info = await pb_grpc.MonitorStub(ch).DescribeBundle(
                pb.DescribeBundleRequest(), timeout=10
            )
            assert info.bundle_id
        async with grpc.aio.insecure_channel(target) as ch:  # plaintext is refused
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.MonitorStub(ch).DescribeBundle(pb.DescribeBundleRequest(), timeout=3)
        if mutual:  # a client without a certificate is refused
            async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await pb_grpc.MonitorStub(ch).DescribeBundle(
                        pb.DescribeBundleRequest(), timeout=3
                    )
    finally:
        await sc.stop()
        redis_server.stop()
