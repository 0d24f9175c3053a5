"""Regenerates the committed gRPC stubs (``slotd/v1``) from the repository's ``proto/``.

Run from the repository root, with the test extra installed (it pins ``grpcio-tools``, so the output
is byte-for-byte the same on every machine)::

    python -m slotd._gen            # rewrite python/slotd/v1/ in place
    python -m slotd._gen --out DIR  # write the stubs under DIR/slotd/v1/ instead (the stub test does)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The proto files the package ships stubs for, relative to ``proto/``.
PROTOS = ("slotd/v1/slotd.proto", "slotd/v1/admin.proto")

#: ``python/slotd`` (this package's directory).
PACKAGE_DIR = Path(__file__).resolve().parent
#: The repository's ``proto/`` directory (the package is built from this repository).
PROTO_DIR = PACKAGE_DIR.parent.parent / "proto"

_INIT = '"""Generated gRPC stubs for slotd.v1 (regenerate with ``python -m slotd._gen``)."""\n'


def generate(out_root: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Writes ``slotd/v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_root``.

    Returns the files written, sorted. Raises ``RuntimeError`` when protoc fails.
    """
    from importlib import resources

    from grpc_tools import protoc  # the test extra; not a runtime dependency

    well_known = str(resources.files("grpc_tools") / "_proto")
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_dir}")
    v1 = out_root / "slotd" / "v1"
    (v1 / "__init__.py").write_text(_INIT)
    return sorted(p for p in v1.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slotd._gen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR.parent, help="root to write slotd/v1/ under")
    parser.add_argument("--proto", type=Path, default=PROTO_DIR, help="the proto/ directory")
    ns = parser.parse_args(argv)
    for path in generate(ns.out, ns.proto):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
