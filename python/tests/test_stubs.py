"""The committed stubs match proto/: regenerating them changes nothing."""

from __future__ import annotations

from pathlib import Path

from slotd import _gen


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    fresh = _gen.generate(tmp_path)
    committed_dir = _gen.PACKAGE_DIR / "v1"
    names = sorted(p.name for p in fresh)
    committed = sorted(p.name for p in committed_dir.iterdir() if p.is_file())
    assert names == committed, "stub files differ; run `python -m slotd._gen`"
    stale = [p.name for p in fresh if p.read_bytes() != (committed_dir / p.name).read_bytes()]
    assert not stale, f"stubs out of date with proto/: {stale}; run `python -m slotd._gen`"
    assert len(fresh) >= 6  # slotd and admin: _pb2, .pyi, _grpc, plus __init__
