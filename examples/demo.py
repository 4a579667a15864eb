#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""`make demo`: trace_loader.py on 127.0.0.1:8126 in front of the demo agent.

It sends Kubernetes-style TCP probes (absorbed: the agent stays asleep), then
one trace request (the agent starts under the loader's pid and answers on that
same connection), then stops the agent. It ends by itself.

    python3 examples/demo.py [--port 8126]
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
LOADER = os.path.join(os.path.dirname(HERE), "trace_loader.py")
AGENT = os.path.join(HERE, "demo_agent.py")
SHOWN = re.compile(r"Listening|Polling\.\.\. \(fds|closed connection|Waking|Starting|demo agent")

CONFIG = """\
bind_host: 127.0.0.1
apm_config:
  receiver_port: {port}
  receiver_socket: ""        # TCP only, for the demo
  socket_activation:
    enabled: true
    handle_tcp_probe: true
log_level: debug
disable_file_logging: true
"""


def say(text: str) -> None:
    print("\n>>> " + text, flush=True)


def stream(proc: subprocess.Popen[bytes], lines: queue.Queue[str]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode("utf-8", "replace").rstrip()
        if SHOWN.search(line):
            print("    " + line, flush=True)
        lines.put(line)
    lines.put("")


def wait_for(lines: queue.Queue[str], pattern: str, count: int = 1) -> None:
    regex = re.compile(pattern)
    while count:
        line = lines.get(timeout=20)
        if not line:
            raise SystemExit("the loader ended early")
        if regex.search(line):
            count -= 1


def probe(port: int, *, rst: bool) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    # kubelet closes with SO_LINGER 1 s (a FIN); a load balancer often with 0 s (an RST).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0 if rst else 1))
    s.close()


def command_of(pid: int) -> str:
    out = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def main(argv: list[str]) -> int:
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 8126
    try:
        with socket.socket() as check:
            # SO_REUSEADDR, as the loader binds: the previous run's connections in TIME_WAIT
            # do not keep it from binding, so they must not fail this check either.
            check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            check.bind(("127.0.0.1", port))
    except OSError as exc:
        print("demo: port %d is not free (%s); try: python3 examples/demo.py --port 18126" % (port, exc))
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "datadog.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(port=port))
        say("Starting: python3 trace_loader.py %s python3 demo_agent.py" % config)
        proc = subprocess.Popen([sys.executable, LOADER, config, sys.executable, AGENT],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=stream, args=(proc, lines), daemon=True).start()
        try:
            wait_for(lines, r"Polling\.\.\. \(fds")
            say("Sending 5 kubelet-style probes (FIN) and 2 load-balancer probes (RST)...")
            for i in range(7):
                probe(port, rst=i >= 5)
            wait_for(lines, "closed connection", count=7)
            say("pid %d is still: %s" % (proc.pid, command_of(proc.pid)))
            say("Sending a trace request...")
            with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
                c.sendall(b"PUT /v0.4/traces HTTP/1.0\r\nContent-Length: 2\r\n\r\n[]")
                answer = b""
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            say("Answer: %s" % answer.decode().split("\r\n\r\n")[-1])
            say("pid %d is now: %s" % (proc.pid, command_of(proc.pid)))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    say("Done: probes absorbed, the agent woke on real traffic under the loader's pid.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
