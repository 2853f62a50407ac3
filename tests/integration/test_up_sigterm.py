"""`loraloop up` with TLS between every service, trained and served over it on loopback; then
stopped by SIGTERM (kill, systemd, docker stop, a CI timeout), which stops every service it
started, as Ctrl-C does, and removes its scratch root (before, SIGTERM ended `up` alone and left
Redis, the broker and the learner running). Afterwards: no token, password or adapter bytes in
any log line or command line, and the run dir's secrets readable by their owner only (issue 19).

One stack run checks all of it: a stack start with a vLLM replica is the cost (~45 s)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.proc import stop_process
from tests.support.proctree import alive


def _certs(d: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A CA and a certificate it signs for 127.0.0.1/localhost (server and client auth)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"loraloop test {name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraloop")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / f"{name}.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    key_file = d / "server.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d / f"{name}.pem", d / "server.pem", key_file


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return []


@pytest.mark.timeout(420)
def test_tls_stack_trains_and_serves_then_sigterm_stops_it(tmp_path: Path, tiny_model: Path):
    import httpx
    import openai

    from services.broker.client import BrokerClient

    ca, cert, key = _certs(tmp_path / "certs")
    other_ca, _, _ = _certs(tmp_path / "other", "other-ca")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", f"--run-dir={run}", f"--model={tiny_model}",
                             "--warm_start=false", "--rollout-replicas=1", "--steps=1000", "--plot=false",
                             f"--tls.cert_file={cert}", f"--tls.key_file={key}", f"--tls.ca_file={ca}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids_file = run / "logs" / "pids.json"
    try:
        # Training over TLS end to end: leases and trajectories (replica -> learner), publishes
        # (learner -> broker), fetches and watches (replica -> broker).
        deadline = time.monotonic() + 300
        while len(_rows(run / "metrics.jsonl")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
        pids = json.loads(pids_file.read_text())
        assert {"redis", "broker", "learner", "rollout-0"} <= set(pids) and all(alive(p) for p in pids.values()), pids
        env = dict(ln.split("=", 1) for ln in (run / "stack.env").read_text().splitlines() if "=" in ln)
        assert env["LORALOOP_TLS_CA"] == str(ca) and env["OPENAI_BASE_URL"].startswith("https://127.0.0.1:")
        broker = env["LORALOOP_BROKER"]

        # Plain text and a certificate from another CA are refused; the stack's CA is accepted.
        with grpc.insecure_channel(broker) as ch, pytest.raises(grpc.RpcError) as e:
            _health(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(other_ca.read_bytes())
        with grpc.secure_channel(broker, creds) as ch, pytest.raises(grpc.RpcError):
            _health(ch)
        with grpc.secure_channel(env["LORALOOP_LEARNER"], grpc.ssl_channel_credentials(ca.read_bytes())) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        with BrokerClient(broker, env["LORALOOP_CLIENT_TOKEN"], tls_ca_file=str(ca), retries=0) as client:
            versions, _ = client.list_versions("policy")
            assert len(versions) >= 2, versions
            latest = max(versions, key=lambda v: v.version)
            adapter_bytes = client.fetch(f"policy@v{latest.version}")[1]
        # `loraloop adapters` finds the CA in the environment stack.env sets.
        out = subprocess.run([sys.executable, "-m", "services.cli", "adapters", "list", "policy"],
                             env={**_env_without_proxy(), **env, "LORALOOP_TOKEN": env["LORALOOP_CLIENT_TOKEN"]},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "latest: v" in out.stdout, out.stderr

        # The OpenAI API over HTTPS, verified with the stack's CA; plain HTTP on that port fails.
        with httpx.Client(verify=str(ca)) as http:
            client = openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"], http_client=http,
                                   max_retries=0, timeout=60)
            resp = client.completions.create(model="policy@latest", prompt="1+2=", max_tokens=3, temperature=0)
            assert resp.model.startswith("policy@v") and int(resp.model.split("@v")[1]) >= latest.version
        with pytest.raises(httpx.HTTPError):
            httpx.get(env["OPENAI_BASE_URL"].replace("https://", "http://") + "/models", timeout=5)
        with pytest.raises(httpx.ConnectError):  # the client's default trust store does not know the CA
            httpx.get(env["OPENAI_BASE_URL"] + "/models", timeout=5)

        cmdlines = {n: Path(f"/proc/{p}/cmdline").read_bytes() for n, p in pids.items()}
        lenv = dict(kv.split("=", 1) for kv in Path(f"/proc/{pids['learner']}/environ").read_text().split("\0")
                    if "=" in kv)
        scratch_root = Path(lenv["TMPDIR"]).parent
        assert scratch_root.name.startswith("ll-") and len(lenv["TMPDIR"]) < 40
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:  # on a failure: `up` stops what it started on SIGTERM (SIGKILL would orphan it)
        stop_process(proc, timeout_s=90)
    assert proc.returncode == 130, out[-3000:]
    assert "stopping ..." in out
    assert not [n for n, p in pids.items() if alive(p)], out[-3000:]
    assert not scratch_root.exists()  # the scratch root goes with the stack

    # Secrets: never in a log line, a config file, `up`'s output or a command line.
    secrets = {k: env[k] for k in ("LORALOOP_TOKEN", "LORALOOP_ROLLOUT_TOKEN", "LORALOOP_CLIENT_TOKEN")}
    secrets["redis password"] = (run / "redis" / "auth.conf").read_text().split()[-1].strip('"')
    key_pem = key.read_text()
    secrets["TLS key"] = "".join(key_pem.splitlines()[1:-1])[:40]
    # Adapter bytes: windows of the tensor data (after the safetensors header), raw and hex, and
    # the file's base64 (as a log dumping it would write it).
    header = 8 + int.from_bytes(adapter_bytes[:8], "little")
    data = adapter_bytes[header:]
    assert len(data) >= 4096
    windows = [data[i:i + 24] for i in range(0, len(data) - 24, len(data) // 16)]
    b64 = base64.b64encode(adapter_bytes).decode()
    b64_chunks = [b64[i:i + 32] for i in range(len(b64) // 2, len(b64) - 32, len(b64) // 8)]
    skip_dirs = {"redis", "checkpoints", "model"}  # the data itself: Redis' AOF, checkpoints
    scanned = []
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if not f.is_file() or rel.parts[0] in skip_dirs or rel.name == "stack.env":
            continue
        blob = f.read_bytes()
        scanned.append(str(rel))
        text = blob.decode("utf-8", "replace")
        for what, value in secrets.items():
            assert value not in text, f"{what} in {rel}"
        for w in windows:
            assert w not in blob and w.hex() not in text, f"adapter bytes in {rel}"
        assert not any(c in text for c in b64_chunks), f"adapter bytes (base64) in {rel}"
    assert any(s.startswith("logs/") for s in scanned) and "metrics.jsonl" in scanned, scanned
    for name, cmdline in cmdlines.items():
        assert not any(v.encode() in cmdline for v in secrets.values()), f"a secret on {name}'s command line"
    for what, value in secrets.items():
        assert value not in out, f"{what} in up's output"

    # Files that hold secrets are readable by their owner only.
    for f in (run / "stack.env", run / "redis" / "auth.conf"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f} is {oct(f.stat().st_mode)}"


def _env_without_proxy() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
