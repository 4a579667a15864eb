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

import argparse
import json
import os
import signal
import socket
import sys
import threading

DROP_IN_VARS = ["DD_APM_NET_RECEIVER_FD", "DD_APM_UNIX_RECEIVER_FD", "DD_OTLP_CONFIG_GRPC_FD"]
DROP_IN_CLIENT_VAR = "DD_APM_NET_RECEIVER_CLIENT_FD"
# Dispositions reported: what the loader sets while waiting must not reach the agent.
SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGIO", "SIGPWR", "SIGVTALRM",
           "SIGPROF", "SIGXCPU")


def open_fds() -> list[int]:
    """The fds open right now, without the one used to list them (a scan where /proc is missing)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            listed = [int(name) for name in os.listdir(directory)]
        except OSError:
            continue
        return sorted(fd for fd in listed if _is_open(fd))
    return [fd for fd in range(1024) if _is_open(fd)]


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


BANNER = b"220 demo agent ready\r\n"


def answer(conn: socket.socket, via: str, banner: bool = False) -> None:
    """Read one HTTP request (headers and Content-Length body), answer it.

    With `banner`, first greet like a server-first protocol (SMTP) does.
    """
    with conn:
        conn.settimeout(30)
        data = b""
        try:
            if banner:
                conn.sendall(BANNER)
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


def serve_listener(name: str, listener: socket.socket, banner: bool) -> None:
    while True:
        try:
            conn, peer = listener.accept()
        except OSError as exc:
            sys.stderr.write("demo agent: accept on %s failed: %s\n" % (name, exc))
            continue
        sys.stderr.write("demo agent: connection on %s from %s\n" % (name, peer[0] if peer else "?"))
        sys.stderr.flush()
        threading.Thread(target=answer, args=(conn, name, banner), daemon=True).start()


def raise_fd_limit() -> None:
    """Like a Go program: lift the soft RLIMIT_NOFILE to the hard limit."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo_agent.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default="", help="write a JSON report of what was inherited here")
    parser.add_argument("--fd-var", action="append", default=[], help="a variable naming a listener fd")
    parser.add_argument("--client-var", default=DROP_IN_CLIENT_VAR, help="the variable naming the held client")
    parser.add_argument("--systemd", action="store_true", help="adopt with systemd's LISTEN_FDS protocol")
    parser.add_argument("--banner", action="store_true", help="greet each connection first, as SMTP does")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    fds = open_fds()  # first thing: nothing of ours is open yet
    blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    args = parse_args(argv)
    raise_fd_limit()
    check: dict[str, object] = {}
    if args.systemd:
        listeners, client, check = adopt_systemd()
    else:
        listeners, client = adopt_env(args.fd_var or DROP_IN_VARS, args.client_var)
    report = {
        "pid": os.getpid(),
        "argv0": sys.argv[0],
        "fds": fds,
        "sigpipe": disposition("SIGPIPE"),
        "sigxfsz": disposition("SIGXFSZ"),
        "signals": {name: disposition(name) for name in SIGNALS if hasattr(signal, name)},
        "blocked": blocked,
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
    if args.report:
        tmp = args.report + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.rename(tmp, args.report)  # appears whole, so a reader never sees half
    sys.stderr.write("demo agent: pid %d serving %s%s\n"
                     % (os.getpid(), ", ".join(sorted(listeners)) or "nothing",
                        " and a held client" if client is not None else ""))
    sys.stderr.flush()  # before 3.9, stderr to a pipe is block-buffered
    if client is not None:
        threading.Thread(target=answer, args=(client, "held-client", args.banner), daemon=True).start()
    for name, listener in listeners.items():
        threading.Thread(target=serve_listener, args=(name, listener, args.banner), daemon=True).start()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
