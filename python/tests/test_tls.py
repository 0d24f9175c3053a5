"""TLS: a client given the daemon's CA (a path or PEM bytes) leases over TLS; a plaintext client is
refused with a clear error, not a raw gRPC one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import DEFAULT_CONFIG

import slotd


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_lease_over_tls(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    d = daemon_factory(DEFAULT_CONFIG, "--tls-cert", str(cert), "--tls-key", str(key))
    with slotd.Client(d.addr, tls=str(cert)) as c:
        with c.lease("one") as lease:
            assert lease.fencing_token > 0
        assert c.close() is True
    with slotd.Client(d.addr, tls=cert.read_bytes()) as c:
        c.acquire("one").release()
    with slotd.Client(d.addr, connect_timeout=0.5) as plain, pytest.raises(slotd.Unavailable):
        plain.acquire("one")
