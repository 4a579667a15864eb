# SPDX-License-Identifier: Apache-2.0
"""Interop: real servers behind the loader, on real loopback sockets.

Each server runs behind the loader in generic mode with the default options
(`--held-client relay`, `--hold-timeout 1000`):

    trace_loader.py --listen tcp://127.0.0.1:0 --handle-tcp-probe --log-level debug -- SERVER ARGS...

and must (1) not be started by FIN or RST probes, (2) answer the first real
client, whose connection the loader held and now relays, (3) run under the
loader's pid and answer more clients. A server-first protocol (SMTP) gets its
held client after the hold timeout. A 64 MB upload and download go through
the relay intact while the relay's memory stays bounded. With --stop-when-idle,
gunicorn and uvicorn go back to sleep and wake again, and the real ddtrace
client reaches a stand-in agent through drop-in mode over two sleep cycles.

`make interop` installs the servers in `.venv-interop/` and sets
TRACE_LOADER_INTEROP=1, under which a missing server fails its tests; under a
plain `pytest` a missing server skips them. Linux only (/proc). The harness
(`Proc`, `wait_until`, the probes, TIMEOUT) is conftest.py's, as for
test_trace_loader.py.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest

from conftest import TIMEOUT, Proc, bound_port, connect, kubelet_probe, read_answer, rst_probe, wait_until

HERE = Path(__file__).resolve().parent
LOADER = HERE / "trace_loader.py"
REQUIRED = os.environ.get("TRACE_LOADER_INTEROP") == "1"
HOLD_TIMEOUT_S = 1.0  # the loader's default --hold-timeout in generic mode
PROBE_DONE = r"TCP client closed connection|TCP client left before it was accepted"
RELAY_LINE = r"Relaying the held TCP client .* helper pid (\d+)"
MiB = 1 << 20

if not sys.platform.startswith("linux"):
    pytest.skip("the interop suite reads /proc (Linux only)", allow_module_level=True)


# ---------------------------------------------------------------------------
# The servers and the tiny apps they serve
# ---------------------------------------------------------------------------

WSGI_APP = '''
import os


def app(environ, start_response):
    body = ("wsgi pid=%d ppid=%d path=%s\\n" % (os.getpid(), os.getppid(), environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''

ASGI_APP = '''
import os


async def app(scope, receive, send):
    if scope["type"] != "http":  # lifespan: nothing to set up
        return
    body = ("asgi pid=%d ppid=%d path=%s\\n" % (os.getpid(), os.getppid(), scope["path"])).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''

# waitress has no command-line option for an inherited fd; its API takes sockets.
WAITRESS_FD = '''
import os
import socket

import waitress

from wsgi_app import app

assert os.environ.get("LISTEN_PID") == str(os.getpid()), "not socket-activated"
waitress.serve(app, sockets=[socket.socket(fileno=3)], threads=2)
'''

# A stdlib server for the bulk test. Per connection: a 16-byte header (upload
# and download sizes), the upload, whose sha256 it sends back, then the
# download (1 MiB chunks, each different); then it waits for the client's
# half-close and answers it with b"bye" before closing.
BULK_SERVER = '''
import hashlib
import os
import socket
import struct


def chunk(seed, i):
    return hashlib.shake_256(b"%s-%d" % (seed, i)).digest(1 << 20)


def recv_exactly(conn, n):
    parts = []
    while n:
        part = conn.recv(min(n, 1 << 16))
        if not part:
            raise EOFError("client closed early")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def serve(conn):
    upload, download = struct.unpack("!QQ", recv_exactly(conn, 16))
    digest = hashlib.sha256()
    while upload:
        part = conn.recv(min(upload, 1 << 16))
        if not part:
            raise EOFError("client closed during the upload")
        digest.update(part)
        upload -= len(part)
    conn.sendall(digest.digest())
    for i in range(download >> 20):
        conn.sendall(chunk(b"down", i))
    conn.sendall(b"bye" if conn.recv(1) == b"" else b"???")


def main():
    # Relay mode: the program gets its listener only, never the held client.
    assert os.environ.get("LISTEN_PID") == str(os.getpid()), "not socket-activated"
    assert os.environ.get("LISTEN_FDS") == "1", os.environ.get("LISTEN_FDS")
    listener = socket.socket(fileno=3)
    while True:
        conn, _ = listener.accept()
        with conn:
            serve(conn)


main()
'''


def bulk_chunk(seed: bytes, i: int) -> bytes:
    """The bulk server's chunk generator, for the client side."""
    return hashlib.shake_256(b"%s-%d" % (seed, i)).digest(MiB)


def script(name: str) -> str | None:
    """An installed console script, next to this interpreter first (a venv's bin/)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(str(beside), os.X_OK):
        return str(beside)
    return shutil.which(name)


class Server(NamedTuple):
    name: str
    module: str  # what must be importable
    scripts: tuple[str, ...]  # console scripts it needs
    argv: Callable[[Path], list[str]]  # its command line, given the work directory
    protocol: str  # "http" or "smtp"
    marker: str  # in its /proc/PID/cmdline once it runs


def _argv_gunicorn(work: Path) -> list[str]:
    # --no-control-socket: gunicorn >= 24 otherwise creates ~/.gunicorn/gunicorn.ctl.
    return [str(script("gunicorn")), "-w", "1", "--no-control-socket", "wsgi_app:app"]


def _argv_uvicorn(work: Path) -> list[str]:
    return [str(script("uvicorn")), "--fd", "3", "asgi_app:app"]


def _argv_hypercorn(work: Path) -> list[str]:
    return [str(script("hypercorn")), "--bind", "fd://3", "asgi_app:app"]


def _argv_waitress(work: Path) -> list[str]:
    return [sys.executable, "waitress_fd.py"]


def _argv_twistd(work: Path) -> list[str]:
    # Twisted's systemd: endpoint takes the inherited fds only when LISTEN_FDNAMES
    # names as many as LISTEN_FDS counts (the loader always sets it).
    return [str(script("twistd")), "-n", "--pidfile=", "-l", "-", "mail", "--no-pop3",
            "--smtp", "systemd:domain=INET:index=0", "-H", "interop.invalid",
            "-d", "example.com=%s" % (work / "maildir")]


SERVERS = {
    s.name: s
    for s in (
        Server("gunicorn", "gunicorn", ("gunicorn",), _argv_gunicorn, "http", "gunicorn"),
        Server("uvicorn", "uvicorn", ("uvicorn",), _argv_uvicorn, "http", "uvicorn"),
        Server("hypercorn", "hypercorn", ("hypercorn",), _argv_hypercorn, "http", "hypercorn"),
        Server("waitress", "waitress", (), _argv_waitress, "http", "waitress_fd.py"),
        Server("twistd-mail", "twisted.mail", ("twistd",), _argv_twistd, "smtp", "twistd"),
    )
}


def missing(server: Server) -> str:
    """Why `server` cannot run here, or ''."""
    try:
        found = importlib.util.find_spec(server.module) is not None
    except ImportError:  # a parent package is missing
        found = False
    if not found:
        return "%s: module %s is not installed for %s" % (server.name, server.module, sys.executable)
    for name in server.scripts:
        if script(name) is None:
            return "%s: the %s script is not installed" % (server.name, name)
    return ""


if not REQUIRED and all(missing(s) for s in SERVERS.values()):
    pytest.skip("none of the interop servers (%s) is installed; `make interop` installs them"
                % ", ".join(SERVERS), allow_module_level=True)


def require(server: Server) -> None:
    why = missing(server)
    if why and REQUIRED:
        pytest.fail("%s (TRACE_LOADER_INTEROP=1: `make interop` must install every server)" % why)
    if why:
        pytest.skip("%s; `make interop` installs it" % why)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The servers' working directory, with the apps in it."""
    for name, text in (("wsgi_app.py", WSGI_APP), ("asgi_app.py", ASGI_APP), ("waitress_fd.py", WAITRESS_FD),
                       ("bulk_server.py", BULK_SERVER)):
        (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    (tmp_path / "maildir").mkdir()
    return tmp_path


# ---------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    for path in glob.glob("/proc/%d/task/*/children" % pid):
        with open(path) as f:
            found.extend(int(word) for word in f.read().split())
    return found


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict; empty once the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def kib(value: str) -> int:
    return int(value.split()[0])


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    state = status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def wait_until_gone(pid: int, what: str) -> None:
    wait_until(lambda: not alive(pid), "%s (pid %d) to end" % (what, pid), step=0.02)


def socket_inodes(pid: int) -> list[int]:
    inodes = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except FileNotFoundError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.append(int(match.group(1)))
    return inodes


def listener_inodes(port: int) -> set[int]:
    """The inodes of the TCP sockets listening on `port` (state 0A in /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(":%04X" % port) and fields[3] == "0A":
                    found.add(int(fields[9]))
    return found


# ---------------------------------------------------------------------------
# The loader, run as a subprocess
# ---------------------------------------------------------------------------


class Loader(Proc):
    """The loader in front of `argv` on a loopback port of its own, waiting; later the server, same pid.

    The server's stdout goes to the test's stderr, which pytest shows with a failure.
    """

    def __init__(self, work: Path, argv: list[str], options: tuple[str, ...] = (), *, config: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "DD_"))}
        env.update(HOME=str(work), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        command = [sys.executable, str(LOADER), "--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe",
                   "--log-level", "debug", *options, "--", *argv]
        if config:  # drop-in mode
            command = [sys.executable, str(LOADER), config, *argv]
        super().__init__(command, env, cwd=str(work), stdout=sys.stderr.fileno())
        self.port = bound_port(self)
        self.wait_for(r"Polling\.\.\.")

    def group(self, pattern: str, count: int = 1) -> str:
        """Group 1 of the `count`-th line matching `pattern`, once logged."""
        line = self.wait_for(pattern, count)[count - 1]
        return re.search(pattern, line).group(1)  # type: ignore[union-attr]

    def relays(self) -> list[int]:
        """The pids of the relay helpers the log names."""
        with self.cond:
            return [int(m.group(1)) for m in (re.search(RELAY_LINE, line) for line in self.lines) if m]


@pytest.fixture
def start_loader(work: Path) -> Iterator[Callable[..., Loader]]:
    started: list[Loader] = []

    def start(argv: list[str], *options: str, config: str = "") -> Loader:
        loader = Loader(work, argv, options, config=config)
        started.append(loader)
        return loader

    yield start
    for loader in started:
        loader.stop()
        for pid in loader.relays():
            if alive(pid):  # a relay left behind by a failed test: ours to end
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


def recv_until(sock: socket.socket, marker: bytes, buf: bytearray) -> bytes:
    while marker not in buf:
        part = sock.recv(65536)
        assert part, "connection closed before %r; got %r" % (marker, bytes(buf))
        buf += part
    head, _, rest = bytes(buf).partition(marker)
    buf[:] = rest
    return head


def http_get(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """One request on `sock`; the status and the body (our apps always send Content-Length)."""
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: interop\r\nUser-Agent: test_interop\r\n\r\n" % path.encode())
    buf = bytearray()
    head = recv_until(sock, b"\r\n\r\n", buf).decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    length = int(headers["content-length"])
    while len(buf) < length:
        part = sock.recv(65536)
        assert part, "connection closed in the body: %r" % bytes(buf)
        buf += part
    return int(status_line.split()[1]), bytes(buf[:length])


def smtp_reply(sock: socket.socket, buf: bytearray) -> str:
    """One SMTP reply, multi-line ones (250-...) included."""
    lines = []
    while True:
        line = recv_until(sock, b"\r\n", buf).decode("ascii", "replace")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


# ---------------------------------------------------------------------------
# Checks shared by every server
# ---------------------------------------------------------------------------


def absorb_probes(loader: Loader) -> None:
    """FIN and RST probes are absorbed: the program does not start."""
    for n, probe in enumerate([kubelet_probe, rst_probe] * 3, 1):
        probe(loader.port)
        loader.wait_for(PROBE_DONE, count=n)
    assert "trace_loader.py" in loader.cmdline(), "the program started on a probe:\n" + loader.text()
    assert children(loader.pid) == [], "the loader has children while waiting"
    assert loader.count(r"Waking") == 0, loader.text()


def assert_serving(loader: Loader, server: Server) -> None:
    """The program runs in the loader's place, same pid."""
    shown = loader.cmdline()
    assert "trace_loader.py" not in shown and server.marker in shown, shown


def check_relay(loader: Loader) -> int:
    """The relay helper named in the log, while its connection is open: not the program's child; its two
    sockets only, never the listener (the port must free when the program exits)."""
    relay = int(loader.group(RELAY_LINE))
    st = status(relay)
    assert st, "the relay (pid %d) is gone while its connection is open" % relay
    assert relay != loader.pid and int(st["PPid"]) != loader.pid, "the relay is the program's child"
    inodes = socket_inodes(relay)
    listeners = listener_inodes(loader.port)
    assert listeners, "no listener on port %d" % loader.port
    assert not listeners & set(inodes), "the relay holds the listener"
    assert len(inodes) == 2, "the relay holds %d sockets, expected 2" % len(inodes)
    return relay


def http_exchange(loader: Loader, path: str) -> tuple[float, str, socket.socket]:
    start = time.monotonic()
    sock = connect(loader.port)
    status_code, body = http_get(sock, path)
    elapsed = time.monotonic() - start
    text = body.decode()
    assert status_code == 200, (status_code, text)
    match = re.fullmatch(r"\w+ pid=(\d+) ppid=(\d+) path=(\S+)\n", text)
    assert match, text
    # Served by the program under the loader's pid, or by its worker.
    assert loader.pid in (int(match.group(1)), int(match.group(2))), (loader.pid, text)
    assert match.group(3) == path
    return elapsed, text, sock


def smtp_session(loader: Loader) -> tuple[float, str]:
    start = time.monotonic()
    with connect(loader.port) as sock:
        buf = bytearray()
        banner = smtp_reply(sock, buf)  # the client waits: the server speaks first
        elapsed = time.monotonic() - start
        assert banner.startswith("220 "), banner
        sock.sendall(b"HELO interop.test\r\n")
        assert smtp_reply(sock, buf).startswith("250"), "HELO refused"
        sock.sendall(b"QUIT\r\n")
        assert smtp_reply(sock, buf).startswith("221"), "QUIT refused"
    return elapsed, banner


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, s in SERVERS.items() if s.protocol == "http"])
def test_http_server_behind_loader(name: str, work: Path, start_loader: Callable[[list[str]], Loader]) -> None:
    server = SERVERS[name]
    require(server)
    loader = start_loader(server.argv(work))
    absorb_probes(loader)

    # The first real client: held, the server woken, the connection relayed.
    first, _, sock = http_exchange(loader, "/first")
    with sock:
        wake = loader.wait_for(r"Waking .*")[0]
        assert "sent data" in wake and "6 probes absorbed" in wake and "FIN: 3, RST: 3" in wake, wake
        assert_serving(loader, server)
        relay = check_relay(loader)
    # The relay passes our close on as a half-close and ends when the server closes too: at once for
    # most, after its 5 s keep-alive timeout for hypercorn, which keeps a connection open after EOF.
    closed = time.monotonic()
    wait_until_gone(relay, "the relay helper, its connection closed")
    print("relay gone %.3f s after close" % (time.monotonic() - closed))

    # Two more, straight to the server.
    for path in ("/second", "/third"):
        elapsed, _, sock = http_exchange(loader, path)
        sock.close()
    assert len(loader.relays()) == 1, "more than one relay:\n" + loader.text()
    assert_serving(loader, server)
    print("%s: first request %.3f s (wake + start-up), third %.4f s" % (name, first, elapsed))


STOPPING = r"Stopping .+: its sockets were idle for \d+ s"
STOPPED = r"Stopped .+ in [\d.]+ s \("
IN_USE = r"Sockets of .+ in use: \d+"
# Keep-alive longer than the idle time: an idle keep-alive connection is what must keep the server up.
KEEP_ALIVE = {"gunicorn": ["--worker-class", "gthread", "--threads", "2", "--keep-alive", "30"],
              "uvicorn": ["--timeout-keep-alive", "30"]}


def program_serving(loader: Loader, sock: socket.socket, path: str) -> int:
    """One request on `sock`: the pid of the loader's child that serves it (the server, or its master)."""
    status_code, body = http_get(sock, path)
    match = re.fullmatch(r"\w+ pid=(\d+) ppid=(\d+) path=\S+\n", body.decode())
    assert status_code == 200 and match, (status_code, body)
    pid, ppid = int(match.group(1)), int(match.group(2))
    program = pid if ppid == loader.pid else ppid
    assert program in children(loader.pid), (program, children(loader.pid))
    return program


@pytest.mark.parametrize("name", ["gunicorn", "uvicorn"])
def test_server_goes_back_to_sleep_and_wakes_again(name: str, work: Path,
                                                   start_loader: Callable[..., Loader]) -> None:
    server = SERVERS[name]
    require(server)
    loader = start_loader(server.argv(work) + KEEP_ALIVE[name], "--stop-when-idle", "2")
    absorb_probes(loader)
    with connect(loader.port) as sock:
        first = program_serving(loader, sock, "/first")
    loader.wait_for(STOPPING)
    loader.wait_for(STOPPED)
    loader.wait_for(r"Polling\.\.\. \(fds", count=2)
    assert children(loader.pid) == [] and not alive(first), "the server or a worker is left:\n" + loader.text()
    probes_before = loader.count(PROBE_DONE)
    kubelet_probe(loader.port)  # the probe check works in the second wait as in the first
    loader.wait_for(PROBE_DONE, count=probes_before + 1)
    assert children(loader.pid) == []

    # Woken again: a keep-alive connection, silent for longer than the idle time, keeps the server up.
    with connect(loader.port) as keep:
        second = program_serving(loader, keep, "/second")
        assert second != first
        loader.wait_for(IN_USE, count=loader.count(IN_USE) + 19)  # 3 s of samples, 0.16 s apart
        assert loader.count(STOPPING) == 1, loader.text()
        assert program_serving(loader, keep, "/again") == second

    # Closed, so stopped again; a client arriving during the stop is answered, by the stopping server
    # if it still accepted it, else from the backlog by the next start: never refused.
    loader.wait_for(STOPPING, count=2)
    with connect(loader.port) as late:
        status_code, _ = http_get(late, "/late")
    assert status_code == 200
    loader.wait_for(STOPPED, count=2)
    print("%s: %s" % (name, "; ".join(line.partition(" | ")[2][-60:]
                                 for line in loader.wait_for(STOPPED, count=loader.count(STOPPED)))))


# A stand-in trace-agent for the real ddtrace client: adopts the drop-in hand-off (the held client first),
# answers every payload, and appends "PID TRACE-COUNT PATH" to traces.log for each one.
TRACE_AGENT = """
import http.server, os, socket

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if "/traces" in self.path:
            with open("traces.log", "a") as f:
                f.write("%d %s %s\\n" % (os.getpid(), self.headers.get("X-Datadog-Trace-Count", "0"), self.path))
        body = b'{"rate_by_service": {}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT

    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=int(os.environ["DD_APM_NET_RECEIVER_FD"]))
if os.environ.get("DD_APM_NET_RECEIVER_CLIENT_FD"):
    held = socket.socket(fileno=int(os.environ["DD_APM_NET_RECEIVER_CLIENT_FD"]))
    server.process_request(held, held.getpeername())
server.serve_forever()
"""
DDTRACE_CLIENT = """
import sys
try:
    from ddtrace.trace import tracer
except ImportError:  # ddtrace before 3.0
    from ddtrace import tracer
for i in range(int(sys.argv[1])):
    with tracer.trace("interop.op", service="interop", resource="r%d" % i):
        pass
tracer.shutdown()  # flushes every trace
"""


def test_ddtrace_reaches_the_agent_over_two_sleep_cycles(work: Path, start_loader: Callable[..., Loader]) -> None:
    """The real ddtrace client, through drop-in mode with stop_when_idle: every trace arrives, in each cycle."""
    if importlib.util.find_spec("ddtrace") is None:
        if REQUIRED:
            pytest.fail("ddtrace is not installed (TRACE_LOADER_INTEROP=1: `make interop` installs it)")
        pytest.skip("ddtrace is not installed; `make interop` installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = work / "datadog.yaml"
    config.write_text("apm_config:\n  receiver_port: %d\n  receiver_socket: ''\n  socket_activation:\n"
                      "    enabled: true\n    handle_tcp_probe: true\n    stop_when_idle: 1\n"
                      "log_level: debug\ndisable_file_logging: true\n" % port)
    (work / "trace_agent.py").write_text(TRACE_AGENT)
    loader = start_loader([sys.executable, "trace_agent.py"], config=str(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DD_")}
    env.update(DD_TRACE_AGENT_URL="http://127.0.0.1:%d" % port, DD_INSTRUMENTATION_TELEMETRY_ENABLED="false",
               DD_REMOTE_CONFIGURATION_ENABLED="false", DD_TRACE_STARTUP_LOGS="false")
    for cycle in (1, 2):
        kubelet_probe(port)
        subprocess.run([sys.executable, "-c", DDTRACE_CLIENT, "25"], cwd=str(work), env=env, check=True,
                       timeout=TIMEOUT)
        loader.wait_for(STOPPED, count=cycle)
        loader.wait_for(r"Polling\.\.\. \(fds", count=cycle + 1)
    rows = [line.split() for line in (work / "traces.log").read_text().splitlines()]
    by_pid: dict[str, int] = {}
    for pid, count, _ in rows:
        by_pid[pid] = by_pid.get(pid, 0) + int(count)
    assert sorted(by_pid.values()) == [25, 25], rows  # two agents, one per cycle, every trace
    assert loader.count(r"Waking the trace-agent") == 2 and loader.count(r"FIN: 1"), loader.text()


def test_gunicorn_answers_a_half_closed_first_client(work: Path, start_loader: Callable[[list[str]], Loader]) -> None:
    """A first client that half-closes after its request (`nc -N`, HTTP/1.0 style) gets the whole answer
    through the relay, then gunicorn's close."""
    server = SERVERS["gunicorn"]
    require(server)
    loader = start_loader(server.argv(work))
    with connect(loader.port) as sock:
        sock.sendall(b"GET /half HTTP/1.0\r\nHost: interop\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        reply = read_answer(sock)
    assert reply.startswith(b"HTTP/1.0 200 ") and reply.endswith(b" path=/half\n"), reply
    relay = int(loader.group(RELAY_LINE))
    wait_until_gone(relay, "the relay helper, its connection closed")


def test_smtp_server_first_protocol(work: Path, start_loader: Callable[[list[str]], Loader]) -> None:
    """twistd mail: the client waits for the banner; the hold timeout wakes the server."""
    server = SERVERS["twistd-mail"]
    require(server)
    loader = start_loader(server.argv(work))
    absorb_probes(loader)

    accepted = loader.count(r"Accepted connection on TCP listener")
    start = time.monotonic()
    with connect(loader.port) as sock:
        buf = bytearray()
        loader.wait_for(r"Accepted connection on TCP listener", count=accepted + 1)  # held, silent
        banner = smtp_reply(sock, buf)
        first = time.monotonic() - start
        assert banner.startswith("220 interop.invalid "), banner
        assert first >= HOLD_TIMEOUT_S * 0.9, "banner after %.3f s, before the hold timeout" % first
        wake = loader.wait_for(r"Waking .*")[0]
        assert "sent nothing for 1000 ms" in wake, wake
        assert_serving(loader, server)
        relay = check_relay(loader)
        sock.sendall(b"HELO interop.test\r\n")
        assert smtp_reply(sock, buf).startswith("250"), "HELO refused"
        sock.sendall(b"QUIT\r\n")
        assert smtp_reply(sock, buf).startswith("221"), "QUIT refused"
    wait_until_gone(relay, "the relay helper, its connection closed")

    for _ in range(2):
        elapsed, banner = smtp_session(loader)
        assert elapsed < HOLD_TIMEOUT_S / 2, "banner after %.3f s once the server runs" % elapsed
    assert len(loader.relays()) == 1, "more than one relay:\n" + loader.text()
    assert_serving(loader, server)
    print("twistd-mail: first banner %.3f s (hold timeout + start-up), third %.4f s" % (first, elapsed))


class RssSampler(threading.Thread):
    """Samples the relay's VmRSS/VmHWM (kB) against the bytes moved so far."""

    def __init__(self, pid: int, progress: list[int]) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.progress = progress
        self.samples: list[tuple[int, int, int]] = []  # (bytes moved, VmRSS, VmHWM)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            st = status(self.pid)
            if "VmHWM" not in st:
                return
            self.samples.append((self.progress[0], kib(st["VmRSS"]), kib(st["VmHWM"])))
            self.stop.wait(0.005)  # the sampling period


def test_relay_64mb_both_ways(work: Path, start_loader: Callable[[list[str]], Loader]) -> None:
    """64 MB up and 64 MB down through the held, relayed connection: intact, in bounded memory."""
    size = 64 * MiB
    loader = start_loader([sys.executable, "bulk_server.py"])
    absorb_probes(loader)

    progress = [0]
    upload_digest = hashlib.sha256()
    start = time.monotonic()
    with connect(loader.port) as sock:
        sock.sendall(struct.pack("!QQ", size, size))
        relay = int(loader.group(RELAY_LINE))
        sampler = RssSampler(relay, progress)
        sampler.start()
        for i in range(size // MiB):
            data = bulk_chunk(b"up", i)
            upload_digest.update(data)
            sock.sendall(data)
            progress[0] += len(data)
        buf = bytearray()
        while len(buf) < 32:
            part = sock.recv(32 - len(buf))
            assert part, "closed before the upload digest"
            buf += part
        assert bytes(buf) == upload_digest.digest(), "the upload arrived altered"

        expected, received = hashlib.sha256(), hashlib.sha256()
        for i in range(size // MiB):
            expected.update(bulk_chunk(b"down", i))
        got = 0
        while got < size:
            part = sock.recv(min(size - got, 1 << 16))
            assert part, "closed after %d of %d download bytes" % (got, size)
            received.update(part)
            got += len(part)
            progress[0] = size + got
        assert received.hexdigest() == expected.hexdigest(), "the download arrived altered"
        elapsed = time.monotonic() - start

        # Still open both ways: the relay is there, with its two sockets.
        check_relay(loader)
        after = status(relay)
        sampler.stop.set()
        sampler.join(TIMEOUT)
    wait_until_gone(relay, "the relay helper, its connection closed")

    assert after, "the relay exited before its client closed"
    samples = sampler.samples
    assert len(samples) >= 10, samples
    hwm, rss = kib(after["VmHWM"]), kib(after["VmRSS"])
    # The high-water mark once a quarter of the 128 MiB had moved: bounded memory means no growth after it.
    early = next((s for s in samples if s[0] >= size // 2), None)
    assert early is not None, "no sample after 32 MiB: %r" % samples[-3:]
    assert hwm < 64 * 1024, "relay VmHWM %d kB" % hwm
    assert hwm - early[2] < 8 * 1024, "relay VmHWM grew from %d to %d kB with the transfer" % (early[2], hwm)
    print("relay pid %d: 128 MiB in %.2f s; VmRSS first %d kB, at 32 MiB %d kB, end %d kB; VmHWM end %d kB; %d samples"
          % (relay, elapsed, samples[0][1], early[1], rss, hwm, len(samples)))


def test_relay_passes_half_close(work: Path, start_loader: Callable[[list[str]], Loader]) -> None:
    """The client half-closes; the server's answer, then its close, reach the client through the relay."""
    loader = start_loader([sys.executable, "bulk_server.py"])
    with connect(loader.port) as sock:
        sock.sendall(struct.pack("!QQ", 5, 0) + b"hello")
        relay = int(loader.group(RELAY_LINE))
        buf = bytearray()
        while len(buf) < 32:
            part = sock.recv(32 - len(buf))
            assert part, "closed before the digest"
            buf += part
        assert bytes(buf) == hashlib.sha256(b"hello").digest()
        sock.shutdown(socket.SHUT_WR)  # the server answers our EOF with b"bye", then closes
        tail = read_answer(sock)
        assert tail == b"bye", tail
    wait_until_gone(relay, "the relay helper, its connection closed")
