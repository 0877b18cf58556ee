"""Generate `epdserve_pb2.py` and its type stub `epdserve_pb2.pyi` from `protos/epdserve.proto` (run from the
repository root)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO = Path("protos/epdserve.proto")
OUT_DIR = Path(__file__).parent


def generate(proto: Path, out_dir: Path) -> list[Path]:
    """Write `<stem>_pb2.py` and `<stem>_pb2.pyi` for `proto` into `out_dir` and return their paths."""
    args = ["protoc", f"-I{proto.parent}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", str(proto)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    return [out_dir / f"{proto.stem}_pb2.{ext}" for ext in ("py", "pyi")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto", type=Path, default=PROTO)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for path in generate(args.proto, args.out_dir):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
