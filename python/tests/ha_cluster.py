"""The HA test cluster: one real etcd on free loopback ports with a temporary data directory, and
three ``slotd`` members (the binary the other fixtures use) sharing a resume-credential key file and
an ``[ha]`` table. The Python twin of ``tests/ha_cluster/mod.rs``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import START_TIMEOUT, Daemon, start_daemon

from slotd.v1 import slotd_pb2 as pb
from slotd.v1 import slotd_pb2_grpc as pb_grpc

#: The etcd lease TTL of every member (etcd's own minimum is about 2 s).
LEASE_TTL = "2s"
#: Longest a lease can live, also the new leader's learning period: short, so a failover is quick.
MAX_TTL = 3
#: How long a failover may take before a test fails: TTL + learning + a margin for a loaded machine.
FAILOVER_TIMEOUT = 20.0
#: The metadata key a standby names the leader in.
LEADER_HEADER = "slotd-leader"


def etcd_binary() -> str | None:
    """``$SLOTD_TEST_ETCD``, or ``etcd`` on the ``PATH``."""
    return os.environ.get("SLOTD_TEST_ETCD") or shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Etcd:
    """A single-member etcd on free loopback ports; :meth:`stop` kills it and removes its data."""

    def __init__(self, exe: str, tmp: Path) -> None:
        client, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.dir = tmp / "etcd"
        cmd = [
            exe,
            "--data-dir", str(self.dir),
            "--name", "default",
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}",
            "--log-level", "error",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=0.1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"etcd did not listen on {self.url}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)


def probe(addr: str) -> tuple[bool, str | None]:
    """What a member answers to Status: ``(True, None)`` on the leader, ``(False, leader)`` on a
    standby (``leader`` from ``slotd-leader``, ``None`` when it knows none or did not answer)."""
    with grpc.insecure_channel(addr) as ch:
        try:
            pb_grpc.SlotdStub(ch).Status(pb.StatusRequest(), timeout=1.0)
            return True, None
        except grpc.RpcError as e:
            named = dict(e.trailing_metadata() or ()).get(LEADER_HEADER)  # type: ignore[attr-defined]
            return False, named


class Cluster:
    """etcd and three members with the same config; ``members[i]`` is ``None`` once killed."""

    def __init__(self, tmp: Path, limit: int, extra: str = "") -> None:
        exe = etcd_binary()
        if exe is None:
            pytest.skip("no `etcd` binary on PATH (apt-get install etcd-server; .ci/run installs it)")
        self.etcd = Etcd(exe, tmp)
        self.members: list[Daemon | None] = []
        try:
            key = tmp / "lease.key"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            config = (
                f'key_file = "{key}"\n'
                f"[pools.p]\nmax_concurrent = {limit}\n"
                f'default_ttl = "{MAX_TTL}s"\nmax_ttl = "{MAX_TTL}s"\n'
                f'[ha]\netcd = ["{self.etcd.url}"]\nelection = "e-{uuid.uuid4().hex[:12]}"\n'
                f'lease_ttl = "{LEASE_TTL}"\nmargin = "500ms"\n'
            ) + extra
            for i in range(3):
                self.members.append(start_daemon(tmp / f"m{i}", config))
        except BaseException:
            self.stop()
            raise

    def addr(self, i: int) -> str:
        m = self.members[i]
        assert m is not None, f"member {i} was killed"
        return m.addr

    def live(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m is not None]

    def leader(self) -> int:
        """Waits until exactly one live member serves and every other live one names it."""
        deadline = time.monotonic() + FAILOVER_TIMEOUT
        while True:
            answers = {i: probe(self.addr(i)) for i in self.live()}
            serving = [i for i, (ok, _) in answers.items() if ok]
            if len(serving) == 1:
                lead = serving[0]
                url = f"http://{self.addr(lead)}"
                if all(named == url for i, (ok, named) in answers.items() if i != lead):
                    return lead
            if time.monotonic() > deadline:
                pytest.fail(f"no single leader within {FAILOVER_TIMEOUT}s: {answers}")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL: no goodbye to etcd, so a standby takes over only after the lease TTL."""
        m = self.members[i]
        assert m is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(START_TIMEOUT)
        self.members[i] = None

    def stop(self) -> None:
        for m in self.members:
            if m is not None:
                m.kill()
        self.members = []
        self.etcd.stop()
