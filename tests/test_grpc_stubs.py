"""The committed gRPC stubs (infercore/proto/) are what proto/generate.py makes from proto/ today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "infercore" / "proto"


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_grpc_stubs_match_the_proto_files(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    from importlib.metadata import version

    generated = load_generator().generate(tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in generated)
    committed = sorted(
        str(p.relative_to(COMMITTED)) for p in COMMITTED.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    hint = f"stubs are stale: run `make proto` (regenerated with grpcio-tools {version('grpcio-tools')})"
    assert names == committed, hint
    stale = [name for name in names if (tmp_path / name).read_bytes() != (COMMITTED / name).read_bytes()]
    assert not stale, f"{hint}; differing: {stale}"


def test_generated_stubs_import_from_the_package_path():
    from infercore.proto.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "infercore.v1"
    assert inference_pb2.DESCRIPTOR.name == "infercore/v1/inference.proto"
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")
