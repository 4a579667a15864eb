#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A stand-in agent: adopts the sockets trace_loader.py hands over and answers.

It reads the hand-off itself (it does not import trace_loader), so it checks
the contract independently:

- drop-in / env protocol: DD_APM_NET_RECEIVER_FD, DD_APM_UNIX_RECEIVER_FD,
  DD_OTLP_CONFIG_GRPC_FD, DD_APM_NET_RECEIVER_CLIENT_FD (or the names given
  with --fd-var / --client-var);
- systemd protocol (--systemd): LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES,
  fds from 3.

With --report PATH it first writes a JSON report of what it inherited (pid,
open fds, signal dispositions, the hand-off variables), then it answers every
HTTP request on every socket with a small JSON body naming its pid and the
socket that carried the request. It serves the held client first. It runs
until it is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

DROP_IN_VARS = ["DD_APM_NET_RECEIVER_FD", "DD_APM_UNIX_RECEIVER_FD", "DD_OTLP_CONFIG_GRPC_FD"]
DROP_IN_CLIENT_VAR = "DD_APM_NET_RECEIVER_CLIENT_FD"


def open_fds() -> list[int]:
    """The fds open right now, without the one used to list them."""
    directory = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    listed = [int(name) for name in os.listdir(directory)]
    return sorted(fd for fd in listed if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def disposition(name: str) -> str:
    handler = signal.getsignal(getattr(signal, name))
    if handler is signal.SIG_DFL:
        return "default"
    if handler is signal.SIG_IGN:
        return "ignored"
    return "handled"


def adopt_env(fd_vars: list[str], client_var: str) -> tuple[dict[str, socket.socket], socket.socket | None]:
    listeners = {}
    for var in fd_vars:
        if os.environ.get(var):
            listeners[var] = socket.socket(fileno=int(os.environ[var]))
    client = None
    if os.environ.get(client_var):
        client = socket.socket(fileno=int(os.environ[client_var]))
    return listeners, client


def adopt_systemd() -> tuple[dict[str, socket.socket], socket.socket | None, dict[str, object]]:
    check: dict[str, object] = {
        "listen_pid_ok": os.environ.get("LISTEN_PID") == str(os.getpid()),
        "listen_fds": os.environ.get("LISTEN_FDS"),
        "listen_fdnames": os.environ.get("LISTEN_FDNAMES"),
    }
    count = int(os.environ.get("LISTEN_FDS", "0")) if check["listen_pid_ok"] else 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    listeners: dict[str, socket.socket] = {}
    client = None
    for index in range(count):
        fd = 3 + index
        name = names[index] if index < len(names) else "unknown"
        sock = socket.socket(fileno=fd)
        if name == "connection":
            client = sock
        else:
            listeners["%s@%d" % (name, fd)] = sock
    return listeners, client, check


def answer(conn: socket.socket, via: str) -> None:
    """Read one HTTP request (headers and Content-Length body), answer it."""
    with conn:
        conn.settimeout(30)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            path = lines[0].split(" ")[1] if " " in lines[0] else ""
            payload = json.dumps({"pid": os.getpid(), "via": via, "path": path, "body_bytes": len(body)}).encode()
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(payload), payload)
            )
        except OSError:
            return


def serve_listener(name: str, listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            sys.stderr.write("demo agent: accept on %s failed: %s\n" % (name, exc))
            continue
        threading.Thread(target=answer, args=(conn, name), daemon=True).start()


def raise_fd_limit() -> None:
    """Like a Go program: lift the soft RLIMIT_NOFILE to the hard limit."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    fds = open_fds()  # first thing: nothing of ours is open yet
    raise_fd_limit()
    args = {"--report": "", "--fd-var": "", "--client-var": DROP_IN_CLIENT_VAR}
    systemd = "--systemd" in argv
    rest = [a for a in argv if a != "--systemd"]
    fd_vars: list[str] = []
    for flag, value in zip(rest[::2], rest[1::2]):
        if flag == "--fd-var":
            fd_vars.append(value)
        elif flag in args:
            args[flag] = value
    check: dict[str, object] = {}
    if systemd:
        listeners, client, check = adopt_systemd()
    else:
        listeners, client = adopt_env(fd_vars or DROP_IN_VARS, args["--client-var"])
    report = {
        "pid": os.getpid(),
        "argv0": sys.argv[0],
        "fds": fds,
        "sigpipe": disposition("SIGPIPE"),
        "sigxfsz": disposition("SIGXFSZ"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("DD_", "LISTEN_", "DEMO_"))},
        "listeners": {name: [sock.family.name, sock.type.name, repr(sock.getsockname())]
                      for name, sock in listeners.items()},
        "blocking": {name: sock.getblocking() and os.get_blocking(sock.fileno())
                     for name, sock in listeners.items()},
        "reuseaddr": {name: bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
                      for name, sock in listeners.items()},
        "client": client is not None,
        **check,
    }
    if args["--report"]:
        tmp = args["--report"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.rename(tmp, args["--report"])  # appears whole, so a reader never sees half
    sys.stderr.write("demo agent: pid %d serving %s%s\n"
                     % (os.getpid(), ", ".join(sorted(listeners)) or "nothing",
                        " and a held client" if client is not None else ""))
    sys.stderr.flush()  # before 3.9, stderr to a pipe is block-buffered
    if client is not None:
        threading.Thread(target=answer, args=(client, "held-client"), daemon=True).start()
    for name, listener in listeners.items():
        threading.Thread(target=serve_listener, args=(name, listener), daemon=True).start()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
