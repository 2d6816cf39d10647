"""Generate the Python gRPC stubs for protos/ into the client package (or a folder given as argv[1]).

protoc writes absolute imports (`from roberta.v1 import roberta_pb2`) that only resolve when the
output folder is on sys.path; they are rewritten to relative imports so the stubs live inside
`roberta_client` and need no path tricks.
"""

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
DEFAULT_OUT = ROOT / "client" / "roberta_client" / "_proto"


def generate(out: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        fixed = re.sub(r"^from roberta\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
        path.write_text(fixed)
    for pkg in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (pkg / "__init__.py").touch()


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
