# SPDX-License-Identifier: Apache-2.0
"""The harness both test files share: waiting, connecting, probing, and the loader as a process.

test_trace_loader.py and test_interop.py run the loader as a real subprocess
and synchronise on its log lines (`Proc.wait_for`) or on observable state
(`wait_until`), never on bare sleeps; every wait ends with a failure naming
what it waited for after TIMEOUT seconds. Nothing here imports the loader:
the test files do, in one line each.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, TypeVar

LINUX = sys.platform.startswith("linux")
TIMEOUT = 20.0  # the longest any one wait may take; a healthy run needs a small fraction of it

T = TypeVar("T")


def wait_until(observe: Callable[[], T], what: str, *, until: Callable[[T], object] = bool,
               timeout: float = TIMEOUT, step: float = 0.01) -> T:
    """Call `observe` until `until` holds for what it returns, and return that.

    In the spirit of CPython's test.support.sleeping_retry: it sleeps `step`
    between tries, and past `timeout` it fails naming `what` and what it saw
    last, so a test never runs on to fail later with an unrelated error.
    """
    deadline = time.monotonic() + timeout
    while True:
        seen = observe()
        if until(seen):
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %g s waiting for %s; last seen: %r" % (timeout, what, seen))
        time.sleep(step)


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=TIMEOUT)


def wake(port: int) -> None:
    """Connect and close: a client that wakes the program.

    A reset is no failure: on a loaded machine, a program that ends at once
    can close its listener before this connect() is scheduled to return.
    """
    try:
        connect(port).close()
    except ConnectionResetError:
        pass


def kubelet_probe(port: int) -> None:
    """What kubelet's tcpSocket probe does: connect, SO_LINGER 1 s, close (a FIN)."""
    with connect(port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 1))


def rst_probe(port: int) -> None:
    """A load balancer's check: connect, SO_LINGER 0 s, close (an RST)."""
    with connect(port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def read_answer(sock: socket.socket, *, reset_ends: bool = False) -> bytes:
    """What arrives before the end of stream; with `reset_ends`, before a reset too."""
    sock.settimeout(TIMEOUT)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            if not reset_ends:
                raise
            return data
        if not chunk:
            return data
        data += chunk


class Proc:
    """A running loader (later the agent, same pid), its stderr collected line by line.

    stdin and stdout are /dev/null unless `popen` says otherwise; `popen` goes to subprocess.Popen.
    """

    def __init__(self, argv: list[str], env: dict[str, str], **popen: object) -> None:
        self.argv = argv
        # A session of its own, so stop() can end every process the test started.
        options: dict[str, object] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        options.update(popen)
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, start_new_session=True,
                                     **options)  # type: ignore[call-overload]
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<EOF>")
            self.cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = TIMEOUT) -> list[str]:
        """The lines matching `pattern`, once there are `count` of them.

        The reader thread notifies on every line, so this sleeps on the
        condition instead of polling; it fails with the whole output when the
        process ends first or the time is up.
        """
        regex = re.compile(pattern)

        def found() -> list[str]:
            return [line for line in self.lines if regex.search(line)]

        with self.cond:
            self.cond.wait_for(lambda: len(found()) >= count or "<EOF>" in self.lines, timeout)
            if len(found()) >= count:
                return found()
            why = "process ended before" if "<EOF>" in self.lines else "timed out waiting for"
            raise AssertionError("%s %r x%d; output:\n%s" % (why, pattern, count, "\n".join(self.lines)))

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self.cond:
            return sum(1 for line in self.lines if regex.search(line))

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code

    def stop(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group has already ended
        self.proc.wait(TIMEOUT)
        self.reader.join(TIMEOUT)

    def cmdline(self) -> str:
        if LINUX:
            with open("/proc/%d/cmdline" % self.pid, "rb") as f:
                return f.read().replace(b"\0", b" ").decode()
        return subprocess.run(["ps", "-o", "args=", "-p", str(self.pid)], capture_output=True,
                              text=True, check=False).stdout


def bound_port(proc: Proc, label: str = "") -> int:
    """The port the loader bound for tcp://...:0, as its log line names it."""
    line = proc.wait_for(r"Listening to %s.* at \S+:\d+$" % re.escape(label))[0]
    return int(re.search(r":(\d+)$", line).group(1))
