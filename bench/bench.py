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

Linux only (it reads /proc). Usage: bench.py [--runs N] [--json] [--python PATH]
"""

from __future__ import annotations

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
from typing import Dict, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADER = os.path.join(ROOT, "trace_loader.py")
AGENT = os.path.join(ROOT, "examples", "demo_agent.py")
BARE = ("import socket, select, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); p = select.poll(); p.register(s, 1); p.poll()")
# The least any Python absorber can do per probe: the loader's syscalls
# (poll, accept, poll, peek, close) with no state machine and no logging.
FLOOR = ("import socket, select, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
         "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(4096); s.setblocking(False); p = select.poll();"
         "p.register(s, 1)\nwhile True:\n p.poll(); c, _ = s.accept(); p.register(c, 1); p.poll()\n"
         " try: c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)\n except OSError: pass\n"
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


def variants(python: str, tmp: str) -> list[Variant]:
    out = []
    for flags, suffix in (([], ""), (["-I", "-S"], " -I -S")):
        out.append(Variant("loader" + suffix, [python, *flags, LOADER, "{config}", "/bin/true"], "Polling"))
        out.append(Variant("bare" + suffix, [python, *flags, "-c", BARE, "{port}"]))
    out.insert(3, Variant("loader.pyc -I -S", [python, "-I", "-S", compiled_loader(python, tmp), "{config}",
                                                "/bin/true"], "Polling"))
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


def wait_line(proc: subprocess.Popen[bytes], text: str, timeout: float = 20.0) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while text.encode() not in buf:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError("no %r from %r" % (text, proc.args))
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            raise RuntimeError("%r ended before %r" % (proc.args, text))
        buf += chunk


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
    for variant in variants(python, tmp):
        rss: dict[str, list[float]] = {"VmRSS": [], "RssAnon": [], "RssFile": []}
        startup = []
        for _ in range(runs):
            # Memory of an untouched waiter (no connection: one would start
            # systemd-socket-activate's child), then start-up in a run of its own.
            proc, _, _ = spawn(variant, tmp, env)
            settle(proc.pid)
            status = proc_status(proc.pid)
            for key in rss:
                rss[key].append(status[key])
            stop(proc)
            proc, _, elapsed = spawn(variant, tmp, env, timed=True)
            startup.append(elapsed * 1000)
            stop(proc)
        results[variant.name] = {**{k: stats(v) for k, v in rss.items()}, "startup_ms": stats(startup)}
    # Wake-ups: three of each at once, one 5 s window for all.
    running = [(variant.name, *spawn(variant, tmp, env)[:2]) for variant in variants(python, tmp)
               for _ in range(3)]
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
    out: dict[str, Stats] = {}
    loader = Variant("loader -I -S", [python, "-I", "-S", LOADER, "{config}", "/bin/true"], "Polling")
    floor = Variant("floor -I -S", [python, "-I", "-S", "-c", FLOOR, "{port}"])
    for variant in (loader, floor):
        cpu, rate = probe_runs(variant, tmp, runs, env, count)
        out["%s: cpu_us_per_probe" % variant.name] = cpu
        out["%s: probes_per_s" % variant.name] = rate
    return out


def probe_runs(variant: Variant, tmp: str, runs: int, env: dict[str, str], count: int) -> tuple[Stats, Stats]:
    cpu: list[float] = []
    rate: list[float] = []
    for _ in range(runs):
        proc, port, _ = spawn(variant, tmp, env)
        settle(proc.pid)
        before = cpu_ns(proc.pid)
        start = time.perf_counter()
        for i in range(count):
            probe(port, rst=bool(i % 2))
        elapsed = time.perf_counter() - start
        while not accept_queue_empty(proc.pid):
            time.sleep(0.001)
        settle(proc.pid)
        cpu.append((cpu_ns(proc.pid) - before) / count / 1000.0)
        rate.append(count / elapsed)
        if proc.poll() is not None:
            raise RuntimeError("%s ended during the probe run" % variant.name)
        stop(proc)
    return stats(cpu), stats(rate)


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
    idle = result["idle"]
    assert isinstance(idle, dict)
    print("\nmachine: %s; %s %s" % (result["machine"], result["python"], result["python_version"]))
    print("\n1-3. idle footprint (median [min-max] of %s runs)" % result["runs"])
    print("%-16s %22s %20s %20s %16s %12s %14s" % ("", "VmRSS kB", "RssAnon kB", "RssFile kB", "start-up ms",
                                                   "wake-ups/5s", "RSS vs bare"))
    for name, row in idle.items():
        bare = idle.get("bare -I -S" if "-I -S" in name else "bare", {})
        cells = ["%6d [%d-%d]" % (row[k]["median"], row[k]["min"], row[k]["max"])
                 for k in ("VmRSS", "RssAnon", "RssFile")]
        print("%-16s %22s %20s %20s %16s %12s %14s" % (
            name, *cells, "%.1f [%.1f-%.1f]" % tuple(row["startup_ms"][k] for k in ("median", "min", "max")),
            "%d" % row["idle_wakeups_5s"]["median"] if "idle_wakeups_5s" in row else "-",
            ratio(row["VmRSS"]["median"], bare["VmRSS"]["median"]) if bare else "-"))
    for section in ("probes", "latency", "burst"):
        print("\n%s" % {"probes": "4. probe cost (log level info, 5,000 probes FIN/RST alternating; floor: the same "
                                  "syscalls in a bare Python loop)",
                        "latency": "5. wake latency: connect+send to first response byte",
                        "burst": "6. burst: 1,000 clients before the agent wakes"}[section])
        rows = result[section]
        assert isinstance(rows, dict)
        for key, value in rows.items():
            print("  %-36s %10.2f  [%.2f - %.2f]" % (key, value["median"], value["min"], value["max"]))
    lat = result["latency"]
    assert isinstance(lat, dict)
    print("  via loader - agent started at connect: %+.2f ms" % (
        lat["via_loader_ms"]["median"] - lat["agent_started_at_connect_ms"]["median"]))


def main(argv: list[str]) -> int:
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
            "runs": runs,
        }
        start = time.monotonic()
        result["idle"] = bench_idle(python, tmp, runs, env)
        result["probes"] = bench_probes(python, tmp, max(3, runs // 2), env)
        result["latency"] = bench_latency(python, tmp, runs, env)
        result["burst"] = bench_burst(python, tmp, max(3, runs // 2), env)
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
