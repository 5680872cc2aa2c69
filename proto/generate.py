"""Generate the Python stubs of proto/infercore/v1/*.proto into the package (``make proto``).

    python proto/generate.py [--out DIR]

The stubs go to ``infercore/proto/v1/`` (the package ``infercore.proto.v1``, which works for
editable and normal installs alike because ``infercore/`` is the package root). protoc names modules
after the .proto paths (``infercore.v1.inference_pb2``); the imports between generated modules are
rewritten to the package path. Output is deterministic for one grpcio-tools version, which the
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
PROTO_PACKAGE = "infercore/v1"  # folder under proto/, and the .proto package infercore.v1
OUT_DEFAULT = REPO / "infercore" / "proto"
PYTHON_PACKAGE = "infercore.proto.v1"
INIT_TEXT = '"""Generated gRPC stubs of proto/{path}; regenerate with `make proto`, never edit."""\n'


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write the stub package ``v1/`` (plus ``__init__.py`` files) under ``out``; return the files."""
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
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / PROTO_PACKAGE
        target = out / "v1"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        module_path = PROTO_PACKAGE.replace("/", ".")
        for source in sorted(generated.iterdir()):
            text = source.read_text(encoding="utf-8")
            text = re.sub(rf"^from {re.escape(module_path)} import ", f"from {PYTHON_PACKAGE} import ", text,
                          flags=re.MULTILINE)
            (target / source.name).write_text(text, encoding="utf-8")
    (out / "__init__.py").write_text(INIT_TEXT.format(path=PROTO_PACKAGE), encoding="utf-8")
    (target / "__init__.py").write_text(INIT_TEXT.format(path=PROTO_PACKAGE), encoding="utf-8")
    return sorted(p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help="package folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
