"""Regenerates the gRPC modules in this folder from proto/blockpress/v1/runtime.proto.

Run from the repository root: `python -m blockpress.runtime._pb._generate [OUT_DIR]` (`make proto`).

protoc writes `blockpress/v1/runtime_pb2.py` and a `_grpc` module that imports it as
`from blockpress.v1 import runtime_pb2`; that path does not exist in our namespace package, so the
modules are flattened into this folder and the import is made relative. The proto keeps its path
`blockpress/v1/runtime.proto` so that server reflection shows the canonical file name.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

FILES = ("runtime_pb2.py", "runtime_pb2.pyi", "runtime_pb2_grpc.py")
PROTO = "blockpress/v1/runtime.proto"


def generate(out_dir: pathlib.Path, proto_root: pathlib.Path) -> list[pathlib.Path]:
    """Writes the generated modules into `out_dir` and returns their paths."""
    from google.rpc import status_pb2
    from grpc_tools import protoc

    # `google/rpc/status.proto` (SubmitMany's per-request error) ships with googleapis-common-protos,
    # already a dependency through grpcio-status; its folder is where protoc finds the import.
    googleapis = pathlib.Path(status_pb2.__file__).resolve().parents[2]
    well_known = pathlib.Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{googleapis}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(proto_root / PROTO),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        written = []
        for name in FILES:
            text = (pathlib.Path(tmp) / "blockpress" / "v1" / name).read_text()
            text = text.replace("from blockpress.v1 import runtime_pb2", "from . import runtime_pb2")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parents[2]
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent
    for path in generate(out, root / "proto"):
        print(path)
