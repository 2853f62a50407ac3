"""TLS settings (issue 19, security): the stack's [tls] reaches every service's server and
client side (and the files `--write-configs` writes); a service's unset TLS fields come from the
LORALOOP_TLS_* variables (compose.tls.yaml), and `up` never passes those on."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.broker.config import BrokerConfig
from services.common.config import TLS_ENV, ClientTLSConfig, load_config, tls_from_env
from services.learner.config import LearnerConfig
from services.rollout.config import RolloutConfig
from services.stack import main
from services.stack_config import StackConfig


def _files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for k, name in (("cert_file", "server.pem"), ("key_file", "server.key"), ("ca_file", "ca.pem")):
        (tmp_path / name).write_text("x")
        out[k] = str(tmp_path / name)
    return out


def test_stack_tls_needs_all_three_files_that_exist(tmp_path: Path):
    files = _files(tmp_path)
    with pytest.raises(ValidationError, match="missing: key_file, ca_file"):
        StackConfig.model_validate({"tls": {"cert_file": files["cert_file"]}})
    with pytest.raises(ValidationError, match="no file"):
        StackConfig.model_validate({"tls": {**files, "ca_file": str(tmp_path / "nope.pem")}})
    assert not StackConfig().tls.enabled


@pytest.mark.parametrize("mutual", [False, True])
def test_write_configs_carry_the_stacks_tls_to_every_service(tmp_path: Path, mutual: bool):
    files = _files(tmp_path)
    out = tmp_path / "cfg"
    args = [f"--tls.{k}={v}" for k, v in files.items()] + [f"--tls.mutual={str(mutual).lower()}"]
    assert main(["--model", "/m", "--write-configs", str(out), *args]) == 0
    broker = load_config(BrokerConfig, out / "broker.toml")
    learner = load_config(LearnerConfig, out / "learner.toml")
    rollout = load_config(RolloutConfig, out / "rollout.toml")
    for c in (broker, learner, rollout):
        assert (c.tls.cert_file, c.tls.key_file) == (files["cert_file"], files["key_file"])
        assert c.tls.ca_file == (files["ca_file"] if mutual else None)  # servers require client certs
    for c in (learner, rollout):
        assert c.client_tls.ca_file == files["ca_file"]
        assert c.client_tls.cert_file == (files["cert_file"] if mutual else None)


def test_without_tls_no_service_gets_any(tmp_path: Path):
    out = tmp_path / "cfg"
    assert main(["--model", "/m", "--write-configs", str(out)]) == 0
    for model, name in ((BrokerConfig, "broker"), (LearnerConfig, "learner"), (RolloutConfig, "rollout")):
        c = load_config(model, out / f"{name}.toml")
        assert not c.tls.enabled and not getattr(c, "client_tls", ClientTLSConfig()).enabled


def test_tls_from_env_fills_only_unset_fields():
    env = {v: f"/env/{v}" for v in TLS_ENV.values()}
    rc = tls_from_env(RolloutConfig(tls={"cert_file": "/mine.pem"}), env)
    assert rc.tls.cert_file == "/mine.pem"  # the config wins
    assert rc.tls.key_file == "/env/LORALOOP_TLS_KEY_FILE" and rc.tls.ca_file == "/env/LORALOOP_TLS_CLIENT_CA_FILE"
    assert rc.client_tls.ca_file == "/env/LORALOOP_TLS_CA" and rc.client_tls.server_name == "/env/LORALOOP_TLS_SERVER_NAME"
    b = tls_from_env(BrokerConfig(), env)  # a broker calls nobody: server side only
    assert b.tls.enabled and not hasattr(b, "client_tls")
    assert not tls_from_env(LearnerConfig(), {}).client_tls.enabled


def test_client_tls_channel_speaks_tls_only_with_a_ca(tmp_path: Path):
    import grpc

    plain = ClientTLSConfig().channel("127.0.0.1:1")
    assert ClientTLSConfig().credentials() is None
    plain.close()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    tls = ClientTLSConfig(ca_file=str(ca), server_name="loraloop")
    assert isinstance(tls.credentials(), grpc.ChannelCredentials)
    assert ("grpc.ssl_target_name_override", "loraloop") in tls.channel_options()


@pytest.mark.parametrize("mutual", [False, True])
def test_chaos_clients_verify_the_stacks_servers_and_present_its_certificate_when_mutual(tmp_path: Path, mutual):
    """`loraloop chaos` under [tls] (its OpenAI clients and replica probes): the stack's CA, and
    with mutual TLS the stack's certificate as the client's."""
    import ssl
    import subprocess

    from services.chaos import stack_ssl

    assert stack_ssl(StackConfig()) is None
    d = tmp_path / "certs"
    subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "deploy/compose/make-certs.sh"), str(d)],
                   check=True, capture_output=True)
    cfg = StackConfig.model_validate({"tls": {"cert_file": str(d / "server.pem"), "key_file": str(d / "server.key"),
                                              "ca_file": str(d / "ca.pem"), "mutual": mutual}})
    ctx = stack_ssl(cfg)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "loraloop CA"),),)]
    bad = cfg.model_copy(update={"tls": cfg.tls.model_copy(update={"key_file": str(d / "ca.key")})})
    if mutual:  # the certificate is loaded: a key that is not its own is refused
        with pytest.raises(ssl.SSLError):
            stack_ssl(bad)
    else:  # nothing of the stack's own is presented
        assert stack_ssl(bad).get_ca_certs() == ctx.get_ca_certs()
