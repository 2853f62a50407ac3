"""TLS by config: a broker given a certificate speaks TLS; clients verify it with the CA."""

from __future__ import annotations

import subprocess

import pytest

from services.broker.client import BrokerClient
from services.common.errors import Unavailable
from tests.support.procs import TOKENS, BrokerProc


def test_tls_broker(tmp_path, redis_proc):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    broker = BrokerProc(redis_proc.url, tmp_path, f"--tls.cert_file={cert}", f"--tls.key_file={key}",
                        tls_ca_file=str(cert))
    try:
        with BrokerClient(f"localhost:{broker.port}", TOKENS["learner"], tls_ca_file=str(cert)) as c:
            assert c.acquire_publisher("tls")[0] == 1
        with (BrokerClient(broker.target, TOKENS["learner"], retries=0, timeout_s=3) as plain,
              pytest.raises(Unavailable)):
            plain.list_adapters()
    finally:
        broker.stop()
