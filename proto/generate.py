"""Generate the Python stubs of the .proto files under proto/ into the package (``make proto``).

    python proto/generate.py [--out DIR]

Two proto packages, each into its own stub package (which works for editable and normal installs
alike because ``infercore/`` is the package root):

- ``proto/infercore/v1/*.proto`` (infercore's own API) → ``infercore/proto/v1/`` (``infercore.proto.v1``);
- ``proto/inference/*.proto`` (the Open Inference Protocol v2, whose package name ``inference`` clients
  expect on the wire) → ``infercore/proto/inference/`` (``infercore.proto.inference``).

protoc names modules after the .proto paths (``infercore.v1.inference_pb2``); the imports between
generated modules are rewritten to the package path. Output is deterministic for one grpcio-tools version, which the
``test`` extra pins, so tests/test_grpc_stubs.py can regenerate into a temporary directory and fail
when the committed stubs are stale.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent
# Folder under proto/ (its path is the .proto package) → stub folder under the output package.
PROTO_PACKAGES = {"infercore/v1": "v1", "inference": "inference"}
OUT_DEFAULT = REPO / "infercore" / "proto"
INIT_TEXT = '"""Generated gRPC stubs of proto/{path}; regenerate with `make proto`, never edit."""\n'


def proto_files(proto_package: str) -> list[Path]:
    return sorted((PROTO_ROOT / proto_package).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write every stub package (plus ``__init__.py`` files) under ``out``; return the files."""
    (out / "__init__.py").write_text(INIT_TEXT.format(path=""), encoding="utf-8")
    for proto_package, folder in PROTO_PACKAGES.items():
        _generate_package(proto_package, out / folder, f"infercore.proto.{folder}")
    return sorted(p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _generate_package(proto_package: str, target: Path, python_package: str) -> None:
    from grpc_tools import protoc  # the test extra's grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"  # descriptor.proto and other well-known types
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files(proto_package)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / proto_package
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        module_path = proto_package.replace("/", ".")
        for source in sorted(generated.iterdir()):
            text = source.read_text(encoding="utf-8")
            text = re.sub(rf"^from {re.escape(module_path)} import ", f"from {python_package} import ", text,
                          flags=re.MULTILINE)
            (target / source.name).write_text(text, encoding="utf-8")
    (target / "__init__.py").write_text(INIT_TEXT.format(path=proto_package), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help="package folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
