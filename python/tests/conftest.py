"""Fixtures: the real daemon binary (built by cargo when missing), started on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import slotd

REPO = Path(__file__).resolve().parents[2]

#: Pools every test daemon has (tests pick the one whose limits they need).
DEFAULT_CONFIG = """
[pools.anthropic]
max_concurrent = 4
default_ttl = "30s"
default_retry_after = "2s"

[pools.one]
max_concurrent = 1
default_ttl = "30s"

[pools.audit]
max_concurrent = 5
default_ttl = "10s"

[pools.short]
max_concurrent = 2
default_ttl = "300ms"
"""

#: How long a daemon may take to log its address, and a stop to take, before the test fails.
START_TIMEOUT = 30.0


def slotd_binary() -> str:
    """``$SLOTD_BIN``, or ``target/debug/slotd`` (built with ``cargo build -p slotd`` if missing)."""
    env = os.environ.get("SLOTD_BIN")
    if env:
        return env
    exe = REPO / "target" / "debug" / "slotd"
    if not exe.exists():
        subprocess.run(["cargo", "build", "-p", "slotd"], cwd=REPO, check=True)
    return str(exe)


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    addr: str
    state_dir: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(START_TIMEOUT)

    def client(self, **kwargs: object) -> slotd.Client:
        return slotd.Client(self.addr, **kwargs)  # type: ignore[arg-type]

    def in_flight(self, pool: str) -> int:
        """The pool's in-flight count from Status, through a fresh client."""
        with slotd.Client(self.addr) as c:
            return next(p.in_flight for p in c.status(pool).pools if p.name == pool)


def start_daemon(tmp: Path, config: str = DEFAULT_CONFIG, *args: str) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "slotd.toml"
    cfg.write_text(config)
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    cmd = [
        slotd_binary(),
        "--config", str(cfg),
        "--listen", "127.0.0.1:0",
        "--restart-marker", "none",
        "--state-dir", str(state),
        "--log-format", "json",
        *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT
    addr = None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"slotd exited before logging its address (rc {proc.wait()})")
        try:
            addr = json.loads(line).get("fields", {}).get("addr")
        except json.JSONDecodeError:
            continue
        if addr:
            break
    assert addr, "slotd did not log its address"
    stderr = proc.stderr
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
    return Daemon(proc, addr, state)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "d")
    yield d
    d.kill()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(config: str = DEFAULT_CONFIG, *args: str) -> Daemon:
        d = start_daemon(tmp_path / f"d{len(started)}", config, *args)
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill()


def eventually(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Polls ``pred`` until it holds; fails after a generous ``timeout`` (never a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.005)


PYTHON = sys.executable
