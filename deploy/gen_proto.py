"""Generate the Python stubs of ``proto/specd/v1/specd.proto`` into ``specd_api/v1/``.

    python -m deploy.gen_proto            # regenerate in place
    python -m deploy.gen_proto --out DIR  # write the tree under DIR instead (the staleness test)

The .proto stays where its package says (``proto/specd/v1/`` for ``package specd.v1``, as other languages'
tools expect); protoc takes the Python import path from the file's path under its include root, so the
include root maps the virtual directory ``specd_api`` onto ``proto/specd``: the stubs import as
``specd_api.v1.specd_pb2``, a leaf below both ``deploy/`` and ``specd/``, while every wire name stays
``specd.v1.*``. The output is committed; ``tests/test_proto_stubs.py`` fails when it is stale.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
INCLUDE = f"specd_api={PROTO_ROOT / 'specd'}"  # protoc's VIRTUAL=DISK form of -I
PROTOS = ("specd_api/v1/specd.proto",)  # virtual paths: proto/specd/v1/specd.proto on disk
GENERATED = ("specd_api/v1/specd_pb2.py", "specd_api/v1/specd_pb2.pyi", "specd_api/v1/specd_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Run protoc over every proto; returns the written files."""
    include = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto shipped with grpc_tools
    for proto in PROTOS:
        (out / proto).parent.mkdir(parents=True, exist_ok=True)
        args = ["protoc", f"-I{INCLUDE}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return [out / g for g in GENERATED]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = p.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
