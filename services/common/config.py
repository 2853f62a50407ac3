"""Typed configuration: pydantic models loaded from TOML with dotted CLI overrides.

One definition per setting: the field's docstring is its `--help` text. A command is
`loraloop SUB [CONFIG.toml] [--section.key=value ...]`; overrides win over the file, the
file over the defaults. Values are parsed as TOML literals when they are one (`8`, `true`,
`[1, 2]`), else taken as strings (`127.0.0.1`). Importing this module pulls in pydantic
only, so `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Role = Literal["learner", "rollout", "client"]
M = TypeVar("M", bound="Section")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class RedisConfig(Section):
    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL. Put the password in `password_env`, not here."""
    password_env: str = "LORALOOP_REDIS_PASSWORD"
    """Environment variable read for the Redis password (empty/unset: no password)."""
    durability: Literal["require", "warn", "off"] = "require"
    """Check at start that Redis fsyncs every write (AOF, appendfsync always): refuse to
    start (`require`), log a warning (`warn`), or skip the check (`off`)."""
    wait_replicas: int = Field(0, ge=0)
    """After each commit, WAIT for this many replicas to acknowledge it (0: none)."""
    retry_s: float = Field(30.0, ge=0)
    """How long a watch stream keeps retrying a lost Redis connection before giving up."""


class AuthConfig(Section):
    enabled: bool = True
    """Require a bearer token on every RPC (health checks and reflection excepted)."""
    tokens_env: str = "LORALOOP_TOKENS"
    """Environment variable with `role:token` pairs, comma-separated (roles: learner,
    rollout, client). Tokens are secrets: keep them out of TOML files in git."""
    tokens_file: str | None = None
    """Optional file with one `role:token` pair per line."""

    def token_roles(self) -> dict[str, Role]:
        """token -> role, from `tokens_env` and `tokens_file`."""
        pairs = [p for p in os.environ.get(self.tokens_env, "").split(",") if p.strip()]
        if self.tokens_file:
            pairs += [ln for ln in Path(self.tokens_file).read_text().splitlines() if ln.strip()]
        roles: dict[str, Role] = {}
        for pair in pairs:
            role, sep, token = pair.strip().partition(":")
            if not sep or role not in typing.get_args(Role) or not token:
                raise ValueError(f"bad token entry {pair.split(':')[0]!r}:...; expected role:token")
            roles[token] = role  # type: ignore[assignment]
        return roles


class TLSConfig(Section):
    cert_file: str | None = None
    """Server certificate (PEM). With key_file set, the server speaks TLS. Unset: $LORALOOP_TLS_CERT_FILE."""
    key_file: str | None = None
    """Server private key (PEM). Unset: $LORALOOP_TLS_KEY_FILE."""
    ca_file: str | None = None
    """CA bundle (PEM): a server given one requires client certificates signed by it.
    Unset: $LORALOOP_TLS_CLIENT_CA_FILE."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


class ClientTLSConfig(Section):
    """How this service reaches the other services' gRPC servers (broker, learner) over TLS."""

    ca_file: str | None = None
    """CA bundle (PEM) that signed the other services' server certificates. Set: every
    connection this service opens to another one speaks TLS and verifies the server with it.
    Unset: $LORALOOP_TLS_CA."""
    cert_file: str | None = None
    """Client certificate (PEM), for servers that require one (their `tls.ca_file` set).
    Unset: $LORALOOP_TLS_CLIENT_CERT_FILE."""
    key_file: str | None = None
    """Client private key (PEM). Unset: $LORALOOP_TLS_CLIENT_KEY_FILE."""
    server_name: str | None = None
    """Name checked against the servers' certificates instead of the host in the address
    (a certificate issued for `loraloop` used at 10.0.0.5:50050). Unset: $LORALOOP_TLS_SERVER_NAME."""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file)

    def credentials(self):  # -> grpc.ChannelCredentials | None
        """grpc channel credentials, or None for a plain-text channel."""
        if not self.enabled:
            return None
        import grpc

        key = Path(self.key_file).read_bytes() if self.key_file else None
        cert = Path(self.cert_file).read_bytes() if self.cert_file else None
        return grpc.ssl_channel_credentials(Path(self.ca_file).read_bytes(), key, cert)  # type: ignore[arg-type]

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.enabled and self.server_name else []

    def channel(self, target: str, options: list | None = None, *, aio: bool = False):
        """A grpc (or grpc.aio) channel to `target`: TLS when `ca_file` is set, else plain text."""
        import grpc

        mod = grpc.aio if aio else grpc
        opts = [*(options or []), *self.channel_options()]
        creds = self.credentials()
        return mod.secure_channel(target, creds, options=opts) if creds else mod.insecure_channel(target, options=opts)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for all)."""
    port: int = Field(50051, ge=0, le=65535)
    """Port to listen on (0: pick a free one and print it)."""
    grace_s: float = Field(5.0, ge=0)
    """On SIGTERM/SIGINT, how long running RPCs get to finish."""
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest single gRPC message accepted or sent."""


# ---------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """`["--a.b=1", "--c", "x", "--flag"]` -> `{"a": {"b": 1}, "c": "x", "flag": True}`."""
    aliases = aliases or {}
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise SystemExit(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        key = aliases.get(key, key)
        node = out
        parts = [p.replace("-", "_") for p in key.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"override --{key} conflicts with another override")
        node[parts[-1]] = _parse_value(value)
        i += 1
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(model: type[M], path: str | Path | None, overrides: dict[str, Any] | None = None) -> M:
    """Defaults < TOML file < overrides; raises SystemExit with every field error listed."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise SystemExit(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(f"{path}: not valid TOML: {e}") from None
    try:
        return model.model_validate(merge(data, overrides or {}))
    except ValidationError as e:
        lines = [f"  --{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise SystemExit(f"invalid configuration{f' in {path}' if path else ''}:\n" + "\n".join(lines)) from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_tables(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(data: dict[str, Any], _prefix: str = "") -> str:
    """A config dict (scalars, lists, nested sections, lists of sections) as TOML; None values
    are left out (the model's default applies)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items()
             if v is not None and not isinstance(v, dict) and not _is_tables(v)]
    for k, v in data.items():
        if isinstance(v, dict):
            body = to_toml(v, f"{_prefix}{k}.")
            lines += ["", f"[{_prefix}{k}]", body] if body.strip() else []
        elif _is_tables(v):
            for item in v:
                lines += ["", f"[[{_prefix}{k}]]", to_toml(item, f"{_prefix}{k}.")]
    return "\n".join(lines).strip() + "\n"


def describe(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """Help lines for every field, dotted, with its default and docstring."""
    lines = []
    for name, f in model.model_fields.items():
        default = getattr(defaults, name) if defaults is not None else f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            lines += describe(type(default), f"{prefix}{name}.", default)
            continue
        doc = " ".join((f.description or "").split())
        lines.append(f"  --{prefix}{name}={default!r}\n      {doc}")
    return lines


# Where a service's TLS settings come from when its config leaves them unset (containers,
# Kubernetes: the same command line with or without TLS). `loraloop up` does not pass these on.
TLS_ENV = {("tls", "cert_file"): "LORALOOP_TLS_CERT_FILE", ("tls", "key_file"): "LORALOOP_TLS_KEY_FILE",
           ("tls", "ca_file"): "LORALOOP_TLS_CLIENT_CA_FILE", ("client_tls", "ca_file"): "LORALOOP_TLS_CA",
           ("client_tls", "cert_file"): "LORALOOP_TLS_CLIENT_CERT_FILE",
           ("client_tls", "key_file"): "LORALOOP_TLS_CLIENT_KEY_FILE",
           ("client_tls", "server_name"): "LORALOOP_TLS_SERVER_NAME"}


def tls_from_env(cfg: Any, environ: Any = None) -> Any:
    """Fill a service config's unset `tls` / `client_tls` fields from TLS_ENV's variables."""
    environ = os.environ if environ is None else environ
    for (section, key), var in TLS_ENV.items():
        sec = getattr(cfg, section, None)
        if isinstance(sec, (TLSConfig, ClientTLSConfig)) and not getattr(sec, key) and environ.get(var):
            setattr(sec, key, environ[var])
    return cfg


def config_cli(model: type[M], argv: list[str], prog: str, summary: str,
               aliases: dict[str, str] | None = None, under: dict[str, Any] | None = None) -> M:
    """Parse `[CONFIG.toml] [--overrides]` for a service command; prints help on -h/--help.
    `under`: settings that apply above the file and below the overrides (e.g. a verl command's)."""
    if any(a in ("-h", "--help") for a in argv):
        alias_text = "".join(f"  --{a} is --{t}\n" for a, t in (aliases or {}).items())
        print(f"usage: {prog} [CONFIG.toml] [--section.key=value ...]\n\n{summary}\n\n"
              f"settings (defaults shown; a TOML file sets the same keys in [sections]):\n"
              + "\n".join(describe(model)) + ("\n\naliases:\n" + alias_text if alias_text else ""))
        sys.exit(0)
    path = argv[0] if argv and not argv[0].startswith("--") else None
    return tls_from_env(load_config(model, path, merge(under or {}, parse_overrides(argv[1 if path else 0 :], aliases))))
