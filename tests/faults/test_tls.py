"""Issue 17, item 10: the gateway serves TLS and the SDK uses it. Real gateway on port 0 with a
self-signed certificate made by `openssl` here (subjectAltName IP:127.0.0.1), real redis-server.

- `AsyncClient` and `Client` with the certificate as their root succeed;
- a plaintext client, and a TLS client that trusts only the system's roots, fail cleanly with a
  typed `ServiceUnavailable` within their retry budget, never a hang;
- a certificate without its key (or the reverse) is refused as a configuration error.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import ConfigurationError, ServiceUnavailable
from blockpress.runtime.sdk.aio import AsyncClient
from blockpress.runtime.sdk.sync import Client

LiveGateway = Any  # tests/faults/conftest.py: `live_gateway`

FAIL_BOUND_S = 10.0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=blockpress-test", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def gateway_settings(certificate: tuple[Path, Path]) -> dict[str, Any]:
    cert, key = certificate
    return {"tls_cert_file": cert, "tls_key_file": key}


def _trusting(certificate: tuple[Path, Path]) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=certificate[0].read_bytes())


async def test_tls_clients_succeed(live_gateway: LiveGateway, certificate: tuple[Path, Path]) -> None:
    async with AsyncClient(live_gateway.address, credentials=_trusting(certificate), timeout=10) as client:
        models = await client.models()
    assert [m.name for m in models] == [live_gateway.model]

    def blocking() -> list[str]:  # in a thread: the gateway runs on this test's loop
        with Client(live_gateway.address, credentials=_trusting(certificate), timeout=10) as client:
            return [m.name for m in client.models()]

    assert await asyncio.to_thread(blocking) == [live_gateway.model]


@pytest.mark.parametrize("how", ["plaintext", "system roots"])
async def test_clients_that_cannot_speak_to_it_fail_cleanly(live_gateway: LiveGateway, how: str) -> None:
    # The system's roots do not include a self-signed certificate: tls=True checks, it does not trust.
    tls = how == "system roots"
    start = time.monotonic()
    async with AsyncClient(live_gateway.address, tls=tls, retry_s=1.0, timeout=FAIL_BOUND_S) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.models()
    took = time.monotonic() - start
    print(f"\n{how} client against the TLS gateway: {type(caught.value).__name__} after {took:.2f} s: {caught.value}")
    assert took < FAIL_BOUND_S


@pytest.mark.parametrize("given", ["tls_cert_file", "tls_key_file"])
def test_half_a_tls_pair_is_a_configuration_error(given: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="set both for TLS"):
        RuntimeSettings(**{given: tmp_path / "x.pem"})
