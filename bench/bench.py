#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""`make bench`: trace_loader.py's footprint and speed, side by side with its peers.

Peers, run in the same process tree, the same way, in the same run:
  bare   the same interpreter, binding one TCP socket and sitting in poll()
  ssa    Debian's systemd-socket-activate listening on a port (if installed)

Figures (median of --runs runs, with min and max; ratios against the peers):
  1. idle memory (VmRSS, RssAnon, RssFile) once listening and waiting
  2. start-up: spawn until the port is in LISTEN state (read from /proc/net)
  3. idle wake-ups: context switches over 5 s with no traffic
  4. probe cost: loader CPU per absorbed probe over 5,000 probes, and the rate
  5. wake latency: connect+send to first response byte, via the loader, vs.
     the same agent already listening, vs. that agent started at the connect
  6. burst: 1,000 clients within ~100 ms before the agent wakes
  7. relay: round trip and MB/s each way through the held client relayed by
     the helper (generic mode, --held-client relay) vs. a direct connection
     to the same server, in the same run, all on one CPU; the round trip to a
     server doing no work (the floor) and to http.server (keep-alive HTTP/1.1)
  8. hold-timeout wake: a silent client of a server-first protocol, from the
     connect to the banner's first byte, less --hold-timeout, vs. the same
     server already listening and started at the connect
  9. YAML reader growth: the config reader's CPU time on N and 2N lines (linear
     reads ~2.0x)
 10. back to sleep (--stop-when-idle): the loader's idle RSS and fd count after
     each wake/stop cycle against its first wait, its RSS while the program
     runs next to the program's, and how late SIGTERM comes after the idle time

With BENCH_BASELINE set to one or more git revisions (spaces or commas between),
trace_loader.py at each of them runs too, as "loader@<rev> -I -S", in figures 1-4.

--only SECTION[,SECTION] runs only those: idle (1-3), probes, latency, burst,
relay, hold, yaml, sleep.

Linux only (it reads /proc).
Usage: bench.py [--runs N] [--only SECTIONS] [--json] [--python PATH] [--help]
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from types import ModuleType
from typing import Callable, Dict, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADER = os.path.join(ROOT, "trace_loader.py")
AGENT = os.path.join(ROOT, "examples", "demo_agent.py")
EXAMPLE_CONFIG = os.path.join(ROOT, "examples", "datadog.yaml")
BARE = ("import socket, select, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); p = select.poll(); p.register(s, 1); p.poll()")
# The least any Python absorber can do per probe: the loader's syscalls
# (poll, accept, poll, peek, close) with no state machine and no logging
# (and the peek's flags combined once, as the loader does).
FLOOR = ("import socket, select, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
         "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(4096); s.setblocking(False); p = select.poll();"
         "p.register(s, 1); peek = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)\nwhile True:\n"
         " p.poll(); c, _ = s.accept(); p.register(c, 1); p.poll()\n"
         " try: c.recv(1, peek)\n except OSError: pass\n"
         " p.unregister(c); c.close()\n")
CONFIG = """\
bind_host: 127.0.0.1
apm_config:
  receiver_port: {port}
  receiver_socket: {sock}
  socket_activation:
    enabled: true
    handle_tcp_probe: true
log_level: {level}
disable_file_logging: true
"""
# The program generic mode starts: any stdlib server that adopts its listener
# the systemd way (LISTEN_FDS=1, LISTEN_PID, fd 3) and knows nothing of the
# loader. One thread per connection; a request is 9 bytes, "!cQ" (op, size):
#   U n  the client uploads n bytes; the server sinks them and answers "K"
#   D n  the server streams n bytes
#   P 0  the server answers "P" (a round trip)
# With argument "banner" it speaks first on each connection, like SMTP.
SERVER = r"""
import os, socket, struct, sys, threading
if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
    sys.exit("server: expected one socket under the systemd protocol")
listener = socket.socket(fileno=3)
banner = sys.argv[1:] == ["banner"]

def exact(c, n):
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            return b""
        data += more
    return data

def serve(c):
    buf = memoryview(bytearray(1 << 20))
    with c:
        if banner:
            c.sendall(b"220 ready\r\n")
        while True:
            head = exact(c, 9)
            if not head:
                return
            op, n = struct.unpack("!cQ", head)
            while op == b"U" and n:
                got = c.recv_into(buf, min(n, len(buf)))
                if not got:
                    return
                n -= got
            while op == b"D" and n:
                k = min(n, len(buf))
                c.sendall(buf[:k])
                n -= k
            c.sendall(b"K" if op == b"U" else b"P" if op == b"P" else b"")

while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
# A real HTTP/1.1 server for the relay's round trip: http.server, keep-alive, one thread per connection,
# adopting its listener like SERVER. It answers PUT /v0.4/traces as the trace agent does (the body read,
# a small JSON answer); header and body are two writes, as http.server makes them, so Nagle is off.
HTTP_SERVER = r"""
import http.server, os, socket, sys
if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
    sys.exit("http server: expected one socket under the systemd protocol")
BODY = b'{"rate_by_service":{}}'

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
server.daemon_threads = True
server.serve_forever()
"""
PORT_LINE = re.compile(r"at \S+:(\d+)(\.\.\.)?$", re.M)
HELPER_LINE = re.compile(r"through helper pid (\d+)")
Stats = Dict[str, float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats(values: Sequence[float]) -> Stats:
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def listening(port: int) -> bool:
    """The port is in LISTEN state (0A) in /proc/net/tcp or tcp6."""
    needle = ":%04X " % port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[key] = int(value.split()[0])
    return out


def cpu_ns(pid: int) -> int:
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0])


class Variant:
    """One way of sitting on a port: argv for a given port, and how we know it waits."""

    def __init__(self, name: str, argv: list[str], ready_line: str = "") -> None:
        self.name = name
        self.argv = argv
        self.ready_line = ready_line


def compiled_loader(python: str, tmp: str) -> str:
    """trace_loader.py compiled once to bytecode, as an image build could ship it."""
    target = os.path.join(tmp, "trace_loader.pyc")
    if not os.path.exists(target):
        subprocess.run([python, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], "
                        "doraise=True)", LOADER, target], check=True)
    return target


def baseline_revisions() -> list[str]:
    """The git revisions in $BENCH_BASELINE (spaces or commas between), in the order given, each once."""
    out: list[str] = []
    for revision in re.split(r"[\s,]+", os.environ.get("BENCH_BASELINE", "")):
        if revision and revision not in out:
            out.append(revision)
    return out


def baseline_loaders(tmp: str) -> list[tuple[str, str]]:
    """(name, path) of trace_loader.py at each $BENCH_BASELINE revision, to compare against, each in a
    directory of its own. The name is the revision's first 12 characters, or all of it where two share those."""
    given = os.environ.get("BENCH_BASELINE", "").strip()
    revisions = baseline_revisions()
    out: list[tuple[str, str]] = []
    for index, revision in enumerate(revisions):
        content, error = b"", "not a revision"  # a leading "-" would be an option to git show
        if not revision.startswith("-"):
            found = subprocess.run(["git", "-C", ROOT, "show", "%s:trace_loader.py" % revision],
                                   capture_output=True, check=False)
            content, error = found.stdout, ""
            if found.returncode:
                error = found.stderr.decode().strip() or "git show exited with %d" % found.returncode
        if error:
            which = "" if given == revision else "%s: " % revision
            raise SystemExit("bench: BENCH_BASELINE=%s: %s%s" % (given, which, error))
        target = os.path.join(tmp, "baseline-%d" % index, "trace_loader.py")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)
        shared = sum(other[:12] == revision[:12] for other in revisions) > 1
        out.append((revision if shared else revision[:12], target))
    return out


def baseline_variants(python: str, tmp: str) -> list[Variant]:
    """The loader at each $BENCH_BASELINE revision, with -I -S, in the order given."""
    return [Variant("loader@%s -I -S" % name, [python, "-I", "-S", path, "{config}", "/bin/true"], "Polling")
            for name, path in baseline_loaders(tmp)]


def variants(python: str, tmp: str) -> list[Variant]:
    out = []
    for flags, suffix in (([], ""), (["-I", "-S"], " -I -S")):
        out.append(Variant("loader" + suffix, [python, *flags, LOADER, "{config}", "/bin/true"], "Polling"))
        out.append(Variant("bare" + suffix, [python, *flags, "-c", BARE, "{port}"]))
    out.insert(3, Variant("loader.pyc -I -S", [python, "-I", "-S", compiled_loader(python, tmp), "{config}",
                                                "/bin/true"], "Polling"))
    out[4:4] = baseline_variants(python, tmp)
    ssa = shutil.which("systemd-socket-activate")
    if ssa:
        out.append(Variant("ssa", [ssa, "-l", "127.0.0.1:{port}", "/bin/true"]))
    return out


def accepts(port: int) -> bool:
    """A connect succeeds (for the loader: one probe, absorbed)."""
    try:
        socket.create_connection(("127.0.0.1", port)).close()
    except ConnectionRefusedError:
        return False
    return True


def spawn(variant: Variant, tmp: str, env: dict[str, str], *,
          timed: bool = False) -> tuple[subprocess.Popen[bytes], int, float]:
    """Start a variant; `timed`: measure until its port accepts a connection."""
    port = free_port()
    config = os.path.join(tmp, "dd-%d.yaml" % port)
    with open(config, "w") as f:
        f.write(CONFIG.format(port=port, sock="''", level="info"))
    argv = [a.replace("{config}", config).replace("{port}", str(port)) for a in variant.argv]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    while not (accepts(port) if timed else listening(port)):
        if proc.poll() is not None:
            raise RuntimeError("%s ended: %r" % (variant.name, proc.stderr.read() if proc.stderr else ""))
        time.sleep(0.0002 if timed else 0.005)
    elapsed = time.perf_counter() - start
    if variant.ready_line:
        wait_line(proc, variant.ready_line)
    return proc, port, elapsed


def wait_line(proc: subprocess.Popen[bytes], text: str, timeout: float = 20.0) -> str:
    """Read stderr until `text` shows; what was read (the log so far)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while text.encode() not in buf:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError("no %r from %r" % (text, proc.args))
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            raise RuntimeError("%r ended before %r: %r" % (proc.args, text, buf.decode(errors="replace")))
        buf += chunk
    return buf.decode(errors="replace")


def settle(pid: int) -> None:
    """Until the process has used no CPU for 50 ms: it sleeps in poll()."""
    last = cpu_ns(pid)
    while True:
        time.sleep(0.05)
        now = cpu_ns(pid)
        if now == last:
            return
        last = now


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stderr:
        proc.stderr.close()


# ---------------------------------------------------------------------------
# 1-3: memory, start-up, idle wake-ups
# ---------------------------------------------------------------------------


def bench_idle(python: str, tmp: str, runs: int, env: dict[str, str]) -> dict[str, dict[str, Stats]]:
    results: dict[str, dict[str, Stats]] = {}
    rss: dict[str, dict[str, list[float]]] = {}
    startup: dict[str, list[float]] = {}
    chosen = variants(python, tmp)
    for _ in range(runs):
        # Each variant in turn within a run, so that a busy moment of the machine weighs on all alike.
        for variant in chosen:
            # Memory of an untouched waiter (no connection: one would start
            # systemd-socket-activate's child), then start-up in a run of its own.
            proc, _, _ = spawn(variant, tmp, env)
            settle(proc.pid)
            status = proc_status(proc.pid)
            for key in ("VmRSS", "RssAnon", "RssFile"):
                rss.setdefault(variant.name, {}).setdefault(key, []).append(status[key])
            stop(proc)
            proc, _, elapsed = spawn(variant, tmp, env, timed=True)
            startup.setdefault(variant.name, []).append(elapsed * 1000)
            stop(proc)
    for name, figures in rss.items():
        results[name] = {**{k: stats(v) for k, v in figures.items()}, "startup_ms": stats(startup[name])}
    # Wake-ups: three of each at once, one 5 s window for all.
    running = [(variant.name, *spawn(variant, tmp, env)[:2]) for variant in chosen for _ in range(3)]
    for _, proc, _ in running:
        settle(proc.pid)
    before = {proc.pid: proc_status(proc.pid) for _, proc, _ in running}
    time.sleep(5.0)
    switches: dict[str, list[float]] = {}
    for name, proc, _ in running:
        after = proc_status(proc.pid)
        count = sum(after[k] - before[proc.pid][k] for k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        switches.setdefault(name, []).append(count)
        stop(proc)
    for name, values in switches.items():
        results[name]["idle_wakeups_5s"] = stats(values)
    return results


# ---------------------------------------------------------------------------
# 4: probe cost
# ---------------------------------------------------------------------------


def probe(port: int, rst: bool) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0 if rst else 1))
    s.close()


def accept_queue_empty(pid: int) -> bool:
    return len(os.listdir("/proc/%d/fd" % pid)) <= 4  # 0-2 and the listener: no client held


def bench_probes(python: str, tmp: str, runs: int, env: dict[str, str], count: int = 5000) -> dict[str, Stats]:
    """CPU per absorbed probe of the loader, each baseline and the floor, all running at once and probed in turn,
    so that whatever else the machine does weighs on each alike; and the loader's CPU over the floor's, per run."""
    loader = Variant("loader -I -S", [python, "-I", "-S", LOADER, "{config}", "/bin/true"], "Polling")
    floor = Variant("floor -I -S", [python, "-I", "-S", "-c", FLOOR, "{port}"])
    contenders = [loader, *baseline_variants(python, tmp), floor]
    cpu: dict[str, list[float]] = {variant.name: [] for variant in contenders}
    rate: dict[str, list[float]] = {variant.name: [] for variant in contenders}
    for _ in range(runs):
        for name, (used, per_s) in probe_side_by_side(contenders, tmp, env, count).items():
            cpu[name].append(used)
            rate[name].append(per_s)
    out: dict[str, Stats] = {}
    for variant in contenders:
        out["%s: cpu_us_per_probe" % variant.name] = stats(cpu[variant.name])
        out["%s: probes_per_s" % variant.name] = stats(rate[variant.name])
    for variant in contenders[:-1]:
        out["%s / floor: CPU ratio" % variant.name] = stats(
            [a / b for a, b in zip(cpu[variant.name], cpu[floor.name])])
    return out


def probe_side_by_side(contenders: list[Variant], tmp: str, env: dict[str, str],
                       count: int) -> dict[str, tuple[float, float]]:
    """One run: {name: (CPU us per probe, probes per s)}, every contender probed in turn, `count` probes each."""
    running = [(variant.name, *spawn(variant, tmp, env)[:2]) for variant in contenders]
    for _, proc, _ in running:
        # All on one CPU: whatever else the machine runs there weighs on each alike (far less spread).
        os.sched_setaffinity(proc.pid, {max(os.sched_getaffinity(0))})
        settle(proc.pid)
    before = {name: cpu_ns(proc.pid) for name, proc, _ in running}
    spent = {name: 0.0 for name, _, _ in running}
    for i in range(count):
        turn = i % len(running)  # each contender first as often as the others
        for name, _, port in running[turn:] + running[:turn]:
            start = time.perf_counter()
            probe(port, rst=bool(i % 2))
            spent[name] += time.perf_counter() - start
    out = {}
    for name, proc, _ in running:
        while not accept_queue_empty(proc.pid):
            time.sleep(0.001)
        settle(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError("%s ended during the probe run" % name)
        out[name] = ((cpu_ns(proc.pid) - before[name]) / count / 1000.0, count / spent[name])
        stop(proc)
    return out


# ---------------------------------------------------------------------------
# 5: wake latency; 6: burst
# ---------------------------------------------------------------------------


def request(sock: socket.socket, start: float) -> float:
    """Send a request; seconds from `start` until the first response byte."""
    sock.sendall(b"PUT /v0.4/traces HTTP/1.0\r\nContent-Length: 2\r\n\r\n[]")
    if not sock.recv(1):
        raise RuntimeError("no answer")
    return time.perf_counter() - start


def bench_latency(python: str, tmp: str, runs: int, env: dict[str, str]) -> dict[str, Stats]:
    via_loader: list[float] = []
    warm: list[float] = []
    cold: list[float] = []
    # The agent runs on the benchmark's own interpreter: like the real (Go)
    # trace-agent, a binary other than the loader's, so pages the loader gave
    # back are not ones the agent needs at once.
    agent = [sys.executable, "-I", "-S", AGENT]
    for _ in range(runs):
        # (a) through the loader: connect+send wakes it, the agent answers.
        port = free_port()
        config = os.path.join(tmp, "lat-%d.yaml" % port)
        with open(config, "w") as f:
            f.write(CONFIG.format(port=port, sock="''", level="info"))
        proc = subprocess.Popen([python, "-I", "-S", LOADER, config, *agent], env=env, stdin=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_line(proc, "Polling")
        settle(proc.pid)
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as c:
            via_loader.append(request(c, start) * 1000)
        stop(proc)
        # (b) the agent started directly, already listening; (c) started at the connect.
        for bucket, started_first in ((warm, True), (cold, False)):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            agent_env = dict(env, DD_APM_NET_RECEIVER_FD=str(listener.fileno()))

            def start_agent() -> subprocess.Popen[bytes]:
                return subprocess.Popen(agent, env=agent_env, pass_fds=(listener.fileno(),),  # noqa: B023
                                        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

            if started_first:
                proc = start_agent()
                wait_line(proc, "serving")
                start = time.perf_counter()
                with socket.create_connection(listener.getsockname()) as c:
                    bucket.append(request(c, start) * 1000)
            else:
                # The fair peer for lazy start: the clock runs from the connect,
                # through fork and exec of the agent, to its first byte.
                start = time.perf_counter()
                with socket.create_connection(listener.getsockname()) as c:
                    proc = start_agent()
                    bucket.append(request(c, start) * 1000)
            stop(proc)
            listener.close()
    return {"via_loader_ms": stats(via_loader), "agent_listening_ms": stats(warm),
            "agent_started_at_connect_ms": stats(cold)}


def bench_burst(python: str, tmp: str, runs: int, env: dict[str, str], clients: int = 1000) -> dict[str, Stats]:
    answered: list[float] = []
    last: list[float] = []
    for _ in range(runs):
        port = free_port()
        config = os.path.join(tmp, "burst-%d.yaml" % port)
        with open(config, "w") as f:
            f.write(CONFIG.format(port=port, sock="''", level="info"))
        proc = subprocess.Popen([python, "-I", "-S", LOADER, config, sys.executable, "-I", "-S", AGENT], env=env,
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_line(proc, "Polling")
        start = time.perf_counter()
        socks = []
        for i in range(clients):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"PUT /c%d HTTP/1.0\r\nContent-Length: 0\r\n\r\n" % i)
            socks.append(s)
        spread = time.perf_counter() - start
        done, finish = 0, start
        for s in socks:
            s.settimeout(30)
            try:
                if s.recv(16).startswith(b"HTTP/1.0 200"):
                    done += 1
                    finish = time.perf_counter()
            except OSError:
                pass
            s.close()
        answered.append(done)
        last.append((finish - start) * 1000)
        stop(proc)
        if spread > 0.5:
            print("note: the %d connects took %.0f ms on this machine" % (clients, spread * 1000), file=sys.stderr)
    return {"answered_of_%d" % clients: stats(answered), "last_answer_ms": stats(last)}


# ---------------------------------------------------------------------------
# 7: relay throughput; 8: hold-timeout wake
# ---------------------------------------------------------------------------

MB = 1 << 20  # MB/s below are MiB/s


def start_generic(python: str, env: dict[str, str], server_args: list[str], *, script: str = SERVER,
                  hold_timeout_ms: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """The loader in generic mode in front of `script` (SERVER), relaying the held client, waiting: it and its port."""
    argv = [python, "-I", "-S", LOADER, "--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe",
            "--held-client", "relay"]
    if hold_timeout_ms is not None:
        argv += ["--hold-timeout", str(hold_timeout_ms)]
    proc = subprocess.Popen([*argv, "--", sys.executable, "-I", "-S", "-c", script, *server_args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = wait_line(proc, "Polling")
    found = PORT_LINE.search(log)
    if not found:
        stop(proc)
        raise RuntimeError("no bound port in the loader's log: %r" % log)
    settle(proc.pid)
    return proc, int(found.group(1))


def start_server(listener: socket.socket, env: dict[str, str], server_args: list[str]) -> subprocess.Popen[bytes]:
    """SERVER started directly on `listener`, the systemd way: a shell moves it to fd 3 and
    sets LISTEN_PID to its own pid, which `exec` hands on to the server."""
    fd = listener.fileno()
    move = "" if fd == 3 else " 3<&%d %d<&-" % (fd, fd)
    script = 'LISTEN_FDS=1 LISTEN_PID=$$; export LISTEN_FDS LISTEN_PID; exec "$@"' + move
    return subprocess.Popen(["/bin/sh", "-c", script, "sh", sys.executable, "-I", "-S", "-c", SERVER, *server_args],
                            env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


def call(sock: socket.socket, op: bytes, size: int, buf: memoryview) -> float:
    """One SERVER request (upload U, download D, ping P): seconds until its last byte is in."""
    start = time.perf_counter()
    sock.sendall(struct.pack("!cQ", op, size))
    left = size
    while op == b"U" and left:
        chunk = min(left, len(buf))
        sock.sendall(buf[:chunk])
        left -= chunk
    while op == b"D" and left:
        got = sock.recv_into(buf, min(left, len(buf)))
        if not got:
            raise RuntimeError("the download ended %d bytes short" % left)
        left -= got
    if op != b"D" and sock.recv(1) != (b"K" if op == b"U" else b"P"):
        raise RuntimeError("no answer to %r" % op)
    return time.perf_counter() - start


def process_cpu_ns(pid: int) -> int:
    """CPU time of all of a process's threads so far."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
            total += int(f.read().split()[0])
    return total


def ended(pid: int, timeout: float) -> bool:
    """The process exits (or is a zombie nobody reaps) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


HTTP_REQUEST = (b"PUT /v0.4/traces HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\n\r\n[]")
CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\d+)", re.I | re.M)


def http_call(sock: socket.socket) -> float:
    """One keep-alive HTTP_REQUEST to HTTP_SERVER: seconds until the whole response is in."""
    start = time.perf_counter()
    sock.sendall(HTTP_REQUEST)
    data = b""
    while True:
        more = sock.recv(65536)
        if not more:
            raise RuntimeError("the HTTP server closed the connection: %r" % data)
        data += more
        head, blank, body = data.partition(b"\r\n\r\n")
        found = CONTENT_LENGTH.search(head) if blank else None
        if found and len(body) >= int(found.group(1)):
            break
    if not data.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError("unexpected HTTP response: %r" % data)
    return time.perf_counter() - start


def round_trips(relayed: socket.socket, direct: socket.socket, one: Callable[[socket.socket], float], count: int, *,
                relayed_first: bool) -> dict[str, float]:
    """Median seconds of `count` round trips on each connection, the two back to back."""
    pair = [("relayed", relayed), ("direct", direct)][::1 if relayed_first else -1]
    medians = {name: stats([one(sock) for _ in range(count)])["median"] for name, sock in pair}
    return {name: medians[name] for name in ("relayed", "direct")}


def relay_through_loader(python: str, env: dict[str, str], script: str,
                         wake: Callable[[socket.socket], float]) -> tuple[subprocess.Popen[bytes], socket.socket,
                                                                            socket.socket, int]:
    """The loader in front of the server `script`, woken by `wake` on a first connection, which the helper
    relays; then a direct connection to the same server (after the wake the port is the server's own listener):
    the loader, the relayed and the direct connection, and the helper's pid."""
    proc, port = start_generic(python, env, [], script=script)
    relayed = socket.create_connection(("127.0.0.1", port))
    relayed.settimeout(60)
    wake(relayed)
    log = wait_line(proc, "through helper pid")
    found = HELPER_LINE.search(log)
    if not found:
        raise RuntimeError("no helper pid in the loader's relay line: %r" % log)
    direct = socket.create_connection(("127.0.0.1", port))
    direct.settimeout(60)
    wake(direct)
    return proc, relayed, direct, int(found.group(1))


def bench_relay(python: str, runs: int, env: dict[str, str], size: int = 256 * MB, pings: int = 2000,
                requests: int = 2000) -> dict[str, Stats]:
    rates: dict[str, list[float]] = {}
    helper_cpu: list[float] = []
    buf = memoryview(bytearray(MB))

    def ping(sock: socket.socket) -> float:
        return call(sock, b"P", 0, buf)

    # Everything on one CPU, the benchmark included (the loader, its helper and the servers inherit it):
    # the relay's cost is wake-ups, and a second core that other work may take or leave would decide them.
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(mine)})
    try:
        for run in range(runs):
            # The round trip to a server that does no work (the floor: the two extra loopback hops and their
            # wake-ups are all there is), and to http.server answering a keep-alive request, each relayed vs.
            # direct, who goes first alternating per run.
            for what, script, one, count in (("ping", SERVER, ping, pings), ("HTTP", HTTP_SERVER, http_call, requests)):
                proc, relayed, direct, helper = relay_through_loader(python, env, script, one)
                with relayed, direct:
                    trips = round_trips(relayed, direct, one, count, relayed_first=not run % 2)
                    for name, value in trips.items():
                        rates.setdefault("%s round trip %s us" % (what, name), []).append(value * 1e6)
                    rates.setdefault("%s added round trip / direct" % what, []).append(
                        trips["relayed"] / trips["direct"] - 1)
                    if what == "ping":
                        before = process_cpu_ns(helper)
                        for op, direction in ((b"U", "upload"), (b"D", "download")):
                            pair = [("relayed", relayed), ("direct", direct)][::-1 if run % 2 else 1]
                            seconds = {name: call(sock, op, size, buf) for name, sock in pair}
                            for name in ("relayed", "direct"):
                                rates.setdefault("%s %s MB/s" % (direction, name), []).append(
                                    size / MB / seconds[name])
                            rates.setdefault("%s relayed/direct" % direction, []).append(
                                seconds["direct"] / seconds["relayed"])
                        helper_cpu.append((process_cpu_ns(helper) - before) / 1e9 / (2 * size / 1e9))
                if not ended(helper, 5.0):
                    print("note: relay helper pid %d still running 5 s after its client closed" % helper,
                          file=sys.stderr)
                stop(proc)
    finally:
        os.sched_setaffinity(0, mine)
    out = {key: stats(values) for key, values in rates.items()}
    out["helper CPU s per GB relayed"] = stats(helper_cpu)
    return out


def first_byte(sock: socket.socket, start: float) -> float:
    """Seconds from `start` until the server's first byte (it speaks first)."""
    sock.settimeout(10)
    if not sock.recv(1):
        raise RuntimeError("no banner")
    return time.perf_counter() - start


def bench_hold(python: str, runs: int, env: dict[str, str], timeout_ms: int = 200) -> dict[str, Stats]:
    via_loader: list[float] = []
    warm: list[float] = []
    cold: list[float] = []
    for _ in range(runs):
        # (a) through the loader: a silent client is held until the timeout, then relayed.
        proc, port = start_generic(python, env, ["banner"], hold_timeout_ms=timeout_ms)
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as c:
            via_loader.append((first_byte(c, start) - timeout_ms / 1000) * 1000)
        stop(proc)
        # (b) the server started directly, already serving; (c) started at the connect.
        for bucket, started_first in ((warm, True), (cold, False)):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            address = listener.getsockname()
            if started_first:
                proc = start_server(listener, env, ["banner"])
                with socket.create_connection(address) as c:
                    first_byte(c, 0.0)  # it serves
                start = time.perf_counter()
                with socket.create_connection(address) as c:
                    bucket.append(first_byte(c, start) * 1000)
            else:
                start = time.perf_counter()
                with socket.create_connection(address) as c:
                    proc = start_server(listener, env, ["banner"])
                    bucket.append(first_byte(c, start) * 1000)
            stop(proc)
            listener.close()
    return {"via loader, less %d ms: ms" % timeout_ms: stats(via_loader), "server listening: ms": stats(warm),
            "server started at connect: ms": stats(cold)}


# ---------------------------------------------------------------------------
# 10: back to sleep
# ---------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def program_pids(loader: int) -> list[int]:
    """The loader's children but the relay helper (a fork of the loader: its command line names it)."""
    with open("/proc/%d/task/%d/children" % (loader, loader)) as f:
        pids = [int(pid) for pid in f.read().split()]
    found = []
    for pid in pids:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            if b"trace_loader" not in f.read():
                found.append(pid)
    return found


def bench_sleep(python: str, env: dict[str, str], cycles: int = 5, idle_s: int = 1) -> dict[str, Stats]:
    argv = [python, "-I", "-S", LOADER, "--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe",
            "--stop-when-idle", str(idle_s), "--", sys.executable, "-I", "-S", "-c", SERVER]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    found = PORT_LINE.search(wait_line(proc, "Polling"))
    assert found, "no bound port in the loader's log"
    settle(proc.pid)
    first_rss, first_fds = proc_status(proc.pid)["VmRSS"], fd_count(proc.pid)
    rss, fds, running, program, delays = [], [], [], [], []
    for _ in range(cycles):
        with socket.create_connection(("127.0.0.1", int(found.group(1)))) as c:
            call(c, b"P", 0, memoryview(bytearray(1)))
            running.append(proc_status(proc.pid)["VmRSS"])
            program.append(sum(proc_status(pid)["VmRSS"] for pid in program_pids(proc.pid)))
        closed = time.perf_counter()
        log = wait_line(proc, "Stopping")
        delays.append((time.perf_counter() - closed - idle_s) * 1000)
        if "Polling" not in log.partition("Stopping")[2]:
            wait_line(proc, "Polling")
        settle(proc.pid)
        rss.append(proc_status(proc.pid)["VmRSS"] / first_rss)
        fds.append(fd_count(proc.pid) / first_fds)
    stop(proc)
    return {"idle RSS after each cycle / first wait": stats(rss), "idle fds after each cycle / first wait": stats(fds),
            "first wait: loader VmRSS kB": stats([first_rss]),
            "program running: loader VmRSS kB": stats(running), "program running: its VmRSS kB": stats(program),
            "SIGTERM after the last close, less %d s: ms" % idle_s: stats(delays)}


# ---------------------------------------------------------------------------
# 9: YAML reader growth
# ---------------------------------------------------------------------------


def loader_module() -> ModuleType:
    """trace_loader.py imported from this checkout (importing it only defines things)."""
    spec = importlib.util.spec_from_file_location("trace_loader", LOADER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def duplicate_keys_yaml(lines: int) -> str:
    """Every key the loader reads, set again and again: each repeat replaces the one before."""
    block = ["apm_config:", "  enabled: true", "  receiver_port: 8126", "  socket_activation:", "    enabled: true",
             "    handle_tcp_probe: true", "bind_host: 127.0.0.1", "log_level: info", "otlp_config:", "  receiver:"]
    return "\n".join((block * (lines // len(block) + 1))[:lines]) + "\n"


def big_datadog_yaml(lines: int) -> str:
    """examples/datadog.yaml, then copies of it indented under keys the loader does not read."""
    with open(EXAMPLE_CONFIG) as f:
        example = f.read().rstrip("\n").split("\n")
    out = list(example)
    while len(out) < lines:
        out.append("unneeded_%d:" % len(out))
        out.extend("  " + line if line else line for line in example if line != "---")
    return "\n".join(out[:lines]) + "\n"


def bench_yaml(pairs: int = 11) -> dict[str, Stats]:
    module = loader_module()
    read: Callable[..., object] = module._read_yaml_subset
    wanted: object = module._KEYS
    out: dict[str, Stats] = {}
    # A duplicate line is a key read in full (~6 us), a skipped line costs a
    # tenth of that: N is smaller there, for about the same time per read.
    for name, make, lines in (("duplicate keys", duplicate_keys_yaml, 20_000),
                              ("datadog.yaml copies", big_datadog_yaml, 100_000)):
        texts = {n: make(n) for n in (lines, 2 * lines)}
        times: dict[int, list[float]] = {n: [] for n in texts}
        for pair in range(pairs):
            # N and 2N back to back, who goes first alternating.
            for n in sorted(texts, reverse=bool(pair % 2)):
                # CPU time, not wall time: the reader is pure CPU in this
                # process, and time spent waiting for a busy core is not its own.
                start = time.process_time()
                read(texts[n], wanted, source="bench-%d.yaml" % n)
                times[n].append((time.process_time() - start) * 1000)
        for n, values in times.items():
            out["%s %dk: CPU ms" % (name, n // 1000)] = stats(values)
        # The best times: noise from the rest of the machine (other processes'
        # cache and memory traffic, a preempted vCPU) only ever adds, and many
        # short reads give each size a quiet moment.
        out["%s: t(2N)/t(N)" % name] = stats([min(times[2 * lines]) / min(times[lines])])
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def pick_python(argv: list[str]) -> tuple[str, str]:
    if "--python" in argv:
        return argv[argv.index("--python") + 1], "given with --python"
    # Pages of a binary that another process maps cannot be paged out, so the
    # measured interpreter should not be the one running this script.
    mine = os.path.realpath(sys.executable)
    found = subprocess.run([os.path.join(ROOT, ".ci", "find-pythons")], capture_output=True, text=True,
                           check=False).stdout.split()
    others = [p for p in found if os.path.realpath(p) != mine]
    if others:
        return sorted(others, key=lambda p: [int(x) for x in re.findall(r"\d+", os.path.basename(p))])[-1], \
            "the newest CPython other than the one running the benchmark (shared pages would skew RssFile)"
    return sys.executable, "the one running the benchmark (RssFile may read high: its pages are shared)"


def ratio(a: float, b: float) -> str:
    return "%.2fx" % (a / b) if b else "-"


def print_table(result: dict[str, object]) -> None:
    print("\nmachine: %s; %s %s" % (result["machine"], result["python"], result["python_version"]))
    if "idle" in result:
        print_idle(result)
    print_sections(result)


def print_idle(result: dict[str, object]) -> None:
    idle = result["idle"]
    assert isinstance(idle, dict)
    print("\n1-3. idle footprint (median [min-max] of %s runs; \"loader\": the plain entrypoint, "
          "python3 trace_loader.py, no flags, no .pyc)" % result["runs"])
    # Wide enough for the longest name (loader@<rev> -I -S for a baseline).
    width = max([16, *map(len, idle)])
    line = "%-*s %22s %20s %20s %16s %12s %12s %17s"
    print(line % (width, "", "VmRSS kB", "RssAnon kB", "RssFile kB", "start-up ms", "wake-ups/5s", "RSS vs bare",
                  "start-up vs bare"))
    for name, row in idle.items():
        bare = idle.get("bare -I -S" if "-I -S" in name else "bare", {})
        cells = ["%6d [%d-%d]" % (row[k]["median"], row[k]["min"], row[k]["max"])
                 for k in ("VmRSS", "RssAnon", "RssFile")]
        print(line % (
            width, name, *cells, "%.1f [%.1f-%.1f]" % tuple(row["startup_ms"][k] for k in ("median", "min", "max")),
            "%d" % row["idle_wakeups_5s"]["median"] if "idle_wakeups_5s" in row else "-",
            ratio(row["VmRSS"]["median"], bare["VmRSS"]["median"]) if bare else "-",
            "%+.1f ms" % (row["startup_ms"]["median"] - bare["startup_ms"]["median"]) if bare else "-"))


def print_sections(result: dict[str, object]) -> None:
    headings = {
        "probes": "4. probe cost (log level info, 5,000 probes FIN/RST alternating; floor: the same syscalls in a "
                  "bare Python loop; all running at once, probed in turn)",
        "latency": "5. wake latency: connect+send to first response byte",
        "burst": "6. burst: 1,000 clients before the agent wakes",
        "relay": "7. relay, all on one CPU: the held client relayed by the helper vs. a direct connection to the "
                 "same server after the wake (ratios: per run, back to back). Round trip, median of 2,000 each: "
                 "ping, a server doing no work (the floor: two extra loopback hops, each a wake-up), and "
                 "HTTP, a keep-alive PUT to http.server; throughput: 256 MB each way to the ping server",
        "hold": "8. hold-timeout wake: a silent client, connect to the server's banner (server-first protocol)",
        "yaml": "9. YAML reader growth: CPU time on N and 2N lines, 11 reads of each (ratio of the best times; "
                "linear ~2.0)",
        "sleep": "10. back to sleep: the loader -I -S with --stop-when-idle 1 in front of the relay's server, 5 "
                 "wake/stop cycles (SIGTERM may come up to 100 ms late)",
    }
    for section, heading in headings.items():
        if section not in result:
            continue
        print("\n%s" % heading)
        rows = result[section]
        assert isinstance(rows, dict)
        width = max([36, *map(len, rows)])
        for key, value in rows.items():
            if value["n"] == 1:  # one figure (a ratio of two others)
                print("  %-*s %10.2f" % (width, key, value["median"]))
            else:
                print("  %-*s %10.2f  [%.2f - %.2f]" % (width, key, value["median"], value["min"], value["max"]))
        if section == "latency":
            print("  via loader - agent started at connect: %+.2f ms" % (
                rows["via_loader_ms"]["median"] - rows["agent_started_at_connect_ms"]["median"]))
        if section == "hold":
            overshoot = next(value for key, value in rows.items() if key.startswith("via loader"))
            print("  overshoot via loader - server started at connect: %+.2f ms" % (
                overshoot["median"] - rows["server started at connect: ms"]["median"]))


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    if not os.path.isdir("/proc/self/fd"):
        print("bench: needs Linux /proc", file=sys.stderr)
        return 1
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 5
    python, why = pick_python(argv)
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {
            "machine": "%s, %d cores, %s" % (os.uname().machine, os.cpu_count() or 0, os.uname().release),
            "python": python, "python_why": why,
            "python_version": subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                             capture_output=True, text=True, check=False).stdout.strip(),
            "runs": runs, "baselines": baseline_revisions(),
        }
        sections: dict[str, Callable[[], object]] = {
            "idle": lambda: bench_idle(python, tmp, runs, env),
            "probes": lambda: bench_probes(python, tmp, max(3, runs // 2), env),
            "latency": lambda: bench_latency(python, tmp, runs, env),
            "burst": lambda: bench_burst(python, tmp, max(3, runs // 2), env),
            "relay": lambda: bench_relay(python, max(3, runs // 2), env),
            "hold": lambda: bench_hold(python, runs, env),
            "yaml": bench_yaml,
            "sleep": lambda: bench_sleep(python, env),
        }
        chosen = argv[argv.index("--only") + 1].split(",") if "--only" in argv else list(sections)
        unknown = sorted(set(chosen) - set(sections))
        if unknown:
            print("bench: --only: no section %s (sections: %s)" % (", ".join(unknown), ",".join(sections)),
                  file=sys.stderr)
            return 2
        start = time.monotonic()
        for name in sections:
            if name in chosen:
                result[name] = sections[name]()
        result["seconds"] = round(time.monotonic() - start, 1)
    if "--json" in argv:
        print(json.dumps(result, indent=2))
    else:
        print("measured interpreter: %s (%s)" % (python, why))
        print_table(result)
        print("\n(%s s)" % result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
