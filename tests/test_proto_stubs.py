"""The committed stubs in specd_api/v1/ are exactly what the .proto generates."""

from __future__ import annotations

from deploy.gen_proto import GENERATED, ROOT, generate


def test_stubs_are_fresh(tmp_path):
    generate(tmp_path)
    stale = [g for g in GENERATED if (tmp_path / g).read_bytes() != (ROOT / g).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `python -m deploy.gen_proto` and commit"


def test_stubs_import_as_specd_api_v1():
    from specd_api.v1 import specd_pb2, specd_pb2_grpc

    assert specd_pb2.DESCRIPTOR.package == "specd.v1"
    assert hasattr(specd_pb2_grpc, "add_SpecdServicer_to_server")
