"""Regenerate (or check) the Python code generated from `proto/`.

`loraloop proto gen` rewrites `loraloop/v1/*_pb2*.py[i]` from `proto/loraloop/v1/*.proto`;
`loraloop proto check` regenerates into a temp dir and fails if anything differs, which is
what CI runs so checked-in stubs never drift from the .proto files.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
OUT_PACKAGE = "loraloop/v1"


def _protos() -> list[Path]:
    return sorted((PROTO_ROOT / OUT_PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into `out_root`; returns the generated files."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit("grpcio-tools is missing: pip install -e '.[dev]'") from e
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in _protos()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_root / OUT_PACKAGE
    for d in (out_root / "loraloop", pkg):
        (d / "__init__.py").touch()
    return sorted(p for p in pkg.iterdir() if p.name != "__init__.py")


def gen() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        dest = REPO / OUT_PACKAGE
        for old in dest.glob("*_pb2*"):
            old.unlink()
        for f in files:
            shutil.copy2(f, dest / f.name)
    print(f"generated {len(files)} files into {OUT_PACKAGE}/")
    return 0


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {f.name: f for f in generate(Path(tmp))}
        dest = REPO / OUT_PACKAGE
        have = {f.name: f for f in dest.glob("*_pb2*")}
        problems = sorted(set(fresh) ^ set(have))
        problems += [n for n in fresh if n in have and not filecmp.cmp(fresh[n], have[n], shallow=False)]
    if problems:
        print("generated code drifted from proto/ (run `loraloop proto gen`):", *problems, sep="\n  ")
        return 1
    print(f"generated code matches proto/ ({len(fresh)} files)")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["gen"]:
        return gen()
    if argv[:1] == ["check"]:
        return check()
    print("usage: loraloop proto {gen|check}", file=sys.stderr)
    return 2
