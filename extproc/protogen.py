"""Generate the control API's Python code from ``protos/`` (``make protos``).

Needs the dev dependencies: grpcio-tools (protoc) and googleapis-common-protos (the
``google/api/*.proto`` sources). The output is checked in under ``extproc/proto/``, so the
gateway itself needs neither; tests regenerate it and compare.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "tollgate/admin/v1/admin.proto"
OUT = Path(__file__).resolve().parent / "proto"
FILES = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")
_ABSOLUTE = b"from tollgate.admin.v1 import admin_pb2"


def _include_with(relative: str) -> str:
    for entry in sys.path:
        if entry and (Path(entry) / relative).is_file():
            return entry
    raise RuntimeError(
        f"{relative} not found: install the dev dependencies (pip install -e .[dev])"
    )


def generate() -> dict[str, bytes]:
    """The generated files' contents, by name."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{_include_with('google/api/annotations.proto')}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(argv)}")
        base = Path(tmp) / Path(PROTO).parent
        out = {name: (base / name).read_bytes() for name in FILES}
    # the generated service imports its messages by the proto's package path; make it relative
    out["admin_pb2_grpc.py"] = out["admin_pb2_grpc.py"].replace(
        _ABSOLUTE, b"from . import admin_pb2"
    )
    return out


def main() -> int:
    for name, data in generate().items():
        (OUT / name).write_bytes(data)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
