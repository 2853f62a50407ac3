"""deploy/compose, checked without a Docker engine.

Static: compose.yaml and compose.gpu.yaml (each, and merged as `docker compose -f compose.yaml -f
compose.gpu.yaml` merges them) against the official Compose JSON schema (the copy vendored by
check-jsonschema) and the compose-spec parser; the structure the stack relies on; every service
command parsed by the real `loraloop` CLI; every Dockerfile parsed by BuildKit's parser (the
`dockerfile` package) and linted by hadolint with deploy/compose/.hadolint.yaml. Each
examples/verl/compose.*.yaml merged on top of both: valid, its config command (`loraloop up
--verl-file ... --write-configs`) run on the directories its mounts stand for, and the files that
writes loaded by the learner's and rollout's own parsers with the example's values.

Live, on this machine: Redis started with the compose command (AOF, fsync always, password)
and the compose health check run against it; a broker on that Redis with the compose gRPC health
check run against it; the model-init script run into a temporary models directory.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from importlib.resources import files
from pathlib import Path

import dockerfile
import jsonschema
import pytest
import yaml
from compose_spec import PyCompose, PyOptions

from tests.support.procs import BrokerProc, free_port

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "compose"
BASE, GPU = HERE / "compose.yaml", HERE / "compose.gpu.yaml"
HOSTNET = HERE / "real" / "compose.hostnet.yaml"  # test-only: deploy/compose/real/run.sh
HADOLINT_CONFIG = HERE / ".hadolint.yaml"
DOCKERFILES = sorted(HERE.glob("Dockerfile*"))
SERVICES = {"redis", "broker", "model-init", "learner", "rollout"}
LONG_RUNNING = {"redis", "broker", "learner", "rollout"}
# Sample values for the variables compose.yaml requires (`${VAR:?...}`).
SAMPLE_ENV = {"LORALOOP_REDIS_PASSWORD": "pw-redis", "LORALOOP_LEARNER_TOKEN": "tok-l",
              "LORALOOP_ROLLOUT_TOKEN": "tok-r", "LORALOOP_CLIENT_TOKEN": "tok-c"}
# Compose's interpolation forms: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}.
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------------------------------------
# helpers


class Override:
    """A value tagged `!override` (Compose >= 2.24.4): it replaces what earlier files set there."""

    def __init__(self, value) -> None:
        self.value = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader plus compose's `!override` tag (any other tag stays an error)."""


def _override(loader: _Loader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    return Override(loader.construct_scalar(node))


_Loader.add_constructor("!override", _override)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader subclass


def plain(doc):
    """The document with every `!override` value in place of its tag."""
    if isinstance(doc, Override):
        return plain(doc.value)
    if isinstance(doc, dict):
        return {k: plain(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [plain(v) for v in doc]
    return doc


# Sequences compose replaces whole when an override sets them (merge rules of the compose spec).
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base, over, path: tuple[str, ...] = ()):
    """Compose's override merge for what the override files use: mappings merge key by key,
    scalars, the replaced sequences and `!override` values are overridden, a service's volumes
    merge by target (a mount at the same target replaces the earlier one). Any other sequence
    set on both sides is refused, since compose merges those by rules this helper does not model."""
    if isinstance(over, Override):
        return plain(over)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v, (*path, k)) if k in base else plain(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and len(path) == 3 and path[::2] == ("services", "volumes"):
        out = copy.deepcopy(base)
        for v in plain(over):
            at = [i for i, b in enumerate(out) if b["target"] == v["target"]]
            if at:
                out[at[0]] = v
            else:
                out.append(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and path[-1] not in _REPLACED_SEQUENCES:
        raise AssertionError(f"an override sets the sequence {'.'.join(path)} that an earlier file "
                             "also sets; keep overrides to mappings, scalars, volumes and `!override`")
    return plain(over)


def merged() -> dict:
    return merge(load(BASE), load(GPU))


def interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        have = env.get(name)
        if have is not None and (have != "" or not (op or "").startswith(":")):
            return have
        if op and op.endswith("-"):
            return arg
        raise KeyError(f"{name} is required ({arg})")

    return _VAR.sub(sub, value)


def variables(path: Path) -> dict[str, str]:
    """Variables a compose file interpolates -> their operator ('' plain, ':-' default, ':?' required)."""
    return {m.group(1): m.group(2) or "" for m in _VAR.finditer(path.read_text())}


SCHEMA = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def schema_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def service_argv(svc: dict, env: dict[str, str]) -> list[str]:
    return [interpolate(a, env) for a in svc["command"]]


def health_argv(svc: dict) -> list[str]:
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return test[1:]


def health_addr(svc: dict) -> str:
    argv = health_argv(svc)
    assert argv[:2] == ["python", "-c"] and len(argv) == 4, argv
    return argv[3]


def parse_cli(name: str, argv: list[str]):
    """The service's own config parser (what `loraloop NAME` runs first): unknown or
    ill-typed flags raise."""
    from services.common.config import config_cli

    module = importlib.import_module(f"services.{name}.config")
    model = getattr(module, f"{name.capitalize()}Config")
    return config_cli(model, argv, f"loraloop {name}", "", module.ALIASES)


def instructions(path: Path) -> list:
    return list(dockerfile.parse_file(str(path)))


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ;, |, and parentheses)."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in {"&&", "||", ";", "|", "(", ")"}:
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        cmds.append(cur)
    return cmds


_PIP_OPTS_WITH_VALUE = {"--extra-index-url", "--index-url", "-i", "-r", "--requirement", "-c",
                        "--constraint", "-f", "--find-links", "--target", "-t"}


def pip_calls(path: Path, verb: str) -> list[list[str]]:
    """Positional arguments of every `pip VERB` in the Dockerfile's RUN lines, in order."""
    calls = []
    for ins in instructions(path):
        if ins.cmd != "RUN":
            continue
        for cmd in shell_commands(" ".join(ins.value)):
            if cmd[:2] == ["python", "-m"] or cmd[:2] == ["python3", "-m"]:
                cmd = cmd[2:]
            if cmd[:2] != ["pip", verb]:
                continue
            args, skip = [], False
            for a in cmd[2:]:
                if skip:
                    skip = False
                elif a in _PIP_OPTS_WITH_VALUE:
                    skip = True
                elif not a.startswith("-"):
                    args.append(a)
            calls.append(args)
    return calls


def installed_extras(path: Path) -> list[tuple[str, set[str]]]:
    """(project path, extras) of every `pip install` of the project itself."""
    out = []
    for args in pip_calls(path, "install"):
        for target in args:
            where, _, extras = target.partition("[")
            out.append((where, {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}))
    return out


def base_image(path: Path) -> str:
    args: dict[str, str] = {}
    for ins in instructions(path):
        if ins.cmd == "ARG":
            for a in ins.value:
                k, _, v = a.partition("=")
                args[k] = v
        if ins.cmd == "FROM":
            return interpolate(ins.value[0], args)
    raise AssertionError(f"{path.name}: no FROM")


def hadolint_bin() -> str:
    for cand in (Path(sysconfig.get_path("scripts")) / "hadolint", shutil.which("hadolint")):
        if cand and Path(cand).exists():
            return str(cand)
    pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin)")


def hadolint(path: Path) -> tuple[int, list[dict]]:
    res = subprocess.run([hadolint_bin(), "--config", str(HADOLINT_CONFIG), "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=120)
    return res.returncode, json.loads(res.stdout or "[]")


# ---------------------------------------------------------------------------------------------
# compose files: validity


@pytest.mark.parametrize("which", ["compose.yaml", "compose.gpu.yaml", "merged"])
def test_compose_files_valid(which):
    doc = merged() if which == "merged" else load(HERE / which)
    assert schema_errors(doc) == []
    text = json.dumps(doc) if which == "merged" else (HERE / which).read_text()
    parsed = PyCompose.from_json(text) if which == "merged" else PyOptions(apply_merge=True).from_yaml(text)
    parsed.validate()
    parsed.to_spec()  # the parser's typed model of the whole file
    assert set(parsed.service_names()) == (SERVICES if which != "compose.gpu.yaml" else
                                           {"model-init", "learner", "rollout"})


def test_validators_reject_a_broken_file():
    doc = load(BASE)
    doc["services"]["rollout"]["healthchek"] = doc["services"]["rollout"].pop("healthcheck")
    assert any("healthchek" in e for e in schema_errors(doc))
    with pytest.raises(ValueError, match="healthchek"):
        PyCompose.from_json(json.dumps(doc))
    doc = load(BASE)
    doc["services"]["learner"]["depends_on"]["broker"]["condition"] = "service_ready"
    assert schema_errors(doc)
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(doc))


# ---------------------------------------------------------------------------------------------
# compose files: structure


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_references_resolve(variant):
    doc = load(BASE) if variant == "cpu" else merged()
    services, volumes = doc["services"], set(doc.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for v in svc.get("volumes", []):
            assert v["type"] == "volume" and v["source"] in volumes, (name, v)
        if "build" in svc:
            ctx = (HERE / svc["build"]["context"]).resolve()
            assert ctx == ROOT, (name, ctx)
            assert (ctx / svc["build"]["dockerfile"]).is_file(), (name, svc["build"])


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_rollout_scales(variant):
    doc = load(BASE) if variant == "cpu" else merged()
    services = doc["services"]
    rollout = services["rollout"]
    for key in ("container_name", "ports", "hostname", "network_mode"):
        assert key not in rollout, key
    # The only host port: the broker's, on the host's loopback.
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert list(published) == ["broker"]
    assert all(p.get("host_ip") == "127.0.0.1" for p in published["broker"])


def test_healthchecks_and_start_order():
    services = load(BASE)["services"]
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], name
    for name, port in (("broker", 50050), ("learner", 50053), ("rollout", 50052)):
        assert health_addr(services[name]) == f"127.0.0.1:{port}", name
    grpc_code = {health_argv(services[n])[2] for n in ("broker", "learner", "rollout")}
    assert len(grpc_code) == 1 and "grpc_health.v1" in grpc_code.pop()

    def cond(name, dep):
        return services[name]["depends_on"][dep]["condition"]

    assert cond("broker", "redis") == "service_healthy"
    assert cond("learner", "broker") == "service_healthy"
    assert cond("rollout", "broker") == "service_healthy"
    assert cond("rollout", "learner") == "service_healthy"
    for name in ("learner", "rollout"):
        assert cond(name, "model-init") == "service_completed_successfully"


def test_redis_durable_and_password_protected():
    services = load(BASE)["services"]
    cmd = services["redis"]["command"]
    assert cmd[0] == "redis-server"
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "always"
    assert variables_in(opts["--requirepass"]) == {"LORALOOP_REDIS_PASSWORD"}
    assert variables_in(services["broker"]["environment"]["LORALOOP_REDIS_PASSWORD"]) == {"LORALOOP_REDIS_PASSWORD"}
    assert {v["target"] for v in services["redis"]["volumes"]} == {"/data"}


def variables_in(value: str) -> set[str]:
    assert value.startswith("${") and value.endswith("}"), f"{value!r} is not a bare ${{VAR}}"
    return {m.group(1) for m in _VAR.finditer(value)}


def test_tokens_from_env():
    services = load(BASE)["services"]
    own = {"learner": "LORALOOP_LEARNER_TOKEN", "rollout": "LORALOOP_ROLLOUT_TOKEN"}
    for name in ("broker", "learner", "rollout"):
        env = services[name]["environment"]
        pairs = dict(p.split(":", 1) for p in interpolate(env["LORALOOP_TOKENS"], SAMPLE_ENV).split(","))
        assert pairs == {"learner": "tok-l", "rollout": "tok-r", "client": "tok-c"}, name
        if name in own:
            assert variables_in(env["LORALOOP_TOKEN"]) == {own[name]}
            assert interpolate(env["LORALOOP_TOKEN"], SAMPLE_ENV) == pairs[name]
    with pytest.raises(KeyError, match="LORALOOP_CLIENT_TOKEN"):
        interpolate(services["broker"]["environment"]["LORALOOP_TOKENS"],
                    {k: v for k, v in SAMPLE_ENV.items() if k != "LORALOOP_CLIENT_TOKEN"})


def test_every_variable_is_documented():
    documented, required = set(), set()
    for line in (HERE / ".env.example").read_text().splitlines():
        line = line.strip()
        optional = line.startswith("# ")
        key, eq, _ = line.removeprefix("# ").partition("=")
        if eq and key.isidentifier() and key.isupper():
            documented.add(key)
            if not optional:
                required.add(key)
    used = variables(BASE) | variables(GPU)
    for name in EXAMPLE_FILES:
        used |= variables(EXAMPLES / name)
    assert set(used) == documented
    assert {k for k, op in used.items() if op.endswith("?")} == required == set(SAMPLE_ENV)


def test_commands_parse_with_the_loraloop_cli():
    services = load(BASE)["services"]
    argv = {n: service_argv(services[n], SAMPLE_ENV) for n in ("broker", "learner", "rollout")}
    for name, a in argv.items():
        assert a[:2] == ["loraloop", name]
    broker = parse_cli("broker", argv["broker"][2:])
    learner = parse_cli("learner", argv["learner"][2:])
    rollout = parse_cli("rollout", argv["rollout"][2:])
    assert (broker.server.host, broker.server.port, broker.redis.url) == ("0.0.0.0", 50050, "redis://redis:6379/0")
    assert broker.redis.durability == "require" and broker.redis.password_env == "LORALOOP_REDIS_PASSWORD"
    assert (learner.server.host, learner.server.port) == ("0.0.0.0", 50053)
    assert (learner.model.path, learner.broker) == ("/models/base", "broker:50050")
    assert learner.run_dir.startswith("/runs/") and learner.token_env == "LORALOOP_TOKEN"
    assert (rollout.server.host, rollout.server.port) == ("0.0.0.0", 50052)
    assert (rollout.engine.model, rollout.broker, rollout.learner) == ("/models/base", "broker:50050", "learner:50053")
    assert rollout.adapters.follow == ["policy"] and rollout.token_env == "LORALOOP_TOKEN"
    # Whatever the servers read comes from the volumes mounted for them.
    mounts = {n: {v["target"]: v for v in services[n]["volumes"]} for n in ("learner", "rollout", "model-init")}
    assert mounts["learner"]["/models"]["source"] == mounts["rollout"]["/models"]["source"] == \
        mounts["model-init"]["/models"]["source"] == "models"
    assert mounts["learner"]["/runs"]["source"] == "runs"
    assert mounts["rollout"]["/models"].get("read_only") is True
    # The tokens the servers check, and their own, are the ones configured (auth stays on).
    assert broker.auth.enabled and learner.auth.enabled and rollout.auth.enabled


def test_hostnet_override():
    """real/compose.hostnet.yaml (the stack run for real by deploy/compose/real/run.sh): every
    service on the host's network on loopback, no published port, replicas on port 0 (so
    `--scale rollout=2` runs), builds on the host network with the base image as a build arg."""
    doc = merge(load(BASE), load(HOSTNET))
    assert schema_errors(doc) == []
    ports = {"LORALOOP_REDIS_PORT": "16379", "LORALOOP_BROKER_PORT": "16050", "LORALOOP_LEARNER_PORT": "16053"}
    env = {**SAMPLE_ENV, **ports}
    PyCompose.from_json(interpolate(json.dumps(doc), env)).validate()  # its image tags must be resolved
    services = doc["services"]
    for name in SERVICES:
        assert services[name]["network_mode"] == "host", name
        assert not services[name].get("ports") and not services[name].get("expose"), name
        assert "networks" not in services[name], name
    argv = {n: service_argv(services[n], env) for n in ("broker", "learner", "rollout")}
    broker = parse_cli("broker", argv["broker"][2:])
    learner = parse_cli("learner", argv["learner"][2:])
    rollout = parse_cli("rollout", [*argv["rollout"][2:], "--worker_id=rollout-x"])
    assert (broker.server.host, broker.server.port, broker.redis.url) == ("127.0.0.1", 16050, "redis://127.0.0.1:16379/0")
    assert broker.redis.durability == "require" and broker.registry.keep_last >= 10_000
    assert (learner.server.host, learner.server.port, learner.broker) == ("127.0.0.1", 16053, "127.0.0.1:16050")
    assert (rollout.server.host, rollout.server.port, rollout.http.host, rollout.http.port) == ("127.0.0.1", 0, "127.0.0.1", 0)
    assert (rollout.broker, rollout.learner) == ("127.0.0.1:16050", "127.0.0.1:16053")
    redis = service_argv(services["redis"], env)
    assert redis[redis.index("--bind") + 1] == "127.0.0.1" and redis[redis.index("--port") + 1] == "16379"
    assert "--appendfsync" in redis and redis[redis.index("--appendfsync") + 1] == "always"
    # Each replica names itself (hostname-pid would be the host's hostname and pid 1 in both).
    entry = services["rollout"]["entrypoint"]
    assert entry[:2] == ["sh", "-ec"] and "--worker_id=" in entry[2] and 'exec "$$@"' in entry[2]
    for name in ("broker", "learner", "rollout"):
        build = services[name]["build"]
        args = dict(a.partition("=")[::2] for a in build["args"])
        assert build["network"] == "host" and {"BASE_IMAGE", "PIP_FIND_LINKS", "PIP_CONSTRAINT"} <= set(args)
        assert interpolate(args["BASE_IMAGE"], {}) == base_image(dockerfile_of(load(BASE), name)) == \
            "python:3.11-slim-bookworm"
    assert interpolate(services["redis"]["image"], {}) == load(BASE)["services"]["redis"]["image"]
    # The health check (any port the container's processes listen on) is valid Python.
    for name in ("broker", "learner", "rollout"):
        compile(health_argv(services[name])[2], f"{name} health check", "exec")
    readme = (HERE / "README.md").read_text()
    for var in variables(HOSTNET):
        assert var in readme or var in SAMPLE_ENV, var


def test_gpu_override():
    cpu, gpu = load(BASE)["services"], merged()["services"]
    for name in ("learner", "rollout", "model-init"):
        if name != "model-init":
            assert gpu[name]["build"]["dockerfile"].endswith(".gpu"), name
            assert gpu[name]["build"]["context"] == cpu[name]["build"]["context"]
        assert gpu[name]["image"].endswith(":gpu") and cpu[name]["image"].endswith(":cpu")
        assert gpu[name]["command"] == cpu[name]["command"]
    # model-init runs the learner's image, which the learner service builds (one build, no
    # untagged copy left by `down --rmi all`).
    assert "build" not in gpu["model-init"] and gpu["model-init"]["image"] == gpu["learner"]["image"]
    for name in ("learner", "rollout"):
        assert "deploy" not in cpu[name]
        (dev,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert dev.get("device_ids") or dev.get("count")
    assert gpu["broker"] == cpu["broker"] and gpu["redis"] == cpu["redis"]


# ---------------------------------------------------------------------------------------------
# examples/verl: a verl command line on compose, as a third file on top of compose.yaml and
# compose.gpu.yaml. Its verl-config service runs `loraloop up --verl-file ... --write-configs`;
# learner and rollout start from the files that writes. Here that command runs on this machine,
# each container path standing for the directory mounted there.

EXAMPLES = ROOT / "examples" / "verl"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("compose.*.yaml"))
GSM8K_ROWS = 7473  # GSM8K's training split
ALL_GPUS = [str(i) for i in range(8)]
# Each example: the values of its verl file, and the GPUs examples/verl/README.md gives each service.
EXPECTED = {
    "compose.qwen2.5-72b-lora-8x80gb.yaml": {
        "verl": "qwen2.5-72b-lora-8x80gb.sh", "model": "/models/Qwen2.5-72B-Instruct", "run_dir": "/runs/qwen2.5-72b",
        "rank": 32, "alpha": 32.0, "n": 5, "groups": 64, "steps": 500, "nproc": 8, "cpu_offload": True,
        "tp": 8, "gpu_memory": 0.4, "max_model_len": 1536, "learner_gpus": ALL_GPUS, "rollout_gpus": ALL_GPUS},
    "compose.qwen2.5-3b-gsm8k-lora.yaml": {
        "verl": "qwen2.5-3b-gsm8k-lora.sh", "model": "/models/Qwen2.5-3B-Instruct", "run_dir": "/runs/qwen2.5-3b-gsm8k",
        "rank": 64, "alpha": 32.0, "n": 5, "groups": 16, "steps": 15 * (GSM8K_ROWS // 16), "nproc": 8,
        "cpu_offload": False, "tp": 2, "gpu_memory": 0.6, "max_model_len": 512 + 1024, "learner_gpus": ALL_GPUS,
        "rollout_gpus": ["0", "1"]},
}
COMPOSE_UP = "docker compose -f compose.yaml -f compose.gpu.yaml -f ../../examples/verl/{} up --build"


def merged_example(name: str) -> dict:
    return merge(merged(), load(EXAMPLES / name))


def interpolated(doc, env: dict[str, str]):
    """Every string of the document interpolated, as `docker compose config` shows it."""
    if isinstance(doc, dict):
        return {k: interpolated(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolated(v, env) for v in doc]
    return interpolate(doc, env) if isinstance(doc, str) else doc


def mounts(svc: dict, env: dict[str, str], volumes: Path) -> dict[str, Path]:
    """Container target -> the directory here that stands for it: a bind's source (relative
    to deploy/compose, the first file's directory, as compose resolves every file's paths) or
    the named volume's directory under `volumes`."""
    out = {}
    for v in svc.get("volumes", []):
        src = interpolate(v["source"], env)
        out[v["target"]] = (HERE / src).resolve() if v["type"] == "bind" else volumes / src
    return out


def to_host(value: str, where: dict[str, Path]) -> str:
    for target, src in sorted(where.items(), key=lambda kv: -len(kv[0])):
        if value == target or value.startswith(target + "/"):
            return str(src) + value[len(target):]
    return value


def to_container(value: str, where: dict[str, Path]) -> str:
    for target, src in sorted(where.items(), key=lambda kv: -len(str(kv[1]))):
        if value == str(src) or value.startswith(f"{src}/"):
            return target + value[len(str(src)):]
    return value


def devices(svc: dict) -> list[dict]:
    return svc["deploy"]["resources"]["reservations"]["devices"]


def test_every_example_is_checked():
    assert sorted(EXPECTED) == EXAMPLE_FILES
    for ex in EXPECTED.values():
        assert (EXAMPLES / ex["verl"]).is_file()


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_override_merges(name):
    env = {**SAMPLE_ENV}  # the example's own variables take their defaults
    assert schema_errors(interpolated(plain(load(EXAMPLES / name)), env)) == []
    doc = interpolated(merged_example(name), env)
    assert schema_errors(doc) == []
    parsed = PyCompose.from_json(json.dumps(doc))
    parsed.validate()
    parsed.to_spec()
    assert set(parsed.service_names()) == SERVICES | {"verl-config"}
    gpu, services = merged()["services"], doc["services"]
    # The GPU images throughout; verl-config is the learner's image (loraloop and pyarrow).
    for svc in ("verl-config", "model-init", "learner", "rollout"):
        if svc not in ("model-init", "verl-config"):  # those two run the image the learner service builds
            assert services[svc]["build"] == interpolated(gpu["learner" if svc != "rollout" else svc]["build"], env)
        assert services[svc]["image"] == gpu["learner" if svc != "rollout" else svc]["image"]
    assert "build" not in services["model-init"] and "build" not in services["verl-config"]
    assert services["broker"] == interpolated(gpu["broker"], env) and services["redis"] == interpolated(gpu["redis"], env)
    # compose.gpu.yaml's one-GPU reservation is replaced (`!override`), not added to.
    ex = EXPECTED[name]
    for svc, ids in (("learner", ex["learner_gpus"]), ("rollout", ex["rollout_gpus"])):
        (dev,) = devices(services[svc])
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["device_ids"] == ids, svc
        assert services[svc]["healthcheck"]["test"] == gpu[svc]["healthcheck"]["test"]
        deps = services[svc]["depends_on"]
        assert deps["verl-config"]["condition"] == deps["model-init"]["condition"] == "service_completed_successfully"
    assert services["verl-config"]["restart"] == "no" and "deploy" not in services["verl-config"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_configs_come_from_the_documented_command(name, tmp_path):
    """verl-config's command, run here on the directories its mounts stand for, writes the files
    learner and rollout are started from; they load through the services' own parsers with the
    verl file's values, the compose network's addresses and as many GPUs as the services reserve."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.cli import main as loraloop

    ex = EXPECTED[name]
    models, data, volumes = tmp_path / "models", tmp_path / "data", tmp_path / "volumes"
    model = models / Path(ex["model"]).name
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"max_position_embeddings": 32768}')
    (data / "gsm8k").mkdir(parents=True)
    for split, rows in (("train", GSM8K_ROWS), ("test", 1319)):
        pq.write_table(pa.table({"data_source": ["openai/gsm8k"] * rows}), data / "gsm8k" / f"{split}.parquet")
    env = {**SAMPLE_ENV, "LORALOOP_MODELS_DIR": str(models), "LORALOOP_DATA_DIR": str(data)}
    services = merged_example(name)["services"]
    where = {svc: mounts(services[svc], env, volumes) for svc in ("verl-config", "model-init", "learner", "rollout")}
    cfg_where = where["verl-config"]
    assert cfg_where["/verl"] == EXAMPLES
    for svc in ("model-init", "learner", "rollout"):
        assert where[svc]["/models"] == cfg_where["/models"] == models, svc
    for svc in ("learner", "rollout"):
        assert where[svc]["/runs"] == cfg_where["/runs"] == volumes / "runs", svc
    assert where["learner"]["/data"] == cfg_where["/data"] == data
    assert all(v.get("read_only") for svc in ("learner", "rollout") for v in services[svc]["volumes"]
               if v["target"] != "/runs" or svc == "rollout"), "only the learner writes (into /runs)"
    assert ex["model"] in services["model-init"]["command"][2]
    # The verl file as the container sees it: its /models and /data paths are the mounted directories.
    staged = tmp_path / "verl"
    staged.mkdir()
    text = (EXAMPLES / ex["verl"]).read_text()
    (staged / ex["verl"]).write_text(re.sub(r"(?<=[=\s])(/models|/data)(?=/)",
                                            lambda m: str(cfg_where[m.group(1)]), text))
    cfg_where["/verl"] = staged

    argv = service_argv(services["verl-config"], env)
    assert argv[:2] == ["loraloop", "up"] and f"/verl/{ex['verl']}" in argv
    (volumes / "runs").mkdir(parents=True)
    assert loraloop([to_host(a, cfg_where) for a in argv[1:]]) == 0
    written = {to_container(str(p), cfg_where) for p in (volumes / "runs").rglob("*") if p.is_file()}
    assert written == {f"{ex['run_dir']}/{f}.toml" for f in ("broker", "learner", "rollout")}

    largv = service_argv(services["learner"], env)
    assert largv[:2] == ["loraloop", "learner"] and largv[2] in written
    lc = parse_cli("learner", [to_host(a, where["learner"]) for a in largv[2:]])
    assert to_container(lc.model.path, where["learner"]) == ex["model"]
    assert to_container(lc.data.dataset, where["learner"]) == "/data/gsm8k/train.parquet"
    if "gsm8k" in largv[2]:  # the validation set is mounted where the verl file names it
        assert to_container(lc.validation.dataset, where["learner"]) == "/data/gsm8k/test.parquet"
    assert to_container(lc.run_dir, where["learner"]) == ex["run_dir"] == str(Path(largv[2]).parent)
    assert (lc.model.lora_rank, lc.model.lora_alpha, lc.model.cpu_offload) == (ex["rank"], ex["alpha"], ex["cpu_offload"])
    assert (lc.data.samples_per_group, lc.data.groups_per_step, lc.steps) == (ex["n"], ex["groups"], ex["steps"])
    assert lc.nproc == ex["nproc"] == len(devices(services["learner"])[0]["device_ids"])
    assert (lc.server.host, lc.server.port, lc.broker) == ("0.0.0.0", 50053, "broker:50050")
    assert health_addr(services["learner"]) == "127.0.0.1:50053" and lc.auth.enabled

    rargv = service_argv(services["rollout"], env)
    assert rargv[:2] == ["loraloop", "rollout"] and rargv[2] in written
    rc = parse_cli("rollout", [to_host(a, where["rollout"]) for a in rargv[2:]])
    eng = rc.engine
    assert to_container(eng.model, where["rollout"]) == ex["model"]
    assert eng.tensor_parallel_size == ex["tp"] == len(devices(services["rollout"])[0]["device_ids"])
    assert (eng.gpu_memory_utilization, eng.max_lora_rank, eng.max_model_len) == (ex["gpu_memory"], ex["rank"],
                                                                                   ex["max_model_len"])
    assert (rc.server.host, rc.server.port, rc.broker, rc.learner) == ("0.0.0.0", 50052, "broker:50050", "learner:50053")
    assert rc.adapters.follow == [lc.adapter_name] == ["policy"]
    assert (rc.http.host, rc.http.port) == ("0.0.0.0", 8000) and rc.auth.enabled


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_model_check_live(name, tmp_path):
    """model-init checks that the example's model is in the mounted directory instead of
    writing the tiny model there."""
    svc = merged_example(name)["services"]["model-init"]
    assert svc["command"][:2] == ["sh", "-ec"] and all(v.get("read_only") for v in svc["volumes"])
    script = svc["command"][2].replace("/models", str(tmp_path))

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30)

    missing = run()
    assert missing.returncode != 0 and "LORALOOP_MODELS_DIR" in missing.stderr
    model = tmp_path / Path(EXPECTED[name]["model"]).name
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert run().returncode != 0  # no weights
    (model / "model.safetensors").write_bytes(b"")
    ok = run()
    assert ok.returncode == 0 and "present" in ok.stdout


def test_examples_documented():
    """examples/verl/README.md gives each example's compose command, the command its verl-config
    service runs, and every variable the example files read."""
    readme = " ".join((EXAMPLES / "README.md").read_text().split())
    for name in EXAMPLE_FILES:
        assert COMPOSE_UP.format(name) in readme, name
        assert " ".join(load(EXAMPLES / name)["services"]["verl-config"]["command"]) in readme, name
        for var in variables(EXAMPLES / name):
            assert var in readme, (name, var)


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_of(doc: dict, service: str) -> Path:
    return ROOT / doc["services"][service]["build"]["dockerfile"]


def test_each_service_has_its_dockerfile():
    cpu, gpu = load(BASE), merged()
    used = {dockerfile_of(d, s) for d in (cpu, gpu) for s in ("broker", "learner", "rollout")}
    assert "build" not in cpu["services"]["model-init"] and \
        cpu["services"]["model-init"]["image"] == cpu["services"]["learner"]["image"]
    assert used == set(DOCKERFILES)
    assert len({dockerfile_of(cpu, s) for s in ("broker", "learner", "rollout")}) == 3


def test_broker_image_has_no_torch():
    path = dockerfile_of(load(BASE), "broker")
    installs = installed_extras(path)
    assert installs, "the broker Dockerfile installs nothing"
    for where, extras in installs:
        assert where in {".", "./"} and extras == set(), (where, extras)
    assert base_image(path).startswith("python:")


@pytest.mark.parametrize(("service", "variant", "extra", "base"), [
    ("rollout", "cpu", "cpu", "python:"),
    ("rollout", "gpu", "gpu", "nvidia/cuda:"),
    ("learner", "cpu", "train", "python:"),
    ("learner", "gpu", "train", "nvidia/cuda:"),
])
def test_image_extras(service, variant, extra, base):
    path = dockerfile_of(load(BASE) if variant == "cpu" else merged(), service)
    extras = [e for where, e in installed_extras(path) if e]
    assert extras == [{extra}], extras
    assert base_image(path).startswith(base)


def test_cpu_rollout_drops_torchvision_and_friends():
    path = dockerfile_of(load(BASE), "rollout")
    installs = pip_calls(path, "install")
    removed = {p for args in pip_calls(path, "uninstall") for p in args}
    assert {"torchvision", "torchaudio", "torchcodec"} <= removed
    # ... after the install that brings them, and no later install of the dependencies.
    runs = [" ".join(i.value) for i in instructions(path) if i.cmd == "RUN"]
    idx_install = next(i for i, r in enumerate(runs) if "[cpu]" in r)
    idx_remove = next(i for i, r in enumerate(runs) if "torchcodec" in r and "uninstall" in r)
    assert idx_remove >= idx_install
    assert all(("--no-deps" in r) for r in runs[idx_remove + 1:] if "pip install" in r)
    assert installs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    ins = instructions(path)
    for i in ins:
        if i.cmd == "COPY":
            assert not any(f.startswith("--from") for f in i.flags)
            for src in i.value[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} is not in the build context"
    users = [i.value[0] for i in ins if i.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"{path.name} runs as root"
    cmd = next(i for i in ins if i.cmd == "CMD")
    assert cmd.json and cmd.value[0] == "loraloop"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    rc, findings = hadolint(path)
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert bad == [], "\n".join(f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in bad)
    assert rc == 0


def test_hadolint_config_is_used_and_justified(tmp_path):
    cfg = load(HADOLINT_CONFIG)
    text = HADOLINT_CONFIG.read_text()
    for rule in cfg.get("ignored", []):
        assert re.search(rf"#\s*{rule}\b", text), f"{rule} is ignored without a comment saying why"
    # The same linter and config fail a Dockerfile with real problems.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/someone/python:latest\nRUN pip install requests\nUSER root\n")
    rc, findings = hadolint(bad)
    assert rc != 0
    assert {"DL3026", "DL3013", "DL3042"} <= {f["code"] for f in findings}


# ---------------------------------------------------------------------------------------------
# live: the commands and health checks against real processes on loopback


@pytest.fixture
def compose_redis(tmp_path):
    """redis-server started with compose.yaml's command (plus a free port and a private dir)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server/redis-cli not installed (deploy/local/install.sh installs them)")
    argv = [interpolate(a, SAMPLE_ENV) for a in load(BASE)["services"]["redis"]["command"]]
    port = free_port()
    (tmp_path / "redis").mkdir()
    proc = subprocess.Popen([*argv, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path / "redis")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port, password=SAMPLE_ENV["LORALOOP_REDIS_PASSWORD"], socket_connect_timeout=1)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None:
                pytest.fail("redis-server did not start with the compose command")
            time.sleep(0.1)
    yield port, client
    client.close()
    proc.terminate()
    proc.wait(10)


def test_redis_command_and_healthcheck_live(compose_redis):
    import redis

    port, client = compose_redis
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "always"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    svc = load(BASE)["services"]["redis"]
    kind, script = svc["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    script = script.replace("redis-cli", f"redis-cli -p {port}", 1)  # the container's default port is 6379
    auth_var = next(k for k, v in svc["environment"].items() if "LORALOOP_REDIS_PASSWORD" in v)

    def check(password: str) -> int:
        env = {**os.environ, auth_var: password}
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=30).returncode

    assert check(SAMPLE_ENV["LORALOOP_REDIS_PASSWORD"]) == 0
    assert check("wrong-password") != 0


def test_broker_on_compose_redis_and_grpc_healthcheck_live(compose_redis, tmp_path, monkeypatch):
    port, _ = compose_redis
    # The broker refuses to start unless Redis fsyncs every write: this Redis passes.
    monkeypatch.setenv("LORALOOP_REDIS_PASSWORD", SAMPLE_ENV["LORALOOP_REDIS_PASSWORD"])
    broker = BrokerProc(f"redis://127.0.0.1:{port}/0", tmp_path)
    try:
        argv = health_argv(load(BASE)["services"]["broker"])
        run = [sys.executable if argv[0] == "python" else argv[0], *argv[1:3]]
        ok = subprocess.run([*run, broker.target], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        closed = subprocess.run([*run, f"127.0.0.1:{free_port()}"], capture_output=True, timeout=60)
        assert closed.returncode != 0
    finally:
        broker.stop()


def test_model_init_script_live(tmp_path):
    svc = load(BASE)["services"]["model-init"]
    assert svc["command"][:2] == ["sh", "-ec"] and svc["restart"] == "no"
    models = tmp_path / "models"
    models.mkdir()
    script = svc["command"][2].replace("/models", str(models))
    env = {**os.environ, "PATH": f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ['PATH']}"}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr
    base = models / "base"
    assert (base / "config.json").is_file() and list(base.glob("*.safetensors"))
    assert sorted(p.name for p in models.iterdir()) == ["base"]
    stamp = (base / "config.json").stat().st_mtime_ns
    second = run()
    assert second.returncode == 0 and "present" in second.stdout
    assert (base / "config.json").stat().st_mtime_ns == stamp
