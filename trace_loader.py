#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""trace-loader: start a heavy agent only when its sockets see real traffic.

The loader binds the agent's sockets, sleeps in ``poll()`` without a timeout,
and on the first real traffic replaces itself with the agent through
``execve()`` (same pid), handing the sockets over as inherited file
descriptors. TCP health probes that connect and close without sending a byte
are absorbed and never wake the agent. Whatever goes wrong, the agent starts
anyway ("fail open").

Two front doors, one engine::

    python3 trace_loader.py CONFIG_FILE AGENT [AGENT_ARGS...]
        drop-in for the Datadog Agent's Go trace-loader: reads datadog.yaml
        and the DD_* environment, hands fds over in DD_*_FD variables.

    python3 trace_loader.py [OPTIONS] -- PROGRAM [ARGS...]
        generic mode for any socket-activatable server: --listen addresses,
        hand-off with systemd's LISTEN_FDS protocol or plain variables.

Supports CPython 3.8 and newer on Linux (first) and macOS. Needs nothing
beyond the standard library; copy this one file wherever it is needed.
Importing it only defines things; the work happens in ``main()``.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs import time and memory; only mypy needs it
    import argparse
    from typing import Iterable, Mapping, NoReturn

__version__ = "0.1.0"

__all__ = [
    "CLIENT_FD_VAR",
    "OTLP_FD_VAR",
    "RECEIVER_FD_VAR",
    "UNIX_FD_VAR",
    "ConfigError",
    "Handoff",
    "ListenerError",
    "LoaderError",
    "adopt",
    "main",
]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class LoaderError(Exception):
    """Root of every error the loader raises on purpose."""


class ConfigError(LoaderError):
    """The configuration (file or environment) holds something unusable.

    Carries where it was found, so the one log line can name it.
    """

    def __init__(
        self, message: str, *, source: str = "", line: int = 0, key: str = ""
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.key = key
        where = source + (":%d" % line if line else "")
        parts = [p for p in (where, key, message) if p]
        super().__init__(": ".join(parts))


class ListenerError(LoaderError):
    """A socket could not be set up as asked."""


# Named here once: the fd variables of the drop-in hand-off (SPEC "Listeners").
RECEIVER_FD_VAR = "DD_APM_NET_RECEIVER_FD"
UNIX_FD_VAR = "DD_APM_UNIX_RECEIVER_FD"
OTLP_FD_VAR = "DD_OTLP_CONFIG_GRPC_FD"
CLIENT_FD_VAR = "DD_APM_NET_RECEIVER_CLIENT_FD"
_DROP_IN_FD_VARS = (RECEIVER_FD_VAR, UNIX_FD_VAR, OTLP_FD_VAR, CLIENT_FD_VAR)

# systemd's sd_listen_fds(3) protocol: the first passed fd is always 3.
_SD_LISTEN_FDS_START = 3
_SYSTEMD_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


# ---------------------------------------------------------------------------
# Logging: the agent's line format, written with os.write (no buffering, so a
# line is out before execve replaces the process; no `logging` import cost).
# ---------------------------------------------------------------------------

_LEVELS = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "error": 4, "critical": 5, "off": 6}
_LEVEL_ALIASES = {"warning": "warn", "err": "error"}

# Errors a log write may meet and that must never cost the activation: a closed
# pipe (SIGPIPE is ignored while we run), a full disk, a non-blocking stderr.
_LOG_WRITE_ERRNOS = frozenset(
    {errno.EPIPE, errno.EAGAIN, errno.EWOULDBLOCK, errno.EIO, errno.ENOSPC,
     errno.EDQUOT, errno.EFBIG, errno.EBADF, errno.EINVAL}
)


class _Log:
    """Writes `DATE UTC | TRACE-LOADER | LEVEL | (file:line in func) | msg`."""

    def __init__(self) -> None:
        self.threshold = _LEVELS["info"]
        self.console = True
        self.file_fd = -1

    def configure(self, *, level: str, console: bool, path: str | None) -> None:
        self.threshold = _LEVELS[level]
        self.console = console
        if path and level != "off":
            self.file_fd = self._open_log_file(path)

    def _open_log_file(self, path: str) -> int:
        # O_APPEND: the agent appends to the same file after execve. os.open
        # makes the fd non-inheritable (PEP 446), so the agent never sees it.
        # O_NONBLOCK: a FIFO named as log file must not hang the loader.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o640)
        except (OSError, ValueError) as exc:
            self.warn("Cannot open log file %s (%s); logging to the console only" % (path, _oserror_text(exc)))
            return -1
        return fd

    def move_fd_at_or_above(self, floor: int) -> None:
        """Keep the log fd out of the range the systemd hand-off fills."""
        if 0 <= self.file_fd < floor:
            import fcntl  # only the systemd hand-off needs it

            # F_DUPFD_CLOEXEC: lowest free fd >= floor, still closed on exec.
            new_fd = fcntl.fcntl(self.file_fd, fcntl.F_DUPFD_CLOEXEC, floor)
            os.close(self.file_fd)
            self.file_fd = new_fd

    def enabled(self, level: str) -> bool:
        return _LEVELS[level] >= self.threshold

    def _emit(self, level: str, message: str, args: tuple[object, ...]) -> None:
        if not self.enabled(level):
            return  # before any formatting: the wait loop logs at debug on every event
        if args:
            message = message % args
        caller = sys._getframe(2)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        source = os.path.basename(caller.f_code.co_filename)
        line = "%s | TRACE-LOADER | %s | (%s:%d in %s) | %s\n" % (
            stamp, level.upper(), source, caller.f_lineno, caller.f_code.co_name,
            message.replace("\n", "\\n"),
        )
        # backslashreplace: environment values may carry undecodable bytes
        # (surrogate escapes); a log line must never raise on them.
        data = line.encode("utf-8", "backslashreplace")
        for fd in ((2,) if self.console else ()) + ((self.file_fd,) if self.file_fd >= 0 else ()):
            try:
                os.write(fd, data)
            except OSError as exc:
                if exc.errno not in _LOG_WRITE_ERRNOS:
                    raise

    def trace(self, message: str, *args: object) -> None:
        self._emit("trace", message, args)

    def debug(self, message: str, *args: object) -> None:
        self._emit("debug", message, args)

    def info(self, message: str, *args: object) -> None:
        self._emit("info", message, args)

    def warn(self, message: str, *args: object) -> None:
        self._emit("warn", message, args)

    def error(self, message: str, *args: object) -> None:
        self._emit("error", message, args)

    def critical(self, message: str, *args: object) -> None:
        self._emit("critical", message, args)


def _oserror_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return "%s (%s)" % (exc.strerror, errno.errorcode.get(exc.errno, exc.errno))
    return str(exc)


def _shown(value: str, limit: int = 64) -> str:
    """A user's value, quoted and cut short, safe for one log line."""
    if len(value) > limit:
        return repr(value[:limit]) + "... (%d characters)" % len(value)
    return repr(value)


# ---------------------------------------------------------------------------
# Configuration, part 1: a reader for the YAML subset a datadog.yaml needs.
#
# It only descends into the keys the loader needs (`wanted` paths); every
# other key's whole value (lists, block strings, flow collections, anything)
# is skipped by indentation alone. Under a wanted key it reads block mappings
# and plain or quoted scalars; anything else it records as "opaque", which is
# an error only if the loader then asks for that key. One pass, each line once.
# ---------------------------------------------------------------------------

_MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a real datadog.yaml is ~200 KB

_NULLS = frozenset({"", "~", "null", "Null", "NULL"})


class _Node:
    """A value found at a wanted path: its kind, text and line."""

    __slots__ = ("kind", "text", "line")

    def __init__(self, kind: str, text: str, line: int) -> None:
        self.kind = kind  # "plain", "quoted", "null", "mapping" or what it is
        self.text = text
        self.line = line

    @property
    def is_scalar(self) -> bool:
        return self.kind in ("plain", "quoted")


class _YamlReader:
    """One pass over the lines; `nodes` maps dotted paths to what they hold."""

    def __init__(self, text: str, wanted: Iterable[str], source: str) -> None:
        self.lines = text.split("\n")
        self.source = source
        self.wanted = frozenset(wanted)
        self.prefixes = frozenset(
            ".".join(p.split(".")[:i]) for p in self.wanted for i in range(1, p.count(".") + 1)
        )
        self.nodes: dict[str, _Node] = {}
        self.anchors: dict[str, _Node] = {}
        # Open block mappings we descend into: (indent of their keys, path).
        self.stack: list[tuple[int, str]] = [(-1, "")]
        self.pending: tuple[int, str, int] | None = None  # key with no value yet
        self.skip_above: int | None = None  # skip lines indented deeper than this
        self.skip_dashes_at: int | None = None  # also "- " items at this indent
        self.scalar_at: tuple[int, str] | None = None  # last wanted scalar's key

    def error(self, lineno: int, message: str, key: str = "") -> ConfigError:
        return ConfigError(message, source=self.source, line=lineno, key=key)

    def read(self) -> dict[str, _Node]:
        started = False
        for index, line in enumerate(self.lines):
            lineno = index + 1
            body = line.lstrip(" ")
            content = body.lstrip(" \t")
            if not content or content.startswith("#"):
                continue  # blank lines and comments never change the structure
            if line.startswith(("---", "...")) and line[3:4] in ("", " ", "\t"):
                if started or line.startswith("..."):
                    break  # only the first document counts, as for the agent
                if line[3:].strip() and not line[3:].strip().startswith("#"):
                    raise self.error(lineno, "content on the '---' line is not supported")
                continue
            if line.startswith("%") and not started:
                continue  # a %YAML or %TAG directive
            started = True
            self.read_line(lineno, len(line) - len(body), body)
        self.close_pending()
        return self.nodes

    def read_line(self, lineno: int, indent: int, body: str) -> None:
        if self.skip_above is not None:
            if indent > self.skip_above or (
                indent == self.skip_dashes_at and _is_dash_item(body)
            ):
                return
            self.skip_above = self.skip_dashes_at = None
        if body.startswith("\t"):
            raise self.error(lineno, "a tab in the indentation (YAML allows spaces only)")
        if self.scalar_at is not None:
            key_indent, path = self.scalar_at
            self.scalar_at = None
            if indent > key_indent:  # the value goes on: a multi-line scalar
                self.nodes[path] = _Node("a value continued on the next line", "", self.nodes[path].line)
                self.skip(key_indent)
                return
        if self.pending is not None and self.open_pending(lineno, indent, body):
            return
        while len(self.stack) > 1 and self.stack[-1][0] > indent:
            self.stack.pop()
        top_indent, parent = self.stack[-1]
        if top_indent == -1:  # the first key sets the top level's indentation
            self.stack[0] = (indent, "")
        elif top_indent != indent:
            raise self.error(lineno, "indentation of %d spaces matches no enclosing key" % indent)
        self.read_entry(lineno, indent, body, parent)

    def open_pending(self, lineno: int, indent: int, body: str) -> bool:
        """A key ended its line with no value: what do the next lines make it?"""
        assert self.pending is not None
        key_indent, path, key_line = self.pending
        self.pending = None
        if _is_dash_item(body) and indent >= key_indent:
            self.nodes[path] = _Node("a list", "", key_line)
            self.skip(key_indent, dashes=indent == key_indent)
            return True
        if indent > key_indent:
            self.nodes[path] = _Node("mapping", "", key_line)
            self.stack.append((indent, path))
            return False
        self.nodes[path] = _Node("null", "", key_line)
        return False

    def close_pending(self) -> None:
        if self.pending is not None:
            _, path, key_line = self.pending
            self.nodes[path] = _Node("null", "", key_line)
            self.pending = None

    def skip(self, indent: int, *, dashes: bool = False) -> None:
        self.skip_above = indent
        self.skip_dashes_at = indent if dashes else None

    def read_entry(self, lineno: int, indent: int, body: str, parent: str) -> None:
        descending = parent == "" or parent in self.prefixes
        if _is_dash_item(body) or body.startswith(("? ", "[", "{", "|", ">", "!", "&", "*", "@", "`")):
            if descending and parent:
                raise self.error(lineno, "expected 'key: value', found %s" % _shown(body.strip(), 24), parent)
            if not parent:
                raise self.error(lineno, "expected 'key: value' at the top level, found %s" % _shown(body.strip(), 24))
            self.skip(indent, dashes=True)
            return
        parsed = _split_key(body)
        if parsed is None:
            if descending:
                raise self.error(lineno, "expected 'key: value', found %s" % _shown(body.strip(), 24), parent)
            self.skip(indent)
            return
        key, rest = parsed
        path = (parent + "." if parent else "") + key.lower()  # keys are case-insensitive, as in viper
        if key == "<<" and descending:
            raise self.error(lineno, "merge keys (<<) are not supported where the loader reads its settings",
                             parent)
        self.forget(path)  # a duplicate key: the last one wins, as for the agent
        if path not in self.wanted and path not in self.prefixes:
            self.note_anchor(rest, lineno)
            self.skip(indent, dashes=True)
            return
        self.read_value(lineno, indent, path, rest)

    def forget(self, path: str) -> None:
        for known in [k for k in self.nodes if k == path or k.startswith(path + ".")]:
            del self.nodes[known]

    def note_anchor(self, rest: str, lineno: int) -> None:
        """Remember `key: &name scalar` anywhere we pass, for later aliases."""
        if rest.startswith("&"):
            name, _, value = rest[1:].partition(" ")
            node = _scalar_node(value.strip(), lineno)
            if node is not None and node.is_scalar:
                self.anchors[name] = node

    def read_value(self, lineno: int, indent: int, path: str, rest: str) -> None:
        anchor = ""
        if rest.startswith("&"):
            anchor, _, rest = rest[1:].partition(" ")
            rest = rest.strip()
        if not rest or rest.startswith("#"):
            self.pending = (indent, path, lineno)
            return
        if rest.startswith("*"):
            name = _strip_comment(rest[1:])
            target = self.anchors.get(name)
            node = (
                _Node(target.kind, target.text, lineno)
                if target is not None
                else _Node("an alias (*%s) to an anchor this reader does not follow" % name, "", lineno)
            )
        else:
            node = _scalar_node(rest, lineno) or _Node(_opaque_kind(rest), "", lineno)
        if anchor and node.is_scalar:
            self.anchors[anchor] = node
        self.nodes[path] = node
        if node.is_scalar or node.kind == "null":
            self.scalar_at = (indent, path)
        else:
            self.skip(indent)


def _is_dash_item(body: str) -> bool:
    return body == "-" or body.startswith(("- ", "-\t"))


def _strip_comment(text: str) -> str:
    """Cut a ` # comment` off a plain scalar (a '#' inside a word stays)."""
    for marker in (" #", "\t#"):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def _split_key(body: str) -> tuple[str, str] | None:
    """`key: rest` -> (key, rest); quoted keys allowed; None if no key here."""
    if body[0] in "\"'":
        key, end = _read_quoted(body, 0)
        if key is None or not body[end:].lstrip(" ").startswith(":"):
            return None
        rest = body[end:].lstrip(" ")[1:]
        if rest and rest[0] not in " \t":
            return None
        return key, rest.strip()
    colon = body.find(":")
    while colon >= 0:
        after = body[colon + 1: colon + 2]
        if after in ("", " ", "\t"):
            key = body[:colon].rstrip()
            if not key or " #" in key:
                return None
            return key, body[colon + 1:].strip()
        colon = body.find(":", colon + 1)
    return None


def _opaque_kind(rest: str) -> str:
    if rest.startswith(("|", ">")):
        return "a multi-line string (%s)" % rest.split()[0]
    if rest.startswith(("[", "{")):
        return "a flow collection (%s...)" % rest[0]
    if rest.startswith("!"):
        return "a tagged value (%s)" % rest.split()[0]
    if _is_dash_item(rest):
        return "a list"
    if rest.startswith(("\"", "'")):
        return "a quoted string that does not end on its line, or text after it"
    if rest.startswith(("@", "`", "%")):
        return "a value starting with the reserved character %s" % rest[0]
    return "a nested 'key: value' on one line"


def _scalar_node(rest: str, lineno: int) -> _Node | None:
    """A one-line scalar, or None when `rest` is some other construct."""
    if rest.startswith(("\"", "'")):
        text, end = _read_quoted(rest, 0)
        if text is None:
            return None
        tail = rest[end:].strip()
        if tail and not tail.startswith("#"):
            return None
        return _Node("quoted", text, lineno)
    if rest.startswith(("|", ">", "[", "{", "!", "&", "*", "@", "`", "%")) or _is_dash_item(rest):
        return None
    text = _strip_comment(rest)
    if ": " in text or text.endswith(":"):
        return None
    return _Node("null" if text in _NULLS else "plain", text, lineno)


_ESCAPES = {
    "0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
    "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
    "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _read_quoted(text: str, pos: int) -> tuple[str | None, int]:
    """Read a quoted scalar starting at `pos`; (None, pos) if it does not end here."""
    quote = text[pos]
    out: list[str] = []
    i = pos + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            if quote == "'" and text[i + 1: i + 2] == "'":
                out.append("'")  # '' is an escaped single quote
                i += 2
                continue
            return "".join(out), i + 1
        if char == "\\" and quote == '"':
            code = text[i + 1: i + 2]
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                i += 2
                continue
            width = _HEX_ESCAPES.get(code, 0)
            digits = text[i + 2: i + 2 + width]
            if not width or len(digits) != width or not _is_hex(digits):
                return None, pos
            value = int(digits, 16)
            if value > 0x10FFFF:
                return None, pos
            out.append(chr(value))
            i += 2 + width
            continue
        out.append(char)
        i += 1
    return None, pos


def _is_hex(digits: str) -> bool:
    return digits.isascii() and all(c in "0123456789abcdefABCDEF" for c in digits)


def _read_config_file(path: str) -> str:
    """The file's text, refusing anything that is not a readable regular file."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
    # forever. os.open makes the fd close-on-exec (PEP 446).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError) as exc:
        raise ConfigError("cannot open: %s" % _oserror_text(exc), source=path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("is not a regular file (%s)" % _file_kind(info.st_mode), source=path)
        if info.st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(
                "is %d bytes; this loader reads at most %d" % (info.st_size, _MAX_CONFIG_BYTES), source=path
            )
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_CONFIG_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > _MAX_CONFIG_BYTES:
            raise ConfigError("grew past %d bytes while being read" % _MAX_CONFIG_BYTES, source=path)
    except OSError as exc:
        raise ConfigError("cannot read: %s" % _oserror_text(exc), source=path) from None
    finally:
        os.close(fd)
    return _decode_config(b"".join(chunks), path)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _decode_config(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError("invalid UTF-8 (byte %d)" % exc.start, source=source, line=line) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte order mark, as some editors write
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_yaml_subset(text: str, wanted: Iterable[str], *, source: str = "<config>") -> dict[str, _Node]:
    """Read the `wanted` dotted paths (and their parents) out of YAML text."""
    return _YamlReader(text, wanted, source).read()


# ---------------------------------------------------------------------------
# Configuration, part 2: the settings of the drop-in front door, from the
# environment over the file over defaults (SPEC "Configuration").
# ---------------------------------------------------------------------------

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}
_INT64 = 1 << 63

_DEFAULT_SOCKET = "/var/run/datadog/apm.socket" if sys.platform.startswith("linux") else ""
_DEFAULT_LOG_FILE = (
    "/opt/datadog-agent/logs/trace-agent.log" if sys.platform == "darwin" else "/var/log/datadog/trace-agent.log"
)
_DEFAULT_PROBE_GRACE_MS = 250
_MAX_PROBE_GRACE_MS = 60_000

# (YAML path, environment variables in order of precedence)
_KEYS: dict[str, tuple[str, ...]] = {
    "apm_config.enabled": ("DD_APM_ENABLED",),
    "apm_config.error_tracking_standalone.enabled": ("DD_APM_ERROR_TRACKING_STANDALONE_ENABLED",),
    "apm_config.socket_activation.enabled": ("DD_APM_SOCKET_ACTIVATION_ENABLED",),
    "apm_config.socket_activation.handle_tcp_probe": ("DD_APM_SOCKET_ACTIVATION_HANDLE_TCP_PROBE",),
    "apm_config.socket_activation.probe_grace_period": ("DD_APM_SOCKET_ACTIVATION_PROBE_GRACE_PERIOD",),
    "apm_config.receiver_port": ("DD_APM_RECEIVER_PORT", "DD_RECEIVER_PORT"),
    "apm_config.receiver_socket": ("DD_APM_RECEIVER_SOCKET",),
    "apm_config.apm_non_local_traffic": ("DD_APM_NON_LOCAL_TRAFFIC",),
    "bind_host": ("DD_BIND_HOST",),
    "otlp_config.receiver": (),
    "otlp_config.traces.internal_port": ("DD_OTLP_CONFIG_TRACES_INTERNAL_PORT",),
    "log_level": ("DD_LOG_LEVEL",),
    "apm_config.log_file": ("DD_APM_LOG_FILE",),
    "log_to_console": ("DD_LOG_TO_CONSOLE",),
    "disable_file_logging": ("DD_DISABLE_FILE_LOGGING",),
}


class _Config:
    """Looks a key up in the environment, then the file; converts its value."""

    def __init__(self, nodes: dict[str, _Node], environ: Mapping[str, str], source: str, log: _Log) -> None:
        self.nodes = nodes
        self.environ = environ
        self.source = source
        self.log = log

    def from_env(self, key: str) -> tuple[str, str] | None:
        for name in _KEYS[key]:
            value = self.environ.get(name, "")
            if value != "":  # an empty value counts as unset
                return name, value
        return None

    def parents_are_mappings(self, key: str) -> bool:
        """False when a parent is absent or empty; an error when it is not a mapping."""
        parts = key.split(".")
        for depth in range(1, len(parts)):
            parent = self.nodes.get(".".join(parts[:depth]))
            if parent is None or parent.kind == "null":
                return False
            if parent.kind != "mapping":
                raise ConfigError(
                    "holds %s where a mapping is expected (looking for %s)" % (_node_what(parent), key),
                    source=self.source, line=parent.line, key=".".join(parts[:depth]),
                )
        return True

    def from_file(self, key: str) -> _Node | None:
        node = self.nodes.get(key) if self.parents_are_mappings(key) else None
        return None if node is None or node.kind == "null" else node

    def has_key(self, key: str) -> bool:
        """The key is written in the file, even with nothing after its colon."""
        return self.parents_are_mappings(key) and key in self.nodes

    def is_set(self, key: str) -> bool:
        return self.from_env(key) is not None or self.from_file(key) is not None

    def boolean(self, key: str, default: bool) -> bool:
        found = self.from_env(key)
        if found is not None:
            return _go_bool(found[1], found[0])
        node = self.scalar(key)
        if node is None:
            return default
        if node.kind == "plain" and node.text.lower() in ("true", "false"):
            return node.text.lower() == "true"
        if node.kind == "plain" and node.text.lower() in _YAML11_BOOLS:
            self.log.warn(
                "%s:%d: %s: %s is read as a boolean (YAML 1.1); write true or false"
                % (self.source, node.line, key, _shown(node.text))
            )
            return _YAML11_BOOLS[node.text.lower()]
        try:
            return _go_bool(node.text, key)
        except ConfigError as exc:
            raise ConfigError(exc.message, source=self.source, line=node.line, key=key) from None

    def integer(self, key: str, default: int) -> int:
        found = self.from_env(key)
        if found is not None:
            return _go_int(found[1], found[0])
        node = self.scalar(key)
        if node is None:
            return default
        try:
            return _go_int(node.text, key)
        except ConfigError as exc:
            raise ConfigError(exc.message, source=self.source, line=node.line, key=key) from None

    def string(self, key: str, default: str) -> str:
        found = self.from_env(key)
        if found is not None:
            return found[1]
        node = self.scalar(key)
        return default if node is None else node.text

    def scalar(self, key: str) -> _Node | None:
        node = self.from_file(key)
        if node is not None and not node.is_scalar:
            raise ConfigError(
                "holds %s; expected a single value" % _node_what(node), source=self.source, line=node.line, key=key
            )
        return node


def _node_what(node: _Node) -> str:
    if node.is_scalar:
        return "the single value %s" % _shown(node.text)
    return "a mapping" if node.kind == "mapping" else node.kind


def _go_bool(text: str, name: str) -> bool:
    """strconv.ParseBool: exactly these spellings, nothing trimmed."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ConfigError("%s is not a boolean (use true or false)" % _shown(text), key=name)


def _go_int(text: str, name: str) -> int:
    """strconv.ParseInt(strings.TrimSpace(s), 0, 0): 8126, 0x1fbe, 0o17, 017, 0b1, 1_000."""
    body = text.strip()
    sign = -1 if body.startswith("-") else 1
    digits = body[1:] if body[:1] in ("-", "+") else body
    if len(digits) > 1 and digits[0] == "0" and digits[1] in "01234567_":
        digits = "0o" + digits[1:]  # Go reads a leading 0 as octal; Python wants 0o
    value: int | None = None
    if digits.isascii() and len(digits) <= 72 and not digits.startswith("_"):
        try:
            value = sign * int(digits, 0)
        except ValueError:
            value = None
    if value is None:
        raise ConfigError("%s is not an integer" % _shown(text), key=name)
    if not -_INT64 <= value < _INT64:
        raise ConfigError("%s is out of range for a 64-bit integer" % _shown(text), key=name)
    return value


class _DropInSettings:
    """Everything the drop-in front door needs from the configuration."""

    def __init__(self, config: _Config, environ: Mapping[str, str]) -> None:
        self.apm_enabled = config.boolean("apm_config.enabled", True)
        self.error_tracking = config.boolean("apm_config.error_tracking_standalone.enabled", False)
        self.socket_activation = config.boolean("apm_config.socket_activation.enabled", False)
        self.handle_tcp_probe = config.boolean("apm_config.socket_activation.handle_tcp_probe", False)
        self.probe_grace_ms = _grace_ms(
            config.integer("apm_config.socket_activation.probe_grace_period", _DEFAULT_PROBE_GRACE_MS),
            "apm_config.socket_activation.probe_grace_period",
        )
        self.receiver_port = config.integer("apm_config.receiver_port", 8126)
        self.receiver_socket = config.string("apm_config.receiver_socket", _DEFAULT_SOCKET)
        # `receiver:` with nothing under it still turns OTLP on (SPEC).
        self.otlp_enabled = config.has_key("otlp_config.receiver") or any(
            name.startswith("DD_OTLP_CONFIG_RECEIVER_") and value for name, value in environ.items()
        )
        self.otlp_port = config.integer("otlp_config.traces.internal_port", 5003)
        self.bind_host, self.bind_host_reason = _bind_host(config, environ)
        self.log_level = _log_level(config.string("log_level", "info"))
        self.log_to_console = config.boolean("log_to_console", True)
        disable_file = config.boolean("disable_file_logging", False)
        log_file = config.string("apm_config.log_file", _DEFAULT_LOG_FILE)
        self.log_file = None if disable_file else log_file
        for key, port in (("apm_config.receiver_port", self.receiver_port),
                          ("otlp_config.traces.internal_port", self.otlp_port)):
            if port > 65535 or (key.startswith("otlp") and self.otlp_enabled and port <= 0):
                raise ConfigError("port %d is out of range (1-65535)" % port, key=key)


def _grace_ms(value: int, name: str) -> int:
    if not 0 <= value <= _MAX_PROBE_GRACE_MS:
        raise ConfigError("%d ms is out of range (0-%d)" % (value, _MAX_PROBE_GRACE_MS), key=name)
    return value


def _log_level(text: str) -> str:
    level = text.strip().lower()
    level = _LEVEL_ALIASES.get(level, level)
    if level not in _LEVELS:
        raise ConfigError(
            "%s is not a log level (trace, debug, info, warn, error, critical, off)" % _shown(text), key="log_level"
        )
    return level


def _bind_host(config: _Config, environ: Mapping[str, str]) -> tuple[str, str]:
    """The receiver's host, and why (the agent's own rule, SPEC "Bind host")."""
    if config.is_set("bind_host") or config.is_set("apm_config.apm_non_local_traffic"):
        host = config.string("bind_host", "localhost")
        if config.is_set("apm_config.apm_non_local_traffic") and config.boolean(
            "apm_config.apm_non_local_traffic", False
        ):
            return "0.0.0.0", "apm_non_local_traffic is true"
        return host, "bind_host"
    if environ.get("DOCKER_DD_AGENT", ""):
        return "0.0.0.0", "containerized (DOCKER_DD_AGENT is set)"
    return "localhost", "default"


def _load_drop_in_settings(path: str, environ: Mapping[str, str], log: _Log) -> _DropInSettings:
    text = _read_config_file(path)
    nodes = _read_yaml_subset(text, _KEYS, source=path)
    return _DropInSettings(_Config(nodes, environ, path, log), environ)


# ---------------------------------------------------------------------------
# Listeners: what to open (a spec), opening it, and closing all on failure.
# ---------------------------------------------------------------------------


class _ListenerSpec:
    """One socket to offer: TCP, unix, or one inherited from systemd."""

    __slots__ = ("fd", "fdname", "host", "kind", "label", "mode", "name", "path", "port", "probe")

    def __init__(self, name: str, kind: str, *, host: str = "", port: int = 0, path: str = "",
                 mode: int = 0o722, fd: int = -1, fdname: str = "", probe: bool = False, label: str = "") -> None:
        self.name = name  # fd variable (env protocol) or LISTEN_FDNAMES entry
        self.kind = kind  # "tcp", "unix" or "inherited"
        self.host = host
        self.port = port
        self.path = path
        self.mode = mode
        self.fd = fd
        self.fdname = fdname  # `systemd:FDNAME`: adopt the inherited sockets of that name ("": all)
        self.probe = probe  # the one listener the TCP probe check watches
        self.label = label or name


class _Listener:
    """An open listening socket and the spec it came from."""

    __slots__ = ("spec", "sock")

    def __init__(self, spec: _ListenerSpec, sock: socket.socket) -> None:
        self.spec = spec
        self.sock = sock

    @property
    def fd(self) -> int:
        return self.sock.fileno()


_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _listen_backlog() -> int:
    """The kernel's limit, read as Go reads it; the agent keeps this backlog."""
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:  # close-on-exec (PEP 446)
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return socket.SOMAXCONN
    # listen() takes an int; Go caps it the same way on old kernels.
    return min(value, 65535) if value > 0 else socket.SOMAXCONN


def _tcp_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host in _WILDCARD_HOSTS and socket.has_ipv6 and _dual_stack_supported():
        # Like Go: a wildcard listens on [::] with IPV6_V6ONLY off, so one
        # socket takes both IPv4 and IPv6 clients.
        return socket.AF_INET6, ("::", port, 0, 0)
    if host in _WILDCARD_HOSTS:
        return socket.AF_INET, ("0.0.0.0", port)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenerError("cannot resolve bind host %s: %s" % (_shown(host), exc)) from None
    # Go's Listen takes a name's first IPv4 address, else its first address;
    # tracers connect to 127.0.0.1 when told "localhost".
    ipv4 = [info for info in infos if info[0] == socket.AF_INET]
    family, _, _, _, address = (ipv4 or infos)[0]
    return family, tuple(address)


def _dual_stack_supported() -> bool:
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False  # no IPv6 in this kernel or namespace: fall back to IPv4
    with probe:
        try:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            return False
    return True


def _open_tcp_listener(host: str, port: int) -> socket.socket:
    family, address = _tcp_address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)  # close-on-exec until handed over
    try:
        # SO_REUSEADDR: as the Go listener does, so a restart can rebind while
        # old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(_listen_backlog())
    except OSError as exc:
        sock.close()
        raise ListenerError("cannot listen on %s: %s" % (_join_host_port(host, port), _oserror_text(exc))) from None
    return sock


def _join_host_port(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host and not host.startswith("[") else "%s:%d" % (host, port)


# sun_path is 108 bytes on Linux and 104 on macOS and the BSDs; keep one for
# the NUL that C clients expect.
_SUN_PATH_MAX = (108 if sys.platform.startswith("linux") else 104) - 1


def _validate_unix_path(path: str) -> None:
    if not os.path.isabs(path):
        # A relative path would depend on the directory we were started in.
        raise ListenerError("unix socket path %s is not absolute" % _shown(path))
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise ListenerError("unix socket path %s contains a NUL byte" % _shown(path))
    if len(encoded) > _SUN_PATH_MAX:
        raise ListenerError(
            "unix socket path is %d bytes, longer than the %d the kernel allows (sun_path): %s"
            % (len(encoded), _SUN_PATH_MAX, path)
        )


def _clear_stale_socket(path: str) -> None:
    """Make room for the socket: remove a stale one, refuse anything else."""
    try:
        info = os.lstat(path)  # lstat: judge a symlink itself, never its target
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenerError("cannot inspect %s: %s" % (path, _oserror_text(exc))) from None
    if stat.S_ISLNK(info.st_mode):
        raise ListenerError("%s is a symbolic link; refusing to replace it" % path)
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenerError(
            "%s exists and is %s, not a socket; refusing to remove it" % (path, _file_kind(info.st_mode))
        )
    if _unix_socket_is_served(path):
        raise ListenerError("%s is served by a live process; refusing to take it over" % path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # gone between lstat and unlink: the room we wanted
    except OSError as exc:
        raise ListenerError("cannot remove stale socket %s: %s" % (path, _oserror_text(exc))) from None


def _unix_socket_is_served(path: str) -> bool:
    """A connect() answers whether anyone listens: refused means stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        # Non-blocking: a live server with a full backlog answers EAGAIN at
        # once instead of making us wait in connect().
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return True
        except OSError as exc:
            raise ListenerError("cannot tell whether %s is in use: %s" % (path, _oserror_text(exc))) from None
    return True


def _open_unix_listener(path: str, mode: int, log: _Log) -> socket.socket | None:
    """The listening unix socket, or None when its directory is missing (a skip, not a failure)."""
    # A leading "@" names a Linux abstract socket, as in Go: no file at all.
    abstract = path.startswith("@") and sys.platform.startswith("linux")
    if not abstract:
        _validate_unix_path(path)  # first: a relative or NUL path is a failure, not a missing directory
        if not os.path.isdir(os.path.dirname(path)):
            log.error("Could not start UDS listener: socket directory does not exist: %s" % path)
            return None
        _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with 0777 & ~umask: setting the umask first
    # gives it its final mode at once, with no window where it is wider
    # (the Go loader binds, then chmods).
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind("\0" + path[1:] if abstract else path)
        sock.listen(_listen_backlog())
    except OSError as exc:
        sock.close()
        raise ListenerError("cannot listen on unix socket %s: %s" % (path, _oserror_text(exc))) from None
    finally:
        os.umask(old_umask)
    return sock


def _adopt_inherited_socket(fd: int) -> socket.socket:
    try:
        # fileno=: wrap the fd itself (family and type read from the kernel);
        # socket.fromfd would dup it and leave the original behind.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError("inherited fd %d is not a usable socket: %s" % (fd, _oserror_text(exc))) from None
    return sock


def _open_listeners(specs: list[_ListenerSpec], log: _Log) -> list[_Listener]:
    """Open every spec in order; on failure close what was opened and raise."""
    opened: list[_Listener] = []
    try:
        for spec in specs:
            sock = _open_one(spec, log)
            if sock is not None:
                opened.append(_Listener(spec, sock))
    except (LoaderError, OSError) as exc:
        for listener in opened:
            if listener.spec.kind != "inherited":  # systemd's fds stay for the fail-open exec
                listener.sock.close()
        if isinstance(exc, OSError):
            raise ListenerError(_oserror_text(exc)) from None
        raise
    return opened


def _open_one(spec: _ListenerSpec, log: _Log) -> socket.socket | None:
    if spec.kind == "tcp":
        sock = _open_tcp_listener(spec.host, spec.port)
        # The bound port, which the kernel chose when the address said 0.
        port = int(sock.getsockname()[1])
        log.info("Listening to %s at %s..." % (spec.label, _join_host_port(spec.host, port)))
        return sock
    if spec.kind == "unix":
        unix_sock = _open_unix_listener(spec.path, spec.mode, log)
        if unix_sock is not None:
            log.info("Listening to %s at path %s" % (spec.label, spec.path))
        return unix_sock
    return _adopt_inherited_socket(spec.fd)


# ---------------------------------------------------------------------------
# The wait: a small state machine over poll().
#
#   IDLE     only the listeners are polled. An event on the probe listener
#            (with the probe check on) accepts one client -> HOLDING; any
#            other event wakes the agent.
#   HOLDING  the listeners and the held client are polled. The client sends
#            data -> wake; closes (FIN or RST) -> a probe absorbed -> IDLE.
#            A second client on the probe listener -> GRACE (or wake at once
#            when the grace period is 0, as the Go loader does).
#   GRACE    the probe listener leaves the poll set, so the second client
#            waits in the kernel's backlog, untouched, for the agent. The
#            held client gets `grace` ms to send (wake) or close (-> IDLE,
#            where the second client is accepted and examined in turn).
#
# Anything else (another listener, an unexpected errno) wakes the agent.
# ---------------------------------------------------------------------------

_IDLE, _HOLDING, _GRACE = "IDLE", "HOLDING", "GRACE"

# accept(2): these mean the client went away before we took it (or a network
# error it reports on Linux); the listener is fine and we keep waiting.
_ACCEPT_RETRY_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EAGAIN", "EWOULDBLOCK", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
        "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    ) if hasattr(errno, name)
)
# A peek that fails with these saw a reset: a probe closed with an RST.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.ENOTCONN})

_POLL_EVENT_NAMES = ((select.POLLIN, "POLLIN"), (select.POLLERR, "POLLERR"),
                     (select.POLLHUP, "POLLHUP"), (select.POLLNVAL, "POLLNVAL"))


class _HeldClient:
    __slots__ = ("address", "sock")

    def __init__(self, sock: socket.socket, address: object) -> None:
        self.sock = sock
        self.address = address  # formatted only when a log line shows it

    @property
    def peer(self) -> str:
        return _peer_text(self.address)


class _Wake:
    """Why the wait ended, and the client to hand over, if one is held."""

    __slots__ = ("reason", "client", "probes")

    def __init__(self, reason: str, client: _HeldClient | None, probes: dict[str, int]) -> None:
        self.reason = reason
        self.client = client
        self.probes = probes


def _peer_text(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return _join_host_port(str(address[0]), int(address[1]))
    return str(address) or "unknown"


def _events_text(revents: int) -> str:
    return " ".join(name for bit, name in _POLL_EVENT_NAMES if revents & bit) or hex(revents)


def _remaining_ms(deadline: float | None) -> int | None:
    if deadline is None:
        return None  # no timeout: an idle loader never wakes up
    # poll() counts whole milliseconds: round up so we never spin just before
    # the deadline.
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))


def _peek(client: _HeldClient) -> str:
    """'data', 'fin', 'rst' or 'silent'; any other error propagates."""
    try:
        # MSG_PEEK: look without consuming, the bytes stay for the agent.
        # MSG_DONTWAIT: the fd stays blocking for the agent, but we never wait.
        data = client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return "silent"
    except OSError as exc:
        if exc.errno in _RESET_ERRNOS:
            return "rst"
        raise
    return "data" if data else "fin"


def _wait_for_traffic(listeners: list[_Listener], *, grace_ms: int, log: _Log, agent_label: str) -> _Wake:
    """Sleep in poll() until traffic that is not a probe arrives."""
    probe_sock = next((lsn.sock for lsn in listeners if lsn.spec.probe), None)
    by_fd = {lsn.fd: lsn for lsn in listeners}
    probes = {"FIN": 0, "RST": 0}
    poller = select.poll()
    for listener in listeners:
        log.debug("%s file descriptor is %d" % (listener.spec.name, listener.fd))
        poller.register(listener.fd, select.POLLIN)
        if listener.sock is probe_sock:
            # Non-blocking for the wait only: a client that vanishes between
            # poll() and accept() must not block us. Restored before exec.
            probe_sock.setblocking(False)
    state = _IDLE
    held: _HeldClient | None = None
    deadline: float | None = None

    def wake(reason: str) -> _Wake:
        return _Wake(reason, held, probes)

    log.info("Polling... (fds %s%s)" % (", ".join(str(fd) for fd in by_fd),
                                        "; probe check on fd %d" % probe_sock.fileno() if probe_sock else ""))
    while True:
        log.debug("Polling... (state %s)", state)
        try:
            ready = dict(poller.poll(_remaining_ms(deadline)))  # PEP 475 retries EINTR for us
        except OSError as exc:
            return wake("poll() failed: %s" % _oserror_text(exc))
        if not ready:
            return wake("a second TCP client arrived and the held one stayed silent for %d ms" % grace_ms)
        if log.enabled("debug"):
            for fd, revents in ready.items():
                log.debug("Socket %d has events %s", fd, _events_text(revents))
        if probe_sock is None:
            return wake("traffic on %s" % _labels(ready, by_fd))
        others = [fd for fd in ready if fd in by_fd and by_fd[fd].sock is not probe_sock]
        if others:
            return wake("traffic on %s" % _labels(others, by_fd))
        if grace_ms == 0 and len(ready) > 1:
            return wake("events on several sockets at once")
        if held is not None and held.sock.fileno() in ready:
            try:
                outcome = _peek(held)
            except OSError as exc:
                return wake("error reading the held TCP client: %s" % _oserror_text(exc))
            if outcome == "data":
                log.debug("TCP client sent data, executing %s..." % agent_label)
                return wake("the held TCP client %s sent data" % held.peer)
            if outcome in ("fin", "rst"):
                kind = outcome.upper()
                probes[kind] += 1
                log.debug("TCP client closed connection, closing file descriptor %d (peer %s, %s)",
                          held.sock.fileno(), held.peer, kind)
                poller.unregister(held.sock.fileno())
                held.sock.close()
                held = None
                if state == _GRACE:
                    poller.register(probe_sock.fileno(), select.POLLIN)
                state, deadline = _IDLE, None
                continue
            if ready[held.sock.fileno()] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                # An error or hang-up the peek did not report: never spin on it.
                return wake("the held TCP client reported %s" % _events_text(ready[held.sock.fileno()]))
        if probe_sock.fileno() in ready and state == _IDLE:
            try:
                sock, address = probe_sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    if exc.errno == errno.ECONNABORTED:  # reset while still in the backlog: a probe
                        probes["RST"] += 1
                    log.debug("A TCP client left before it was accepted: %s", exc)
                    continue
                return wake("accept() on the TCP listener failed: %s" % _oserror_text(exc))
            held = _HeldClient(sock, address)
            poller.register(sock.fileno(), select.POLLIN)
            state = _HOLDING
            log.debug("Accepted connection on TCP listener: %d (peer %s)", sock.fileno(), held.peer)
        elif probe_sock.fileno() in ready and state == _HOLDING:
            if grace_ms == 0:
                return wake("a second TCP client arrived while one was held")
            # Leave the second client in the backlog: never accept it here.
            poller.unregister(probe_sock.fileno())
            deadline = time.monotonic() + grace_ms / 1000.0
            state = _GRACE
            log.debug("A second TCP client is waiting; giving the held one %d ms" % grace_ms)


def _labels(fds: Iterable[int], by_fd: dict[int, _Listener]) -> str:
    return ", ".join(by_fd[fd].spec.label if fd in by_fd else "fd %d" % fd for fd in sorted(fds))


# ---------------------------------------------------------------------------
# Hand-off and exec: put each fd where the program expects it, say so in the
# environment, reset what the interpreter changed, and execve.
# ---------------------------------------------------------------------------


class _HandoffProtocol:
    """How the program learns its fds: `scrub` on every exec, `hand_over` on wake."""

    def scrub(self, env: dict[str, str]) -> None:
        raise NotImplementedError

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  log: _Log) -> list[int]:
        raise NotImplementedError


class _EnvProtocol(_HandoffProtocol):
    """Each fd in a variable of its own (the Datadog agent's way)."""

    def __init__(self, owned_vars: Iterable[str], client_var: str) -> None:
        self.owned_vars = tuple(owned_vars)
        self.client_var = client_var

    def scrub(self, env: dict[str, str]) -> None:
        # A variable inherited from our own parent names an fd nobody handed
        # the program: drop it on every path, so it is never adopted.
        for name in self.owned_vars + ((self.client_var,) if self.client_var else ()):
            env.pop(name, None)

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  log: _Log) -> list[int]:
        fds = []
        for listener in listeners:
            env[listener.spec.name] = str(listener.fd)
            fds.append(listener.fd)
        if client is not None and self.client_var:
            env[self.client_var] = str(client.sock.fileno())
            fds.append(client.sock.fileno())
        return fds


class _SystemdProtocol(_HandoffProtocol):
    """sd_listen_fds(3): fds 3, 4, ... with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES."""

    def __init__(self, *, inherited_for_us: bool) -> None:
        # LISTEN_* addressed to this very process belong to the program too
        # when we fail open (same pid after execve): keep them then.
        self.inherited_for_us = inherited_for_us

    def scrub(self, env: dict[str, str]) -> None:
        if not self.inherited_for_us:
            for name in _SYSTEMD_VARS:
                env.pop(name, None)

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  log: _Log) -> list[int]:
        sources = [lsn.fd for lsn in listeners] + ([client.sock.fileno()] if client is not None else [])
        # "unknown" is the name systemd reports for a socket it was given no
        # name for; "connection" the one it gives an accepted connection.
        names = [lsn.spec.name or "unknown" for lsn in listeners] + (["connection"] if client is not None else [])
        targets = _move_fds_to(sources, _SD_LISTEN_FDS_START, log)
        _close_other_fds_on_exec(keep=targets)
        for name in _SYSTEMD_VARS:
            env.pop(name, None)
        env["LISTEN_FDS"] = str(len(targets))
        env["LISTEN_PID"] = str(os.getpid())  # execve keeps our pid for the program
        env["LISTEN_FDNAMES"] = ":".join(names)
        return targets


def _move_fds_to(sources: list[int], start: int, log: _Log) -> list[int]:
    """dup2 each source fd to start, start+1, ... without clobbering another.

    First every source is copied above the target range, then each copy is
    dup2'ed into place: a source that already sits on another's target is
    safe in its copy. The copies are close-on-exec and closed afterwards.
    """
    import fcntl  # only this hand-off needs it

    end = start + len(sources)
    log.move_fd_at_or_above(end)
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, end) for fd in sources]
    for fd in sources:
        if fd >= end:
            os.set_inheritable(fd, False)  # the original stays behind, closed by execve
    targets = list(range(start, end))
    for copy, target in zip(copies, targets):
        os.dup2(copy, target, inheritable=True)
        os.close(copy)
    return targets


def _close_other_fds_on_exec(*, keep: list[int]) -> None:
    """Under systemd's protocol the program gets 0-2 and its LISTEN_FDS, nothing else."""
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    for name in os.listdir(fd_dir):  # the listing's own fd is closed by the time we loop
        fd = int(name)
        if fd > 2 and fd not in keep:
            _close_on_exec_if_open(fd)


def _find_program(name: str, environ: Mapping[str, str]) -> str:
    """Find NAME as a shell would (as given with a '/', else in PATH); check it can run.

    Checked before anything else, so a broken agent path is reported at once
    rather than on the first request, when the waiting client would be lost.
    """
    if not name:
        raise LoaderError("the program name is empty")
    if "/" in name:
        _check_runnable(name)
        return name
    search_path = environ.get("PATH", os.defpath)
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            _check_runnable(candidate)
            return candidate
    raise LoaderError("%s was not found in PATH (%s)" % (_shown(name), _shown(search_path, 200)))


def _check_runnable(path: str) -> None:
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        raise LoaderError("%s: %s" % (path, _oserror_text(exc))) from None
    if stat.S_ISDIR(info.st_mode):
        raise LoaderError("%s is a directory" % path)
    if not stat.S_ISREG(info.st_mode):
        raise LoaderError("%s is not a regular file" % path)
    if not os.access(path, os.X_OK):
        raise LoaderError("%s is not executable" % path)
    interpreter = _interpreter_of(path)
    if interpreter and not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        raise LoaderError("%s starts with '#!%s', and that interpreter is missing or not executable"
                          % (path, interpreter))


def _interpreter_of(path: str) -> str:
    """The program a '#!' line names (the kernel would exec it), or ''."""
    try:
        with open(path, "rb") as f:  # close-on-exec (PEP 446), closed at once anyway
            head = f.read(256)
    except OSError:
        return ""  # execute-only files exist; execve will tell
    if not head.startswith(b"#!"):
        return ""
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else ""


class _Launch:
    """What to exec: the resolved path, argv as given, the base environment."""

    def __init__(self, path: str, argv: list[str], env: dict[str, str], label: str,
                 protocol: _HandoffProtocol) -> None:
        self.path = path
        self.argv = argv
        self.env = env
        self.label = label
        self.protocol = protocol
        self.unselected_fds: list[int] = []  # inherited sockets nobody asked for


def _reset_signals_for_exec() -> None:
    # CPython ignores SIGPIPE and SIGXFSZ at start-up, and an ignored signal
    # stays ignored across execve: give the program the defaults it expects.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def _exec_program(launch: _Launch, env: dict[str, str], log: _Log) -> NoReturn:
    log.info("Starting %s..." % launch.label)
    if log.enabled("trace"):
        log.trace("Starting %s with env: %r" % (launch.label, sorted(env.items())))
    _reset_signals_for_exec()
    try:
        os.execve(launch.path, launch.argv, env)
    except (OSError, ValueError) as exc:
        # Back to ignoring SIGPIPE so this last line cannot kill us instead.
        if hasattr(signal, "SIGPIPE"):
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        log.error("Failed to start %s with args %r: %s" % (launch.label, launch.argv, _oserror_text(exc)))
        sys.exit(1)


def _exec_directly(launch: _Launch, log: _Log) -> NoReturn:
    """Fail open: the program, unchanged environment, none of our sockets."""
    env = dict(launch.env)
    launch.protocol.scrub(env)
    _exec_program(launch, env, log)


def _close_on_exec_if_open(fd: int) -> None:
    try:
        os.set_inheritable(fd, False)
    except OSError as exc:
        if exc.errno != errno.EBADF:  # already closed: nothing to keep from the program
            raise


def _exec_with_handoff(launch: _Launch, listeners: list[_Listener], wake: _Wake, log: _Log) -> NoReturn:
    env = dict(launch.env)
    launch.protocol.scrub(env)
    fds = launch.protocol.hand_over(env, listeners, wake.client, log)
    for fd in launch.unselected_fds:
        if fd not in fds:
            _close_on_exec_if_open(fd)
    for fd in fds:
        # The program inherits these fds (close-on-exec cleared) in blocking
        # mode, as the Go loader leaves them; every other fd of ours is
        # close-on-exec, so the program gets exactly 0, 1, 2 and these.
        os.set_inheritable(fd, True)
        os.set_blocking(fd, True)
    _exec_program(launch, env, log)


# ---------------------------------------------------------------------------
# Footprint: while it waits, the loader is the whole cost of an idle agent.
# Before the wait it gives back what it no longer needs, as the Go loader
# does. Each step was measured (README, Performance); all are Linux-only.
#
#   defer    run main() only once the script's own module has finished
#            executing: CPython frees a script's syntax tree (~4 MB for this
#            file) only then. See _run_as_script at the end of the file.
#   trim     malloc_trim(0): hand freed heap pages back to the kernel.
#   pageout  madvise(MADV_PAGEOUT) on read-only file-backed mappings (the
#            interpreter's and libraries' code): the kernel may reclaim them;
#            the few the wait loop touches come back as page faults.
#
# TRACE_LOADER_RELEASE_MEMORY=none (or a comma list) selects steps, for
# measuring them; the default is all of them.
# ---------------------------------------------------------------------------

_MEMORY_STEPS = ("defer", "trim", "pageout")
_MADV_PAGEOUT = 21  # linux/mman.h, since Linux 5.4
_MADVISE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM})
_SYSTEM_LIBRARY_DIRS = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")


def _memory_steps(environ: Mapping[str, str]) -> frozenset[str]:
    text = environ.get("TRACE_LOADER_RELEASE_MEMORY", "")
    if not text:
        return frozenset(_MEMORY_STEPS)
    return frozenset(step.strip() for step in text.split(",")) & frozenset(_MEMORY_STEPS)


def _rss_kb() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # not Linux, or /proc is not mounted: the figure is only for the log
    return 0


def _release_memory(steps: frozenset[str], log: _Log) -> None:
    if not sys.platform.startswith("linux") or not steps & {"trim", "pageout"}:
        return
    before = _rss_kb()
    try:
        import ctypes  # costs ~0.4 MB, which trim alone wins back several times over

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError) as exc:
        log.debug("Cannot load libc to release memory: %s" % exc)
        return
    if "trim" in steps and hasattr(libc, "malloc_trim"):  # glibc has it; musl does not
        libc.malloc_trim(0)
    if "pageout" in steps:
        _page_out_file_mappings(libc, ctypes)
    log.debug("Released memory before waiting: RSS %d kB -> %d kB" % (before, _rss_kb()))


def _page_out_file_mappings(libc: object, ctypes: object) -> None:
    madvise = libc.madvise  # type: ignore[attr-defined]
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)  # type: ignore[attr-defined]
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split(None, 5)
        # Only mappings of a file that we never write: their pages can be
        # read back from the file. Writable ones are our private data.
        if len(fields) < 6 or fields[5].startswith("[") or "w" in fields[1]:
            continue
        # System libraries (libc, the dynamic linker) are what the agent maps
        # first after execve, and other processes share them anyway: keep them.
        if fields[5].startswith(_SYSTEM_LIBRARY_DIRS):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, _MADV_PAGEOUT) != 0:
            if ctypes.get_errno() in _MADVISE_UNSUPPORTED:  # type: ignore[attr-defined]
                return  # an older kernel or a sandbox: nothing more to gain
            continue  # this mapping only (e.g. a locked one)


# ---------------------------------------------------------------------------
# The engine: listeners -> wait -> exec, shared by both front doors.
# ---------------------------------------------------------------------------


def _serve(launch: _Launch, specs: list[_ListenerSpec], *, grace_ms: int, log: _Log) -> int:
    try:
        listeners = _open_listeners(specs, log)
    except LoaderError as exc:
        log.warn("Failed to get listeners for %s: %s" % (launch.label, exc))
        _exec_directly(launch, log)
    if not listeners:
        log.info("All %s inputs are disabled, stopping..." % launch.label)
        return 0
    _release_memory(_memory_steps(launch.env), log)
    wake = _wait_for_traffic(listeners, grace_ms=grace_ms, log=log, agent_label=launch.label)
    total = wake.probes["FIN"] + wake.probes["RST"]
    log.info(
        "Waking %s: %s; %d probe%s absorbed since start (FIN: %d, RST: %d)"
        % (launch.label, wake.reason, total, "" if total == 1 else "s", wake.probes["FIN"], wake.probes["RST"])
    )
    _exec_with_handoff(launch, listeners, wake, log)


# ---------------------------------------------------------------------------
# Front door 1: drop-in for the Go trace-loader.
# ---------------------------------------------------------------------------

_USAGE = """\
usage: trace_loader.py CONFIG_FILE AGENT [AGENT_ARGS...]
       trace_loader.py [OPTIONS] -- PROGRAM [ARGS...]
       trace_loader.py --help | --version

Drop-in mode reads CONFIG_FILE (datadog.yaml) and the DD_* environment, binds
the trace-agent's sockets, and execs AGENT with them on the first real traffic.
Generic mode takes --listen options; 'trace_loader.py --help' lists them.
"""


def _drop_in_specs(settings: _DropInSettings, log: _Log) -> list[_ListenerSpec]:
    specs: list[_ListenerSpec] = []
    if settings.bind_host_reason.startswith("containerized"):
        log.info("Activating non-local traffic automatically in containerized environment, "
                 "trace-agent will listen on 0.0.0.0")
    if settings.receiver_port > 0:
        specs.append(_ListenerSpec(RECEIVER_FD_VAR, "tcp", host=settings.bind_host, port=settings.receiver_port,
                                  probe=settings.handle_tcp_probe, label="TCP receiver"))
    else:
        log.info("Trace-agent TCP receiver is disabled")
    if settings.receiver_socket:
        specs.append(_ListenerSpec(UNIX_FD_VAR, "unix", path=settings.receiver_socket, mode=0o722,
                                  label="unix receiver"))
    else:
        log.info("Trace-agent unix receiver is disabled")
    if settings.otlp_enabled:
        specs.append(_ListenerSpec(OTLP_FD_VAR, "tcp", host=settings.bind_host, port=settings.otlp_port,
                                  label="OTLP receiver"))
    else:
        log.info("Trace-agent OTLP receiver is disabled")
    return specs


def _run_drop_in(config_path: str, agent: str, agent_args: list[str], environ: Mapping[str, str], log: _Log) -> int:
    try:
        path = _find_program(agent, environ)
    except LoaderError as exc:
        log.critical("Cannot start the trace-agent: %s" % exc)
        return 1
    protocol = _EnvProtocol(_DROP_IN_FD_VARS, CLIENT_FD_VAR)
    launch = _Launch(path, [agent, *agent_args], dict(environ), "the trace-agent", protocol)
    try:
        settings = _load_drop_in_settings(config_path, environ, log)
    except ConfigError as exc:
        log.warn("Failed to load the configuration: %s" % exc)
        _exec_directly(launch, log)
    log.configure(level=settings.log_level, console=settings.log_to_console, path=settings.log_file)
    if not settings.apm_enabled and not settings.error_tracking:
        log.info("Trace-agent is disabled, stopping...")
        return 0
    if not settings.socket_activation:
        log.info("Socket-activation for the trace-agent is disabled, running the trace-agent directly...")
        _exec_directly(launch, log)
    specs = _drop_in_specs(settings, log)
    grace = settings.probe_grace_ms if settings.handle_tcp_probe else 0
    return _serve(launch, specs, grace_ms=grace, log=log)


# ---------------------------------------------------------------------------
# Front door 2: generic mode, for any server (argparse is imported only here).
# ---------------------------------------------------------------------------

_FDNAME_MAX = 255


def _valid_fdname(name: str) -> bool:
    # sd_listen_fds_with_names(3): printable ASCII, no ':' (the separator).
    return 0 < len(name) <= _FDNAME_MAX and name.isascii() and name.isprintable() and ":" not in name


def _valid_env_name(name: str) -> bool:
    return bool(name) and name.isascii() and (name[0].isalpha() or name[0] == "_") and \
        all(c.isalnum() or c == "_" for c in name)


def _parse_listen(value: str) -> _ListenerSpec:
    """`[NAME=]tcp://HOST:PORT | tcp://[V6]:PORT | unix:///PATH[?mode=0660] | systemd:[FDNAME]`."""
    name, sep, address = value.partition("=")
    if not sep or "://" in name or name.startswith("systemd:"):
        name, address = "", value
    if address.startswith("tcp://"):
        host, port = _parse_host_port(address[len("tcp://"):], value)
        return _ListenerSpec(name, "tcp", host=host, port=port, label=address)
    if address.startswith("unix://"):
        path, _, query = address[len("unix://"):].partition("?")
        if not path.startswith("/") and not path.startswith("@"):
            raise ValueError("%s: a unix address needs an absolute path (unix:///run/app.sock)" % _shown(value))
        mode = 0o666  # systemd's SocketMode default
        if query:
            key, _, text = query.partition("=")
            try:
                mode = int(text, 8) if key == "mode" else -1
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise ValueError("%s: expected ?mode=OCTAL (e.g. ?mode=0660)" % _shown(value))
        return _ListenerSpec(name, "unix", path=path, mode=mode, label=address)
    if address.startswith("systemd:"):
        return _ListenerSpec(name, "inherited", fdname=address[len("systemd:"):], label=address)
    raise ValueError("%s: expected tcp://HOST:PORT, tcp://[V6]:PORT, unix:///PATH or systemd:[FDNAME]"
                     % _shown(value))


def _parse_host_port(text: str, value: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError("%s: put an IPv6 address in brackets (tcp://[::1]:8080)" % _shown(value))
    # Port 0 asks the kernel for a free port; the log line names the one it chose.
    if not port_text.isdigit() or not port_text.isascii() or not 0 <= int(port_text) <= 65535:
        raise ValueError("%s: the port must be a number from 0 to 65535" % _shown(value))
    return host, int(port_text)


def _generic_parser() -> argparse.ArgumentParser:
    import argparse

    def listen(value: str) -> _ListenerSpec:
        try:
            return _parse_listen(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def grace(value: str) -> int:
        if not value.isascii() or not value.isdigit() or int(value) > _MAX_PROBE_GRACE_MS:
            raise argparse.ArgumentTypeError(
                "%s: expected milliseconds from 0 to %d" % (_shown(value), _MAX_PROBE_GRACE_MS))
        return int(value)

    parser = argparse.ArgumentParser(
        prog="trace_loader.py",
        usage="%(prog)s [OPTIONS] -- PROGRAM [ARGS...]\n       %(prog)s CONFIG_FILE AGENT [AGENT_ARGS...]",
        description="Hold PROGRAM's sockets and exec it on the first real traffic. "
                    "With CONFIG_FILE AGENT instead: drop-in mode for the Datadog trace-loader.",
    )
    parser.add_argument("--version", action="version", version="trace-loader %s" % __version__)
    parser.add_argument("--listen", action="append", type=listen, required=True, metavar="[NAME=]ADDRESS",
                        help="tcp://HOST:PORT, tcp://[V6]:PORT, unix:///PATH[?mode=0660], or systemd:[FDNAME] "
                             "to adopt sockets this process inherited from systemd (repeatable)")
    parser.add_argument("--protocol", choices=("systemd", "env"), default="systemd",
                        help="hand-off: systemd's LISTEN_FDS (default) or one variable per fd (NAME=)")
    parser.add_argument("--client-fd-var", default="", metavar="VAR",
                        help="under --protocol env: the variable that carries the held TCP client")
    parser.add_argument("--handle-tcp-probe", action="store_true",
                        help="absorb TCP probes (connect, then close) on the first TCP listener")
    parser.add_argument("--probe-grace-period", type=grace, default=_DEFAULT_PROBE_GRACE_MS, metavar="MS",
                        help="how long a held silent client may delay a second one (default 250, 0: none)")
    parser.add_argument("--log-level", type=str.lower, default="info", choices=tuple(_LEVELS),
                        help="trace, debug, info, warn, error, critical or off")
    return parser


def _run_generic(argv: list[str], environ: Mapping[str, str], log: _Log) -> int:
    parser = _generic_parser()
    if "--" in argv:
        options, program = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    else:
        options, program = argv, []
    args = parser.parse_args(options)
    if not program:
        parser.error("expected '-- PROGRAM [ARGS...]' after the options")
    specs: list[_ListenerSpec] = args.listen
    problem = _check_generic_names(specs, args)
    if problem:
        parser.error(problem)
    log.configure(level=args.log_level, console=True, path=None)
    first_tcp = next((s for s in specs if s.kind == "tcp"), None)
    if args.handle_tcp_probe and first_tcp is not None:
        first_tcp.probe = True
    try:
        path = _find_program(program[0], environ)
    except LoaderError as exc:
        log.critical("Cannot start %s: %s" % (_shown(program[0]), exc))
        return 1
    label = os.path.basename(program[0])
    for_us = environ.get("LISTEN_PID", "") == str(os.getpid())
    protocol: _HandoffProtocol
    if args.protocol == "env":
        # LISTEN_* meant for another process are stale here: drop them too.
        stale = () if for_us else _SYSTEMD_VARS
        protocol = _EnvProtocol([s.name for s in specs] + list(stale), args.client_fd_var)
    else:
        protocol = _SystemdProtocol(inherited_for_us=for_us)
    launch = _Launch(path, program, dict(environ), label, protocol)
    try:
        specs, launch.unselected_fds = _expand_inherited(
            specs, environ, for_us=for_us, probe=args.handle_tcp_probe and first_tcp is None)
        _check_unique_names(specs, args.protocol)
    except ListenerError as exc:
        log.warn("Failed to get listeners for %s: %s" % (label, exc))
        _exec_directly(launch, log)
    return _serve(launch, specs, grace_ms=args.probe_grace_period if args.handle_tcp_probe else 0, log=log)


def _check_generic_names(specs: list[_ListenerSpec], args: argparse.Namespace) -> str:
    protocol = args.protocol
    for spec in specs:
        if protocol == "env" and not _valid_env_name(spec.name):
            return "argument --listen: %s needs NAME= (the variable that carries its fd) under --protocol env" \
                % spec.label
        if protocol == "systemd" and spec.name and not _valid_fdname(spec.name):
            return "argument --listen: %s is not a valid fd name (printable ASCII, no ':')" % _shown(spec.name)
    client_var = args.client_fd_var
    if client_var and not _valid_env_name(client_var):
        return "argument --client-fd-var: %s is not a valid variable name" % _shown(client_var)
    if protocol == "env" and args.handle_tcp_probe and not client_var:
        return "--handle-tcp-probe with --protocol env needs --client-fd-var VAR for the held client"
    return ""


def _inherited_fds(environ: Mapping[str, str], *, for_us: bool) -> list[tuple[int, str]]:
    """sd_listen_fds(3): (fd, name) pairs passed to this very process."""
    if not for_us:
        raise ListenerError("no sockets were passed to this process (LISTEN_PID is %s, our pid is %d)"
                            % (_shown(environ.get("LISTEN_PID", "")), os.getpid()))
    count_text = environ.get("LISTEN_FDS", "")
    if not count_text.isascii() or not count_text.isdigit() or not 0 < int(count_text) <= 4096:
        raise ListenerError("LISTEN_FDS is %s; expected a count of sockets" % _shown(count_text))
    count = int(count_text)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if len(names) != count:
        names = ["unknown"] * count  # systemd's name when none was set
    return [(_SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _check_unique_names(specs: list[_ListenerSpec], protocol: str) -> None:
    if protocol != "env":
        return  # LISTEN_FDNAMES may repeat a name; systemd allows it
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ListenerError("%s would carry %d fds; under --protocol env each NAME takes one socket"
                                % (name, names.count(name)))


def _expand_inherited(specs: list[_ListenerSpec], environ: Mapping[str, str], *, for_us: bool,
                      probe: bool) -> tuple[list[_ListenerSpec], list[int]]:
    """Replace each `systemd:[NAME]` spec by one spec per matching inherited fd.

    Also returns the inherited fds that no spec asked for.
    """
    if not any(s.kind == "inherited" for s in specs):
        return specs, []
    inherited = _inherited_fds(environ, for_us=for_us)
    expanded: list[_ListenerSpec] = []
    for spec in specs:
        if spec.kind != "inherited":
            expanded.append(spec)
            continue
        matches = [(fd, name) for fd, name in inherited if not spec.fdname or name == spec.fdname]
        if not matches:
            raise ListenerError("no inherited socket is named %s (LISTEN_FDNAMES: %s)"
                                % (_shown(spec.fdname), _shown(environ.get("LISTEN_FDNAMES", ""))))
        for fd, name in matches:
            expanded.append(_ListenerSpec(spec.name or name, "inherited", fd=fd, label="inherited fd %d (%s)"
                                         % (fd, name)))
    if probe:
        first = next((s for s in expanded if s.kind == "inherited" and _is_tcp_listener(s.fd)), None)
        if first is not None:
            first.probe = True
    chosen = {s.fd for s in expanded if s.kind == "inherited"}
    return expanded, [fd for fd, _ in inherited if fd not in chosen]


def _is_tcp_listener(fd: int) -> bool:
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with probe:
        return probe.family in (socket.AF_INET, socket.AF_INET6) and probe.type == socket.SOCK_STREAM


# ---------------------------------------------------------------------------
# For agents written in Python: adopt what the loader handed over.
# ---------------------------------------------------------------------------


class Handoff:
    """The sockets a drop-in loader handed over, by variable name.

    `accept()` returns the held client first (it is an accepted connection
    that may already carry a request), then accepts from the listener.
    """

    def __init__(self, listeners: dict[str, socket.socket], client: socket.socket | None) -> None:
        self.listeners = listeners
        self.client = client

    def accept(self, *, var: str = RECEIVER_FD_VAR) -> tuple[socket.socket, object]:
        if var == RECEIVER_FD_VAR and self.client is not None:
            client, self.client = self.client, None
            try:
                return client, client.getpeername()
            except OSError:
                return client, None
        return self.listeners[var].accept()


def adopt(*, environ: Mapping[str, str] | None = None) -> Handoff:
    """Wrap the fds named by the DD_*_FD variables; raise LoaderError on garbage."""
    env = os.environ if environ is None else environ
    adopted: dict[str, socket.socket] = {}
    for var in _DROP_IN_FD_VARS:
        text = env.get(var, "")
        if not text:
            continue
        if not text.isascii() or not text.isdigit():
            raise LoaderError("%s is %s, not a file descriptor number" % (var, _shown(text)))
        try:
            adopted[var] = socket.socket(fileno=int(text))
        except OSError as exc:
            raise LoaderError("%s=%s is not an open socket: %s" % (var, text, _oserror_text(exc))) from None
    client = adopted.pop(CLIENT_FD_VAR, None)
    return Handoff(adopted, client)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed.

    Otherwise our first socket would land on 0, 1 or 2, and the program would
    take a listener for its stdin or stdout.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            new = os.open(os.devnull, os.O_RDWR)  # lowest free fd: this one
            os.set_inheritable(new, True)


def _restore_default_interrupt() -> None:
    # CPython turns SIGINT into KeyboardInterrupt; the default action makes
    # SIGINT end the waiting loader like SIGTERM and SIGHUP do: at once, no
    # traceback, the exit status of a process killed by that signal, and no
    # half-started agent (the signal either lands before execve or the agent
    # gets it). If our parent ignored SIGINT, CPython kept it ignored: so do we.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["-h"], ["--help"]):
        sys.stdout.write(_USAGE + "\n")
        _generic_parser().print_help()
        return 0
    if args == ["--version"]:
        sys.stdout.write("trace-loader %s\n" % __version__)
        return 0
    if len(args) < 2:
        sys.stderr.write(_USAGE)
        return 2
    _ensure_std_fds()
    _restore_default_interrupt()
    log = _Log()
    environ = dict(os.environ)
    try:
        if args[0].startswith("-"):
            return _run_generic(args, environ, log)
        return _run_drop_in(args[0], args[1], args[2:], environ, log)
    except Exception as exc:  # noqa: BLE001 -- the last guard: an internal error must not cost the agent
        log.critical("Internal error (%s: %s); starting the program directly" % (type(exc).__name__, exc))
        return _last_resort_exec(args, environ, log)


def _last_resort_exec(args: list[str], environ: dict[str, str], log: _Log) -> int:
    program = args[args.index("--") + 1:] if args[0].startswith("-") and "--" in args else args[1:]
    try:
        path = _find_program(program[0] if program else "", environ)
    except LoaderError:
        return 1
    env = dict(environ)
    for name in _DROP_IN_FD_VARS:
        env.pop(name, None)
    _exec_program(_Launch(path, program, env, os.path.basename(program[0]), _EnvProtocol((), "")), env, log)


def _run_as_script() -> None:
    """main() as the program: exit with its status, whatever happens."""
    try:
        status = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # closed or absent: nothing left to say there
    os._exit(status)  # we are inside atexit: end here, without a second shutdown


if __name__ == "__main__":
    if "defer" in _memory_steps(os.environ):
        # CPython frees a script's syntax tree only after the script's last
        # line has run, and the loader would wait (and the agent inherit
        # nothing of it) while it is still held. Run main() from atexit, the
        # first thing after that: every module is still loaded there.
        import atexit

        atexit.register(_run_as_script)
    else:
        _run_as_script()
