# SPDX-License-Identifier: Apache-2.0
"""Tests for trace_loader.py: real sockets, real subprocesses, a real execve.

The loader runs as `[sys.executable, trace_loader.py, ...]` and execs the
stand-in agent `examples/demo_agent.py`, which adopts the inherited fds,
writes a JSON report of what it inherited, and answers HTTP requests. Tests
synchronise on the loader's log lines (`Proc.wait_for`) and on observable
state (files, the process's cmdline, /proc) through one waiting helper,
`wait_until`; never on bare sleeps. Sockets and processes belong to the
`sockets` and `procs` fixtures, which close and kill them however a test ends.
The harness test_interop.py uses too (`wait_until`, `Proc`, the probes) is in
conftest.py; section 1 holds what only this file needs.

The sections follow the data through the loader, as trace_loader.py does:

     1. Harness: waiting, sockets, processes, the loader in both modes
     2. Configuration: the YAML subset, the environment, Go's integers
     3. Listeners
     4. The wait: the probe check and the hold timeout
     5. Hand-off: fds, variables, the exec and the relay
     6. Command line and usage errors
     7. Drop-in mode: the decision flow
     8. Generic mode: --listen, the systemd and env protocols
     9. Signals
    10. Logging
    11. Hardening: faults and hostile input
    12. The Python API for agents
    13. Back to sleep: stop the program when idle, wait again, supervise it
    14. Footprint
    15. Packaging: the wheel and its `trace-loader` command
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from importlib import metadata

import pytest

import conftest
import trace_loader as tl  # the one import: the suite runs against a renamed copy too
from conftest import LINUX, TIMEOUT, bound_port, connect, kubelet_probe, read_answer, rst_probe, wait_until, wake

LOADER = os.path.abspath(tl.__file__)
HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(HERE, "examples", "demo_agent.py")
FIXTURE = os.path.join(HERE, "examples", "datadog.yaml")
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \| TRACE-LOADER \| (TRACE|DEBUG|INFO|WARN|ERROR|CRITICAL) \| "
    r"\([\w.]+:\d+ in \w+\) \| .+$"
)


# ---------------------------------------------------------------------------
# 1. Harness: waiting, sockets, processes, the loader in both modes
# ---------------------------------------------------------------------------


def text_of(path) -> str | None:
    """The file's text, or None while there is no such file."""
    try:
        with open(str(path)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def free_port() -> int:
    """A loopback port that was free a moment ago; another process may take it first.

    Only where the loader cannot bind port 0 itself: in drop-in mode
    `receiver_port: 0` turns the TCP receiver off, so a drop-in test must
    name a port. Generic mode binds tcp://127.0.0.1:0 and the test reads the
    port from the log (`bound_port`).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sockets:
    """The sockets a test opened through the `sockets` fixture, closed when it ends, pass or fail."""

    def __init__(self) -> None:
        self.opened: list[socket.socket] = []

    def keep(self, sock: socket.socket) -> socket.socket:
        self.opened.append(sock)
        return sock

    def connect(self, port: int, host: str = "127.0.0.1") -> socket.socket:
        return self.keep(connect(port, host))

    def tcp_listener(self) -> socket.socket:
        """A listening TCP socket on a loopback port of its own."""
        s = self.keep(socket.socket())
        s.bind(("127.0.0.1", 0))
        s.listen()
        return s

    def unix_listener(self, path: str) -> socket.socket:
        s = self.keep(socket.socket(socket.AF_UNIX))
        s.bind(path)
        s.listen()
        return s

    def close_all(self) -> None:
        for sock in self.opened:
            sock.close()  # a no-op for one the test closed itself, as part of what it tests


@pytest.fixture
def sockets():
    made = Sockets()
    yield made
    made.close_all()


def http_request(sock: socket.socket, path: str = "/v0.4/traces", body: bytes = b"") -> bytes:
    sock.sendall(b"POST %s HTTP/1.0\r\nHost: agent\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return read_answer(sock)


def answer_json(raw: bytes) -> dict:
    assert raw.startswith(b"HTTP/1.0 200 OK"), raw
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def base_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


class Proc(conftest.Proc):
    """conftest's process wrapper, which can tell whether the loader still runs under its pid."""

    def is_loader(self) -> bool:
        return os.path.basename(LOADER) in self.cmdline()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(argv: list[str], env: dict[str, str], **popen: object) -> Proc:
        proc = Proc(argv, env, **popen)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# A program that only says it started, under which pid (a shell's redirection would need fds above 9).
SAYS_ITS_PID = [sys.executable, "-c", "import os, sys; sys.stderr.write('started as %d\\n' % os.getpid())"]


def signal_dispositions(**dispositions: object):
    """preexec_fn: start the loader with these dispositions, whatever ours are.

    A shell's background job, for one, starts with SIGINT ignored.
    """
    def apply() -> None:
        for name, handler in dispositions.items():
            signal.signal(getattr(signal, name), handler)  # type: ignore[arg-type]
    return apply


def run_loader(args: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT,
               **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LOADER] + args, env=env or base_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def open_fds_of(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc/%d/fd" % pid))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
linux_only = pytest.mark.skipif(not LINUX, reason="Linux kernel behaviour")
CAN_UNSHARE = LINUX and os.geteuid() == 0 and shutil.which("unshare") is not None
needs_unshare = pytest.mark.skipif(not CAN_UNSHARE, reason="needs root and unshare(1) for namespaces")


# The loader in drop-in mode: CONFIG_FILE AGENT [AGENT_ARGS...]


def write_config(tmp_path, text: str = "", *, port: int | None = None, socket_path: str = "",
                 probe: bool = True, activation: bool = True, level: str = "debug", grace: int | None = None,
                 hold: int | None = None) -> str:
    lines = [
        "apm_config:",
        "  receiver_port: %d" % (port if port is not None else 0),
        "  receiver_socket: '%s'" % socket_path,
        "  socket_activation:",
        "    enabled: %s" % ("true" if activation else "false"),
        "    handle_tcp_probe: %s" % ("true" if probe else "false"),
    ]
    if grace is not None:
        lines.append("    probe_grace_period: %d" % grace)
    if hold is not None:
        lines.append("    hold_timeout: %d" % hold)
    lines += ["log_level: %s" % level, "disable_file_logging: true", text]
    path = tmp_path / "datadog.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def agent_argv(report) -> list[str]:
    return [sys.executable, AGENT, "--report", str(report)]


def start_drop_in(procs, config: str, report, env: dict[str, str] | None = None, agent: list[str] | None = None,
                  **popen: object) -> Proc:
    argv = [sys.executable, LOADER, config] + (agent or agent_argv(report))
    return procs(argv, env or base_env(), **popen)


def read_report(report, timeout: float = TIMEOUT) -> dict:
    """The agent's report, once it is there: the agent writes it whole (a rename)."""
    return json.loads(wait_until(lambda: text_of(report), "the agent's report at %s" % report, timeout=timeout))


def loader_and_port(procs, tmp_path, **config: object) -> tuple[Proc, int, object]:
    """A drop-in loader with the probe check, waiting; its port and the agent's report path."""
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port, **config), report)  # type: ignore[arg-type]
    proc.wait_for("Polling")
    return proc, port, report


ABSORBED = r"TCP client closed connection, closing file descriptor \d+ \(peer [^,]+, (FIN|RST)\)"


def hold_one(proc: Proc, port: int) -> socket.socket:
    """Connect a silent client and wait until the loader holds it."""
    before = proc.count("Accepted connection on TCP listener")
    client = connect(port)
    proc.wait_for("Accepted connection on TCP listener", count=before + 1)
    return client


def fails_open(procs, tmp_path, config: str, env: dict[str, str] | None = None) -> tuple[Proc, dict]:
    """Run the loader; the agent must start directly (no fds) under its pid."""
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, config, report, env)
    data = read_report(report)
    assert data["pid"] == proc.pid and data["fds"] == [0, 1, 2], data
    assert "Traceback" not in proc.text()
    return proc, data


def one_warning(proc: Proc, pattern: str) -> str:
    proc.wait_for("demo agent: pid")
    lines = [line for line in proc.text().splitlines() if "| WARN |" in line or "| ERROR |" in line]
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def quiet_log() -> tl._Log:
    log = tl._Log()
    log.configure(level="off", console=False, path=None)
    return log


# The loader in generic mode: --listen ADDRESS... -- PROGRAM [ARGS...]


def start_generic(procs, options: list[str], program: list[str], env: dict[str, str] | None = None,
                  **popen: object) -> Proc:
    return procs([sys.executable, LOADER] + options + ["--"] + program, env or base_env(), **popen)


def systemd_agent(report) -> list[str]:
    return [sys.executable, AGENT, "--systemd", "--report", str(report)]


def launch_with_fds(socks: list[socket.socket], names: str | None, argv: list[str]) -> list[str]:
    """A launcher that puts `socks` on fds 3, 4, ... and sets LISTEN_* for the pid it execs as."""
    fds = [s.fileno() for s in socks]
    code = (
        "import os, sys\n"
        "fds = %r\n"
        "import fcntl\n"
        "copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]\n"
        "for fd in fds: os.set_inheritable(fd, False)\n"
        "for i, c in enumerate(copies): os.dup2(c, 3 + i); os.close(c)\n"
        "os.environ['LISTEN_FDS'] = str(len(fds)); os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "%s"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    ) % (fds, "os.environ['LISTEN_FDNAMES'] = %r\n" % names if names is not None else "")
    return [sys.executable, "-c", code] + argv


def start_relaying(procs, tmp_path, *options: str, agent_options: tuple[str, ...] = (),
                   program: list[str] | None = None, **popen: object) -> tuple[Proc, int, object]:
    """A generic loader on a port of its own with the probe check (and by default the relay), waiting.

    The program is the stand-in agent reporting to tmp_path/report.json, unless `program` is given.
    """
    report = tmp_path / "report.json"
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe", "--log-level", "debug",
                                 *options], program or systemd_agent(report) + list(agent_options), **popen)
    port = bound_port(proc)
    proc.wait_for("Polling")
    return proc, port, report


# ---------------------------------------------------------------------------
# 2. Configuration: the YAML subset, the environment, Go's integers
# ---------------------------------------------------------------------------


def settings_of(tmp_path, text: str, env: dict[str, str] | None = None, *, raw: bool = False) -> tl._DropInSettings:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.encode("utf-8") if not raw else text.encode("latin-1"))
    return tl._load_drop_in_settings(str(path), env or {}, tl._Log())


def fixture_variants():
    with open(FIXTURE, "rb") as f:
        data = f.read()
    return {
        "lf": data,
        "crlf": data.replace(b"\n", b"\r\n"),
        "bom-crlf": b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"),
        "cr": data.replace(b"\n", b"\r"),
    }


@pytest.mark.parametrize("variant", ["lf", "crlf", "bom-crlf", "cr"])
def test_realistic_datadog_yaml_yields_the_right_values(tmp_path, capfd, variant):
    path = tmp_path / "datadog.yaml"
    path.write_bytes(fixture_variants()[variant])
    s = tl._load_drop_in_settings(str(path), {}, tl._Log())
    assert (s.apm_enabled, s.error_tracking, s.socket_activation, s.handle_tcp_probe) == (True, False, True, True)
    assert s.probe_grace_ms == 100  # 0x64
    assert s.receiver_port == 8127  # through an alias
    assert s.receiver_socket == "/var/run/datadog/apm.socket"
    assert (s.bind_host, s.bind_host_reason) == ("127.0.0.1", "bind_host")  # alias to a top-level anchor
    assert (s.otlp_enabled, s.otlp_port) == (True, 5004)
    assert (s.log_level, s.log_to_console, s.log_file) == ("debug", True, None)
    # `disable_file_logging: yes` is YAML 1.1: accepted, with a warning naming line and key.
    assert "datadog.yaml:126: disable_file_logging: 'yes' is read as a boolean (YAML 1.1)" in capfd.readouterr().err


def test_environment_overrides_the_file(tmp_path):
    path = tmp_path / "datadog.yaml"
    path.write_bytes(fixture_variants()["lf"])
    env = {
        "DD_APM_RECEIVER_PORT": "9126", "DD_RECEIVER_PORT": "7126",  # the first name wins
        "DD_APM_RECEIVER_SOCKET": "/tmp/x.sock",
        "DD_APM_SOCKET_ACTIVATION_HANDLE_TCP_PROBE": "F",
        "DD_APM_SOCKET_ACTIVATION_PROBE_GRACE_PERIOD": "0",
        "DD_BIND_HOST": "",  # empty counts as unset: the file's value stays
        "DD_APM_NON_LOCAL_TRAFFIC": "1",
        "DD_OTLP_CONFIG_TRACES_INTERNAL_PORT": " 0x1fbe ",
        "DD_LOG_LEVEL": "warn",
        "DD_LOG_TO_CONSOLE": "FALSE",
        "DD_DISABLE_FILE_LOGGING": "false",
        "DD_APM_LOG_FILE": "/tmp/tl.log",
    }
    s = tl._load_drop_in_settings(str(path), env, tl._Log())
    assert s.receiver_port == 9126
    assert s.receiver_socket == "/tmp/x.sock"
    assert s.handle_tcp_probe is False
    assert s.probe_grace_ms == 0
    assert s.bind_host == "0.0.0.0"  # apm_non_local_traffic wins over bind_host
    assert s.otlp_port == 8126
    assert (s.log_level, s.log_to_console, s.log_file) == ("warn", False, "/tmp/tl.log")


def test_defaults_when_the_file_is_empty(tmp_path):
    s = settings_of(tmp_path, "")
    assert (s.apm_enabled, s.socket_activation, s.handle_tcp_probe) == (True, False, False)
    assert (s.receiver_port, s.bind_host, s.otlp_enabled, s.otlp_port) == (8126, "localhost", False, 5003)
    assert s.probe_grace_ms == 250
    assert s.receiver_socket == ("/var/run/datadog/apm.socket" if LINUX else "")
    assert s.log_file == ("/var/log/datadog/trace-agent.log" if sys.platform != "darwin"
                          else "/opt/datadog-agent/logs/trace-agent.log")


def test_docker_dd_agent_listens_on_all_interfaces_unless_bind_host_is_set(tmp_path):
    assert settings_of(tmp_path, "", {"DOCKER_DD_AGENT": "true"}).bind_host == "0.0.0.0"
    assert settings_of(tmp_path, "bind_host: 10.1.2.3\n", {"DOCKER_DD_AGENT": "true"}).bind_host == "10.1.2.3"
    assert settings_of(tmp_path, "apm_config:\n  apm_non_local_traffic: false\n",
                       {"DOCKER_DD_AGENT": "yes"}).bind_host == "localhost"


def test_otlp_is_on_with_an_empty_receiver_key_or_any_receiver_variable(tmp_path):
    assert settings_of(tmp_path, "otlp_config:\n  receiver:\n").otlp_enabled is True
    assert settings_of(tmp_path, "otlp_config:\n  traces:\n    internal_port: 1\n").otlp_enabled is False
    env = {"DD_OTLP_CONFIG_RECEIVER_PROTOCOLS_GRPC_ENDPOINT": "0.0.0.0:4317"}
    assert settings_of(tmp_path, "", env).otlp_enabled is True
    assert settings_of(tmp_path, "", {"DD_OTLP_CONFIG_RECEIVER_PROTOCOLS_GRPC_ENDPOINT": ""}).otlp_enabled is False


@pytest.mark.parametrize("text, expected", [
    ("8126", 8126), (" 8126 ", 8126), ("0x1fbe", 8126), ("0X1FBE", 8126), ("017676", 8126),
    ("0o17676", 8126), ("0b1111110111110", 8126), ("8_126", 8126), ("+8126", 8126), ("-1", -1),
])
def test_integers_read_like_go_parseint(text, expected):
    assert tl._go_int(text, "X") == expected


@pytest.mark.parametrize("text", ["", " ", "8126.0", "1e3", "0x", "eighty", "8126a", "\u0668\u0661", "_1",
                                  "99999999999999999999", "0x" + "f" * 100])
def test_bad_integers_are_errors_naming_the_value(text):
    with pytest.raises(tl._ConfigError) as info:
        tl._go_int(text, "DD_APM_RECEIVER_PORT")
    assert str(info.value).startswith("DD_APM_RECEIVER_PORT: ")


# Go's strconv.ParseInt(strings.TrimSpace(s), 0, 64): its answers, value or error.
GO_PARSEINT = [
    ("8126", 8126), ("+8126", 8126), ("-8126", -8126), (" 8126\t\n", 8126), ("\u30008126\u2028", 8126),
    ("\x1c8126", None), ("--8126", None), ("- 8126", None), ("+-8126", None), ("-+8126", None), ("++1", None),
    ("", None), ("+", None), ("-", None), ("0", 0), ("-0", 0), ("00", 0), ("017", 15), ("08", None),
    ("0x1fbe", 8126), ("0X1FBE", 8126), ("-0x10", -16), ("0x", None), ("0o17", 15), ("0O17", 15), ("0o", None),
    ("0b101", 5), ("0B101", 5), ("0b2", None), ("0b", None), ("1_000", 1000), ("1__000", None), ("_1000", None),
    ("1000_", None), ("0x_1f", 31), ("0_17", 15), ("0_x1f", None), ("1_0x", None), ("1e3", None), ("8126.0", None),
    ("\u0663", None), ("\uff18", None), ("9223372036854775807", 2**63 - 1), ("9223372036854775808", "range"),
    ("-9223372036854775808", -(2**63)), ("-9223372036854775809", "range"), ("0x7fffffffffffffff", 2**63 - 1),
    ("0x8000000000000000", "range"), ("9" * 100_000, "range"),
]


@pytest.mark.parametrize("text, expected", GO_PARSEINT)
def test_integers_are_exactly_go_parseint(text, expected):
    if isinstance(expected, int):
        assert tl._go_int(text, "K") == expected
    else:
        with pytest.raises(tl.LoaderError, match="out of range" if expected == "range" else "is not an integer"):
            tl._go_int(text, "K")


@pytest.mark.parametrize("value, port", [("-1", -1), ("'8126 '", 8126), ("0x1fbe", 8126), ('"0"', 0)])
def test_port_spellings(tmp_path, value, port):
    s = settings_of(tmp_path, "apm_config:\n  receiver_port: %s\n" % value)
    assert s.receiver_port == port


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True),
    ("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False), ("False", False),
])
def test_environment_booleans_read_like_go_parsebool(tmp_path, text, expected):
    assert settings_of(tmp_path, "", {"DD_APM_SOCKET_ACTIVATION_ENABLED": text}).socket_activation is expected


@pytest.mark.parametrize("text", ["yes", "on", "TrUe", " true", "2", "enabled"])
def test_bad_environment_booleans_name_the_variable(tmp_path, text):
    with pytest.raises(tl._ConfigError) as info:
        settings_of(tmp_path, "", {"DD_APM_SOCKET_ACTIVATION_ENABLED": text})
    assert str(info.value) == "DD_APM_SOCKET_ACTIVATION_ENABLED: %r is not a boolean (use true or false)" % text


@pytest.mark.parametrize("text, expected", [("TRUE", True), ("False", False), ("on", True), ("OFF", False),
                                            ("'t'", True), ('"0"', False), ("1", True)])
def test_file_booleans(tmp_path, text, expected):
    s = settings_of(tmp_path, "apm_config:\n  socket_activation:\n    enabled: %s\n" % text)
    assert s.socket_activation is expected


# Garbage, and how the one line that names it shows it: quoted, escaped, cut short past 64 characters.
GARBAGE = {"garbage": "%%$#@!", "whitespace": " \t ", "long": "x" * 100_000, "non-ascii": "\u0668\u0661\u00e9\u2603"}
GARBAGE_SHOWN = {"garbage": "'%%$#@!'", "whitespace": "' \\t '", "long": "'%s'... (100000 characters)" % ("x" * 64),
                 "non-ascii": "'\u0668\u0661\u00e9\u2603'"}

# Every variable of the README's Configuration table: where the loader stops
# on garbage in it, and the line that says so ({name}: the variable, {value}:
# the garbage as shown).
NOT_A_BOOLEAN = r"{name}: {value} is not a boolean \(use true or false\)"
NOT_AN_INTEGER = r"{name}: {value} is not an integer"
GARBAGE_IN_THE_ENVIRONMENT = [
    ("DD_APM_ENABLED", "settings", NOT_A_BOOLEAN),
    ("DD_APM_ERROR_TRACKING_STANDALONE_ENABLED", "settings", NOT_A_BOOLEAN),
    ("DD_APM_LOG_FILE", "nowhere", ""),  # a log file that cannot be opened costs a warning, not the activation
    ("DD_APM_NON_LOCAL_TRAFFIC", "settings", NOT_A_BOOLEAN),
    ("DD_APM_RECEIVER_PORT", "settings", NOT_AN_INTEGER),
    ("DD_APM_RECEIVER_SOCKET", "unix listener", r"unix socket path {value} is not absolute"),
    ("DD_APM_SOCKET_ACTIVATION_ENABLED", "settings", NOT_A_BOOLEAN),
    ("DD_APM_SOCKET_ACTIVATION_HANDLE_TCP_PROBE", "settings", NOT_A_BOOLEAN),
    ("DD_APM_SOCKET_ACTIVATION_PROBE_GRACE_PERIOD", "settings", NOT_AN_INTEGER),
    ("DD_BIND_HOST", "TCP listener", r"cannot (resolve bind host {value}|listen on .*): .*"),
    ("DD_DISABLE_FILE_LOGGING", "settings", NOT_A_BOOLEAN),
    ("DD_LOG_LEVEL", "settings",
     r"{name}: {value} is not a log level \(trace, debug, info, warn, error, critical, off\)"),
    ("DD_LOG_TO_CONSOLE", "settings", NOT_A_BOOLEAN),
    ("DD_OTLP_CONFIG_RECEIVER_PROTOCOLS_GRPC_ENDPOINT", "nowhere", ""),  # only its presence counts
    ("DD_OTLP_CONFIG_TRACES_INTERNAL_PORT", "settings", NOT_AN_INTEGER),
    ("DD_RECEIVER_PORT", "settings", NOT_AN_INTEGER),
]


def where_the_loader_stops(tmp_path, environ: dict[str, str]) -> tuple[str, str]:
    """Read the settings, then open the listeners they name, as the loader does: where it stops, and why.

    ("nowhere", "") when every step succeeds.
    """
    config = tmp_path / "datadog.yaml"
    config.write_text("apm_config:\n  socket_activation:\n    enabled: true\n  receiver_socket: ''\n"
                      "otlp_config:\n  traces:\n    internal_port: 1\n")
    try:
        s = tl._load_drop_in_settings(str(config), environ, tl._Log())
    except tl._ConfigError as exc:
        return "settings", str(exc)
    try:
        # '' in the file: only the variable can turn the unix receiver on.
        unix = tl._open_unix_listener(s.receiver_socket, 0o722, quiet_log()) if s.receiver_socket else None
    except tl._ListenerError as exc:
        return "unix listener", str(exc)
    if unix is not None:  # None: its directory is missing, a skip
        unix.close()
    try:
        tl._open_tcp_listener(s.bind_host, 0).close()
    except tl._ListenerError as exc:
        return "TCP listener", str(exc)
    return "nowhere", ""


@pytest.mark.parametrize("kind", sorted(GARBAGE))
@pytest.mark.parametrize("name, stops_at, message", GARBAGE_IN_THE_ENVIRONMENT,
                         ids=[name for name, _, _ in GARBAGE_IN_THE_ENVIRONMENT])
def test_garbage_in_each_environment_variable(tmp_path, name, stops_at, message, kind):
    where, text = where_the_loader_stops(tmp_path, {name: GARBAGE[kind]})
    assert where == stops_at, text
    # The one line names the variable and shows the value, cut short.
    assert re.fullmatch(message.format(name=name, value=re.escape(GARBAGE_SHOWN[kind])), text), text
    assert len(text) < 200


@pytest.mark.parametrize("value, message", [
    ("[8126]", "holds a flow collection ([...); expected a single value"),
    ("{a: 1}", "holds a flow collection ({...); expected a single value"),
    ("|\n    8126", "holds a multi-line string (|); expected a single value"),
    ("\n    - 8126", "holds a list; expected a single value"),
    ("\n    port: 8126", "holds a mapping; expected a single value"),
    ("*nowhere", "holds an alias (*nowhere) to an anchor this reader does not follow; expected a single value"),
    ("!!int 8126", "holds a tagged value (!!int); expected a single value"),
    ("8126\n    9126", "holds a value continued on the next line; expected a single value"),
    ('"8126', "holds a quoted string that does not end on its line, or text after it; expected a single value"),
    ("eighty", "'eighty' is not an integer"),
    ("99999999999999999999", "'99999999999999999999' is out of range for a 64-bit integer"),
    ("70000", "port 70000 is out of range (1-65535)"),
])
def test_a_needed_key_holding_something_unreadable_names_line_and_key(tmp_path, value, message):
    with pytest.raises(tl._ConfigError) as info:
        settings_of(tmp_path, "# comment\napm_config:\n  receiver_port: %s\n" % value)
    text = str(info.value)
    assert text.endswith("apm_config.receiver_port: " + message), text
    if "out of range (1-" not in message:
        assert ":3: " in text  # the line of the key


@pytest.mark.parametrize("text, message", [
    ("log_level: loud\n", ":1: log_level: 'loud' is not a log level"),
    ("apm_config:\n  receiver_port: 70000\n", ":2: apm_config.receiver_port: port 70000 is out of range (1-65535)"),
])
def test_every_unusable_key_names_its_file_and_line(tmp_path, text, message):
    with pytest.raises(tl._ConfigError) as info:
        settings_of(tmp_path, text)
    assert "cfg.yaml" + message in str(info.value), str(info.value)


def test_unneeded_keys_may_hold_anything(tmp_path):
    text = "\n".join([
        "weird: [unclosed, flow", "   continues: here]", "block: |", "  apm_config:", "    enabled: false",
        "list:", "- {a: [1, 2]}", "- ? complex", "anchored: &a {x: 1}", "aliased: *a", "tagged: !!binary |",
        "  R0lGODlhDAAMAIQAAP", "apm_config:", "  replace_tags: [{name: x}]", "  enabled: false", "",
    ])
    s = settings_of(tmp_path, text)
    assert s.apm_enabled is False


def test_duplicate_keys_last_one_wins(tmp_path):
    s = settings_of(tmp_path, "apm_config:\n  receiver_port: 1\n  receiver_port: 2\n"
                              "apm_config:\n  receiver_port: 3\n")
    assert s.receiver_port == 3


def test_keys_are_case_insensitive_and_quoted_keys_work(tmp_path):
    s = settings_of(tmp_path, 'APM_Config:\n  "receiver_port": 4\n  \'enabled\': "false"\n')
    assert (s.receiver_port, s.apm_enabled) == (4, False)


def test_double_quoted_escapes(tmp_path):
    s = settings_of(tmp_path, 'apm_config:\n  receiver_socket: "/tmp/\\x61p\\u006d.sock"  # comment\n')
    assert s.receiver_socket == "/tmp/apm.sock"


def test_only_the_first_document_counts(tmp_path):
    s = settings_of(tmp_path, "---\napm_config:\n  receiver_port: 5\n---\napm_config:\n  receiver_port: 6\n")
    assert s.receiver_port == 5


def test_bad_indentation_names_its_line(tmp_path):
    with pytest.raises(tl._ConfigError, match=r"cfg.yaml:3: indentation of 1 spaces matches no enclosing key"):
        settings_of(tmp_path, "apm_config:\n   enabled: true\n receiver_port: 5\n")


def test_merge_key_where_settings_are_read_is_an_error(tmp_path):
    with pytest.raises(tl._ConfigError, match=r":4: apm_config: merge keys"):
        settings_of(tmp_path, "base: &b\n  enabled: false\napm_config:\n  <<: *b\n")


def test_a_line_that_is_no_key_at_the_top_level_says_where(tmp_path):
    with pytest.raises(tl._ConfigError) as info:
        settings_of(tmp_path, "apm_config:\n  enabled: true\nreceiver port 8126\n")
    assert str(info.value).endswith("cfg.yaml:3: expected 'key: value' at the top level, found 'receiver port 8126'")


def test_an_anchor_on_a_comment_holds_no_value(tmp_path):
    # `&x # note` anchors an empty value: the comment must not become the socket path.
    with pytest.raises(tl._ConfigError) as info:
        settings_of(tmp_path, "paths: &x # the socket\napm_config:\n  receiver_socket: *x\n")
    assert str(info.value).endswith(":3: apm_config.receiver_socket: holds an alias (*x) to an anchor this reader "
                                    "does not follow; expected a single value")


def test_what_the_reader_finds_is_kept_by_kind_and_named_where_the_error_is_made():
    text = ("apm_config:\n  receiver_port: [1]\n  receiver_socket: *nowhere\n  enabled: |\n    x\n"
            "  error_tracking_standalone:\n    enabled: 1\n      2\nbind_host: !!str x\nlog_level:\n- debug\n"
            "log_to_console: \"\\ud800\"\n")
    nodes = tl._read_yaml_subset(text, tl._KEYS)
    assert all(node.kind.isidentifier() for node in nodes.values()), [node.kind for node in nodes.values()]
    shown = {path: tl._describe_node(node) for path, node in nodes.items()}
    assert shown == {
        "apm_config": "a mapping",
        "apm_config.receiver_port": "a flow collection ([...)",
        "apm_config.receiver_socket": "an alias (*nowhere) to an anchor this reader does not follow",
        "apm_config.enabled": "a multi-line string (|)",
        "apm_config.error_tracking_standalone": "a mapping",
        "apm_config.error_tracking_standalone.enabled": "a value continued on the next line",
        "bind_host": "a tagged value (!!str)",
        "log_level": "a list",
        "log_to_console": "the escape \\ud800, a surrogate code point, which YAML does not allow",
    }


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"a: 1\nb: \xff\xfe\n")
    with pytest.raises(tl._ConfigError, match=r"cfg.yaml:2: invalid UTF-8"):
        tl._load_drop_in_settings(str(path), {}, tl._Log())


def mutate(data: bytes, rng) -> bytes:
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and data:  # flip a byte
            buf = bytearray(b"\n".join(lines))
            buf[rng.randrange(len(buf))] = rng.randrange(256)
            lines = bytes(buf).split(b"\n")
        elif choice == 1:  # truncate
            joined = b"\n".join(lines)
            lines = joined[: rng.randrange(len(joined) + 1)].split(b"\n")
        elif choice == 2:  # change an indentation
            i = rng.randrange(len(lines))
            lines[i] = b" " * rng.randrange(8) + lines[i].lstrip(b" ")
        elif choice == 3:  # duplicate a line
            i = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        else:  # splice in a YAML indicator
            i = rng.randrange(len(lines))
            j = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:j] + rng.choice([b"&a ", b"*a", b"- ", b"[", b"{", b'"', b"'", b"|", b">",
                                                   b"#", b": ", b"\t", b"\r", b"? ", b"<<: ", b"!!str "]) + lines[i][j:]
    return b"\n".join(lines)


def test_fuzzed_configs_yield_values_or_config_errors():
    import random

    with open(FIXTURE, "rb") as f:
        original = f.read()
    rng = random.Random(20261126)
    outcomes = {"values": 0, "errors": 0}
    for _ in range(3000):
        data = mutate(original, rng)
        try:
            text = tl._decode_config(data, "fuzz.yaml")
            nodes = tl._read_yaml_subset(text, tl._KEYS, source="fuzz.yaml")
            tl._DropInSettings(tl._Config(nodes, {}, "fuzz.yaml", quiet_log()), {})
            outcomes["values"] += 1
        except tl._ConfigError as exc:
            assert exc.message and ("fuzz.yaml" in str(exc) or exc.key)
            outcomes["errors"] += 1
    assert outcomes["values"] > 300 and outcomes["errors"] > 300, outcomes  # both paths exercised


def test_pathological_configs_are_read_within_a_time_limit(tmp_path):
    # Each in a child with a hard timeout: a reader that went quadratic on one
    # of these would need hours. How the time grows with the size (2N lines
    # against N) is measured by `make bench`, not here.
    cases = {
        "duplicates": "apm_config:\n" + "  receiver_port: 1\n" * 200_000,
        "long-line": "apm_config:\n  receiver_socket: \"" + "\\\\" * 1_000_000 + "\"\n",
        "deep": "".join(" " * i + "k%d:\n" % i for i in range(3000)),
        "many-keys": "".join("key%d: value\n" % i for i in range(300_000)),
        "anchors": "".join("a%d: &a%d %d\n" % (i, i, i) for i in range(100_000)),
    }
    for name, text in cases.items():
        path = tmp_path / (name + ".yaml")
        path.write_text(text)
        code = ("import sys; sys.path.insert(0, %r); import trace_loader as t\n"
                "try:\n    t._load_drop_in_settings(%r, {}, t._Log())\nexcept t._ConfigError as e:\n    print(e)\n"
                % (os.path.dirname(LOADER), str(path)))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (name, result.stderr[-500:])


# ---------------------------------------------------------------------------
# 3. Listeners
# ---------------------------------------------------------------------------


def test_tcp_listener_options_backlog_and_unix_mode(procs, tmp_path):
    port = free_port()
    sock_path = str(tmp_path / "apm.sock")
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=port, socket_path=sock_path)
    proc = start_drop_in(procs, config, report)
    proc.wait_for("Polling")
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o722
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    if shutil.which("ss") and LINUX:
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
        out = subprocess.run(["ss", "-ltnH", "sport = :%d" % port], capture_output=True, text=True).stdout
        assert out.split()[2] == str(min(somaxconn, 65535)), out  # Send-Q of a listener is its backlog
    with connect(port) as c:
        answer_json(http_request(c))
    data = read_report(report)
    assert data["listeners"]["DD_APM_NET_RECEIVER_FD"][0] == "AF_INET"
    assert data["blocking"] == {"DD_APM_NET_RECEIVER_FD": True, "DD_APM_UNIX_RECEIVER_FD": True}
    assert data["reuseaddr"]["DD_APM_NET_RECEIVER_FD"] is True  # on the very socket the agent inherited


def answered_through(procs, tmp_path, bind_host: str, client_host: str) -> tuple[Proc, object]:
    """The loader on `bind_host` (probe check off); a request from `client_host` wakes the agent."""
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, "bind_host: '%s'\n" % bind_host, port=port, probe=False),
                         report)
    proc.wait_for(r"Listening to TCP receiver at %s$" % re.escape(tl._join_host_port(bind_host, port)))
    proc.wait_for("Polling")
    with connect(port, client_host) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    return proc, port


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_wildcard_bind_host_is_dual_stack(procs, tmp_path):
    if not tl._dual_stack_supported() or not has_ipv6_loopback():
        pytest.skip("no dual-stack sockets or no ::1 here")
    proc, port = answered_through(procs, tmp_path, "0.0.0.0", "127.0.0.1")
    with connect(port, "::1") as c6:  # the same listener takes IPv6 clients too
        assert answer_json(http_request(c6))["pid"] == proc.pid
    assert read_report(tmp_path / "report.json")["listeners"]["DD_APM_NET_RECEIVER_FD"][0] == "AF_INET6"


def test_ipv6_literal_bind_host(procs, tmp_path):
    if not has_ipv6_loopback():
        pytest.skip("no ::1 on this host")
    answered_through(procs, tmp_path, "::1", "::1")


def test_stale_unix_socket_is_replaced(procs, tmp_path):
    sock_path = str(tmp_path / "apm.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(sock_path)  # closed without listening: the file stays, nobody listens
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, socket_path=sock_path), report)
    proc.wait_for("Polling")
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(TIMEOUT)
        u.connect(sock_path)
        assert answer_json(http_request(u))["via"] == "DD_APM_UNIX_RECEIVER_FD"


@pytest.mark.parametrize("kind", ["file", "symlink", "live"])
def test_unix_path_that_is_not_a_stale_socket_is_never_removed(procs, sockets, tmp_path, kind):
    sock_path = tmp_path / "apm.sock"
    if kind == "file":
        sock_path.write_text("precious")
        expected = "exists and is a regular file, not a socket; refusing to remove it"
    elif kind == "symlink":
        target = tmp_path / "target.sock"
        with socket.socket(socket.AF_UNIX) as t:
            t.bind(str(target))
        sock_path.symlink_to(target)
        expected = "is a symbolic link; refusing to replace it"
    else:
        sockets.unix_listener(str(sock_path))
        expected = "is served by a live process; refusing to take it over"
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, socket_path=str(sock_path)), report)
    data = read_report(report)
    line = proc.wait_for("Failed to get listeners")[0]
    assert expected in line, line
    assert data["fds"] == [0, 1, 2]
    assert os.path.lexists(str(sock_path))
    if kind == "file":
        assert sock_path.read_text() == "precious"


def test_unix_path_longer_than_sun_path_is_a_failure_that_says_so(procs, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, socket_path=str(deep / "apm.sock")), report)
    assert read_report(report)["fds"] == [0, 1, 2]  # started directly: a failure, not a skipped listener
    proc.wait_for(r"unix socket path is \d+ bytes, longer than the 10[37] the kernel allows \(sun_path\)")


def test_missing_socket_directory_is_skipped_not_a_failure(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=port, socket_path=str(tmp_path / "nodir" / "apm.sock"), probe=False)
    proc = start_drop_in(procs, config, report)
    proc.wait_for(r"\| ERROR \|.*Could not start UDS listener: socket directory does not exist: .*nodir/apm.sock")
    proc.wait_for("Polling")
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "DD_APM_NET_RECEIVER_FD"
    assert sorted(read_report(report)["listeners"]) == ["DD_APM_NET_RECEIVER_FD"]


@pytest.mark.skipif(not shutil.which("strace") or not LINUX, reason="needs strace")
def test_unix_socket_gets_its_mode_without_a_chmod_window(procs, tmp_path):
    sock_path = str(tmp_path / "apm.sock")
    port = free_port()
    config = write_config(tmp_path, port=port, socket_path=sock_path, probe=False)
    trace = tmp_path / "strace.out"
    proc = procs(["strace", "-f", "-qq", "-e", "trace=umask,bind,chmod,fchmod,fchmodat", "-o", str(trace),
                  sys.executable, LOADER, config, "/bin/true"], base_env())
    proc.wait_for("Polling")
    wake(port)  # the loader execs /bin/true, which ends
    assert proc.wait_exit() == 0
    calls = trace.read_text()
    assert re.search(r"umask\(0?55\)", calls), calls
    assert "bind(" in calls and "chmod" not in calls, calls
    assert calls.index("umask(055") < calls.index("apm.sock")


def test_otlp_listener_wakes_the_agent_and_is_answered(procs, tmp_path):
    port, otlp = free_port(), free_port()
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=port, text="otlp_config:\n  traces:\n    internal_port: %d\n" % otlp)
    env = base_env(DD_OTLP_CONFIG_RECEIVER_PROTOCOLS_GRPC_ENDPOINT="127.0.0.1:4317")
    proc = start_drop_in(procs, config, report, env)
    proc.wait_for("Polling")
    with connect(otlp) as c:
        assert answer_json(http_request(c))["via"] == "DD_OTLP_CONFIG_GRPC_FD"
    proc.wait_for(r"Waking the trace-agent: traffic on OTLP receiver")
    assert set(read_report(report)["listeners"]) == {"DD_APM_NET_RECEIVER_FD", "DD_OTLP_CONFIG_GRPC_FD"}


def test_unix_socket_wakes_the_agent_and_is_answered(procs, tmp_path):
    sock_path = str(tmp_path / "apm.sock")
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=free_port(), socket_path=sock_path), report)
    proc.wait_for("Polling")
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(TIMEOUT)
        u.connect(sock_path)
        assert answer_json(http_request(u)) == {"pid": proc.pid, "via": "DD_APM_UNIX_RECEIVER_FD",
                                                "path": "/v0.4/traces", "body_bytes": 0}
    proc.wait_for(r"Waking the trace-agent: traffic on unix receiver; 0 probes absorbed")


# Readiness for supervisors: once every listener listens, before any client.


def read_within(fd: int, timeout: float = TIMEOUT) -> bytes:
    """What a read of `fd` returns once it is readable (b"" at end of file); fail if it never is."""
    assert select.select([fd], [], [], timeout)[0], "nothing to read on fd %d within %g s" % (fd, timeout)
    return os.read(fd, 4096)


def environ_of(pid: int) -> dict[str, str]:
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)


@needs_proc
@pytest.mark.parametrize("where", ["path", pytest.param("abstract", marks=linux_only)])
def test_notify_socket_gets_ready_before_any_client_and_the_program_never_sees_it(procs, sockets, tmp_path, where):
    notify = sockets.keep(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    if where == "path":
        address = str(tmp_path / "notify")
        notify.bind(address)
    else:
        address = "@trace-loader-test-%d-%s" % (os.getpid(), tmp_path.name)
        notify.bind("\0" + address[1:])
    notify.settimeout(TIMEOUT)
    port, report = free_port(), tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, base_env(NOTIFY_SOCKET=address))
    assert notify.recv(4096) == b"READY=1"
    assert proc.is_loader() and not report.exists()  # ready while it waits, before any client
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    read_report(report)
    environ = environ_of(proc.pid)  # the program's, after execve
    assert "PATH" in environ and "NOTIFY_SOCKET" not in environ, environ


@pytest.mark.parametrize("front_door", ["drop-in", "generic"])
def test_ready_fd_gets_a_newline_and_is_closed_before_the_program_starts(procs, tmp_path, front_door):
    read_end, write_end = os.pipe()
    report = tmp_path / "report.json"
    try:
        if front_door == "drop-in":
            port = free_port()
            proc = start_drop_in(procs, write_config(tmp_path, port=port), report,
                                 base_env(DD_APM_SOCKET_ACTIVATION_READY_FD=str(write_end)), pass_fds=[write_end])
        else:
            proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--ready-fd", str(write_end)],
                                 systemd_agent(report), pass_fds=[write_end])
            port = bound_port(proc)
        os.close(write_end)
        assert read_within(read_end) == b"\n"
        assert read_within(read_end) == b""  # end of file: the loader closed its copy, the last one
        assert proc.is_loader() and not report.exists()
        with connect(port) as c:
            assert answer_json(http_request(c))["pid"] == proc.pid
    finally:
        os.close(read_end)
    data = read_report(report)
    handed = sorted(int(v) for k, v in data["env"].items() if k in tl._DROP_IN_FD_VARS)
    assert data["fds"] == ([0, 1, 2] + handed if front_door == "drop-in" else [0, 1, 2, 3]), data


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full, its write end blocking again: a write() to it would block."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    return read_end, write_end


@pytest.mark.parametrize("case, warning", [
    ("not open", r"Cannot write the readiness newline to fd \d+: not open when the loader started"),
    ("read end", r"Cannot write the readiness newline to fd \d+: not writable \(read-only, or full\)"),
    ("full pipe", r"Cannot write the readiness newline to fd \d+: not writable \(read-only, or full\)"),
    ("notify refuses", r"Cannot send READY=1 to NOTIFY_SOCKET \S*/notify: Connection refused \(ECONNREFUSED\)"),
    ("notify full", r"Cannot send READY=1 to NOTIFY_SOCKET \S*/notify: Resource temporarily unavailable \(EAGAIN\)"),
])
def test_a_readiness_channel_that_fails_costs_one_warning_not_the_start(procs, sockets, tmp_path, case, warning):
    read_end, write_end = full_pipe() if case == "full pipe" else os.pipe()
    fd = read_end if case == "read end" else write_end
    env = base_env(DD_APM_SOCKET_ACTIVATION_READY_FD=str(fd))
    if case == "notify refuses":
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(str(tmp_path / "notify"))  # closed: a socket file that nobody receives on
        env = base_env(NOTIFY_SOCKET=str(tmp_path / "notify"))
    if case == "notify full":
        # A supervisor that does not read: its receive queue is full, a blocking send would wait for ever.
        sockets.keep(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)).bind(str(tmp_path / "notify"))
        sender = sockets.keep(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        sender.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                sender.sendto(b"x", str(tmp_path / "notify"))
        env = base_env(NOTIFY_SOCKET=str(tmp_path / "notify"))
    port, report = free_port(), tmp_path / "report.json"
    try:
        proc = start_drop_in(procs, write_config(tmp_path, port=port), report, env,
                             pass_fds=[] if case == "not open" else [fd])
        proc.wait_for("Polling")
        with connect(port) as c:
            assert answer_json(http_request(c))["pid"] == proc.pid
        one_warning(proc, warning)
        if case in ("read end", "full pipe"):
            assert fd not in read_report(report)["fds"]  # the program never inherits the readiness fd
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("case", ["config error", "activation off", "ready_fd in the file", "listener error"])
def test_failing_open_announces_readiness_before_the_program_starts(procs, sockets, tmp_path, case):
    # Under Type=notify or s6's notification-fd, a service that never says so is killed and restarted in a loop.
    notify = sockets.keep(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(TIMEOUT)
    env = base_env(NOTIFY_SOCKET=str(tmp_path / "notify"))
    read_end, write_end = os.pipe()
    report = tmp_path / "report.json"
    try:
        if case == "listener error":
            taken = sockets.tcp_listener().getsockname()[1]
            proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:%d" % taken, "--ready-fd", str(write_end)],
                                 systemd_agent(report), env, pass_fds=[write_end])
        else:
            config = write_config(tmp_path, port=free_port(), activation=case == "config error")
            if case == "config error":
                with open(config, "a") as f:
                    f.write("bind_host: [oops\n")
            if case == "ready_fd in the file":
                path = tmp_path / "datadog.yaml"
                path.write_text(path.read_text().replace("enabled: false\n", "enabled: false\n    ready_fd: %d\n"
                                                         % write_end))
            else:
                env["DD_APM_SOCKET_ACTIVATION_READY_FD"] = str(write_end)
            proc = start_drop_in(procs, config, report, env, pass_fds=[write_end])
        os.close(write_end)
        assert notify.recv(4096) == b"READY=1"
        assert read_within(read_end) == b"\n"
        assert read_within(read_end) == b""  # end of file: the program did not inherit it
    finally:
        os.close(read_end)
    data = read_report(report)
    assert data["pid"] == proc.pid and data["fds"] == [0, 1, 2] and "NOTIFY_SOCKET" not in data["env"], data


@pytest.mark.skipif(not LINUX, reason="RLIMIT_NOFILE arithmetic below is for Linux")
def test_listeners_opened_before_an_emfile_are_closed_before_readiness_is_announced(procs, sockets, tmp_path):
    import resource

    # A soft limit of 5: 0-2 and two listeners, and the third fails with EMFILE. The two are closed before
    # the loader fails open, or READY=1 finds no fd for its socket and the unit is never ready.
    notify = sockets.keep(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(TIMEOUT)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    report = tmp_path / "report.json"
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0"] * 3, systemd_agent(report),
                         base_env(NOTIFY_SOCKET=str(tmp_path / "notify")),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (5, hard)))
    assert notify.recv(4096) == b"READY=1"
    assert read_report(report)["pid"] == proc.pid  # failed open: the program started in its place
    assert proc.count(r"Failed to get listeners for .*: Too many open files \(EMFILE\)") == 1
    assert proc.count("Cannot send READY=1") == 0


# ---------------------------------------------------------------------------
# 4. The wait: the probe check and the hold timeout
# ---------------------------------------------------------------------------


def syscall_of(pid: int) -> list[str]:
    """/proc/PID/syscall: the number of the syscall the process sleeps in, then its arguments."""
    with open("/proc/%d/syscall" % pid) as f:
        return f.read().split()


@pytest.mark.skipif(not LINUX or os.uname().machine != "x86_64", reason="reads x86_64 /proc/PID/syscall")
def test_idle_loader_sleeps_in_poll_without_a_timeout(procs, tmp_path):
    proc = start_drop_in(procs, write_config(tmp_path, port=free_port()), tmp_path / "r.json")
    proc.wait_for("Polling")
    fields = wait_until(lambda: syscall_of(proc.pid), "the loader asleep in poll(2), syscall 7 on x86_64",
                        until=lambda fields: fields[0] == "7")
    assert fields[0] == "7" and int(fields[3], 16) in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF), fields


def test_kubelet_probes_are_absorbed_then_a_request_is_answered_on_its_connection(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report)
    proc.wait_for("Polling")
    for _ in range(100):
        kubelet_probe(port)
    proc.wait_for(r"TCP client closed connection, closing file descriptor \d+ \(peer .*, FIN\)", count=100)
    assert proc.is_loader()
    assert not report.exists()
    with connect(port) as c:
        c.sendall(b"POST /v0.4/traces HTTP/1.0\r\nContent-Length: 4\r\n\r\nabcd")
        proc.wait_for("TCP client sent data, executing the trace-agent")
        answer = answer_json(read_answer(c))
    assert answer == {"pid": proc.pid, "via": "held-client", "path": "/v0.4/traces", "body_bytes": 4}
    proc.wait_for(r"INFO .*Waking the trace-agent: the held TCP client .* sent data; 100 probes absorbed "
                  r"since start \(FIN: 100, RST: 0\)")
    assert not proc.is_loader()


def test_rst_probes_are_absorbed_like_fin_probes(procs, tmp_path):
    proc, port, report = loader_and_port(procs, tmp_path)
    for _ in range(100):
        rst_probe(port)
    for _ in range(100):
        kubelet_probe(port)
        rst_probe(port)
    proc.wait_for(ABSORBED + "|left before it was accepted", count=300)
    assert proc.is_loader() and not report.exists()
    assert proc.count(ABSORBED.replace("(FIN|RST)", "RST")) >= 100  # each with its peer and how it closed
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "held-client"
    proc.wait_for(r"Waking the trace-agent: the held TCP client 127\.0\.0\.1:\d+ sent data; "
                  r"300 probes absorbed since start \(FIN: 100, RST: 200\)")


class CountingLog(tl._Log):
    """A log at info level, off the console, that remembers every call that reached it, shown or not."""

    def __init__(self) -> None:
        super().__init__()
        self.configure(level="info", console=False, path=None)
        self.calls: list[tuple[str, str]] = []

    def _emit(self, level: str, message: str, args: tuple[object, ...]) -> None:
        self.calls.append((level, message))


def test_an_absorbed_probe_costs_no_log_call_and_no_peer_text_at_info_level(sockets, monkeypatch):
    # The wait itself, in this process, on a real listener: only its Python work is under test here.
    peers: list[object] = []
    peer_text = tl._peer_text
    monkeypatch.setattr(tl, "_peer_text", lambda address: peers.append(address) or peer_text(address))
    log = CountingLog()
    sock = sockets.tcp_listener()
    listener = tl._Listener(tl._ListenerSpec("receiver", tl._TCP, shown_as="TCP receiver"), sock)
    waiter = tl._Waiter([listener], listener, grace_ms=250, hold_timeout_ms=60_000, log=log, program_label="agent")
    wakes: list[object] = []
    thread = threading.Thread(target=lambda: wakes.append(waiter.run()), daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    for _ in range(20):
        kubelet_probe(port)
        rst_probe(port)
    wait_until(lambda: dict(waiter.probes), "40 probes absorbed", until=lambda n: n[tl._FIN] + n[tl._RST] == 40)
    assert log.calls == [("info", "Polling... (fds %s%s)")] and peers == []
    sockets.connect(port).sendall(b"x")
    thread.join(10)
    assert wakes and "sent data" in wakes[0]  # the one peer text: the wake's reason
    assert len(peers) == 1 and [level for level, _ in log.calls] == ["info", "debug"]


def test_overlapping_probes_are_absorbed(procs, sockets, tmp_path):
    # A generous grace, so a slow machine cannot turn the overlap into a wake-up.
    proc, port, report = loader_and_port(procs, tmp_path, grace=5000)
    first = sockets.keep(hold_one(proc, port))
    second = sockets.connect(port)
    proc.wait_for("A second TCP client is waiting; giving the held one 5000 ms")
    first.close()  # the held probe ends
    proc.wait_for(ABSORBED, count=1)
    second.close()  # and then the one that overlapped it
    proc.wait_for(ABSORBED, count=2)
    assert proc.count("Accepted connection on TCP listener") == 2  # the second, only once the first was gone
    assert proc.is_loader() and not report.exists()
    assert proc.count("Waking") == 0


@needs_proc
def test_probe_storm_never_wakes_the_agent_nor_leaks_an_fd(procs, tmp_path):
    proc, port, report = loader_and_port(procs, tmp_path)
    before = open_fds_of(proc.pid)
    errors: list[OSError] = []

    def prober(index: int) -> None:
        try:
            for i in range(1250):
                (rst_probe if (i + index) % 2 else kubelet_probe)(port)
        except OSError as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=prober, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # The backlog is served in order: once this last probe is absorbed, all were.
    with connect(port) as last:
        last_peer = "127.0.0.1:%d" % last.getsockname()[1]
    proc.wait_for(re.escape("peer %s, FIN" % last_peer))
    assert proc.count(ABSORBED + "|left before it was accepted") == 5001
    assert proc.is_loader() and not report.exists()
    assert open_fds_of(proc.pid) == before


def test_an_urgent_byte_alone_is_data(procs, tmp_path):
    proc, port, report = loader_and_port(procs, tmp_path)
    with hold_one(proc, port) as c:
        c.send(b"!", socket.MSG_OOB)
        proc.wait_for(r"Waking the trace-agent: the held TCP client \S+ sent urgent \(out-of-band\) data")
    assert read_report(report)["pid"] == proc.pid
    assert proc.count(ABSORBED) == 0


def test_second_client_while_one_is_held_starts_the_agent_and_both_are_answered(procs, sockets, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port, grace=0), report)
    proc.wait_for("Polling")
    first = sockets.keep(hold_one(proc, port))
    second = sockets.connect(port)
    second.sendall(b"POST /second HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    proc.wait_for("Waking the trace-agent: a second TCP client arrived while one was held")
    first.sendall(b"POST /first HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert answer_json(read_answer(first))["via"] == "held-client"
    assert answer_json(read_answer(second))["path"] == "/second"


def test_silent_client_held_past_the_grace_wakes_the_agent_and_both_are_answered(procs, sockets, tmp_path):
    proc, port, _ = loader_and_port(procs, tmp_path)
    silent = sockets.keep(hold_one(proc, port))
    second = sockets.connect(port)
    second.sendall(b"POST /second HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    proc.wait_for(r"Waking the trace-agent: a second TCP client arrived and the held one stayed silent "
                  r"for 250 ms; 0 probes absorbed")
    assert proc.count("Accepted connection on TCP listener") == 1  # the second was never accepted by the loader
    silent.sendall(b"POST /silent HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert answer_json(read_answer(silent)) == {"pid": proc.pid, "via": "held-client", "path": "/silent",
                                                "body_bytes": 0}
    assert answer_json(read_answer(second))["via"] == "DD_APM_NET_RECEIVER_FD"


def test_grace_zero_is_the_reference_behaviour(procs, sockets, tmp_path):
    proc, port, _ = loader_and_port(procs, tmp_path, grace=0)
    sockets.keep(hold_one(proc, port))  # held
    sockets.connect(port)  # and a second one, at once
    proc.wait_for("Waking the trace-agent: a second TCP client arrived while one was held")
    assert proc.count("A second TCP client is waiting") == 0


def test_without_the_probe_check_the_first_connection_starts_the_agent(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port, probe=False), report)
    proc.wait_for("Polling")
    kubelet_probe(port)  # even a probe wakes it: this is the behaviour without the check
    proc.wait_for("Waking the trace-agent: traffic on TCP receiver")
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "DD_APM_NET_RECEIVER_FD"
    assert "DD_APM_NET_RECEIVER_CLIENT_FD" not in read_report(report)["env"]


def test_hold_timeout_wakes_a_server_that_speaks_first(procs, tmp_path):
    proc, port, _ = start_relaying(procs, tmp_path, "--hold-timeout", "300", agent_options=("--banner",))
    with connect(port) as c:
        c.settimeout(TIMEOUT)
        assert c.recv(64) == b"220 demo agent ready\r\n"  # the client said nothing at all
        proc.wait_for(r"Waking \S+: the held TCP client 127\.0\.0\.1:\d+ sent nothing for 300 ms")
        assert answer_json(http_request(c, "/after-banner"))["path"] == "/after-banner"


def test_hold_timeout_zero_holds_a_silent_client_without_limit(procs, tmp_path):
    # A grace longer than generic mode's default hold timeout (1000 ms), which starts earlier (at the
    # accept): were 0 ignored, that default would wake the program first, and the wake line would say so.
    proc, port, _ = start_relaying(procs, tmp_path, "--hold-timeout", "0", "--probe-grace-period", "1500")
    with hold_one(proc, port):
        proc.wait_for(r"Polling\.\.\. \(state HOLDING\)")
        kubelet_probe(port)  # the second client: GRACE, and 1500 ms later the wake
        wake = proc.wait_for(r"Waking ")[0]
    assert re.search(r"a second TCP client arrived and the held one stayed silent for 1500 ms", wake), wake


def test_in_grace_the_hold_timeout_wakes_when_it_comes_first(procs, tmp_path):
    proc, port, report = start_relaying(procs, tmp_path, "--hold-timeout", "400", "--probe-grace-period", "60000")
    with hold_one(proc, port), connect(port):
        proc.wait_for("A second TCP client is waiting")
        proc.wait_for(r"Waking \S+: the held TCP client \S+ sent nothing for 400 ms")
        assert read_report(report)["pid"] == proc.pid  # the program runs, both clients still silent


def test_drop_in_hold_timeout_from_the_file(procs, tmp_path):
    port = free_port()
    config = write_config(tmp_path, port=port, hold=200)
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, config, report)
    proc.wait_for("Polling")
    with connect(port):
        proc.wait_for(r"Waking the trace-agent: the held TCP client \S+ sent nothing for 200 ms")
        data = read_report(report)  # the agent runs with the silent client handed over
    assert data["pid"] == proc.pid and data["client"] is True, data


# ---------------------------------------------------------------------------
# 5. Hand-off: fds, variables, the exec and the relay
# ---------------------------------------------------------------------------


def test_agent_inherits_exactly_the_listed_fds_and_replaced_variables(procs, tmp_path):
    port = free_port()
    sock_path = str(tmp_path / "apm.sock")
    log_file = tmp_path / "trace-agent.log"
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=port, socket_path=sock_path)
    env = base_env(DD_APM_NET_RECEIVER_FD="99", DD_APM_UNIX_RECEIVER_FD="98", DD_OTLP_CONFIG_GRPC_FD="97",
                   DD_APM_NET_RECEIVER_CLIENT_FD="96", DD_DISABLE_FILE_LOGGING="false",
                   DD_APM_LOG_FILE=str(log_file))
    proc = start_drop_in(procs, config, report, env)
    proc.wait_for("Polling")
    with connect(port) as c:
        c.sendall(b"POST /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        assert answer_json(read_answer(c))["via"] == "held-client"
    data = read_report(report)
    fd_env = {k: int(v) for k, v in data["env"].items() if k.endswith("_FD")}
    assert sorted(fd_env) == ["DD_APM_NET_RECEIVER_CLIENT_FD", "DD_APM_NET_RECEIVER_FD", "DD_APM_UNIX_RECEIVER_FD"]
    assert not {96, 97, 98, 99} & set(fd_env.values())  # inherited values replaced
    assert "DD_OTLP_CONFIG_GRPC_FD" not in data["env"]  # inherited, nobody handed it: removed
    # The log file was open in the loader (it wrote to it) but is not inherited.
    log_fd = int(re.search(r"DD_APM_NET_RECEIVER_FD file descriptor is (\d+)", proc.text()).group(1)) - 1
    assert "Starting the trace-agent..." in log_file.read_text()
    assert log_fd not in data["fds"]
    assert data["fds"] == [0, 1, 2] + sorted(fd_env.values())


def test_agent_found_in_path_keeps_argv0_and_the_loaders_pid(procs, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # The agent is /bin/sh under another name, so the kernel keeps argv as
    # given (a '#!' script would get its interpreter's argv instead).
    (bindir / "trace-agent").symlink_to("/bin/sh")
    pid_file = tmp_path / "pid"
    config = write_config(tmp_path, activation=False)
    env = base_env(PATH="%s:%s" % (bindir, os.environ.get("PATH", "")))
    script = "echo $$ > %s.tmp && mv %s.tmp %s; sleep 60" % (pid_file, pid_file, pid_file)
    proc = procs([sys.executable, LOADER, config, "trace-agent", "-c", script], env)
    proc.wait_for("running the trace-agent directly")
    pid = wait_until(lambda: text_of(pid_file), "the agent's pid in %s" % pid_file)
    assert int(pid) == proc.pid  # execve: the same process
    assert proc.cmdline().split()[:2] == ["trace-agent", "-c"]  # argv[0] exactly as given


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/status")
def test_agent_gets_default_sigpipe_and_sigxfsz(procs, tmp_path):
    status = tmp_path / "status.txt"
    port = free_port()
    config = write_config(tmp_path, port=port, probe=False)
    # The agent is a shell: it records its own signal masks, which it
    # inherited through execve, before anything else can change them.
    script = "grep -E '^Sig(Ign|Blk)' /proc/$$/status > %s.tmp && mv %s.tmp %s && exec sleep 60" % (
        status, status, status)
    proc = start_drop_in(procs, config, None, agent=["/bin/sh", "-c", script])
    proc.wait_for("Polling")
    with connect(port):
        proc.wait_for("Starting the trace-agent")
    masks = wait_until(lambda: text_of(status), "the agent's signal masks in %s" % status)
    fields = dict(line.split(":") for line in masks.split("\n") if line)
    ignored = int(fields["SigIgn"].strip(), 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), fields
    assert not ignored & (1 << (signal.SIGXFSZ - 1)), fields


@pytest.mark.parametrize("probe", [False, True])
def test_300_clients_queued_before_the_agent_wakes_are_all_answered(procs, sockets, tmp_path, probe):
    port = free_port()
    proc = start_drop_in(procs, write_config(tmp_path, port=port, probe=probe, level="info"),
                         tmp_path / "r.json")
    proc.wait_for("Polling")
    clients = []
    for i in range(300):
        c = sockets.connect(port)
        c.sendall(b"POST /c%d HTTP/1.0\r\nContent-Length: 0\r\n\r\n" % i)
        clients.append(c)
    paths = {answer_json(read_answer(c))["path"] for c in clients}
    assert paths == {"/c%d" % i for i in range(300)}


@pytest.mark.parametrize("probe", [True, False])
def test_request_sent_in_two_parts_one_second_apart_is_answered_in_full(procs, tmp_path, probe):
    proc, port, _ = loader_and_port(procs, tmp_path, probe=probe)
    with connect(port) as c:
        c.sendall(b"POST /split HTTP/1.0\r\nContent-Length: 10\r\n\r\n12345")
        proc.wait_for("Starting the trace-agent")
        time.sleep(1.0)  # shapes the traffic (the pause under test), not a synchronisation
        c.sendall(b"67890")
        assert answer_json(read_answer(c)) == {"pid": proc.pid, "via": "held-client" if probe else
                                               "DD_APM_NET_RECEIVER_FD", "path": "/split", "body_bytes": 10}


# The held client relayed into the program's own listener (generic mode's default)

RELAYED = r"Relaying the held TCP client \S+ to \S+ through helper pid (\d+)"


def relay_helper_pid(proc: Proc) -> int:
    return int(re.search(RELAYED, proc.wait_for(RELAYED)[0]).group(1))


def proc_status_of(pid: int) -> dict[str, str]:
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def state_of(pid: int) -> str:
    """The process's state as /proc shows it ("S (sleeping)", "Z (zombie)", ...), or "gone"."""
    try:
        return proc_status_of(pid)["State"]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def wait_gone(pid: int) -> None:
    """Wait until the process has ended (a zombie counts as ended: it runs nothing)."""
    wait_until(lambda: state_of(pid), "pid %d to end" % pid, until=lambda state: state == "gone" or state[0] == "Z")


@needs_proc
def test_relay_is_the_generic_default_and_the_program_gets_only_its_listener(procs, tmp_path):
    proc, port, report = start_relaying(procs, tmp_path)
    kubelet_probe(port)
    rst_probe(port)
    proc.wait_for(ABSORBED + "|left before it was accepted", count=2)
    with connect(port) as c:
        c.sendall(b"POST /first HTTP/1.0\r\nContent-Length: 3\r\n\r\n")
        proc.wait_for("Accepted connection")
        c.sendall(b"abc")  # sent in two parts: the relay carries the peeked bytes and the rest
        answer = answer_json(read_answer(c))
    # Through the program's own listener, not as a held fd; from the loopback address.
    assert answer == {"pid": proc.pid, "via": "unknown@3", "path": "/first", "body_bytes": 3}
    proc.wait_for(r"demo agent: connection on unknown@3 from 127\.0\.0\.1")
    data = read_report(report)
    assert (data["listen_fds"], data["listen_fdnames"], data["fds"]) == ("1", "unknown", [0, 1, 2, 3])
    with connect(port) as c:  # later clients go straight to the program
        assert answer_json(http_request(c, "/second"))["path"] == "/second"
    assert proc.count(RELAYED) == 1


@needs_proc
def test_relay_helper_holds_two_sockets_ignores_stop_signals_and_ends_with_its_client(procs, sockets, tmp_path):
    proc, port, _ = start_relaying(procs, tmp_path)
    c = sockets.connect(port)
    c.sendall(b"POST /slow HTTP/1.0\r\nContent-Length: 4\r\n\r\n")  # the body comes later: the relay waits
    helper = relay_helper_pid(proc)
    proc.wait_for("demo agent: connection on unknown@3")
    fds = os.listdir("/proc/%d/fd" % helper)
    kinds = sorted(os.readlink("/proc/%d/fd/%s" % (helper, fd)).split(":")[0] for fd in fds)
    assert kinds == ["socket", "socket"]  # no listener, no stderr, no log file
    status = proc_status_of(helper)
    ignored = sum(1 << (signum - 1) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                                                   signal.SIGALRM, signal.SIGPIPE, signal.SIGRTMIN))
    assert int(status["SigIgn"], 16) & ignored == ignored, status  # it outlives a stop sent to the group
    assert int(status["SigCgt"], 16) & ignored == 0 and int(status["SigBlk"], 16) == 0, status
    assert int(status["PPid"]) != proc.pid  # double fork: never a child the program must reap
    c.sendall(b"body")
    assert answer_json(read_answer(c))["body_bytes"] == 4
    c.close()  # the client leaves: its helper must end with it
    wait_gone(helper)


def test_relay_passes_a_half_close_on(procs, tmp_path):
    proc, port, _ = start_relaying(procs, tmp_path)
    with connect(port) as c:
        c.sendall(b"POST /half HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        c.shutdown(socket.SHUT_WR)  # like `nc -N`: done sending, still reading
        assert answer_json(read_answer(c))["path"] == "/half"
    relay_helper_pid(proc)


# A program that answers 413 once it has the headers and closes with the upload unread: the kernel resets.
ANSWERS_413_EARLY = (
    "import socket\n"
    "listener = socket.socket(fileno=3)\n"
    "c, _ = listener.accept()\n"
    "head = b''\n"
    "while b'\\r\\n\\r\\n' not in head:\n"
    "    head += c.recv(4096)\n"
    "c.sendall(b'HTTP/1.1 413 Payload Too Large\\r\\nContent-Length: 0\\r\\n\\r\\n')\n"
    "c.close()\n"
)


def test_relay_delivers_an_answer_sent_before_a_reset(procs, tmp_path):
    size = 32 << 20  # far more than the socket buffers on the way hold
    for attempt in range(5):
        proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe"],
                             [sys.executable, "-c", ANSWERS_413_EARLY])
        port = bound_port(proc)
        with connect(port) as c:
            try:
                c.sendall(b"POST /upload HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (size, b"x" * size))
            except (ConnectionResetError, BrokenPipeError):
                pass  # the program reset the connection: the answer it sent first must still be there
            answer = read_answer(c, reset_ends=True)
        assert answer.startswith(b"HTTP/1.1 413 Payload Too Large\r\n"), (attempt, answer)
        relay_helper_pid(proc)
        proc.stop()


# A program that answers an urgent byte with one: what it read, then "?" as urgent data.
ANSWERS_URGENT = (
    "import select, socket\n"
    "listener = socket.socket(fileno=3)\n"
    "c, _ = listener.accept()\n"
    "data = b''\n"
    "while data != b'hello':\n"
    "    data += c.recv(5 - len(data))\n"
    "poller = select.poll()\n"
    "poller.register(c, select.POLLPRI)\n"
    "poller.poll(%d)\n"
    "c.sendall(b'got ' + c.recv(1, socket.MSG_OOB))\n"
    "c.send(b'?', socket.MSG_OOB)\n"
    "c.shutdown(socket.SHUT_WR)\n"
    "while c.recv(4096):\n"
    "    pass\n"
) % (TIMEOUT * 1000)


def test_relay_passes_urgent_bytes_on_both_ways(procs, tmp_path):
    proc, port, _ = start_relaying(procs, tmp_path, program=[sys.executable, "-c", ANSWERS_URGENT])
    with connect(port) as c:
        c.sendall(b"hello")
        c.send(b"!", socket.MSG_OOB)  # held with the client until the relay starts
        poller = select.poll()
        poller.register(c, select.POLLPRI)
        assert poller.poll(TIMEOUT * 1000), "no urgent byte came back"
        assert c.recv(1, socket.MSG_OOB) == b"?"
        c.shutdown(socket.SHUT_WR)
        assert read_answer(c) == b"got !"  # the program read the urgent byte as urgent data
    relay_helper_pid(proc)


# A program that reads urgent bytes in place (SO_OOBINLINE) and answers the SHA-256 of all it read.
HASHES_THE_STREAM = (
    "import hashlib, socket\n"
    "listener = socket.socket(fileno=3)\n"
    "c, _ = listener.accept()\n"
    "c.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)\n"
    "digest = hashlib.sha256()\n"
    "while True:\n"
    "    data = c.recv(65536)\n"
    "    if not data:\n"
    "        break\n"
    "    digest.update(data)\n"
    "c.sendall(digest.hexdigest().encode())\n"
)


def test_relay_keeps_urgent_bytes_in_place_in_a_stream(procs, tmp_path):
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe"],
                         [sys.executable, "-c", HASHES_THE_STREAM])
    port = bound_port(proc)
    sent = hashlib.sha256()
    with connect(port) as c:
        for i in range(200):  # urgent bytes faster than a reader takes them: each overtakes the one before
            part = b"%05d" % i * 10000
            c.sendall(part)
            c.send(b"!", socket.MSG_OOB)
            sent.update(part + b"!")
        c.shutdown(socket.SHUT_WR)
        assert read_answer(c).decode() == sent.hexdigest()  # every byte once, in order
    relay_helper_pid(proc)


# A program that finishes its in-flight request on SIGTERM, then exits.
FINISHES_ON_SIGTERM = (
    "import signal, socket, sys\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    "listener = socket.socket(fileno=3)\n"
    "c, _ = listener.accept()\n"
    "head = b''\n"
    "while b'\\r\\n\\r\\n' not in head:\n"
    "    head += c.recv(4096)\n"
    "sys.stderr.write('program: request in flight\\n')\n"
    "sys.stderr.flush()\n"
    "signal.sigwait({signal.SIGTERM})\n"
    "c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 13\\r\\n\\r\\nfinished well')\n"
    "c.close()\n"
)


@needs_proc
def test_relay_outlives_a_stop_signal_sent_to_the_process_group(procs, tmp_path):
    proc, port, _ = start_relaying(procs, tmp_path, program=[sys.executable, "-c", FINISHES_ON_SIGTERM])
    with connect(port) as c:
        c.sendall(b"GET /slow HTTP/1.0\r\n\r\n")
        helper = relay_helper_pid(proc)
        proc.wait_for("program: request in flight")
        os.killpg(proc.pid, signal.SIGTERM)  # systemd's KillMode=control-group, or Ctrl-C in a terminal
        assert read_answer(c).endswith(b"\r\n\r\nfinished well")
    assert proc.wait_exit() == 0
    wait_gone(helper)  # and it ends with its connection


def test_fd_hands_the_client_over_and_no_helper_runs(procs, tmp_path):
    proc, port, report = start_relaying(procs, tmp_path, "--held-client", "fd")
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "held-client"
    assert read_report(report)["listen_fdnames"] == "unknown:connection"
    assert proc.count(RELAYED) == 0


@pytest.mark.parametrize("value, way", [("relay", "unknown"), ("fd", "held-client"), ("Relay", "unknown"),
                                        ("FD", "held-client")])
def test_drop_in_held_client_setting(procs, tmp_path, value, way):
    port = free_port()
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=port)
    proc = start_drop_in(procs, config, report, base_env(DD_APM_SOCKET_ACTIVATION_HELD_CLIENT=value))
    proc.wait_for("Polling")
    with connect(port) as c:
        via = answer_json(http_request(c))["via"]
    assert via == ("DD_APM_NET_RECEIVER_FD" if way == "unknown" else "held-client")
    assert ("DD_APM_NET_RECEIVER_CLIENT_FD" in read_report(report)["env"]) == (way == "held-client")
    assert proc.count(RELAYED) == (way == "unknown")


@needs_proc
def test_relay_that_cannot_start_costs_only_that_client(procs, tmp_path):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    report = tmp_path / "report.json"
    # 0-2, the listener (3), the held client (4): with a soft limit of 5 the
    # relay's socket() gets EMFILE. The program starts all the same.
    agent = ["/bin/sh", "-c", 'ulimit -S -n 1024 && exec "$0" "$@"'] + systemd_agent(report)
    proc, port, _ = start_relaying(procs, tmp_path, program=agent,
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (5, hard)))
    with connect(port) as lost:
        lost.sendall(b"POST /lost HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        proc.wait_for(r"WARN .* Cannot relay the held TCP client \S+ \(Too many open files \(EMFILE\)\); "
                      r"closing it and starting sh without it")
        with pytest.raises(ConnectionResetError):
            lost.settimeout(TIMEOUT)
            lost.recv(1)
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "unknown@3"
    assert read_report(report)["fds"] == [0, 1, 2, 3]
    assert "Internal error" not in proc.text()


def test_relay_starts_when_the_parent_ignored_sigchld(procs, tmp_path):
    # An ignored SIGCHLD survives execve: the kernel reaps the loader's children itself and waitpid() fails
    # with ECHILD. The helper's pid, written through the pipe, is what says it started.
    proc, port, _ = start_relaying(procs, tmp_path, preexec_fn=signal_dispositions(SIGCHLD=signal.SIG_IGN))
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "unknown@3"
    proc.wait_for(RELAYED)
    assert "Cannot relay" not in proc.text()


@linux_only  # how many a backlog of 1 holds, and a dropped SYN's retry, are Linux's
def test_relay_waits_for_room_in_a_full_backlog(procs, sockets, tmp_path):
    # The program's socket, passed as systemd would, has a backlog of 1: two clients queued behind the held
    # one fill it, and the relay's connect is dropped until the program accepts them; the kernel's SYN retry
    # then gets in. The loader must not wait for that before its execve (nothing would drain the backlog).
    report = tmp_path / "report.json"
    listener = sockets.keep(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    argv = launch_with_fds([listener], "web", [sys.executable, LOADER, "--listen", "systemd:", "--handle-tcp-probe",
                                               "--probe-grace-period", "60000", "--log-level", "debug", "--"]
                           + systemd_agent(report))
    proc = procs(argv, base_env(), pass_fds=(listener.fileno(),))
    proc.wait_for("Polling")
    listener.close()  # from here on, only the loader's copy
    held = sockets.keep(hold_one(proc, port))
    queued = [sockets.connect(port) for _ in range(2)]
    proc.wait_for("A second TCP client is waiting")
    held.sendall(b"POST /held HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    for i, c in enumerate(queued):
        c.sendall(b"POST /queued%d HTTP/1.0\r\nContent-Length: 0\r\n\r\n" % i)
    assert answer_json(read_answer(held))["path"] == "/held"
    assert sorted(answer_json(read_answer(c))["path"] for c in queued) == ["/queued0", "/queued1"]
    assert proc.count(RELAYED) == 1 and "Cannot relay" not in proc.text()


# ---------------------------------------------------------------------------
# 6. Command line and usage errors
# ---------------------------------------------------------------------------


def test_version_flag_prints_the_module_version():
    result = run_loader(["--version"])
    assert result.returncode == 0
    assert result.stdout.strip() == "trace-loader %s" % tl.__version__


def test_help_shows_both_command_lines_and_exits_zero():
    result = run_loader(["--help"])
    assert result.returncode == 0
    assert "CONFIG_FILE AGENT [AGENT_ARGS...]" in result.stdout
    assert "--listen" in result.stdout


def test_help_is_one_usage_block_and_listener_lines_name_the_address_once(procs, tmp_path):
    result = run_loader(["--help"])
    assert result.stdout.count("usage:") == 1 and "--help' lists" not in result.stdout
    assert "--held-client" in result.stdout and "--hold-timeout" in result.stdout
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--listen", "web=tcp://127.0.0.1:0",
                                 "--log-level", "debug"], ["/bin/true"])
    proc.wait_for("Polling")
    assert re.search(r"\| Listening to TCP listener 1 at 127\.0\.0\.1:\d+$", proc.text(), re.M)
    assert re.search(r"\| Listening to web at 127\.0\.0\.1:\d+$", proc.text(), re.M)
    assert re.search(r"\| TCP listener 1 file descriptor is 3$", proc.text(), re.M)
    assert re.search(r"\| web file descriptor is 4$", proc.text(), re.M)


@pytest.mark.parametrize("args", [[], ["only-a-config.yaml"]])
def test_too_few_arguments_is_a_usage_error(args):
    result = run_loader(args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage:")


def test_main_is_callable_with_an_argv_list(capsys):
    assert tl.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "trace-loader %s" % tl.__version__


@pytest.mark.parametrize("args, message", [
    (["--listen", "http://x:1", "--", "true"], "argument --listen: 'http://x:1': expected tcp://HOST:PORT"),
    (["--listen", "tcp://127.0.0.1:99999", "--", "true"], "the port must be a number from 0 to 65535"),
    (["--listen", "tcp://::1:80", "--", "true"], "put an IPv6 address in brackets"),
    (["--listen", "unix://relative.sock", "--", "true"], "a unix address needs an absolute path"),
    (["--listen", "unix:///x.sock?mode=999", "--", "true"], "expected ?mode=OCTAL"),
    (["--listen", "tcp://127.0.0.1:1", "--protocol", "inetd", "--", "true"],
     "argument --protocol: 'inetd' is not one of systemd, env"),
    (["--listen", "tcp://127.0.0.1:1", "--probe-grace-period", "-5", "--", "true"],
     "argument --probe-grace-period: '-5': expected milliseconds"),
    (["--listen", "tcp://127.0.0.1:1", "--log-level", "loud", "--", "true"],
     "argument --log-level: 'loud' is not one of trace, debug"),
    (["--listen", "tcp://127.0.0.1:1"], "expected '-- PROGRAM [ARGS...]'"),
    (["--protocol", "env", "--listen", "tcp://127.0.0.1:1", "--", "true"], "needs NAME="),
    (["--listen", "a:b=tcp://127.0.0.1:1", "--", "true"], "is not a valid fd name"),
    (["--protocol", "env", "--listen", "X=tcp://127.0.0.1:1", "--handle-tcp-probe", "--held-client", "fd", "--",
      "true"], "needs --client-fd-var"),
    (["--protocol", "env", "--listen", "X=tcp://127.0.0.1:1", "--client-fd-var", "1BAD", "--", "true"],
     "argument --client-fd-var: '1BAD' is not a valid variable name"),
    (["--bogus", "--", "true"], "unrecognized arguments: '--bogus'"),
    (["--bogus"], "unrecognized arguments: '--bogus'"),
    (["--bogus", "x"], "unrecognized arguments: '--bogus' 'x'"),
    (["--listen", "tcp://127.0.0.1:1", "--handle", "--", "true"], "unrecognized arguments: '--handle'"),
    (["--listen", "tcp://127.0.0.1:1", "--held-client", "pipe", "--", "true"],
     "argument --held-client: 'pipe' is not one of relay, fd"),
    # A value of any length is named cut short; a number of any length is a usage error, never int()'s
    # 4300-digit ValueError.
    (["--listen", "tcp://127.0.0.1:1", "--protocol", "x" * 100_000, "--", "true"],
     "argument --protocol: '%s'... (100000 characters) is not one of" % ("x" * 64)),
    (["--listen", "tcp://127.0.0.1:1", "--hold-timeout", "9" * 5000, "--", "true"],
     "argument --hold-timeout: '%s'... (5000 characters): expected milliseconds" % ("9" * 64)),
    (["--listen", "tcp://127.0.0.1:" + "1" * 5000, "--", "true"], "the port must be a number from 0 to 65535"),
    (["--listen", "tcp://127.0.0.1:1", "--hold-timeout", "-1", "--", "true"],
     "argument --hold-timeout: '-1': expected milliseconds from 0 to 600000"),
    (["--listen", "tcp://127.0.0.1:1", "--hold-timeout", "600001", "--", "true"],
     "argument --hold-timeout: '600001': expected milliseconds from 0 to 600000"),
    (["--listen", "tcp://127.0.0.1:1", "--hold-timeout", "1.5", "--", "true"],
     "argument --hold-timeout: '1.5': expected milliseconds"),
    (["--protocol", "env", "--listen", "X=tcp://127.0.0.1:1", "--listen", "X=tcp://127.0.0.1:2", "--", "true"],
     "argument --listen: X is named twice; under --protocol env each NAME takes one socket"),
    (["--listen", "connection=tcp://127.0.0.1:0", "--", "true"],
     "argument --listen: 'connection' is the held client's fd name, not a listener's"),
    (["--listen", "tcp://127.0.0.1:1", "--client-fd-var", "C", "--", "true"],
     "argument --client-fd-var: only used with --held-client fd under --protocol env"),
    (["--listen", "tcp://127.0.0.1:1", "--ready-fd", "2", "--", "true"],
     "argument --ready-fd: '2' is not a file descriptor from 3 to 2147483647 (0-2 are the standard streams)"),
    (["--listen", "tcp://127.0.0.1:1", "--ready-fd", "fd3", "--", "true"],
     "argument --ready-fd: 'fd3' is not a file descriptor from 3"),
    (["config.yaml", "--bogus"], "AGENT '--bogus' looks like an option"),
])
def test_generic_usage_errors_exit_2_naming_the_option(args, message):
    result = run_loader(args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listen, shown", [
    ("\x1b[2J\rX\n=tcp://127.0.0.1:1", r"'\x1b[2J\rX\n' needs NAME="),
    ("systemd:\x1b]0;owned\x07", r"'systemd:\x1b]0;owned\x07' needs NAME="),
])
def test_a_listen_name_in_a_usage_error_is_escaped(listen, shown):
    # Bytes, so that no CR is turned into a newline on the way.
    result = subprocess.run([sys.executable, LOADER, "--protocol", "env", "--listen", listen, "--", "true"],
                            env=base_env(), capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == b"trace_loader.py: error: argument --listen: " + shown.encode() + \
        b" (the variable that carries its fd) under --protocol env", result.stderr
    assert not any(char in result.stderr for char in b"\x1b\r\x07"), result.stderr


@pytest.mark.parametrize("args, status", [
    (["--bogus", "--", "true"], 2),
    (["--listen", "http://x:1", "--", "true"], 2),
    (["config.yaml"], 2),
    (["--version"], 0),
    (["--listen", "tcp://127.0.0.1:1", "--help"], 0),
])
@pytest.mark.parametrize("streams", ["closed", pytest.param("full", marks=pytest.mark.skipif(
    not os.path.exists("/dev/full"), reason="no /dev/full"))])
def test_usage_errors_exit_2_even_when_stdout_and_stderr_cannot_be_written(args, status, streams):
    # CPython leaves sys.stderr None when fd 2 is closed at start-up, and /dev/full fails every write
    # (ENOSPC): writing the usage must not turn the exit status into 0 (an exception escaping
    # main()), 1, or a started program (an internal error failing open).
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, LOADER, *args], env=base_env(), stdin=subprocess.DEVNULL,
                                stdout=full, stderr=full, timeout=TIMEOUT, check=False,
                                preexec_fn=(lambda: (os.close(1), os.close(2))) if streams == "closed" else None)
    assert result.returncode == status


def test_missing_agent_is_critical_and_exits_1_before_binding(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port=port)
    result = run_loader([config, "no-such-trace-agent-binary"])
    assert result.returncode == 1
    assert "| CRITICAL |" in result.stderr
    assert "'no-such-trace-agent-binary' was not found in PATH" in result.stderr
    assert "Listening" not in result.stderr


@pytest.mark.parametrize("kind, message", [
    ("missing", "No such file or directory (ENOENT)"),
    ("not-executable", "is not executable"),
    ("directory", "is a directory"),
    ("bad-interpreter", "starts with '#!/nonexistent/python', and that interpreter is missing or not executable"),
])
def test_broken_agent_binary_exits_1_naming_it(tmp_path, kind, message):
    agent = tmp_path / "trace-agent"
    if kind == "not-executable":
        agent.write_text("#!/bin/sh\n")
    elif kind == "directory":
        agent.mkdir()
    elif kind == "bad-interpreter":
        agent.write_text("#!/nonexistent/python\nprint('hi')\n")
        agent.chmod(0o755)
    config = write_config(tmp_path, port=free_port())
    result = run_loader([config, str(agent)])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "| CRITICAL |" in lines[0], lines
    assert "Cannot start the trace-agent: " in lines[0] and message in lines[0] and str(agent) in lines[0]


@pytest.mark.parametrize("head, message", [
    (b"#!/bin/sh\r\necho hi\n", r"starts with '#!/bin/sh\\r', and that interpreter is missing"),
    (b"echo no interpreter line\n", r"is neither a binary nor a script starting with '#!' \(execve would fail "
                                    r"with ENOEXEC\)"),
    (b"#!\n", r"starts with '#!' but names no interpreter"),
    (b"#!\0/bin/sh\n", r"starts with '#!' but names no interpreter"),  # the name ends at the NUL
    # The interpreter is a script itself, and the kernel would refuse that one.
    (b"#!{inner}\n", r"starts with '#!\S+/inner', which starts with '#!/nonexistent/sh', and that interpreter "
                     r"is missing"),
    (b"#!" + b"/x" * 200 + b"\n", r"starts with '#!(/x){127}', and that interpreter is missing"),  # 256 bytes read
    (b"#!{agent}\n", r"starts with '#!\S+/agent', (which starts with '#!\S+/agent', ){4}which is one '#!' "
                     r"script too many in a row, or a loop \(execve would fail with ELOOP\)"),
])
def test_agent_the_kernel_would_refuse_is_refused_before_binding(tmp_path, head, message):
    inner = tmp_path / "inner"
    inner.write_bytes(b"#!/nonexistent/sh\n")
    inner.chmod(0o755)
    agent = tmp_path / "agent"
    agent.write_bytes(head.replace(b"{inner}", bytes(inner)).replace(b"{agent}", bytes(agent)))
    agent.chmod(0o755)
    port = free_port()
    result = run_loader([write_config(tmp_path, port=port), str(agent)])
    assert result.returncode == 1, result.stderr
    assert re.search(r"CRITICAL .* Cannot start the trace-agent: .*agent " + message, result.stderr), result.stderr
    assert "Listening" not in result.stderr


@pytest.mark.parametrize("line", ["#!\t/bin/sh\t-e",
                                  pytest.param("#!/bin/sh\0 ignored by the kernel", marks=linux_only),
                                  pytest.param("#!{wrapper}", marks=linux_only)])
def test_a_shebang_is_read_like_the_kernel(procs, tmp_path, line):
    # Tab-separated, cut at a NUL, or through an interpreter that is a script itself: all run.
    report = tmp_path / "report.json"
    wrapper = tmp_path / "wrapper"
    wrapper.write_text('#!/bin/sh\nexec /bin/sh "$@"\n')
    wrapper.chmod(0o755)
    agent = tmp_path / "agent"
    agent.write_text(line.format(wrapper=wrapper) + '\nexec "%s" "$@"\n' % sys.executable)
    agent.chmod(0o755)
    port = free_port()
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, agent=[str(agent), AGENT, "--report",
                                                                                   str(report)])
    proc.wait_for("Polling")
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid


# ---------------------------------------------------------------------------
# 7. Drop-in mode: the decision flow
# ---------------------------------------------------------------------------


def test_unreadable_config_fails_open(procs, tmp_path):
    report = tmp_path / "report.json"
    env = base_env(DD_APM_NET_RECEIVER_FD="7", DD_APM_NET_RECEIVER_CLIENT_FD="8")
    proc = start_drop_in(procs, str(tmp_path / "missing.yaml"), report, env)
    data = read_report(report)
    assert data["pid"] == proc.pid
    line = proc.wait_for(r"\| WARN \|.*Failed to load the configuration: .*missing.yaml: cannot open: "
                         r"No such file or directory \(ENOENT\)")
    assert LOG_LINE.match(line[0])
    assert data["env"] == {}  # inherited fd variables are removed on every path
    assert data["fds"] == [0, 1, 2]


def test_empty_config_file_means_defaults(procs, tmp_path):
    path = tmp_path / "datadog.yaml"
    path.write_bytes(b"")
    proc, _ = fails_open(procs, tmp_path, str(path))  # socket activation is off by default
    proc.wait_for("Socket-activation for the trace-agent is disabled")


def test_apm_disabled_exits_zero_without_starting_anything(tmp_path):
    config = write_config(tmp_path, "apm_config.enabled: ignored\n", port=free_port())
    result = run_loader([config, sys.executable, AGENT], env=base_env(DD_APM_ENABLED="false"))
    assert result.returncode == 0
    assert "| INFO | (trace_loader.py" in result.stderr
    assert "Trace-agent is disabled, stopping..." in result.stderr
    assert "demo agent" not in result.stderr


def test_error_tracking_standalone_keeps_apm_on(procs, tmp_path):
    report = tmp_path / "report.json"
    config = write_config(tmp_path, activation=False)
    env = base_env(DD_APM_ENABLED="false", DD_APM_ERROR_TRACKING_STANDALONE_ENABLED="true")
    proc = start_drop_in(procs, config, report, env)
    assert read_report(report)["pid"] == proc.pid


def test_socket_activation_disabled_execs_directly(procs, tmp_path):
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=free_port(), activation=False)
    proc = start_drop_in(procs, config, report)
    data = read_report(report)
    proc.wait_for("Socket-activation for the trace-agent is disabled, running the trace-agent directly...")
    assert data["env"] == {} and data["fds"] == [0, 1, 2]


def test_listener_failure_closes_everything_and_fails_open(procs, sockets, tmp_path):
    port = sockets.tcp_listener().getsockname()[1]  # taken
    report = tmp_path / "report.json"
    sock_path = str(tmp_path / "apm.sock")
    config = write_config(tmp_path, port=port, socket_path=sock_path,
                          text="otlp_config:\n  receiver:\n  traces:\n    internal_port: %d\n" % port)
    proc = start_drop_in(procs, config, report)
    data = read_report(report)
    proc.wait_for(r"Failed to get listeners for the trace-agent: cannot listen on localhost:%d: "
                  r"Address already in use \(EADDRINUSE\)" % port)
    assert data["fds"] == [0, 1, 2] and data["env"] == {}


def test_no_listener_at_all_exits_zero(tmp_path):
    config = write_config(tmp_path, port=0, socket_path="")
    result = run_loader([config, sys.executable, AGENT])
    assert result.returncode == 0
    assert "All the trace-agent inputs are disabled, stopping..." in result.stderr


def test_negative_port_turns_the_tcp_receiver_off(tmp_path):
    config = write_config(tmp_path, port=-5, socket_path="")
    result = run_loader([config, sys.executable, AGENT])
    assert result.returncode == 0
    assert "Trace-agent TCP receiver is disabled" in result.stderr
    assert "All the trace-agent inputs are disabled, stopping..." in result.stderr


@pytest.mark.parametrize("path", ["config-failure", "activation-off", "listener-failure", "wake", "internal"])
def test_inherited_fd_variables_never_reach_the_agent(procs, sockets, tmp_path, path):
    port = free_port()
    if path == "config-failure":
        config = str(tmp_path / "missing.yaml")
    elif path == "listener-failure":
        config = write_config(tmp_path, port=sockets.tcp_listener().getsockname()[1], probe=False)
    else:
        config = write_config(tmp_path, port=port, activation=path != "activation-off", probe=False)
    env = base_env(**{var: "1" for var in tl._DROP_IN_FD_VARS})
    report = tmp_path / "report.json"
    if path == "internal":
        # No input reaches main()'s last guard from outside; run the guard's exec itself.
        code = ("import sys; sys.path.insert(0, %r); import trace_loader as t, os;"
                "t._last_resort_exec(sys.argv[2:], sys.argv[1:2], dict(os.environ), [0, 1, 2], t._Log())"
                % os.path.dirname(LOADER))
        proc = procs([sys.executable, "-c", code, config] + agent_argv(report), env)
    else:
        proc = start_drop_in(procs, config, report, env)
    if path == "wake":
        proc.wait_for("Polling")
        connect(port).close()
    data = read_report(report)
    expected = {"DD_APM_NET_RECEIVER_FD"} if path == "wake" else set()
    assert set(data["env"]) == expected, data["env"]


# ---------------------------------------------------------------------------
# 8. Generic mode: --listen, the systemd and env protocols
# ---------------------------------------------------------------------------


def test_systemd_protocol_hands_fds_from_3_with_names(procs, tmp_path):
    report = tmp_path / "report.json"
    sock_path = str(tmp_path / "app.sock")
    proc = start_generic(procs, ["--listen", "web=tcp://127.0.0.1:0", "--listen", "unix://%s?mode=0660" % sock_path,
                                 "--log-level", "debug"], systemd_agent(report),
                         env=base_env(LISTEN_PIDFDID="12345", LISTEN_FDS="9", LISTEN_PID="1"))
    port = bound_port(proc)
    proc.wait_for("Polling")
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "web@3"
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(TIMEOUT)
        u.connect(sock_path)
        assert answer_json(http_request(u))["via"] == "unknown@4"
    data = read_report(report)
    assert data["listen_pid_ok"] is True and data["pid"] == proc.pid
    assert (data["listen_fds"], data["listen_fdnames"]) == ("2", "web:unknown")
    assert data["fds"] == [0, 1, 2, 3, 4]
    assert "LISTEN_PIDFDID" not in data["env"]


def test_env_protocol_hands_fds_in_named_variables(procs, tmp_path):
    report = tmp_path / "report.json"
    proc = start_generic(procs, ["--protocol", "env", "--listen", "APP_FD=tcp://127.0.0.1:0",
                                 "--handle-tcp-probe", "--held-client", "fd", "--client-fd-var", "APP_CLIENT_FD",
                                 "--log-level", "debug"],
                         [sys.executable, AGENT, "--fd-var", "APP_FD", "--client-var", "APP_CLIENT_FD",
                          "--report", str(report)],
                         env=base_env(APP_CLIENT_FD="77", LISTEN_FDS="2"))
    port = bound_port(proc)
    proc.wait_for("Polling")
    kubelet_probe(port)
    proc.wait_for(ABSORBED)
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "held-client"
    data = read_report(report)
    assert sorted(data["env"]) == []  # LISTEN_* not addressed to us are dropped; APP_* not reported
    assert data["fds"] == [0, 1, 2, 3, 4]


def test_generic_probe_check_hands_the_client_over_as_connection(procs, tmp_path):
    report = tmp_path / "report.json"
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe", "--held-client", "fd",
                                 "--log-level", "debug"],
                         systemd_agent(report))
    port = bound_port(proc)
    proc.wait_for("Polling")
    for _ in range(20):
        kubelet_probe(port)
        rst_probe(port)
    proc.wait_for(ABSORBED + "|left before it was accepted", count=40)
    assert proc.is_loader()
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "held-client"
    data = read_report(report)
    assert (data["listen_fds"], data["listen_fdnames"], data["fds"]) == ("2", "unknown:connection", [0, 1, 2, 3, 4])


def test_inherited_sockets_are_reordered_without_clobbering(procs, sockets, tmp_path):
    report = tmp_path / "report.json"
    tcp = sockets.tcp_listener()
    unix = sockets.unix_listener(str(tmp_path / "b.sock"))
    # Inherited as fd 3 = "a" (TCP) and fd 4 = "b" (unix); asked for in the order b, a.
    argv = launch_with_fds([tcp, unix], "a:b", [sys.executable, LOADER, "--listen", "systemd:b", "--listen",
                                                "systemd:a", "--log-level", "debug", "--"] + systemd_agent(report))
    proc = procs(argv, base_env(), pass_fds=(tcp.fileno(), unix.fileno()))
    proc.wait_for("Polling")
    tcp_port = tcp.getsockname()[1]
    tcp.close()  # from here on, only the copies the loader was handed
    unix.close()
    with connect(tcp_port) as c:
        assert answer_json(http_request(c))["via"] == "a@4"
    data = read_report(report)
    assert data["listen_fdnames"] == "b:a" and data["fds"] == [0, 1, 2, 3, 4]
    assert data["listeners"]["b@3"][0] == "AF_UNIX" and data["listeners"]["a@4"][0] == "AF_INET"


def test_new_and_inherited_listeners_mix_in_listen_order(procs, sockets, tmp_path):
    report = tmp_path / "report.json"
    inherited = sockets.tcp_listener()
    argv = launch_with_fds([inherited], None, [sys.executable, LOADER, "--listen", "new=tcp://127.0.0.1:0",
                                               "--listen", "systemd:", "--"] + systemd_agent(report))
    proc = procs(argv, base_env(), pass_fds=(inherited.fileno(),))
    port = bound_port(proc)
    proc.wait_for("Polling")
    old_port = inherited.getsockname()[1]
    inherited.close()  # from here on, only the copy the loader was handed
    with connect(old_port) as c:
        assert answer_json(http_request(c))["via"] == "unknown@4"
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "new@3"
    assert read_report(report)["listen_fdnames"] == "new:unknown"


def test_systemd_protocol_passes_only_the_chosen_sockets(procs, sockets, tmp_path, request):
    report = tmp_path / "report.json"
    first, second = sockets.tcp_listener(), sockets.tcp_listener()
    stray_r, stray_w = os.pipe()  # an fd the loader inherits and nobody asked for
    request.addfinalizer(lambda: (os.close(stray_r), os.close(stray_w)))
    os.set_inheritable(stray_r, True)
    argv = launch_with_fds([first, second], "a:b", [sys.executable, LOADER, "--listen", "systemd:b", "--"]
                           + systemd_agent(report))
    proc = procs(argv, base_env(), pass_fds=(first.fileno(), second.fileno(), stray_r))
    proc.wait_for("Polling")
    with connect(second.getsockname()[1]) as c:
        assert answer_json(http_request(c))["via"] == "b@3"
    data = read_report(report)
    assert (data["listen_fds"], data["listen_fdnames"], data["fds"]) == ("1", "b", [0, 1, 2, 3])


def test_one_env_name_for_several_inherited_sockets_fails_open(procs, sockets):
    # Only once systemd:web is expanded does the loader know that X would name two sockets: a fact of the
    # environment it inherited, not of its command line.
    first, second = sockets.tcp_listener(), sockets.tcp_listener()
    argv = launch_with_fds([first, second], "web:web", [sys.executable, LOADER, "--protocol", "env", "--listen",
                                                        "X=systemd:web", "--", *SAYS_ITS_PID])
    proc = procs(argv, base_env(), pass_fds=(first.fileno(), second.fileno()))
    proc.wait_for("started as %d" % proc.pid)
    proc.wait_for(r"WARN .* Failed to get listeners for \S+: X=systemd:web matches 2 inherited sockets; under "
                  r"--protocol env each NAME takes one$")


def test_generic_systemd_listen_without_passed_sockets_fails_open(procs, tmp_path):
    report = tmp_path / "report.json"
    proc = start_generic(procs, ["--listen", "systemd:"], systemd_agent(report),
                         env=base_env(LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="x"))
    data = read_report(report)
    assert data["pid"] == proc.pid and data["fds"] == [0, 1, 2]
    assert data["listen_fds"] is None and data["listen_fdnames"] is None  # stale LISTEN_* removed
    proc.wait_for(r"WARN .*Failed to get listeners for \S+: no sockets were passed to this process "
                  r"\(LISTEN_PID is '1', our pid is %d\)" % proc.pid)


# A program that prints its environment as one JSON line on stderr.
PRINTS_ITS_ENV = [sys.executable, "-c",
                  "import json, os, sys; sys.stderr.write('env %s\\n' % json.dumps(dict(os.environ)))"]


@pytest.mark.parametrize("path", ["fail-open", "internal"])
def test_failing_open_drops_every_listen_name_the_parent_set(procs, tmp_path, path):
    options = ["--protocol", "env", "--listen", "T_HTTP_FD=systemd:", "--listen", "T_API_FD=tcp://127.0.0.1:0",
               "--held-client", "fd", "--client-fd-var", "T_CLIENT_FD"]
    env = base_env(T_HTTP_FD="7", T_API_FD="8", T_CLIENT_FD="9", T_OTHER="kept")
    if path == "internal":
        # No input reaches main()'s last guard from outside; run the guard's exec itself.
        code = ("import sys; sys.path.insert(0, %r); import trace_loader as t, os;"
                "t._last_resort_exec(sys.argv[1:], %r, dict(os.environ), [0, 1, 2], t._Log())"
                % (os.path.dirname(LOADER), options))
        proc = procs([sys.executable, "-c", code] + PRINTS_ITS_ENV, env)
    else:
        proc = start_generic(procs, options, PRINTS_ITS_ENV, env)  # nothing was passed to this pid
    seen = json.loads(proc.wait_for(r"^env ")[0][4:])
    assert "T_HTTP_FD" not in seen and "T_API_FD" not in seen and "T_CLIENT_FD" not in seen, seen
    assert seen["T_OTHER"] == "kept"


def test_generic_systemd_name_not_found_passes_the_sockets_through(procs, sockets, tmp_path):
    report = tmp_path / "report.json"
    inherited = sockets.tcp_listener()
    argv = launch_with_fds([inherited], "web", [sys.executable, LOADER, "--listen", "systemd:api", "--"]
                           + systemd_agent(report))
    proc = procs(argv, base_env(), pass_fds=(inherited.fileno(),))
    data = read_report(report)
    # Failing open under systemd: the program gets what systemd gave this pid, untouched.
    assert (data["listen_pid_ok"], data["listen_fds"], data["listen_fdnames"]) == (True, "1", "web")
    assert data["fds"] == [0, 1, 2, 3]
    proc.wait_for(r"no inherited socket is named 'api' \(LISTEN_FDNAMES: 'web'\)")


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate is not installed")
def test_under_systemd_socket_activate(procs, tmp_path):
    report = tmp_path / "report.json"
    # systemd-socket-activate binds the -l address itself, refuses port 0 and
    # takes no socket from us: a port that was free a moment ago.
    port = free_port()
    argv = [shutil.which("systemd-socket-activate"), "-l", "127.0.0.1:%d" % port, sys.executable, LOADER,
            "--listen", "systemd:", "--handle-tcp-probe", "--held-client", "fd", "--log-level", "debug",
            "--"] + systemd_agent(report)
    proc = procs(argv, base_env())
    proc.wait_for("Listening on 127.0.0.1:%d" % port)
    kubelet_probe(port)  # systemd-socket-activate starts the loader on this very probe
    proc.wait_for(ABSORBED)
    assert proc.is_loader() and not report.exists()
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "held-client"
    data = read_report(report)
    assert data["pid"] == proc.pid and data["listen_pid_ok"] is True
    assert data["listen_fdnames"] == "unknown:connection"


S6_TOOLS = ("s6-supervise", "s6-svc", "s6-svstat")


@pytest.mark.skipif(not all(shutil.which(tool) for tool in S6_TOOLS), reason="s6 is not installed")
def test_under_s6_the_service_is_ready_once_the_loader_listens(procs, tmp_path):
    port, report = free_port(), tmp_path / "report.json"
    service = tmp_path / "trace-agent"
    service.mkdir()
    (service / "notification-fd").write_text("3\n")  # s6-supervise opens fd 3 for the service's run
    (service / "down").write_text("")  # started by s6-svc below, not as soon as s6-supervise runs
    run = service / "run"
    run.write_text("#!/bin/sh\nexport DD_APM_SOCKET_ACTIVATION_READY_FD=3\nexec %s\n" % " ".join(
        [sys.executable, LOADER, write_config(tmp_path, port=port)] + agent_argv(report)))
    run.chmod(0o755)
    supervise = procs([shutil.which("s6-supervise"), str(service)], base_env())
    wait_until(lambda: (service / "supervise" / "control").exists(), "s6-supervise's control fifo")
    try:
        # -wU: return once the service is up and has said it is ready; -T: at most this long.
        up = subprocess.run(["s6-svc", "-wU", "-T", "%d" % (TIMEOUT * 1000), "-u", str(service)],
                            capture_output=True, text=True, timeout=TIMEOUT + 5, check=False)
        assert up.returncode == 0, (up.stderr, supervise.text())
        status = subprocess.run(["s6-svstat", "-o", "up,ready,pid", str(service)], capture_output=True,
                                text=True, timeout=TIMEOUT, check=True).stdout.split()
        assert status[:2] == ["true", "true"], status
        pid = int(status[2])
        assert not report.exists()  # ready while the loader waits
        with connect(port) as c:
            assert answer_json(http_request(c))["pid"] == pid
        data = read_report(report)
        handed = [int(data["env"][var]) for var in (tl.RECEIVER_FD_VAR, tl.CLIENT_FD_VAR)]
        assert data["fds"] == [0, 1, 2] + sorted(handed)  # s6's fd 3 is gone: the held client has that number
    finally:
        subprocess.run(["s6-svc", "-wd", "-T", "%d" % (TIMEOUT * 1000), "-d", str(service)],
                       capture_output=True, timeout=TIMEOUT + 5, check=False)


# ---------------------------------------------------------------------------
# 9. Signals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_while_waiting_ends_the_loader_as_killed_by_it(procs, tmp_path, signum):
    report = tmp_path / "report.json"
    defaults = signal_dispositions(SIGTERM=signal.SIG_DFL, SIGINT=signal.SIG_DFL, SIGHUP=signal.SIG_DFL)
    proc = start_drop_in(procs, write_config(tmp_path, port=free_port()), report, preexec_fn=defaults)
    proc.wait_for("Polling")
    os.kill(proc.pid, signum)
    assert proc.wait_exit() == -signum
    assert "Traceback" not in proc.text()
    assert not report.exists()


def test_a_signal_ignored_by_the_parent_stays_ignored(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    ignore = signal_dispositions(SIGHUP=signal.SIG_IGN, SIGINT=signal.SIG_IGN)
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, preexec_fn=ignore)
    proc.wait_for("Polling")
    os.kill(proc.pid, signal.SIGHUP)
    os.kill(proc.pid, signal.SIGINT)
    kubelet_probe(port)  # handled after both signals were delivered: it is still waiting
    proc.wait_for(ABSORBED)
    assert proc.is_loader() and proc.proc.poll() is None


_STRAY_SIGNALS = [getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGIO", "SIGPWR",
                                                    "SIGVTALRM", "SIGPROF", "SIGXCPU") if hasattr(signal, name)]
_STRAY_SIGNALS += [signal.SIGRTMIN, signal.SIGRTMAX] if hasattr(signal, "SIGRTMIN") else []


def test_sigterm_ends_the_wait_even_when_the_parent_ignored_it(procs, tmp_path):
    # Only SIGINT and SIGHUP keep an ignored disposition (nohup, a background job), as the Go runtime
    # does: SIGTERM is how a service manager or a container runtime stops the loader.
    report = tmp_path / "report.json"
    ignore = signal_dispositions(SIGTERM=signal.SIG_IGN)
    proc = start_drop_in(procs, write_config(tmp_path, port=free_port()), report, preexec_fn=ignore)
    proc.wait_for("Polling")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait_exit() == -signal.SIGTERM
    assert not report.exists()


def blocking_stop_signals() -> None:
    """preexec_fn: start the loader with SIGTERM, SIGINT and SIGHUP blocked (and their default actions)."""
    signal_dispositions(SIGTERM=signal.SIG_DFL, SIGINT=signal.SIG_DFL, SIGHUP=signal.SIG_DFL)()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])


def signals_in_mask(hex_mask: str) -> set[int]:
    """The signals a /proc/PID/status mask (SigBlk, SigIgn) holds: bit N-1 is signal N."""
    mask = int(hex_mask, 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_sigterm_ends_the_wait_even_when_the_parent_blocked_it(procs, tmp_path):
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=free_port()), report, preexec_fn=blocking_stop_signals)
    proc.wait_for("Polling")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait_exit() == -signal.SIGTERM
    assert not report.exists()


def test_the_program_starts_with_the_stop_signals_unblocked(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, preexec_fn=blocking_stop_signals)
    proc.wait_for("Polling")
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    assert read_report(report)["blocked"] == []  # the mask the program started with
    if LINUX:
        assert signals_in_mask(proc_status_of(proc.pid)["SigBlk"]) == set()


def test_a_stray_signal_the_parent_blocked_is_taken_by_the_loader_not_left_to_the_program(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report,
                         preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1]))
    proc.wait_for("Polling")
    os.kill(proc.pid, signal.SIGUSR1)
    kubelet_probe(port)  # handled after the signal above was delivered
    proc.wait_for(ABSORBED)
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    assert read_report(report)["blocked"] == []
    if LINUX:  # nothing pending either: SIGUSR1's default action would end the program once it unblocks it
        status = proc_status_of(proc.pid)
        assert signal.SIGUSR1 not in signals_in_mask(status["SigPnd"]) | signals_in_mask(status["ShdPnd"])


@pytest.mark.parametrize("parent", ["default", "ignored"])
def test_stray_signals_are_ignored_while_waiting_and_the_agent_gets_defaults(procs, tmp_path, parent):
    port = free_port()
    report = tmp_path / "report.json"
    ignored = {signal.Signals(n).name: signal.SIG_IGN for n in _STRAY_SIGNALS} if parent == "ignored" else {}
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, preexec_fn=signal_dispositions(**ignored))
    proc.wait_for("Polling")
    for signum in _STRAY_SIGNALS:
        os.kill(proc.pid, signum)
    kubelet_probe(port)  # handled after every signal above was delivered
    proc.wait_for(ABSORBED)
    assert proc.is_loader() and proc.proc.poll() is None
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    data = read_report(report)
    # SIGINT is the Python agent's own KeyboardInterrupt handler; every other one arrived at its default.
    assert {name for name, how in data["signals"].items() if how != "default"} == {"SIGINT"}, data["signals"]
    assert data["blocked"] == []
    if LINUX:  # the real-time signals too: none ignored (CPython itself ignores only SIGPIPE and SIGXFSZ)
        assert signals_in_mask(proc_status_of(proc.pid)["SigIgn"]) & set(_STRAY_SIGNALS) == set()


def test_sigstop_and_sigcont_while_waiting_cause_no_exec(procs, tmp_path):
    proc, port, report = loader_and_port(procs, tmp_path)
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGCONT)
    kubelet_probe(port)  # still absorbing probes afterwards: the wait went on
    proc.wait_for(ABSORBED)
    assert proc.is_loader() and not report.exists()
    assert proc.count("Waking") == 0
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid


def test_sigterm_racing_the_wake_up_never_leaves_half_of_each(procs, sockets, tmp_path):
    for round_ in range(10):
        workdir = tmp_path / str(round_)
        workdir.mkdir()
        port = free_port()
        report = workdir / "report.json"
        proc = start_drop_in(procs, write_config(workdir, port=port, probe=False, level="info"), report,
                             preexec_fn=signal_dispositions(SIGTERM=signal.SIG_DFL))
        proc.wait_for("Polling")
        c = sockets.connect(port)
        c.sendall(b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait_exit()
        # Killed by the signal, as the loader or as the agent: never an exit
        # code of its own, never a traceback, never an agent without its fds.
        assert code == -signal.SIGTERM, (code, proc.text())
        assert "Traceback" not in proc.text()
        if report.exists():
            assert "DD_APM_NET_RECEIVER_FD" in read_report(report)["env"]


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, task)) as f:
            found += [int(p) for p in f.read().split()]
    return found


def only_child(pid: int) -> int:
    return wait_until(lambda: child_pids(pid), "a child of pid %d" % pid)[0]


@needs_unshare
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_as_pid_1_a_stop_signal_ends_the_waiting_loader(procs, tmp_path, signum):
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=free_port())
    proc = procs(["unshare", "--pid", "--fork", "--kill-child", sys.executable, LOADER, config]
                 + agent_argv(report), base_env(), preexec_fn=signal_dispositions(SIGINT=signal.SIG_DFL))
    proc.wait_for("Polling")
    loader = only_child(proc.pid)  # PID 1 inside its namespace
    os.kill(loader, signum)
    assert proc.wait_exit() == 128 + signum  # unshare passes its child's status on
    assert not report.exists() and "Traceback" not in proc.text()


# ---------------------------------------------------------------------------
# 10. Logging
# ---------------------------------------------------------------------------


def test_log_lines_match_the_agent_format_and_go_to_the_file(procs, tmp_path):
    log_file = tmp_path / "trace-agent.log"
    log_file.write_text("earlier line\n")
    config = write_config(tmp_path, port=0, socket_path="", level="info")
    env = base_env(DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(log_file))
    result = run_loader([config, sys.executable, AGENT], env=env)
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    assert not any("| DEBUG |" in line for line in lines)
    content = log_file.read_text().splitlines()
    assert content[0] == "earlier line"  # appended, never truncated
    assert content[1:] == lines


def test_the_readme_sample_log_line_is_one_the_loader_writes(tmp_path):
    """The README's sample line: its time and line number are examples; its file, function and message are real."""
    with open(os.path.join(HERE, "README.md")) as f:
        sample = re.search(r"`(\d{4}-[^`]* \| TRACE-LOADER \| [^`]*)`", f.read()).group(1)
    assert LOG_LINE.match(sample), sample

    def shape(line: str) -> str:
        return re.sub(r":\d+ in ", ":LINE in ", line.partition(" UTC | ")[2])

    result = run_loader([write_config(tmp_path, activation=False, level="info")] + SAYS_ITS_PID)
    assert result.returncode == 0
    written = [shape(line.replace(os.path.basename(LOADER), "trace_loader.py")) for line in result.stderr.splitlines()]
    assert shape(sample) in written, (sample, result.stderr)


def test_log_file_that_cannot_be_opened_costs_a_warning_not_the_activation(procs, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    env = base_env(DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(tmp_path / "no" / "dir.log"))
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, env)
    proc.wait_for(r"\| WARN \|.*Cannot open log file .*no/dir.log \(No such file or directory \(ENOENT\)\)")
    proc.wait_for("Polling")
    with connect(port) as c:
        answer_json(http_request(c))


def test_a_log_write_failing_with_any_error_costs_the_line_not_the_activation(tmp_path):
    # stderr a datagram socket whose reader left: every console write fails (ECONNREFUSED, then ENOTCONN).
    stderr, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.close()
    log_file = tmp_path / "trace-agent.log"
    port = free_port()
    report = tmp_path / "report.json"
    env = base_env(DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(log_file))
    agent = ["/bin/sh", "-c", 'exec "$@" 2>/dev/null', "sh"] + agent_argv(report)  # the agent's stderr works
    proc = subprocess.Popen([sys.executable, LOADER, write_config(tmp_path, port=port)] + agent, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr.fileno(),
                            start_new_session=True)
    stderr.close()
    try:
        waiting = wait_until(lambda: proc.poll() is None and "Polling" in (text_of(log_file) or ""),
                             "the loader waiting or ending", until=lambda seen: seen or proc.poll() is not None)
        assert waiting, "the loader ended with status %s" % proc.poll()
        with connect(port) as c:
            assert answer_json(http_request(c))["pid"] == proc.pid
        assert read_report(report)["pid"] == proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)


def test_log_level_off_is_silent(tmp_path):
    config = write_config(tmp_path, port=0, socket_path="", level="off")
    result = run_loader([config, sys.executable, AGENT])
    assert result.returncode == 0 and result.stderr == ""


def loader_lines(*texts: str) -> list[str]:
    return [line for text in texts for line in text.splitlines() if "TRACE-LOADER" in line]


def test_a_forged_line_in_a_value_reaches_the_log_escaped(tmp_path):
    log_file = tmp_path / "trace-agent.log"
    forged = "/nonexistent/y\r2099-01-01 00:00:00 UTC | TRACE-LOADER | INFO | all good\x1b[2J"
    env = base_env(DD_APM_RECEIVER_SOCKET=forged, DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(log_file))
    result = run_loader([write_config(tmp_path, port=0), "/bin/true"], env)  # TCP off: the socket is all there is
    assert result.returncode == 0, result.stderr
    lines = loader_lines(result.stderr, log_file.read_text())
    assert any(r"does not exist: '/nonexistent/y\r2099-01-01" in line for line in lines), lines
    assert not any("\r" in line or "\x1b" in line for line in lines)
    for text in (result.stderr, log_file.read_text()):  # one ERROR line each, which holds the whole value
        assert [line for line in text.split("\n") if "all good" in line] == \
            [line for line in text.split("\n") if "| ERROR |" in line and "all good" in line]


def test_a_100_kb_value_is_cut_and_no_line_exceeds_2048_bytes(procs, tmp_path):
    env = base_env(DD_BIND_HOST="h" * 100_000, DD_APM_LOG_FILE="/nonexistent/" + "l" * 100_000,
                   DD_DISABLE_FILE_LOGGING="false")
    proc, _ = fails_open(procs, tmp_path, write_config(tmp_path, port=free_port()), env)
    lines = loader_lines(proc.text())
    assert max(len(line.encode()) + 1 for line in lines) <= 2048
    assert re.search(r"cannot resolve bind host 'h{64}'\.\.\. \(100000 characters\)", proc.text())
    assert re.search(r"Cannot open log file '/nonexistent/l{287}'\.\.\. \(100013 characters\)", proc.text())


def test_a_long_program_name_is_cut_whole_in_the_log(procs, tmp_path):
    program = tmp_path / ("x" * 100)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0"], [str(program)])
    port = bound_port(proc)
    proc.wait_for("Polling")
    wake(port)
    assert proc.wait_exit() == 0
    assert re.search(r"INFO .* Starting x{64}\.\.\. \(100 characters\)\.\.\.$", proc.text(), re.M), proc.text()


def test_a_long_config_path_is_cut_in_the_line_that_names_it(procs, tmp_path):
    directory = tmp_path / ("d" * 200) / ("e" * 200)
    directory.mkdir(parents=True)
    config = directory / "datadog.yaml"
    config.write_text("apm_config:\n  receiver_port: eighty\n")
    proc, _ = fails_open(procs, tmp_path, str(config))
    line = one_warning(proc, r"Failed to load the configuration")
    assert re.search(r"'/[^']{299}'\.\.\. \(%d characters\):2: apm_config\.receiver_port: 'eighty' is not an "
                     r"integer" % len(str(config)), line), line


def test_a_5000_digit_listen_fds_fails_open_naming_it(procs, tmp_path):
    # CPython's int() refuses more than 4300 digits: checked by length first, never an internal error.
    launcher = ("import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '9' * 5000;"
                "os.execv(sys.argv[1], sys.argv[1:])")
    # Failing open, LISTEN_* stay for this pid.
    proc = procs([sys.executable, "-c", launcher, sys.executable, LOADER, "--listen", "systemd:", "--", *SAYS_ITS_PID],
                 base_env())
    proc.wait_for("started as %d" % proc.pid)
    proc.wait_for(r"WARN .* Failed to get listeners for \S+: LISTEN_FDS is '9{64}'\.\.\. \(5000 characters\); "
                  r"expected a count of sockets")
    assert "Internal error" not in proc.text()


def test_trace_level_masks_secrets(procs, tmp_path):
    log_file = tmp_path / "trace-agent.log"
    env = base_env(DD_API_KEY="s3cr3t-api", DD_APP_KEY="s3cr3t-app", MY_AUTH_HEADER="s3cr3t-auth",
                   db_password="s3cr3t-pw", DD_LOG_LEVEL="trace", DD_DISABLE_FILE_LOGGING="false",
                   DD_APM_LOG_FILE=str(log_file),
                   # credentials under other names: a proxy URL, the API keys of extra endpoints, any URL
                   DD_PROXY_HTTPS="http://user:s3cr3t-proxy@proxy:3128", DD_PROXY_NO_PROXY="s3cr3t-host",
                   DD_APM_ADDITIONAL_ENDPOINTS='{"https://intake.example": ["s3cr3t-key"]}',
                   dd_apm_profiling_additional_endpoints="s3cr3t-lower",
                   DATABASE_URL="postgres://app:s3cr3t/url@db:5432/x", MIRROR="https://mirror.example:8443/")
    port = free_port()
    report = tmp_path / "report.json"
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, env)
    proc.wait_for("Polling")
    with connect(port) as c:
        answer_json(http_request(c))
    line = proc.wait_for("Starting the trace-agent with env")[0]
    assert "'DD_API_KEY'='********'" in line and "'DD_LOG_LEVEL'='trace'" in line
    assert "'DD_PROXY_HTTPS'='********'" in line and "'DD_APM_ADDITIONAL_ENDPOINTS'='********'" in line
    assert "'DATABASE_URL'='postgres://********@db:5432/x'" in line
    assert "'MIRROR'='https://mirror.example:8443/'" in line  # a URL without a password, as it is
    for text in (proc.text(), log_file.read_text()):
        assert "s3cr3t" not in text


# Credentials in values of variables whose names do not say so, and what stays visible.
HIDDEN_CREDENTIALS = {
    "V_NO_SCHEME": ("proxy-user:S3CR3T-1@proxy:3128", "********@proxy:3128"),
    "V_AT_IN_PW": ("http://user:p@S3CR3T-2@proxy", "http://********@proxy"),
    "V_EMAIL_USER": ("http://john@corp.example:S3CR3T-3@proxy", "http://********@proxy"),
    "V_GITHUB_USER": ("https://ghp_S3CR3T-4@github.com/o/r.git", "https://********@github.com/o/r.git"),
    "V_SENTRY_DSN": ("https://S3CR3T-5@o1.ingest.sentry.io/1", "https://********@o1.ingest.sentry.io/1"),
    "V_QUERY": ("jdbc:mysql://db/app?user=app&password=S3CR3T-6", "jdbc:mysql://db/app?user=app&password=********"),
    "V_PAIRS": ("Server=db;Pwd=S3CR3T-7;Access_Token=S3CR3T-8", "Server=db;Pwd=********;Access_Token=********"),
    "V_LIST": ("http://a:S3CR3T-9@h1,b:S3CR3T-10@h2 x", "http://********@h1,********@h2 x"),
    "V_PLAIN": ("https://mirror.example:8443/a?b=c", "https://mirror.example:8443/a?b=c"),
    "V_HEADERS": ("Authorization=Bearer S3CR3T-11,x-tenant=t1", "Authorization=********,x-tenant=t1"),
}


def test_trace_level_masks_credentials_in_any_value_in_linear_time(procs, tmp_path):
    env = base_env(**{name: value for name, (value, _) in HIDDEN_CREDENTIALS.items()})
    # Values a backtracking pattern takes seconds each to scan (the whole wait would outlast TIMEOUT).
    env.update(("V_LONG_%d" % i, "://x:" * 26_000) for i in range(3))
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--log-level", "trace"], SAYS_ITS_PID, env)
    port = bound_port(proc)
    proc.wait_for("Polling")
    wake(port)
    line = proc.wait_for("with env")[0]
    proc.wait_for("started as %d" % proc.pid)
    for name, (_, shown) in HIDDEN_CREDENTIALS.items():
        assert "%r=%r" % (name, shown) in line, line
    assert "S3CR3T" not in proc.text()


# ---------------------------------------------------------------------------
# 11. Hardening: faults and hostile input
# ---------------------------------------------------------------------------


def test_config_file_that_is_a_directory_fails_open(procs, tmp_path):
    proc, _ = fails_open(procs, tmp_path, str(tmp_path))
    one_warning(proc, r"Failed to load the configuration: .*: is not a regular file \(a directory\)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_config_file_that_is_a_fifo_does_not_block(procs, tmp_path):
    fifo = tmp_path / "datadog.yaml"
    os.mkfifo(str(fifo))
    proc, _ = fails_open(procs, tmp_path, str(fifo))
    one_warning(proc, r"datadog.yaml: is not a regular file \(a FIFO\)")


def test_config_file_of_50_mb_is_refused_without_reading_it(procs, tmp_path):
    big = tmp_path / "datadog.yaml"
    with open(str(big), "wb") as f:
        f.truncate(50 * 1024 * 1024)
    proc, _ = fails_open(procs, tmp_path, str(big))
    one_warning(proc, r"datadog.yaml: is 52428800 bytes; this loader reads at most 16777216")


@pytest.mark.parametrize("content, pattern", [
    (bytes(range(256)) * 4, r"datadog.yaml:2: invalid UTF-8 \(byte 128\)"),
    (b"apm_config:\n  enabled: \xc3\x28\n", r"datadog.yaml:2: invalid UTF-8 \(byte 23\)"),
    (b"- a list\n- at the top\n", r"datadog.yaml:1: expected 'key: value' at the top level"),
    (b"\x00\x01: [\napm_config: {\n", r"datadog.yaml:2: apm_config: holds a flow collection"),
    (b"apm_config:\n  socket_activation:\n    enabled: &x [1]\n",
     r"datadog.yaml:3: apm_config.socket_activation.enabled: holds a flow collection"),
])
def test_garbage_config_fails_open_with_one_line(procs, tmp_path, content, pattern):
    path = tmp_path / "datadog.yaml"
    path.write_bytes(content)
    proc, _ = fails_open(procs, tmp_path, str(path))
    one_warning(proc, pattern)


def test_a_surrogate_escape_in_yaml_is_a_configuration_error(procs, tmp_path):
    config = write_config(tmp_path, port=free_port())
    with open(config) as f:
        text = f.read().replace("receiver_socket: ''", 'receiver_socket: "/tmp/x\\ud800.sock"')
    with open(config, "w") as f:
        f.write(text)
    proc, _ = fails_open(procs, tmp_path, config)
    one_warning(proc, r"datadog\.yaml:3: apm_config\.receiver_socket: holds the escape \\ud800, a surrogate")
    assert "Internal error" not in proc.text()


@pytest.mark.parametrize("name, value, message", [
    ("DD_APM_SOCKET_ACTIVATION_HELD_CLIENT", "pipe", "'pipe' is not one of fd, relay"),
    ("DD_APM_SOCKET_ACTIVATION_HOLD_TIMEOUT", "-1", "-1 ms is out of range (0-600000)"),
    ("DD_APM_SOCKET_ACTIVATION_HOLD_TIMEOUT", "600001", "600001 ms is out of range (0-600000)"),
    ("DD_APM_SOCKET_ACTIVATION_HOLD_TIMEOUT", "1.5", "'1.5' is not an integer"),
])
def test_bad_held_client_or_hold_timeout_fails_open_naming_variable_and_value(procs, tmp_path, name, value,
                                                                               message):
    config = write_config(tmp_path, port=free_port())
    proc, data = fails_open(procs, tmp_path, config, base_env(**{name: value}))
    one_warning(proc, re.escape("%s: %s" % (name, message)))
    assert data["fds"] == [0, 1, 2]


@pytest.mark.parametrize("value, message", [
    ("2", "DD_APM_SOCKET_ACTIVATION_READY_FD: 2 is not a file descriptor from 3 to 2147483647"),
    ("-1", "DD_APM_SOCKET_ACTIVATION_READY_FD: -1 is not a file descriptor from 3"),
    ("fd3", "DD_APM_SOCKET_ACTIVATION_READY_FD: 'fd3' is not an integer"),
    ("in the file", r"datadog\.yaml:\d+: apm_config\.socket_activation\.ready_fd: 0 is not a file descriptor from 3"),
])
def test_bad_ready_fd_fails_open_naming_where_it_was_found(procs, tmp_path, value, message):
    config = write_config(tmp_path, port=free_port())
    env = base_env()
    if value == "in the file":
        path = tmp_path / "datadog.yaml"
        path.write_text(path.read_text().replace("    enabled: true\n", "    enabled: true\n    ready_fd: 0\n"))
    else:
        env = base_env(DD_APM_SOCKET_ACTIVATION_READY_FD=value)
        message = re.escape(message)
    proc, _ = fails_open(procs, tmp_path, config, env)
    one_warning(proc, message)


def test_bad_hold_timeout_in_the_file_names_file_line_and_key(procs, tmp_path):
    proc, _ = fails_open(procs, tmp_path, write_config(tmp_path, port=free_port(), hold=700000))
    one_warning(proc, r"datadog\.yaml:\d+: apm_config\.socket_activation\.hold_timeout: 700000 ms is out of range")


@pytest.mark.parametrize("value", ["--8126", "- 8126", "+-8126"])
def test_a_sign_typo_in_the_port_fails_open_instead_of_turning_the_receiver_off(procs, tmp_path, value):
    config = write_config(tmp_path, port=free_port())
    proc, _ = fails_open(procs, tmp_path, config, base_env(DD_APM_RECEIVER_PORT=value))
    one_warning(proc, r"DD_APM_RECEIVER_PORT: %s is not an integer" % re.escape(repr(value)))
    assert "inputs are disabled" not in proc.text()


@pytest.mark.parametrize("name", ["DD_APM_RECEIVER_PORT", "DD_BIND_HOST", "DD_APM_RECEIVER_SOCKET"])
def test_environment_garbage_end_to_end_fails_open_with_one_line(procs, tmp_path, name):
    config = write_config(tmp_path, port=free_port(), socket_path=str(tmp_path / "apm.sock"))
    proc, _ = fails_open(procs, tmp_path, config, base_env(**{name: GARBAGE["non-ascii"]}))
    line = one_warning(proc, r"Failed to (load the configuration|get listeners)")
    assert name in line or "bind host" in line or "unix socket path" in line, line


def test_non_utf8_bytes_in_the_environment_are_logged_safely(procs, tmp_path):
    config = write_config(tmp_path, port=free_port())
    env = {k.encode(): v.encode() for k, v in base_env().items()}
    env[b"DD_APM_RECEIVER_PORT"] = b"\xff\xfe"
    report = tmp_path / "report.json"
    proc = procs([sys.executable, LOADER, config] + agent_argv(report), env)
    assert read_report(report)["fds"] == [0, 1, 2]
    proc.wait_for(r"DD_APM_RECEIVER_PORT: '\\udcff\\udcfe' is not an integer")


def test_unresolvable_bind_host_fails_open(procs, tmp_path):
    config = write_config(tmp_path, "bind_host: no-such-host.invalid\n", port=free_port())
    proc, _ = fails_open(procs, tmp_path, config)
    one_warning(proc, r"cannot resolve bind host 'no-such-host.invalid'")


def test_ipv6_literal_without_ipv6_fails_open(procs, tmp_path):
    if has_ipv6_loopback():
        pytest.skip("this host has IPv6")
    config = write_config(tmp_path, "bind_host: '::1'\n", port=free_port())
    proc, _ = fails_open(procs, tmp_path, config)
    one_warning(proc, r"cannot (listen on \[::1\]|resolve bind host)")


@pytest.fixture
def nobody_dir():
    """A world-readable directory (pytest's own tmp dirs are 0700)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="trace-loader-nobody-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(uid: int, gid: int):
    def switch() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return switch


def nobody_python(shared: str) -> tuple[str, int, int]:
    """An interpreter the `nobody` user can run, with copies of the loader and the agent in `shared`."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no nobody user")
    for src in (LOADER, AGENT):
        shutil.copy(src, shared)
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run([python, "-c", "import socket, json"], capture_output=True, timeout=TIMEOUT,
                                   preexec_fn=as_user(entry.pw_uid, entry.pw_gid))
        except OSError:
            continue  # not there, or not reachable for nobody (e.g. under /root)
        if probe.returncode == 0:
            return python, entry.pw_uid, entry.pw_gid
    pytest.skip("no Python that nobody may run")


def run_as_nobody(procs, shared: str, config_text: str, *, mode: int = 0o644) -> tuple[int, str, dict | None]:
    """The loader as `nobody`: its pid, its output, and the agent's report (None if the agent never started)."""
    python, uid, gid = nobody_python(shared)
    config = os.path.join(shared, "datadog.yaml")
    with open(config, "w") as f:
        f.write(config_text)
    os.chmod(config, mode)
    out = os.path.join(shared, "out")  # nobody's, for the agent's report
    os.mkdir(out)
    os.chown(out, uid, gid)
    report = os.path.join(out, "report.json")
    proc = procs([python, os.path.join(shared, "trace_loader.py"), config, python,
                  os.path.join(shared, "demo_agent.py"), "--report", report], base_env(), preexec_fn=as_user(uid, gid))
    wait_until(lambda: os.path.exists(report) or proc.proc.poll() is not None,
               "the agent's report at %s, or the loader's end" % report)
    text = text_of(report)
    proc.stop()  # the agent serves until killed; then its output is complete
    return proc.pid, proc.text(), json.loads(text) if text is not None else None


def test_unreadable_config_as_nobody_fails_open(procs, nobody_dir):
    pid, err, data = run_as_nobody(procs, nobody_dir, "apm_config:\n  enabled: true\n", mode=0o600)
    assert data is not None and data["pid"] == pid and data["fds"] == [0, 1, 2]
    assert re.search(r"datadog.yaml: cannot open: Permission denied \(EACCES\)", err), err


def test_privileged_port_as_nobody_fails_open(procs, nobody_dir):
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") if LINUX else open(os.devnull) as f:
        start = int(f.read() or 1024)
    if start <= 80:
        pytest.skip("unprivileged users may bind port 80 here")
    _, err, data = run_as_nobody(procs, nobody_dir, "apm_config:\n  receiver_port: 80\n  receiver_socket: ''\n"
                                 "  socket_activation:\n    enabled: true\n")
    assert data is not None and data["fds"] == [0, 1, 2]
    assert "cannot listen on localhost:80: Permission denied (EACCES)" in err, err


def test_unwritable_socket_directory_as_nobody_fails_open(procs, nobody_dir):
    locked = os.path.join(nobody_dir, "locked")
    os.mkdir(locked, 0o755)  # root's, so nobody may not create the socket there
    _, err, data = run_as_nobody(procs, nobody_dir, "apm_config:\n  receiver_port: 0\n  receiver_socket: '%s'\n"
                                 "  socket_activation:\n    enabled: true\n" % os.path.join(locked, "apm.sock"))
    assert data is not None and data["fds"] == [0, 1, 2]
    assert re.search(r"cannot listen on unix socket .*apm.sock: Permission denied \(EACCES\)", err), err


@pytest.mark.skipif(not LINUX, reason="RLIMIT_NOFILE arithmetic below is for Linux")
def test_emfile_on_accept_still_starts_the_agent_and_queued_clients_are_answered(procs, sockets, tmp_path):
    import resource

    port = free_port()
    log_file = tmp_path / "trace-agent.log"
    config = write_config(tmp_path, "bind_host: 127.0.0.1\n", port=port)
    env = base_env(DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(log_file))
    # The loader holds 0-2, its log file (3) and the listener (4): with a soft
    # limit of 5, accept() has no fd left. The agent does not inherit the log
    # fd, so its shell can start, lift the soft limit as Go programs do, and
    # serve.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    agent = ["/bin/sh", "-c", 'ulimit -S -n 1024 && exec "$0" "$@"', sys.executable, AGENT,
             "--report", str(tmp_path / "report.json")]
    proc = start_drop_in(procs, config, None, env, agent=agent,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (5, hard)))
    proc.wait_for("Polling")
    clients = [sockets.connect(port) for _ in range(3)]
    for i, c in enumerate(clients):
        c.sendall(b"POST /q%d HTTP/1.0\r\nContent-Length: 0\r\n\r\n" % i)
    proc.wait_for(r"Waking the trace-agent: accept\(\) on the TCP listener failed: Too many open files \(EMFILE\)")
    assert sorted(answer_json(read_answer(c))["path"] for c in clients) == ["/q0", "/q1", "/q2"]


def test_emfile_while_clearing_a_stale_unix_socket_fails_open_naming_the_socket(procs, tmp_path):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    stale = tmp_path / "apm.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # closed without a listen(): a stale socket file
    # 0-2 and the TCP receiver (3) fill a soft limit of 4: the connect() that
    # tells a stale socket from a live one has no fd left for its socket.
    config = write_config(tmp_path, port=free_port(), socket_path=str(stale))
    agent = ["/bin/sh", "-c", 'ulimit -S -n 1024 && exec "$0" "$@"', *SAYS_ITS_PID]
    # -S: site's .pth files would need a second free fd at start-up.
    proc = procs([sys.executable, "-I", "-S", LOADER, config, *agent], base_env(),
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (4, hard)))
    proc.wait_for(r"WARN .* Failed to get listeners for the trace-agent: cannot clear the way for unix socket %s: "
                  r"Too many open files \(EMFILE\)" % re.escape(str(stale)))
    proc.wait_for("started as %d" % proc.pid)
    assert stat.S_ISSOCK(os.lstat(str(stale)).st_mode)  # refused to judge it, so left it alone


def test_trace_level_at_the_fd_limit_still_starts_the_program(procs, tmp_path):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # 0-2, the log file (3) and the unix receiver (4) fill a soft limit of 5: the program still has its one
    # free fd to start with, and the trace line of its environment must need none (an import would). No TCP
    # receiver: resolving its host loads the idna codec, which imports early what such a line might need.
    config = write_config(tmp_path, socket_path=str(tmp_path / "apm.sock"), level="trace")
    env = base_env(DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(tmp_path / "trace-agent.log"))
    agent = ["/bin/sh", "-c", 'ulimit -S -n 1024 && exec "$0" "$@"', *SAYS_ITS_PID]
    proc = procs([sys.executable, "-I", "-S", LOADER, config, *agent], env,
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (5, hard)))
    proc.wait_for("Polling")
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(tmp_path / "apm.sock"))  # wakes it: no probe check on a unix socket
        proc.wait_for("started as %d" % proc.pid)
    proc.wait_for("Starting the trace-agent with env")
    assert "Internal error" not in proc.text()


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_closed_standard_fd_never_receives_a_socket(procs, tmp_path, closed):
    port = free_port()
    report = tmp_path / "report.json"
    log_file = tmp_path / "loader.log"  # fd 2 may be the closed one: sync on the file
    config = write_config(tmp_path, port=port, probe=False)
    env = base_env(DD_DISABLE_FILE_LOGGING="false", DD_APM_LOG_FILE=str(log_file))
    start_drop_in(procs, config, report, env, preexec_fn=lambda: os.close(closed))
    wait_until(lambda: text_of(log_file) or "", "'Polling' in %s" % log_file, until=lambda text: "Polling" in text)
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "DD_APM_NET_RECEIVER_FD"
    data = read_report(report)
    assert int(data["env"]["DD_APM_NET_RECEIVER_FD"]) > 2
    assert data["fds"][:3] == [0, 1, 2]


@needs_proc
def test_a_hand_off_already_in_place_needs_no_spare_fd(procs, tmp_path):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    report = tmp_path / "report.json"
    # 0-2, four listeners (3-6), the held client (7): all where the systemd
    # protocol wants them. A soft limit of 12 leaves the program four free
    # fds; copying the five sockets first would need five, and would fail
    # open.
    listens = ["--listen", "tcp://127.0.0.1:0"]
    for name in "bcd":
        listens += ["--listen", "unix://%s" % (tmp_path / ("%s.sock" % name))]
    proc = start_generic(procs, listens + ["--handle-tcp-probe", "--held-client", "fd", "--log-level", "debug"],
                         systemd_agent(report),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (12, hard)))
    port = bound_port(proc, "TCP listener 1")
    proc.wait_for("Polling")
    with connect(port) as c:
        assert answer_json(http_request(c))["via"] == "held-client"
    data = read_report(report)
    assert data["fds"] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert data["listen_fdnames"] == "unknown:unknown:unknown:unknown:connection"
    assert "WARN" not in proc.text()


@needs_proc
def test_emfile_in_the_generic_hand_off_fails_open_cleanly(procs, sockets, tmp_path):
    report = tmp_path / "report.json"
    inherited = [sockets.tcp_listener() for _ in range(6)]
    # Inherited as fds 3-8 named a-f, asked for as f, e, ..., a; the probe
    # check holds a client of f on fd 9. Reversing 3-8 needs six spare fds
    # above 9, and a soft limit of 14 leaves four: the copy fails and the
    # hand-off fails open. The program gets
    # what systemd gave (its LISTEN_* and fds 3-8, blocking as they came,
    # though the wait made f non-blocking).
    order = []
    for name in "fedcba":
        order += ["--listen", "systemd:" + name]
    loader = ["/bin/sh", "-c", 'ulimit -S -n 14 && exec "$@"', "sh", sys.executable, "-I", "-S", LOADER, *order,
              "--handle-tcp-probe", "--held-client", "fd", "--log-level", "debug", "--",
              "/bin/sh", "-c", 'ulimit -S -n 1024 && exec "$0" "$@"']
    proc = procs(launch_with_fds(inherited, "a:b:c:d:e:f", loader + systemd_agent(report)), base_env(),
                 pass_fds=[s.fileno() for s in inherited])
    proc.wait_for("Polling")
    with connect(inherited[5].getsockname()[1]) as c:
        c.sendall(b"POST / HTTP/1.0\r\n\r\n")
        proc.wait_for(r"WARN .* Failed to hand the sockets over to sh: cannot copy the sockets into place: "
                      r"Too many open files \(EMFILE\)")
        c.settimeout(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            c.recv(1)  # a reset, never a hang
    data = read_report(report)
    assert data["fds"] == [0, 1, 2, 3, 4, 5, 6, 7, 8] and data["listen_fdnames"] == "a:b:c:d:e:f"
    assert data["blocking"] == {"%s@%d" % (name, 3 + i): True for i, name in enumerate("abcdef")}
    assert "Internal error" not in proc.text()


@needs_proc
@pytest.mark.parametrize("protocol", ["systemd", "env"])
def test_a_hand_off_that_would_fill_the_fd_limit_fails_open(procs, tmp_path, protocol):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # 0-2 and four listeners on 3-6: with a soft limit of 7 the program would
    # start with every fd it may have, and its dynamic loader could not even
    # open libc. Failing open, it starts (and may bind its own sockets).
    listens = []
    for name in "abcd":
        listens += ["--listen", "%s=unix://%s" % (name.upper(), tmp_path / ("%s.sock" % name))]
    proc = start_generic(procs, listens + ["--protocol", protocol], SAYS_ITS_PID,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (7, hard)))
    proc.wait_for("Polling")
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(tmp_path / "a.sock"))
        proc.wait_for(r"WARN .* Failed to hand the sockets over to python\S*: the program would hold 7 of the 7 "
                      r"file descriptors RLIMIT_NOFILE allows, too few left to start with")
    proc.wait_for("started as %d" % proc.pid)
    assert "error while loading shared libraries" not in proc.text()


@needs_unshare
def test_a_closed_stdin_without_dev_null_starts_the_program_directly(procs, tmp_path):
    # A socket must never land on fd 0-2, and /dev/null is what fills them: without it the loader
    # binds nothing and fails open. The arguments are still read first: a usage error is one.
    script = ('mount --make-rprivate / && mount -t tmpfs none /dev && '
              '("$0" "$1" --bogus -- true 0<&-; echo "usage error: status $?" >&2) && exec "$0" "$@" 0<&-')
    proc = procs(["unshare", "--mount", "/bin/sh", "-c", script, sys.executable, LOADER, "--listen",
                  "tcp://127.0.0.1:0", "--", *SAYS_ITS_PID], base_env())
    proc.wait_for("started as %d" % proc.pid)
    proc.wait_for("usage error: status 2")
    proc.wait_for(r"WARN .* Failed to get listeners for python\S*: fd 0 is closed and /dev/null could not be opened "
                  r"in its place: a socket would land there")
    assert "Listening" not in proc.text() and "Internal error" not in proc.text()


def without_proc(argv: list[str]) -> list[str]:
    """argv run in a private mount namespace whose /proc is an empty tmpfs (a chroot without /proc)."""
    script = 'mount --make-rprivate / && mount -t tmpfs none /proc && exec "$@"'
    return ["unshare", "--mount", "/bin/sh", "-c", script, "sh"] + argv


@needs_unshare
@pytest.mark.parametrize("held", ["relay", "fd"])
def test_without_proc_the_loader_still_activates(procs, tmp_path, held):
    report = tmp_path / "report.json"
    proc = procs(without_proc([sys.executable, LOADER, "--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe",
                               "--held-client", held, "--log-level", "debug", "--"] + systemd_agent(report)),
                 base_env())
    port = bound_port(proc)
    proc.wait_for("Polling")
    kubelet_probe(port)
    proc.wait_for(ABSORBED)
    with connect(port) as c:
        answer = answer_json(http_request(c))
    assert answer["via"] == ("unknown@3" if held == "relay" else "held-client")
    data = read_report(report)
    assert data["fds"] == ([0, 1, 2, 3] if held == "relay" else [0, 1, 2, 3, 4])
    assert "Internal error" not in proc.text() and "Traceback" not in proc.text()
    assert "Released memory before waiting (no /proc to tell how much)" in proc.text()  # never "0 kB -> 0 kB"


# ---------------------------------------------------------------------------
# 12. The Python API for agents
# ---------------------------------------------------------------------------


def test_adopt_serves_the_held_client_first(sockets):
    listener = sockets.tcp_listener()
    port = listener.getsockname()[1]
    early = sockets.connect(port)
    held = sockets.keep(listener.accept()[0])
    later = sockets.connect(port)
    env = {"DD_APM_NET_RECEIVER_FD": str(listener.detach()), "DD_APM_NET_RECEIVER_CLIENT_FD": str(held.detach())}
    with tl.adopt(environ=env) as handoff:  # closes the listener it adopted, however the test ends
        first = sockets.keep(handoff.accept()[0])
        second = sockets.keep(handoff.accept()[0])
        early.sendall(b"1")
        later.sendall(b"2")
        assert first.recv(1) == b"1" and second.recv(1) == b"2"


def test_a_failed_adopt_leaves_every_fd_open_and_untouched(sockets, tmp_path):
    listener = sockets.tcp_listener()
    listener.set_inheritable(True)  # as the loader hands it over
    with open(tmp_path / "not-a-socket", "w") as regular:
        os.set_inheritable(regular.fileno(), True)
        env = {"DD_APM_NET_RECEIVER_FD": str(listener.fileno()), "DD_APM_UNIX_RECEIVER_FD": str(regular.fileno())}
        with pytest.raises(tl.LoaderError, match=r"DD_APM_UNIX_RECEIVER_FD.* is not an open socket"):
            tl.adopt(environ=env)
        gc.collect()  # a wrapper adopt() dropped, collected now, would close its fd
        assert os.get_inheritable(listener.fileno()) and os.get_inheritable(regular.fileno())
        assert regular.write("still open") == 10
    client = sockets.connect(listener.getsockname()[1])  # the listener still listens, and can fall back
    assert listener.accept()[0].getpeername() == client.getsockname()


@pytest.mark.parametrize("kwargs, env, named", [
    ({}, {}, "DD_APM_NET_RECEIVER_FD, DD_APM_UNIX_RECEIVER_FD"),  # no hand-off at all: the caller binds its own
    ({"names": ["APP_FD"]}, {"DD_APM_NET_RECEIVER_FD": "3"}, "none of APP_FD is set"),
    ({"names": ["APP_FD"], "client_var": "APP_CLIENT_FD"}, {"LISTEN_PID": "1"}, "APP_FD, APP_CLIENT_FD"),
])
def test_adopt_finding_nothing_raises(kwargs, env, named):
    with pytest.raises(tl.LoaderError, match="no sockets were handed over to this process: .*%s" % named):
        tl.adopt(environ=env, **kwargs)


# A server written in Python, adopting with the one call whichever protocol handed its sockets over.
ADOPTING_AGENT = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
import trace_loader as tl

with tl.adopt(**json.loads(sys.argv[3])) as handoff:
    held = handoff.client is not None
    adopted = list(handoff.listeners.values()) + ([handoff.client] if held else [])
    with open(sys.argv[2] + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "listeners": sorted(handoff.listeners), "held": held,
                   "inheritable": [os.get_inheritable(s.fileno()) for s in adopted]}, f)
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    for _ in range(2):
        conn, peer = handoff.accept()
        with conn:
            request = conn.recv(65536)
            body = json.dumps({"pid": os.getpid(), "line": request.split(b"\\r\\n")[0].decode(),
                               "peer": peer is not None}).encode()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
"""


def adopting_agent(tmp_path, report, **adopt_kwargs: object) -> list[str]:
    script = tmp_path / "adopting_agent.py"
    script.write_text(ADOPTING_AGENT)
    return [sys.executable, str(script), os.path.dirname(LOADER), str(report), json.dumps(adopt_kwargs)]


def get(port: int, path: str) -> dict:
    with connect(port) as c:
        c.sendall(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
        return answer_json(read_answer(c))


@pytest.mark.parametrize("front_door, held, listeners", [
    ("drop-in", True, ["DD_APM_NET_RECEIVER_FD"]),
    ("systemd fd", True, ["unknown"]),
    ("systemd relay", False, ["unknown"]),
    ("env fd", True, ["APP_FD"]),
    ("env relay", False, ["APP_FD"]),
])
def test_adopt_reads_every_protocol_from_a_real_hand_off(procs, tmp_path, front_door, held, listeners):
    report = tmp_path / "report.json"
    protocol, held_client = front_door.split()[0], front_door.split()[-1]
    if front_door == "drop-in":
        port = free_port()
        proc = start_drop_in(procs, write_config(tmp_path, port=port), report,
                             agent=adopting_agent(tmp_path, report))
    else:
        env_options = ["--client-fd-var", "APP_CLIENT_FD"] if held_client == "fd" else []
        options = ["--protocol", "env", "--listen", "APP_FD=tcp://127.0.0.1:0", *env_options] \
            if protocol == "env" else ["--listen", "tcp://127.0.0.1:0"]
        kwargs = {"names": ["APP_FD"], "client_var": "APP_CLIENT_FD"} if protocol == "env" else {}
        proc = start_generic(procs, [*options, "--handle-tcp-probe", "--held-client", held_client, "--log-level",
                                     "debug"], adopting_agent(tmp_path, report, **kwargs))
        port = bound_port(proc)
    proc.wait_for("Polling")
    first = get(port, "/first")  # the held client: served first (by adopt()'s accept(), or through the relay)
    second = get(port, "/second")  # then the listener
    assert (first["pid"], second["pid"]) == (proc.pid, proc.pid)
    assert (first["line"], second["line"]) == ("GET /first HTTP/1.0", "GET /second HTTP/1.0")
    assert first["peer"] and second["peer"]
    # Every adopted socket close-on-exec, as sd_listen_fds(3) leaves them, whichever protocol.
    assert read_report(report) == {"pid": proc.pid, "listeners": listeners, "held": held,
                                   "inheritable": [False] * (len(listeners) + held)}


@pytest.mark.parametrize("via_loader", [False, True], ids=["systemd to adopt()", "systemd to loader to adopt()"])
@pytest.mark.parametrize("count, names, listeners", [
    (1, None, ["unknown"]),
    (1, "", ["unknown"]),
    (2, None, ["unknown@3", "unknown@4"]),
    (2, "web:", ["unknown", "web"]),
])
def test_adopt_names_unnamed_systemd_sockets_as_the_loader_does(procs, sockets, tmp_path, count, names, listeners,
                                                               via_loader):
    report = tmp_path / "report.json"
    passed = [sockets.tcp_listener() for _ in range(count)]
    agent = adopting_agent(tmp_path, report)
    # The loader reads the same LISTEN_FDNAMES, and hands the names it read on in its own.
    argv = [sys.executable, LOADER, "--listen", "systemd:", "--", *agent] if via_loader else agent
    proc = procs(launch_with_fds(passed, names, argv), base_env(), pass_fds=[s.fileno() for s in passed])
    if via_loader:
        proc.wait_for("Polling")
        sockets.connect(passed[0].getsockname()[1])  # wakes the program
    assert read_report(report)["listeners"] == listeners


@pytest.mark.parametrize("count, names, problem", [
    (0, None, r"LISTEN_FDS is '0'; expected a count of sockets from 1 to 4096"),
    (1, "a:b", r"LISTEN_FDNAMES is 'a:b': 2 names for LISTEN_FDS=1 sockets"),
])
def test_loader_and_adopt_refuse_the_same_listen_fds(procs, sockets, tmp_path, count, names, problem):
    passed = [sockets.tcp_listener() for _ in range(count)]
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count), **({"LISTEN_FDNAMES": names} if names else {})}
    with pytest.raises(tl.LoaderError, match="^%s$" % problem):
        tl.adopt(environ=env)
    proc = procs(launch_with_fds(passed, names, [sys.executable, LOADER, "--listen", "systemd:", "--",
                                                 *SAYS_ITS_PID]), base_env(), pass_fds=[s.fileno() for s in passed])
    proc.wait_for(r"WARN .* Failed to get listeners for \S+: %s$" % problem)  # and it fails open
    proc.wait_for("started as %d" % proc.pid)


def test_handoff_closes_what_it_holds(sockets):
    listener = sockets.tcp_listener()
    client = sockets.connect(listener.getsockname()[1])
    with tl.Handoff({"x": listener}, client, client_listener="x") as handoff:
        assert handoff.accept()[0] is client
    assert listener.fileno() == -1 and client.fileno() != -1  # the client was handed out: the caller's now
    with pytest.raises(tl.LoaderError, match="no listener named 'y'"):
        tl.Handoff({"x": sockets.tcp_listener()}, None).accept(name="y")


@pytest.mark.parametrize("value", ["abc", "-1", "999999", pytest.param("9" * 5000, id="5000-digits")])
def test_adopt_rejects_garbage(value):
    with pytest.raises(tl.LoaderError, match="DD_APM_NET_RECEIVER_FD"):
        tl.adopt(environ={"DD_APM_NET_RECEIVER_FD": value})


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_adopt_refuses_a_standard_stream(sockets, fd):
    # A socket on fd 2 (stderr to a socket, as under systemd's journal) must not become close-on-exec.
    with pytest.raises(tl.LoaderError, match=r"^DD_APM_NET_RECEIVER_FD is '%d', not a file descriptor number "
                                             r"from 3$" % fd):
        tl.adopt(environ={"DD_APM_NET_RECEIVER_FD": str(fd)})


def test_adopt_refuses_one_fd_under_two_names(sockets):
    listener = sockets.tcp_listener()
    listener.set_inheritable(True)
    env = {"APP_FD": str(listener.fileno()), "API_FD": str(listener.fileno())}
    with pytest.raises(tl.LoaderError, match=r"^APP_FD and API_FD both name fd %d$" % listener.fileno()):
        tl.adopt(names=["APP_FD", "API_FD"], environ=env)
    gc.collect()
    assert os.get_inheritable(listener.fileno())  # untouched: still open, still inheritable


def test_adopt_takes_one_str_as_one_name_and_a_client_var_alone(sockets):
    listener = sockets.tcp_listener()
    held = sockets.connect(listener.getsockname()[1])
    env = {"APP_FD": str(listener.detach()), "APP_CLIENT_FD": str(held.detach())}
    with tl.adopt(names="APP_FD", client_var="APP_CLIENT_FD", environ=env) as handoff:
        assert list(handoff.listeners) == ["APP_FD"] and handoff.client is not None
    listener, held = sockets.tcp_listener(), sockets.connect(sockets.tcp_listener().getsockname()[1])
    env = {"DD_APM_NET_RECEIVER_FD": str(listener.detach()), "MY_CLIENT_FD": str(held.detach())}
    with tl.adopt(client_var="MY_CLIENT_FD", environ=env) as handoff:  # the drop-in listeners, this client
        assert list(handoff.listeners) == ["DD_APM_NET_RECEIVER_FD"] and handoff.client is not None


def test_import_has_no_side_effects():
    code = ("import os, signal, sys; before = sorted(os.listdir('/dev/fd')); h = signal.getsignal(signal.SIGINT);"
            "sys.path.insert(0, %r); import trace_loader;"
            "assert sorted(os.listdir('/dev/fd')) == before; assert signal.getsignal(signal.SIGINT) is h;"
            "print('ok')" % os.path.dirname(LOADER))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------------------
# 13. Back to sleep: stop the program when idle, wait again, supervise it
# ---------------------------------------------------------------------------

# A server for the stop tests: adopts fd 3 (LISTEN_FDS), answers each request with its pid, reports the
# signals it gets. On SIGTERM it stops accepting and takes argv[1] seconds to end (-1: ignores SIGTERM).
SLEEPY_SERVER = r"""
import os, signal, socket, sys, time
linger = float(sys.argv[1])
class Stop(Exception):
    pass
def stop(signum, frame):
    raise Stop
def say(signum, frame):
    os.write(2, b"server got signal %d\n" % signum)
signal.signal(signal.SIGTERM, signal.SIG_IGN if linger < 0 else stop)
for name in ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGQUIT"):
    signal.signal(getattr(signal, name), say)
listener = socket.socket(fileno=3)
sys.stderr.write("server %d up\n" % os.getpid())
sys.stderr.flush()
try:
    while True:
        conn, _ = listener.accept()
        try:
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n%d" % os.getpid())
        except OSError:
            pass  # a probe that reset
except Stop:
    sys.stderr.write("server stopping\n")
    sys.stderr.flush()
    time.sleep(linger)
"""
STOPPING = r"\| INFO \|.*Stopping .+: its sockets were idle for \d+ s"
STOPPED = r"\| INFO \|.*Stopped .+ in [\d.]+ s \((exit status \d+|killed by signal \d+)\)"


def sleepy_loader(procs, *options: str, program: list[str] | None = None, linger: float = 0,
                  **popen: object) -> tuple[Proc, int]:
    """A generic loader in front of SLEEPY_SERVER (or `program`) that stops it after 1 s idle; waiting."""
    program = program or [sys.executable, "-c", SLEEPY_SERVER, str(linger)]
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--log-level", "debug", "--stop-when-idle", "1",
                                 *options], program, **popen)
    port = bound_port(proc)
    proc.wait_for("Polling")
    return proc, port


def served_by(port: int) -> int:
    """The pid of the SLEEPY_SERVER that answered one request."""
    with connect(port) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        raw = read_answer(c)
    assert raw.startswith(b"HTTP/1.0 200 OK"), raw
    return int(raw.partition(b"\r\n\r\n")[2])


@needs_proc
def test_idle_program_is_stopped_and_the_next_client_starts_it_again(procs, tmp_path):
    report = tmp_path / "report.json"
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--handle-tcp-probe", "--stop-when-idle", "1",
                                 "--log-level", "debug"], systemd_agent(report))
    port = bound_port(proc)
    pids = []
    for cycle in (1, 2, 3):
        proc.wait_for("Polling", count=cycle)
        kubelet_probe(port)  # the probe check works in every wait, not only the first
        proc.wait_for(ABSORBED, count=cycle)
        with connect(port) as c:
            pids.append(answer_json(http_request(c))["pid"])
        closed = time.monotonic()
        line = proc.wait_for(STOPPING, count=cycle)[-1]
        delay = time.monotonic() - closed
        assert 0.9 < delay < 1.0 + 0.1 + 0.5, (delay, line)  # at most 10% late, and 0.5 s for a busy machine
        proc.wait_for(STOPPED, count=cycle)
        wait_gone(pids[-1])
    assert len(set(pids)) == 3 and proc.pid not in pids  # a new program each time, under the same loader
    assert proc.count(r"\| INFO \|.*Waking .*1 probe absorbed since start \(FIN: 1, RST: 0\); waited \d+ s$") == 3
    assert read_report(report)["listen_pid_ok"]  # LISTEN_PID is the child's pid
    assert proc.proc.poll() is None and proc.is_loader()
    assert proc.count("Traceback") == 0


def test_stop_when_idle_0_execs_in_place(procs):
    proc, port = sleepy_loader(procs, "--stop-when-idle", "0")
    assert served_by(port) == proc.pid  # no fork: the program has the loader's pid
    assert proc.count("Sockets of") == 0


@needs_proc
def test_a_silent_open_connection_keeps_the_program_up(procs, sockets):
    proc, port = sleepy_loader(procs)
    first = served_by(port)
    silent = sockets.connect(port)  # accepted by the server, which waits for a request that never comes
    proc.wait_for(r"Sockets of \S+ in use: [1-9]", count=25)  # 2 s of samples: twice the idle second
    assert proc.count("Stopping") == 0
    silent.close()
    proc.wait_for(STOPPING)
    proc.wait_for(STOPPED)
    assert served_by(port) != first


@needs_proc
@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate is not installed")
def test_under_systemd_socket_activate_the_program_sleeps_and_wakes_on_the_inherited_socket(procs):
    port = free_port()  # systemd-socket-activate refuses port 0
    argv = [shutil.which("systemd-socket-activate"), "-l", "127.0.0.1:%d" % port, sys.executable, LOADER,
            "--listen", "systemd:", "--handle-tcp-probe", "--log-level", "debug", "--stop-when-idle", "1", "--",
            sys.executable, "-c", SLEEPY_SERVER, "0"]
    proc = procs(argv, base_env())
    proc.wait_for("Listening on 127.0.0.1:%d" % port)
    first = served_by(port)  # the loader starts on this request, and the server after it
    proc.wait_for(STOPPED)
    proc.wait_for(r"Polling\.\.\. \(fds", count=2)  # the inherited socket, waited on again
    kubelet_probe(port)
    proc.wait_for(ABSORBED)
    second = served_by(port)
    assert second != first and proc.is_loader()  # a new server; the loader kept systemd's pid
    assert second in child_pids(proc.pid)  # its child (beside, for a moment, the relay helper)


@needs_proc
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_probes_between_samples_do_not_keep_the_program_up(procs, tmp_path, family):
    path = str(tmp_path / "s.sock")
    listen = "unix://" + path if family == "unix" else "tcp://127.0.0.1:0"
    proc = start_generic(procs, ["--listen", listen, "--log-level", "debug", "--stop-when-idle", "2"],
                         [sys.executable, "-c", SLEEPY_SERVER, "0"])
    port = 0 if family == "unix" else bound_port(proc)
    proc.wait_for("Polling")
    probes = 0
    while not proc.count("Stopping"):  # 5 probes per 200 ms sample, each over in about a millisecond
        if family == "unix":
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
        else:
            rst_probe(port)
        probes += 1
        assert probes < 150, proc.text()  # 6 s: the idle time three times over, even if a sample catches a probe
        proc.wait_for(r"Sockets of \S+ in use|Stopping", count=probes // 5 + 1)
    assert probes >= 25  # the program was stopped although probes came all through its idle time
    proc.wait_for(STOPPED)


@needs_proc
def test_a_program_whose_children_keep_serving_has_them_stopped_too(procs):
    # A wrapper shell: SIGTERM ends the shell, and its server child, orphaned to the loader, would keep serving.
    wrapper = ["sh", "-c", '"$0" -c "$1" 0 & wait', sys.executable, SLEEPY_SERVER]
    proc, port = sleepy_loader(procs, program=wrapper)
    first = served_by(port)
    proc.wait_for(STOPPED)
    proc.wait_for("server stopping")  # the SIGTERM the loader sent once the shell had ended
    proc.wait_for(r"Polling\.\.\. \(fds", count=2)
    assert child_pids(proc.pid) == []  # nothing left running, no zombie, during the wait
    assert served_by(port) != first


@needs_proc
def test_what_the_program_left_and_ignores_sigterm_is_killed_after_the_stop_timeout(procs):
    # What the program left that ignores SIGTERM gets SIGKILL after the stop timeout, and the wait comes
    # back; a process the loader's parent started (not the program's) is left alone.
    sibling = subprocess.Popen(["sleep", "60"])
    # SIGTERM ignored, inherited: a shell left behind, and its sleep, ours only once the shell is SIGKILLed.
    script = 'trap "" TERM; sh -c "sleep 120 & wait" & exec "$0" -c "$1" 0'
    program = ["sh", "-c", script, sys.executable, SLEEPY_SERVER]
    proc, port = sleepy_loader(procs, "--stop-timeout", "1", program=program)
    first = served_by(port)
    proc.wait_for(r"WARN .* What \S+ left still runs 1 s after SIGTERM: SIGKILL")
    proc.wait_for(r"Polling\.\.\. \(fds", count=2)
    assert child_pids(proc.pid) == []
    assert sibling.poll() is None  # not the program's: untouched
    sibling.kill()
    sibling.wait()
    assert served_by(port) != first


@needs_proc
def test_a_sibling_of_the_loader_is_not_stopped_with_the_program(procs, tmp_path):
    mark = tmp_path / "sibling.pid"
    script = 'sleep 60 & echo $! > "$0"; exec "$@"'  # the sleep becomes the loader's child
    argv = ["sh", "-c", script, str(mark), sys.executable, LOADER, "--listen", "tcp://127.0.0.1:0", "--log-level",
            "debug", "--stop-when-idle", "1", "--", sys.executable, "-c", SLEEPY_SERVER, "0"]
    proc = procs(argv, base_env())
    port = bound_port(proc)
    served_by(port)
    proc.wait_for(STOPPED)
    proc.wait_for(r"Polling\.\.\. \(fds", count=2)
    sibling = int(mark.read_text())
    assert sibling in child_pids(proc.pid)  # alive, still the loader's child
    os.kill(sibling, signal.SIGKILL)
    # Reaped during the wait: no zombie left while no program runs.
    wait_until(lambda: child_pids(proc.pid) == [], "the sibling reaped by the waiting loader")


# Dies of signal 32, which glibc keeps for itself (and GNU make leaves ignored for its children): its
# default action is set back with the raw system call, as the C library refuses to.
DIES_OF_SIGNAL_32 = r"""
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall({"x86_64": 13, "aarch64": 134}[platform.machine()], 32, ctypes.create_string_buffer(64), None, 8)
os.kill(os.getpid(), 32)
"""


@needs_proc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64") or not LINUX, reason="rt_sigaction's number")
def test_a_program_killed_by_a_signal_the_c_library_reserves_is_not_started_twice(procs):
    proc = start_generic(procs, ["--listen", "tcp://127.0.0.1:0", "--stop-when-idle", "60"],
                         [sys.executable, "-c", DIES_OF_SIGNAL_32])
    wake(bound_port(proc))
    assert proc.wait_exit() == 128 + 32
    assert proc.count("Starting python") == 1 and proc.count("Internal error") == 0, proc.text()


@needs_proc
def test_a_unix_socket_file_the_program_deletes_is_named_in_a_warning(procs, tmp_path):
    path = str(tmp_path / "s.sock")
    program = [sys.executable, "-c", "import os, signal, socket, sys; "
               "signal.signal(signal.SIGTERM, lambda *_: (os.unlink(sys.argv[1]), sys.exit(0))); "
               "socket.socket(fileno=3).accept()[0].close(); signal.pause()", path]
    proc = start_generic(procs, ["--listen", "unix://" + path, "--stop-when-idle", "1"], program)
    proc.wait_for("Polling")
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
    proc.wait_for(STOPPED)
    proc.wait_for(r"\| WARN \|.*%s no longer names the unix socket the loader listens on" % re.escape(path))


@needs_proc
def test_a_client_arriving_during_the_stop_is_answered_by_the_next_start(procs, sockets):
    proc, port = sleepy_loader(procs, linger=1.5)
    first = served_by(port)
    proc.wait_for("server stopping")  # SIGTERM came; the server no longer accepts, and takes 1.5 s to end
    late = sockets.connect(port)  # waits in the backlog of the listener the loader kept
    late.sendall(b"GET / HTTP/1.0\r\n\r\n")
    proc.wait_for(STOPPED)
    raw = read_answer(late)
    second = int(raw.partition(b"\r\n\r\n")[2])
    assert second not in (first, proc.pid)
    assert proc.count(r"Waking \S+: traffic on TCP listener 1") == 2
    assert STOPPED and proc.count("Stopped") == 1


@needs_proc
def test_a_flood_of_clients_during_the_stop_is_answered_by_the_next_start(procs, sockets):
    proc, port = sleepy_loader(procs, linger=1)
    first = served_by(port)
    proc.wait_for("server stopping")
    flood = [sockets.connect(port) for _ in range(200)]  # all in the backlog the loader kept
    for sock in flood:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    proc.wait_for(STOPPED)
    answers = {int(read_answer(sock).partition(b"\r\n\r\n")[2]) for sock in flood}
    assert len(answers) == 1 and first not in answers  # every one, by the next start
    assert proc.count("Waking") == 2


@needs_proc
def test_a_program_that_ignores_sigterm_is_killed_after_the_stop_timeout(procs):
    proc, port = sleepy_loader(procs, "--stop-timeout", "1", linger=-1)
    first = served_by(port)
    started = time.monotonic()
    proc.wait_for(STOPPING)
    proc.wait_for(r"\| WARN \|.*still runs 1 s after SIGTERM: SIGKILL")
    line = proc.wait_for(STOPPED)[0]
    assert "killed by signal %d" % signal.SIGKILL in line
    assert time.monotonic() - started > 1.0
    proc.wait_for("Polling", count=2)
    assert served_by(port) != first


@needs_proc
@pytest.mark.parametrize("code, status", [("sys.exit(7)", 7),
                                          ("os.kill(os.getpid(), signal.SIGUSR1)", -signal.SIGUSR1),
                                          ("os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL)])
def test_a_program_ending_on_its_own_ends_the_loader_the_same_way(procs, code, status):
    program = [sys.executable, "-c", "import os, signal, sys; sys.stderr.write('up\\n'); sys.stderr.flush(); " + code]
    proc, port = sleepy_loader(procs, program=program)
    wake(port)
    assert proc.wait_exit() == status
    shown = "exit status %d" % status if status >= 0 else "killed by signal %d" % -status
    assert proc.count(r"ended \(%s\); the loader ends the same way" % shown) == 1


@needs_proc
def test_a_sigchld_our_parent_blocked_still_wakes_the_supervisor(procs):
    block = lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # noqa: E731
    proc, port = sleepy_loader(procs, "--stop-timeout", "1", linger=-1, preexec_fn=block)
    served_by(port)
    proc.wait_for(r"SIGKILL")  # then nothing but SIGCHLD wakes the loop
    proc.wait_for(STOPPED)
    proc.wait_for(r"Polling\.\.\. \(fds", count=2)


@needs_proc
def test_no_fd_left_at_the_wake_starts_the_program_once_in_place(procs):
    import resource

    proc, port = sleepy_loader(procs)
    hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (len(open_fds_of(proc.pid)), hard))
    wake(port)
    proc.wait_for(r"\| WARN \|.*Cannot fork \(Too many open files.*\); starting \S+ in place")
    proc.wait_for(r"Starting \S+\.\.\.")
    assert proc.wait_exit() != 0  # the program, in the loader's pid, cannot start with no fd free
    assert proc.count(r"Starting \S+\.\.\.") == 1 and proc.count("CRITICAL") == 0


@needs_proc
def test_a_count_that_failed_once_does_not_keep_the_program_up_for_ever(procs):
    import resource

    proc, port = sleepy_loader(procs)
    with connect(port):  # a silent connection: the program runs, in use
        proc.wait_for(r"Sockets of \S+ in use: [1-9]")
        limits = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (len(open_fds_of(proc.pid)), limits[1]))
        proc.wait_for(r"\| WARN \|.*Cannot count the connections of ")
        proc.wait_for(r"Sockets of \S+ in use: None", count=3)  # sampling goes on; never stopped on such a count
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, limits)
    proc.wait_for(STOPPING)
    assert proc.count("Cannot count") == 1


@needs_proc
@pytest.mark.skipif(open("/proc/sys/kernel/core_pattern").read().strip() != "core" if LINUX else True,
                    reason="needs core files named core in the working directory")
def test_a_program_that_dumped_core_does_not_have_the_loader_dump_its_own(procs, tmp_path):
    import resource

    (tmp_path / "program").mkdir()
    program = [sys.executable, "-c", "import os, sys; os.chdir(sys.argv[1]); os.abort()", str(tmp_path / "program")]
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    cores = lambda: resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # noqa: E731
    proc, port = sleepy_loader(procs, program=program, preexec_fn=cores, cwd=str(tmp_path))
    wake(port)
    assert proc.wait_exit() == -signal.SIGABRT  # killed by the same signal
    assert (tmp_path / "program" / "core").exists() and not (tmp_path / "core").exists()


@needs_proc
def test_signals_are_forwarded_to_the_program(procs):
    proc, port = sleepy_loader(procs)
    served = served_by(port)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT):
        os.kill(proc.pid, signum)
        proc.wait_for("server got signal %d" % signum)
    assert state_of(served)[0] != "Z" and proc.proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)  # forwarded: the server ends cleanly, and so does the loader
    proc.wait_for("server stopping")
    assert proc.wait_exit() == 0


@needs_proc
def test_sigterm_during_an_idle_stop_is_not_lost(procs):
    proc, port = sleepy_loader(procs, linger=1)
    served_by(port)
    proc.wait_for("server stopping")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait_exit() == -signal.SIGTERM
    assert proc.count("Stopped") == 1 and proc.count(r"Polling\.\.\. \(fds") == 1  # never waited again


@needs_proc
def test_sigterm_the_program_ignored_ends_the_loader_at_the_next_idle_stop(procs):
    proc, port = sleepy_loader(procs, "--stop-timeout", "1", linger=-1)
    served_by(port)
    os.kill(proc.pid, signal.SIGTERM)  # forwarded, and ignored by the program
    proc.wait_for(STOPPING)
    assert proc.wait_exit() == -signal.SIGTERM
    assert proc.count("SIGKILL") == 1 and proc.count(r"Polling\.\.\. \(fds") == 1


@needs_unshare
def test_as_pid_1_it_reaps_every_orphan_and_ends_with_128_plus_n(procs, tmp_path):
    report = tmp_path / "report.json"
    port = free_port()
    proc = procs(["unshare", "--pid", "--fork", "--kill-child", sys.executable, LOADER, "--listen",
                  "tcp://127.0.0.1:%d" % port, "--handle-tcp-probe", "--stop-when-idle", "1", "--"]
                 + systemd_agent(report), base_env())
    proc.wait_for("Polling")
    loader = only_child(proc.pid)  # PID 1 inside its namespace
    for cycle in (1, 2):
        with connect(port) as c:  # relayed: the helper is double-forked, an orphan of PID 1
            answer_json(http_request(c))
        proc.wait_for(STOPPED, count=cycle)
        proc.wait_for("Polling", count=cycle + 1)
        assert child_pids(loader) == []  # the program, its relay helper: reaped, no zombie
    with connect(port) as c:
        answer_json(http_request(c))
    program = wait_until(lambda: child_pids(loader), "the program")[0]
    wait_until(lambda: child_pids(loader) == [program], "only the program left, the helper reaped")
    os.kill(loader, signal.SIGTERM)  # forwarded; the program dies of it; PID 1 cannot, so 128+15
    assert proc.wait_exit() == 128 + signal.SIGTERM


@pytest.mark.parametrize("option, value", [("--stop-when-idle", "-1"), ("--stop-when-idle", "604801"),
                                           ("--stop-when-idle", "1.5"), ("--stop-timeout", "x")])
def test_bad_stop_values_are_usage_errors(option, value):
    result = run_loader([option, value, "--listen", "tcp://127.0.0.1:0", "--", "true"])
    assert result.returncode == 2
    assert "argument %s: '%s': expected seconds from 0 to 604800" % (option, value) in result.stderr


@pytest.mark.parametrize("name", ["DD_APM_SOCKET_ACTIVATION_STOP_WHEN_IDLE", "DD_APM_SOCKET_ACTIVATION_STOP_TIMEOUT"])
def test_drop_in_bad_stop_values_fail_open(procs, tmp_path, name):
    proc, _ = fails_open(procs, tmp_path, write_config(tmp_path, port=free_port()), base_env(**{name: "604801"}))
    assert proc.count(r"\| WARN \|.*%s.*604801 s is out of range \(0-604800\)" % name) == 1


@needs_proc
def test_drop_in_stop_when_idle_hands_the_client_fd_over_in_each_cycle(procs, tmp_path):
    port = free_port()
    report = tmp_path / "report.json"
    config = write_config(tmp_path, port=port, text="")
    env = base_env(DD_APM_SOCKET_ACTIVATION_STOP_WHEN_IDLE="1", DD_APM_SOCKET_ACTIVATION_STOP_TIMEOUT="5")
    proc = start_drop_in(procs, config, report, env)
    for cycle in (1, 2):
        proc.wait_for("Polling", count=cycle)
        with connect(port) as c:
            answer = answer_json(http_request(c))
        assert answer["via"] == "held-client" and answer["pid"] != proc.pid
        proc.wait_for(STOPPED, count=cycle)


@needs_proc
@pytest.mark.parametrize("family", ["tcp", "tcp6", "unix"])
def test_connections_are_counted_alike_by_sock_diag_and_proc_net(sockets, tmp_path, family):
    if family == "tcp6" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    if family == "unix":
        listener = sockets.unix_listener(str(tmp_path / "s.sock"))
        address: object = str(tmp_path / "s.sock")
    else:
        listener = sockets.keep(socket.socket(socket.AF_INET6 if family == "tcp6" else socket.AF_INET))
        listener.bind(("::1" if family == "tcp6" else "127.0.0.1", 0))
        listener.listen()
        address = listener.getsockname()[:2]
    usage = tl._Usage([tl._Listener(tl._ListenerSpec("x", tl._TCP, shown_as="x"), listener)])
    assert usage.count_with_sock_diag() == usage.count_in_proc_net() == usage.count() == 0
    client = sockets.keep(socket.socket(listener.family))
    client.connect(address)
    # In the backlog: the listener is readable, and a TCP connection is listed already (a unix one is not).
    assert usage.count() == (1 if family == "unix" else 2)
    server, _ = listener.accept()
    sockets.keep(server)
    assert usage.count_with_sock_diag() == usage.count_in_proc_net() == usage.count() == 1  # not the client's end
    client.close()  # the program has not closed its end yet (CLOSE_WAIT): still held
    assert usage.count_with_sock_diag() == usage.count_in_proc_net() == 1
    server.close()
    assert usage.count_with_sock_diag() == usage.count_in_proc_net() == usage.count() == 0


# ---------------------------------------------------------------------------
# 14. Footprint
# ---------------------------------------------------------------------------

# `make bench` measures the memory-release steps; here only: they run, and can be turned off.


@pytest.mark.parametrize("steps", ["", "none", "bytecode", "trim,pageout"])
def test_memory_release_steps_keep_the_behaviour(procs, tmp_path, steps):
    port = free_port()
    report = tmp_path / "report.json"
    env = base_env(TRACE_LOADER_RELEASE_MEMORY=steps)
    proc = start_drop_in(procs, write_config(tmp_path, port=port), report, env)
    proc.wait_for("Polling")
    released = proc.count(r"Released memory before waiting: RSS \d+ kB -> \d+ kB")
    assert released == (1 if LINUX and steps in ("", "trim,pageout") else 0)
    kubelet_probe(port)
    proc.wait_for(ABSORBED)
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    assert read_report(report)["fds"] == [0, 1, 2, 3, 4]


@needs_proc
def test_a_16_mib_config_of_4_million_short_keys_peaks_under_150_mb(procs, tmp_path):
    port = free_port()
    config = write_config(tmp_path, "other:", port=port)  # an unneeded key, to hold them all
    with open(config, "a") as f:
        f.write(" k:\n" * ((tl._MAX_CONFIG_BYTES - f.tell()) // 4))
    proc = start_drop_in(procs, config, tmp_path / "report.json")
    proc.wait_for("Polling")
    peak_kb = int(proc_status_of(proc.pid)["VmHWM"].split()[0])  # the whole read lies behind
    assert peak_kb < 150 * 1024, "peak RSS %d kB reading the configuration" % peak_kb


@pytest.mark.parametrize("steps", ["", "none"])
def test_exit_statuses_are_the_same_with_and_without_the_bytecode_step(tmp_path, steps):
    env = base_env(TRACE_LOADER_RELEASE_MEMORY=steps, DD_APM_ENABLED="false")
    assert run_loader(["--version"], env=env).returncode == 0
    assert run_loader(["--listen", "bad", "--", "true"], env=env).returncode == 2
    assert run_loader([write_config(tmp_path), "no-such-agent"], env=env).returncode == 1
    assert run_loader([write_config(tmp_path), sys.executable], env=env).returncode == 0


def proc_status(pid: int) -> dict[str, int]:
    with open("/proc/%d/status" % pid) as f:
        return {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in f)
                if key in ("VmRSS", "RssAnon", "RssFile")}


@pytest.mark.skipif(not LINUX or not hasattr(os, "memfd_create"), reason="the bytecode step needs a memfd")
@pytest.mark.parametrize("options", [[], ["-X", "utf8", "-W", "ignore"], ["--"]])
def test_run_from_source_the_loader_waits_as_bytecode_with_its_options_argv_and_fds(procs, tmp_path, options):
    report = tmp_path / "report.json"
    port = free_port()
    config = write_config(tmp_path, port=port)
    proc = procs([sys.executable, *options, LOADER, config, *agent_argv(report)], base_env())
    proc.wait_for("Polling")
    with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
        argv = os.fsdecode(f.read()).split("\0")
    # The same interpreter and options (less a closing "--", which would make -S the script), -S, the
    # runner, then the script and its arguments as given.
    kept = [option for option in options if option != "--"]
    assert argv[: len(kept) + 3] == [sys.executable, *kept, "-S", "-c"], argv
    assert argv[argv.index(LOADER):-1] == [LOADER, config, *agent_argv(report)]
    assert open_fds_of(proc.pid) == [0, 1, 2, 3]  # no memfd left behind
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid
    assert read_report(report)["fds"] == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not LINUX or not hasattr(os, "memfd_create"), reason="the bytecode step needs a memfd")
def test_the_bytecode_step_never_starts_another_interpreter(procs, tmp_path):
    # argv[0] "python3" and a PATH where that name is something else: sys.executable names it, not the
    # interpreter that runs (`exec -a`, a unit's Environment=PATH=...). The step must not exec it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 99\n")
    (bin_dir / "python3").chmod(0o755)
    port = free_port()
    env = dict(base_env(), PATH="%s:%s" % (bin_dir, os.environ["PATH"]))
    proc = procs(["python3", LOADER, write_config(tmp_path, port=port), *agent_argv(tmp_path / "report.json")],
                 env, executable=sys.executable)
    proc.wait_for("Polling")
    with connect(port) as c:
        assert answer_json(http_request(c))["pid"] == proc.pid


@pytest.mark.skipif(not LINUX or not hasattr(os, "memfd_create"), reason="the bytecode step needs a memfd")
def test_run_from_source_the_loader_idles_in_the_memory_of_its_compiled_form(procs, tmp_path):
    # Anonymous memory only: file pages this interpreter shares with pytest's cannot be paged out.
    compiled = tmp_path / "trace_loader.pyc"
    subprocess.run([sys.executable, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], "
                    "doraise=True)", LOADER, str(compiled)], check=True, timeout=TIMEOUT)
    anon = {}
    for argv in ([LOADER], ["-I", "-S", str(compiled)]):
        proc = procs([sys.executable, *argv, write_config(tmp_path, port=free_port(), level="info"), "true"],
                     base_env())
        proc.wait_for("Polling")
        anon[argv[-1]] = proc_status(proc.pid)["RssAnon"]  # what the release before "Polling" left
        proc.stop()
    # Compiling the source leaves allocator arenas and, for a script, its syntax tree: 4 MB and more
    # (9740 against 5148 kB on 3.11). The two ways of loading bytecode differ by up to ~150 kB on 3.8,
    # where the table of interned names grows in steps with the number of names the module holds.
    assert anon[LOADER] - anon[str(compiled)] < 512, anon


# ---------------------------------------------------------------------------
# 15. Packaging: the wheel and its `trace-loader` command
# ---------------------------------------------------------------------------

CHECKOUT = os.path.dirname(LOADER)


def wheel_tooling_missing() -> str:
    """Why this interpreter cannot build and install the wheel offline; "" when it can."""

    def version_of(dist: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in re.findall(r"\d+", metadata.version(dist))[:3])
        except metadata.PackageNotFoundError:
            return ()

    if version_of("setuptools") < (61,):  # the first to read [project] from pyproject.toml
        return "building the wheel needs setuptools>=61 (python -m pip install 'setuptools>=61' wheel)"
    if version_of("setuptools") < (70, 1) and not version_of("wheel"):  # 70.1 took bdist_wheel in
        return "building the wheel with setuptools<70.1 needs wheel (python -m pip install wheel)"
    if version_of("pip") < (22, 3):  # pip --python
        return "installing into a venv without pip needs pip>=22.3 (python -m pip install -U pip)"
    return ""


def run_to_completion(argv: list[str], **kw: object) -> str:
    """Run a build or install step; its whole output is the failure message."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, "%s exited %d:\n%s%s" % (argv, result.returncode, result.stdout, result.stderr)
    return str(result.stdout)


@pytest.mark.skipif(not os.path.isfile(os.path.join(CHECKOUT, "pyproject.toml")),
                    reason="not a checkout: no pyproject.toml beside the module")
def test_the_installed_command_activates_like_the_file(procs, tmp_path):
    missing = wheel_tooling_missing()
    if missing:
        pytest.skip(missing)
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    # Built from the checkout as a user would, but offline: with this
    # interpreter's setuptools instead of a fresh one from an index.
    run_to_completion([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                       "--disable-pip-version-check", "-w", str(wheels), CHECKOUT])
    (wheel,) = wheels.iterdir()
    assert wheel.name == "trace_loader-%s-py3-none-any.whl" % tl.__version__  # the version is __version__
    with zipfile.ZipFile(str(wheel)) as archive:
        assert [name for name in archive.namelist() if ".dist-info/" not in name] == ["trace_loader.py"]
    # A venv without pip of its own (ensurepip costs seconds); this pip fills it.
    run_to_completion([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    run_to_completion([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps",
                       "--disable-pip-version-check", str(wheel)])

    # From tmp_path with the tests' bare environment, neither the checkout nor a
    # PYTHONPATH is on the venv's path: what runs is what pip installed.
    located = run_to_completion([python, "-c", "import trace_loader; print(trace_loader.__file__)"],
                                cwd=str(tmp_path), env=base_env())
    assert os.path.realpath(located.strip()).startswith(os.path.realpath(str(venv)) + os.sep), located
    version = run_to_completion([python, "-m", "trace_loader", "--version"], cwd=str(tmp_path), env=base_env())
    assert version == "trace-loader %s\n" % tl.__version__

    report = tmp_path / "report.json"
    proc = procs([str(venv / "bin" / "trace-loader"), "--listen", "tcp://127.0.0.1:0", "--log-level", "debug",
                  "--"] + systemd_agent(report), base_env(), cwd=str(tmp_path))
    port = bound_port(proc)
    proc.wait_for("Polling")
    with connect(port) as c:
        answer = answer_json(http_request(c))
    # The console script's process became the agent: same pid, the socket as fd 3.
    assert answer["pid"] == proc.pid and answer["via"].endswith("@3"), answer
    assert read_report(report)["listen_pid_ok"] is True
