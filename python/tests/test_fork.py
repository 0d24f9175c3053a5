"""Fork safety: a client created before os.fork() refuses to work in the child (it would share the
parent's stream and threads), with a clear error, and the parent's lease is untouched."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import Daemon

import slotd


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_client_created_before_fork_is_unusable_in_the_child(daemon: Daemon) -> None:
    with daemon.client() as c:
        lease = c.acquire("one")
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                c.acquire("one")
            except slotd.ClientClosed as e:
                code = 0 if "fork" in str(e) else 2
            except BaseException:  # noqa: BLE001
                code = 3
            sys.stdout.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not lease.lost.is_set() and daemon.in_flight("one") == 1
        lease.release()
