"""TLS in the compose stack when certificates are given (issue 19, security): compose.tls.yaml
on top of compose.yaml (and the GPU file) is valid and gives broker, learner and rollout the
certificates and the LORALOOP_TLS_* variables; make-certs.sh's certificate, read through those
same variables by a real broker, is served and verified under the compose service name; plain
text is refused; the override's TLS health check passes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.broker.client import BrokerClient
from services.common.config import ClientTLSConfig
from services.common.errors import Unavailable
from tests.integration.test_compose import (
    BASE,
    GPU,
    HERE,
    SAMPLE_ENV,
    interpolated,
    load,
    merge,
    plain,
    schema_errors,
)
from tests.support.procs import TOKENS, BrokerProc

TLS = HERE / "compose.tls.yaml"
MAKE_CERTS = HERE / "make-certs.sh"
ENV = {**SAMPLE_ENV, "LORALOOP_TLS_DIR": "/srv/certs"}


@pytest.mark.parametrize("files", [[BASE, TLS], [BASE, GPU, TLS]], ids=["cpu", "gpu"])
def test_override_gives_each_grpc_service_the_certificates(files):
    doc = load(files[0])
    for f in files[1:]:
        doc = merge(doc, load(f))
    doc = interpolated(plain(doc), ENV)
    assert schema_errors(doc) == []
    for name in ("broker", "learner", "rollout"):
        svc = doc["services"][name]
        assert {"source": "/srv/certs", "target": "/certs", "type": "bind", "read_only": True} in svc["volumes"]
        env = svc["environment"]
        assert (env["LORALOOP_TLS_CERT_FILE"], env["LORALOOP_TLS_KEY_FILE"], env["LORALOOP_TLS_CA"]) == (
            "/certs/server.pem", "/certs/server.key", "/certs/ca.pem")
        assert "LORALOOP_TOKENS" in env  # the base file's variables are kept
        assert "secure_channel" in " ".join(svc["healthcheck"]["test"])
    with pytest.raises(KeyError, match="LORALOOP_TLS_DIR"):
        interpolated(plain(merge(load(BASE), load(TLS))), SAMPLE_ENV)


def test_make_certs_and_a_broker_configured_by_the_variables(tmp_path, redis_proc, monkeypatch):
    certs = tmp_path / "certs"
    out = subprocess.run(["bash", str(MAKE_CERTS), str(certs)], capture_output=True, text=True, check=True)
    assert "DNS:broker" in out.stdout
    assert (certs / "server.key").stat().st_mode & 0o077 == 0 and (certs / "ca.key").stat().st_mode & 0o077 == 0
    # As compose.tls.yaml sets them; the broker's command line has no TLS flag.
    monkeypatch.setenv("LORALOOP_TLS_CERT_FILE", str(certs / "server.pem"))
    monkeypatch.setenv("LORALOOP_TLS_KEY_FILE", str(certs / "server.key"))
    broker = BrokerProc(redis_proc.url, tmp_path, tls_ca_file=str(certs / "ca.pem"))
    try:
        # A replica reaching `broker:50050` in compose checks the name `broker` in the certificate.
        tls = ClientTLSConfig(ca_file=str(certs / "ca.pem"), server_name="broker")
        with BrokerClient(broker.target, TOKENS["learner"], tls=tls) as c:
            assert c.acquire_publisher("tls-env")[0] == 1
        wrong = ClientTLSConfig(ca_file=str(certs / "ca.pem"), server_name="not-in-the-cert")
        with BrokerClient(broker.target, TOKENS["learner"], tls=wrong, retries=0, timeout_s=3) as c, \
                pytest.raises(Unavailable):
            c.list_adapters()
        with BrokerClient(broker.target, TOKENS["learner"], retries=0, timeout_s=3) as plain_client, \
                pytest.raises(Unavailable):
            plain_client.list_adapters()
        # The override's own health check, with the CA where the container mounts it.
        snippet = load(TLS)["x-grpc-health-tls"].replace("/certs/ca.pem", str(certs / "ca.pem"))
        health = subprocess.run([sys.executable, "-c", snippet, broker.target], capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
    finally:
        broker.stop()
