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
        hand-off with systemd's LISTEN_FDS protocol or plain variables; the
        first real client is relayed into the program's own listener.

Supports CPython 3.8 and newer on Linux (first) and macOS. Needs nothing
beyond the standard library: copy this one file wherever it is needed, or
install it (``pip install .``) for a ``trace-loader`` command; ``python3 -m
trace_loader`` works too. Importing it only defines things; the work happens
in ``main()``. README.md is the operator's guide; docs/ holds the design.
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
    import ctypes
    from typing import Callable, Iterable, Iterator, Mapping, NoReturn

__version__ = "0.2.0"

__all__ = [
    "CLIENT_FD_VAR",
    "OTLP_FD_VAR",
    "RECEIVER_FD_VAR",
    "UNIX_FD_VAR",
    "Handoff",
    "LoaderError",
    "adopt",
    "main",
]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class LoaderError(Exception):
    """Root of every error the loader raises on purpose."""


class _ConfigError(LoaderError):
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
        where = _path_shown(source) + (":%d" % line if line else "") if source else ""
        parts = [p for p in (where, key, message) if p]
        super().__init__(": ".join(parts))


class _ListenerError(LoaderError):
    """A socket could not be set up as asked."""


# Named here once: the fd variables of the drop-in hand-off (README "Hand-off").
RECEIVER_FD_VAR = "DD_APM_NET_RECEIVER_FD"
UNIX_FD_VAR = "DD_APM_UNIX_RECEIVER_FD"
OTLP_FD_VAR = "DD_OTLP_CONFIG_GRPC_FD"
CLIENT_FD_VAR = "DD_APM_NET_RECEIVER_CLIENT_FD"
_DROP_IN_FD_VARS = (RECEIVER_FD_VAR, UNIX_FD_VAR, OTLP_FD_VAR, CLIENT_FD_VAR)

# systemd's sd_listen_fds(3) protocol: the first passed fd is always 3.
_SD_LISTEN_FDS_START = 3
_MAX_LISTEN_FDS = 4096  # more inherited sockets than any real unit passes: garbage
_MAX_FD = 2**31 - 1  # an fd is a C int
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


# Every control character a message might still carry becomes a visible
# escape: a raw CR or ESC in a log line could forge a line or drive a terminal.
_CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7F, 0xA0))}
_MAX_LOG_LINE = 2048  # bytes, newline included
_PATH_SHOWN_MAX = 300
# A variable whose name holds one of these (any case) is masked at trace level.
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")


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
            self.warn("Cannot open log file %s (%s); logging to the console only",
                      _path_shown(path), _oserror_text(exc))
            return -1
        return fd

    def enabled(self, level: str) -> bool:
        return _LEVELS[level] >= self.threshold

    def _emit(self, level: str, message: str, args: tuple[object, ...]) -> None:
        if not self.enabled(level):
            # Before formatting: every log call passes its arguments for this
            # to format, so a debug line costs nothing at info level.
            return
        if args:
            message = message % args
        caller = sys._getframe(2)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        source = os.path.basename(caller.f_code.co_filename)
        line = "%s | TRACE-LOADER | %s | (%s:%d in %s) | %s" % (
            stamp, level.upper(), source, caller.f_lineno, caller.f_code.co_name,
            message.translate(_CONTROL_ESCAPES),
        )
        # backslashreplace: environment values may carry undecodable bytes
        # (surrogate escapes); a log line must never raise on them.
        data = line.encode("utf-8", "backslashreplace")
        if len(data) >= _MAX_LOG_LINE:
            data = data[: _MAX_LOG_LINE - 5].decode("utf-8", "ignore").encode("utf-8") + b" ..."
        data += b"\n"
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


def _quoted(value: str, limit: int = 64) -> str:
    """A user's value, quoted and cut short, safe for one log line.

    repr() escapes every control character (CR, ESC, ...), so no value can
    forge a line or drive a terminal; README "Logging".
    """
    if len(value) > limit:
        return repr(value[:limit]) + "... (%d characters)" % len(value)
    return repr(value)


def _escaped(value: str, limit: int = 64) -> str:
    """`value` escaped as _quoted does, without the quotes: for a phrase that quotes or labels it itself."""
    text = repr(value[:limit])[1:-1]
    return text + "... (%d characters)" % len(value) if len(value) > limit else text


def _path_shown(path: str) -> str:
    """A path (or address) from outside: as it is when plainly printable and short, else escaped and cut."""
    return _printable(path, _PATH_SHOWN_MAX)


def _printable(value: str, limit: int = 64) -> str:
    """`value` unquoted when it is printable and short enough; else quoted, escaped and cut (_quoted)."""
    if value and len(value) <= limit and value.isprintable():
        return value
    return _quoted(value, limit)


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def _env_shown(env: Mapping[str, str]) -> str:
    """The environment for a trace line: secrets masked, every value cut."""
    return ", ".join(
        "%s=%s" % (_quoted(name, 64), "'********'" if _is_secret_name(name) else _quoted(value))
        for name, value in sorted(env.items())
    )


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


# What a wanted path holds. Anything else the reader found there is kept as
# its own description ("a list", "a flow collection ([...)"), for the error
# that names it if the loader then needs that key.
_PLAIN, _QUOTED, _NULL, _MAPPING = "plain", "quoted", "null", "mapping"


class _Node:
    """A value found at a wanted path: its kind, text and line."""

    __slots__ = ("kind", "text", "line")

    def __init__(self, kind: str, text: str, line: int) -> None:
        self.kind = kind  # _PLAIN, _QUOTED, _NULL, _MAPPING, or the description of something else
        self.text = text
        self.line = line

    @property
    def is_scalar(self) -> bool:
        return self.kind in (_PLAIN, _QUOTED)


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

    def error(self, lineno: int, message: str, key: str = "") -> _ConfigError:
        return _ConfigError(message, source=self.source, line=lineno, key=key)

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
            self.nodes[path] = _Node(_MAPPING, "", key_line)
            self.stack.append((indent, path))
            return False
        self.nodes[path] = _Node(_NULL, "", key_line)
        return False

    def close_pending(self) -> None:
        if self.pending is not None:
            _, path, key_line = self.pending
            self.nodes[path] = _Node(_NULL, "", key_line)
            self.pending = None

    def skip(self, indent: int, *, dashes: bool = False) -> None:
        self.skip_above = indent
        self.skip_dashes_at = indent if dashes else None

    def read_entry(self, lineno: int, indent: int, body: str, parent: str) -> None:
        descending = parent == "" or parent in self.prefixes
        if _is_dash_item(body) or body.startswith(("? ", "[", "{", "|", ">", "!", "&", "*", "@", "`")):
            if descending and parent:
                raise self.error(lineno, "expected 'key: value', found %s" % _quoted(body.strip(), 24), parent)
            if not parent:
                raise self.error(lineno, "expected 'key: value' at the top level, found %s" % _quoted(body.strip(), 24))
            self.skip(indent, dashes=True)
            return
        parsed = _split_key(body)
        if parsed is None:
            if descending:
                raise self.error(lineno, "expected 'key: value', found %s" % _quoted(body.strip(), 24), parent)
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
        if node.is_scalar or node.kind == _NULL:
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
    if rest.startswith("\"") and _surrogate_escape(rest):
        return "the escape %s, a surrogate code point, which YAML does not allow" % _surrogate_escape(rest)
    if rest.startswith(("\"", "'")):
        return "a quoted string that does not end on its line, or text after it"
    if rest.startswith(("@", "`", "%")):
        return "a value starting with the reserved character %s" % rest[0]
    return "a nested 'key: value' on one line"


def _surrogate_escape(text: str) -> str:
    """The first \\uD800-\\uDFFF style escape in `text`, or ''."""
    for marker, width in (("\\u", 4), ("\\U", 8)):
        start = text.find(marker)
        while start >= 0:
            digits = text[start + 2: start + 2 + width]
            if len(digits) == width and _is_hex(digits) and 0xD800 <= int(digits, 16) <= 0xDFFF:
                return text[start: start + 2 + width]
            start = text.find(marker, start + 2)
    return ""


def _scalar_node(rest: str, lineno: int) -> _Node | None:
    """A one-line scalar, or None when `rest` is some other construct."""
    if rest.startswith(("\"", "'")):
        text, end = _read_quoted(rest, 0)
        if text is None:
            return None
        tail = rest[end:].strip()
        if tail and not tail.startswith("#"):
            return None
        return _Node(_QUOTED, text, lineno)
    if rest.startswith(("|", ">", "[", "{", "!", "&", "*", "@", "`", "%")) or _is_dash_item(rest):
        return None
    text = _strip_comment(rest)
    if ": " in text or text.endswith(":"):
        return None
    return _Node(_NULL if text in _NULLS else _PLAIN, text, lineno)


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
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                return None, pos  # beyond Unicode, or a lone surrogate: YAML allows neither
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
        raise _ConfigError("cannot open: %s" % _oserror_text(exc), source=path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _ConfigError("is not a regular file (%s)" % _file_kind(info.st_mode), source=path)
        if info.st_size > _MAX_CONFIG_BYTES:
            raise _ConfigError(
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
            raise _ConfigError("grew past %d bytes while being read" % _MAX_CONFIG_BYTES, source=path)
    except OSError as exc:
        raise _ConfigError("cannot read: %s" % _oserror_text(exc), source=path) from None
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
        raise _ConfigError("invalid UTF-8 (byte %d)" % exc.start, source=source, line=line) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte order mark, as some editors write
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_yaml_subset(text: str, wanted: Iterable[str], *, source: str = "<config>") -> dict[str, _Node]:
    """Read the `wanted` dotted paths (and their parents) out of YAML text."""
    return _YamlReader(text, wanted, source).read()


# ---------------------------------------------------------------------------
# Configuration, part 2: the settings of the drop-in front door, from the
# environment over the file over defaults (README "Configuration").
# ---------------------------------------------------------------------------

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}
_INT64 = 1 << 63
# unicode.IsSpace, which strings.TrimSpace uses: narrower than str.isspace,
# which also strips the ASCII separators 0x1c-0x1f.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"
_GO_PREFIXES = {"b": 2, "o": 8, "x": 16}
_GO_DIGITS = {c: i for i, c in enumerate("0123456789abcdefghijklmnopqrstuvwxyz")}

_DEFAULT_SOCKET = "/var/run/datadog/apm.socket" if sys.platform.startswith("linux") else ""
_DEFAULT_LOG_FILE = (
    "/opt/datadog-agent/logs/trace-agent.log" if sys.platform == "darwin" else "/var/log/datadog/trace-agent.log"
)
_DEFAULT_PROBE_GRACE_MS = 250
_MAX_PROBE_GRACE_MS = 60_000
_MAX_HOLD_TIMEOUT_MS = 600_000
_GENERIC_HOLD_TIMEOUT_MS = 1000  # drop-in: 0 (no limit), as the Go loader
_MAX_STOP_SECONDS = 604_800  # a week: --stop-when-idle and --stop-timeout
_DEFAULT_STOP_TIMEOUT = 30
# How the held client reaches the program: as an inherited fd, or relayed by
# a helper process into the program's own listener (README "Generic mode").
_HELD_FD, _HELD_RELAY = "fd", "relay"
_HELD_CLIENT_WAYS = (_HELD_FD, _HELD_RELAY)

# (YAML path, environment variables in order of precedence)
_KEYS: dict[str, tuple[str, ...]] = {
    "apm_config.enabled": ("DD_APM_ENABLED",),
    "apm_config.error_tracking_standalone.enabled": ("DD_APM_ERROR_TRACKING_STANDALONE_ENABLED",),
    "apm_config.socket_activation.enabled": ("DD_APM_SOCKET_ACTIVATION_ENABLED",),
    "apm_config.socket_activation.handle_tcp_probe": ("DD_APM_SOCKET_ACTIVATION_HANDLE_TCP_PROBE",),
    "apm_config.socket_activation.probe_grace_period": ("DD_APM_SOCKET_ACTIVATION_PROBE_GRACE_PERIOD",),
    "apm_config.socket_activation.held_client": ("DD_APM_SOCKET_ACTIVATION_HELD_CLIENT",),
    "apm_config.socket_activation.hold_timeout": ("DD_APM_SOCKET_ACTIVATION_HOLD_TIMEOUT",),
    "apm_config.socket_activation.stop_when_idle": ("DD_APM_SOCKET_ACTIVATION_STOP_WHEN_IDLE",),
    "apm_config.socket_activation.stop_timeout": ("DD_APM_SOCKET_ACTIVATION_STOP_TIMEOUT",),
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
            if parent is None or parent.kind == _NULL:
                return False
            if parent.kind != _MAPPING:
                raise _ConfigError(
                    "holds %s where a mapping is expected (looking for %s)" % (_describe_node(parent), key),
                    source=self.source, line=parent.line, key=".".join(parts[:depth]),
                )
        return True

    def from_file(self, key: str) -> _Node | None:
        node = self.nodes.get(key) if self.parents_are_mappings(key) else None
        return None if node is None or node.kind == _NULL else node

    def key_written(self, key: str) -> bool:
        """The key is written in the file, even with nothing after its colon."""
        return self.parents_are_mappings(key) and key in self.nodes

    def has_value(self, key: str) -> bool:
        return self.from_env(key) is not None or self.from_file(key) is not None

    def boolean(self, key: str, default: bool) -> bool:
        found = self.from_env(key)
        if found is not None:
            return _go_bool(found[1], found[0])
        node = self.scalar(key)
        if node is None:
            return default
        if node.kind == _PLAIN and node.text.lower() in ("true", "false"):
            return node.text.lower() == "true"
        if node.kind == _PLAIN and node.text.lower() in _YAML11_BOOLS:
            self.log.warn("%s:%d: %s: %s is read as a boolean (YAML 1.1); write true or false",
                          _path_shown(self.source), node.line, key, _quoted(node.text))
            return _YAML11_BOOLS[node.text.lower()]
        try:
            return _go_bool(node.text, key)
        except _ConfigError as exc:
            raise _ConfigError(exc.message, source=self.source, line=node.line, key=key) from None

    def integer(self, key: str, default: int) -> int:
        found = self.from_env(key)
        if found is not None:
            return _go_int(found[1], found[0])
        node = self.scalar(key)
        if node is None:
            return default
        try:
            return _go_int(node.text, key)
        except _ConfigError as exc:
            raise _ConfigError(exc.message, source=self.source, line=node.line, key=key) from None

    def string(self, key: str, default: str) -> str:
        found = self.from_env(key)
        if found is not None:
            return found[1]
        node = self.scalar(key)
        return default if node is None else node.text

    def error(self, key: str, message: str) -> _ConfigError:
        """An error about the value `key` has now, naming where that value was found."""
        found = self.from_env(key)
        if found is not None:
            return _ConfigError(message, key=found[0])
        node = self.from_file(key)
        return _ConfigError(message, source=self.source, line=node.line if node else 0, key=key)

    def in_range(self, key: str, default: int, low: int, high: int, unit: str = "ms") -> int:
        """An integer from `low` to `high` (in `unit`), or an error naming key and value."""
        value = self.integer(key, default)
        if not low <= value <= high:
            raise self.error(key, "%d %s is out of range (%d-%d)" % (value, unit, low, high))
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices` (lower case), in any case: `Relay` reads as `relay`, as log levels do."""
        text = self.string(key, default)
        if text.lower() not in choices:
            raise self.error(key, "%s is not one of %s" % (_quoted(text), ", ".join(choices)))
        return text.lower()

    def scalar(self, key: str) -> _Node | None:
        node = self.from_file(key)
        if node is not None and not node.is_scalar:
            raise _ConfigError(
                "holds %s; expected a single value" % _describe_node(node), source=self.source, line=node.line, key=key
            )
        return node


def _describe_node(node: _Node) -> str:
    if node.is_scalar:
        return "the single value %s" % _quoted(node.text)
    return "a mapping" if node.kind == _MAPPING else node.kind


def _go_bool(text: str, name: str) -> bool:
    """strconv.ParseBool: exactly these spellings, nothing trimmed."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise _ConfigError("%s is not a boolean (use true or false)" % _quoted(text), key=name)


def _go_int(text: str, name: str) -> int:
    """strconv.ParseInt(strings.TrimSpace(s), 0, 64), exactly: 8126, 0x1fbe, 0o17, 017, 0b1, 1_000."""
    value = _parse_go_int(text.strip(_GO_SPACE))
    if value is None:
        raise _ConfigError("%s is not an integer" % _quoted(text), key=name)
    if not -_INT64 <= value < _INT64:
        raise _ConfigError("%s is out of range for a 64-bit integer" % _quoted(text), key=name)
    return value


def _parse_go_int(text: str) -> int | None:
    """Go's integer syntax with base 0, or None; the range is checked by the caller."""
    negative = text[:1] == "-"
    body = text[1:] if text[:1] in ("-", "+") else text  # one sign, directly before the number
    if not body:
        return None
    base, digits = 10, body
    if body[0] == "0":
        prefix = body[1:2].lower()
        if len(body) >= 3 and prefix in _GO_PREFIXES:
            base, digits = _GO_PREFIXES[prefix], body[2:]
        else:
            base, digits = 8, body[1:]  # a leading 0 alone means octal
    value = 0
    for char in digits:
        if char == "_":
            continue  # placement is checked below, on the whole literal
        digit = _GO_DIGITS.get(char.lower(), 99)
        if digit >= base:
            return None
        # Past 64 bits the exact value no longer matters: stop it growing, so
        # a 100 KB string of digits costs linear time.
        value = min(value * base + digit, _INT64 << 1)
    if "_" in body and not _go_underscores_ok(body):
        return None
    return -value if negative else value


def _go_underscores_ok(body: str) -> bool:
    """Go's rule: an underscore only between digits, or after a base prefix."""
    hexadecimal = body[:2].lower() == "0x"
    previous = "digit" if len(body) >= 2 and body[0] == "0" and body[1].lower() in "box" else "start"
    start = 2 if previous == "digit" else 0
    for char in body[start:]:
        if char == "_":
            if previous != "digit":
                return False
            previous = "_"
        elif char in "0123456789" or (hexadecimal and char.lower() in "abcdef"):
            previous = "digit"
        else:
            return False  # not reached: the digits were checked first
    return previous != "_"


def _decimal(text: str, high: int) -> int | None:
    """Plain ASCII digits naming a number from 0 to `high`, else None.

    The length is checked before int(): CPython refuses to convert more than
    4300 digits (ValueError), and so many digits are garbage here anyway.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        return None
    value = int(digits)
    return value if value <= high else None


class _DropInSettings:
    """Everything the drop-in front door needs from the configuration."""

    def __init__(self, config: _Config, environ: Mapping[str, str]) -> None:
        self.apm_enabled = config.boolean("apm_config.enabled", True)
        self.error_tracking = config.boolean("apm_config.error_tracking_standalone.enabled", False)
        self.socket_activation = config.boolean("apm_config.socket_activation.enabled", False)
        self.handle_tcp_probe = config.boolean("apm_config.socket_activation.handle_tcp_probe", False)
        self.probe_grace_ms = config.in_range("apm_config.socket_activation.probe_grace_period",
                                              _DEFAULT_PROBE_GRACE_MS, 0, _MAX_PROBE_GRACE_MS)
        self.held_client = config.choice("apm_config.socket_activation.held_client", _HELD_FD, _HELD_CLIENT_WAYS)
        # 0: no limit, as the Go loader, which holds a silent client for ever.
        self.hold_timeout_ms = config.in_range("apm_config.socket_activation.hold_timeout", 0, 0,
                                               _MAX_HOLD_TIMEOUT_MS)
        # 0: never stop the program (README "Back to sleep").
        self.stop_when_idle = config.in_range("apm_config.socket_activation.stop_when_idle", 0, 0,
                                              _MAX_STOP_SECONDS, "s")
        self.stop_timeout = config.in_range("apm_config.socket_activation.stop_timeout", _DEFAULT_STOP_TIMEOUT, 0,
                                            _MAX_STOP_SECONDS, "s")
        self.receiver_port = config.integer("apm_config.receiver_port", 8126)
        self.receiver_socket = config.string("apm_config.receiver_socket", _DEFAULT_SOCKET)
        # `receiver:` with nothing under it still turns OTLP on, as for the agent.
        self.otlp_enabled = config.key_written("otlp_config.receiver") or any(
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
                raise _ConfigError("port %d is out of range (1-65535)" % port, key=key)


def _log_level(text: str) -> str:
    level = text.strip().lower()
    level = _LEVEL_ALIASES.get(level, level)
    if level not in _LEVELS:
        raise _ConfigError(
            "%s is not a log level (trace, debug, info, warn, error, critical, off)" % _quoted(text), key="log_level"
        )
    return level


def _bind_host(config: _Config, environ: Mapping[str, str]) -> tuple[str, str]:
    """The receiver's host, and why (the agent's own rule, README "Configuration")."""
    if config.has_value("bind_host") or config.has_value("apm_config.apm_non_local_traffic"):
        host = config.string("bind_host", "localhost")
        if config.has_value("apm_config.apm_non_local_traffic") and config.boolean(
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


# The three kinds of listener, as `--listen` writes them.
_TCP, _UNIX, _INHERITED = "tcp", "unix", "inherited"


class _ListenerSpec:
    """One socket to offer: TCP, unix, or one inherited from systemd.

    Three names, for three readers: `handoff_name` is what the program sees
    (its fd variable, or its LISTEN_FDNAMES entry); `systemd_name` selects
    which inherited sockets a `systemd:NAME` adopts; `shown_as` is what the
    log says.
    """

    __slots__ = ("fd", "handoff_name", "host", "kind", "mode", "path", "port", "probe", "shown_as",
                 "systemd_name")

    def __init__(self, handoff_name: str, kind: str, *, shown_as: str, host: str = "", port: int = 0,
                 path: str = "", mode: int = 0o722, fd: int = -1, systemd_name: str = "") -> None:
        self.handoff_name = handoff_name
        self.kind = kind
        self.shown_as = shown_as
        self.host = host
        self.port = port
        self.path = path
        self.mode = mode
        self.fd = fd
        self.systemd_name = systemd_name  # "" adopts every inherited socket
        self.probe = False  # the one listener the probe check watches; see _choose_probe_listener


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
        raise _ListenerError("cannot resolve bind host %s: %s" % (_quoted(host), exc)) from None
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
        where = _printable(_join_host_port(host, port))
        raise _ListenerError("cannot listen on %s: %s" % (where, _oserror_text(exc))) from None
    return sock


def _join_host_port(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host and not host.startswith("[") else "%s:%d" % (host, port)


# sun_path is 108 bytes on Linux and 104 on macOS and the BSDs; keep one for
# the NUL that C clients expect.
_SUN_PATH_MAX = (108 if sys.platform.startswith("linux") else 104) - 1


def _validate_unix_path(path: str) -> None:
    if not os.path.isabs(path):
        # A relative path would depend on the directory we were started in.
        raise _ListenerError("unix socket path %s is not absolute" % _quoted(path))
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise _ListenerError("unix socket path %s contains a NUL byte" % _quoted(path))
    if len(encoded) > _SUN_PATH_MAX:
        raise _ListenerError(
            "unix socket path is %d bytes, longer than the %d the kernel allows (sun_path): %s"
            % (len(encoded), _SUN_PATH_MAX, _path_shown(path))
        )


def _clear_stale_socket(path: str) -> None:
    """Make room for the socket: remove a stale one, refuse anything else."""
    try:
        info = os.lstat(path)  # lstat: judge a symlink itself, never its target
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _ListenerError("cannot inspect %s: %s" % (_path_shown(path), _oserror_text(exc))) from None
    if stat.S_ISLNK(info.st_mode):
        raise _ListenerError("%s is a symbolic link; refusing to replace it" % _path_shown(path))
    if not stat.S_ISSOCK(info.st_mode):
        raise _ListenerError(
            "%s exists and is %s, not a socket; refusing to remove it" % (_path_shown(path), _file_kind(info.st_mode))
        )
    if _unix_socket_is_served(path):
        raise _ListenerError("%s is served by a live process; refusing to take it over" % _path_shown(path))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # gone between lstat and unlink: the room we wanted
    except OSError as exc:
        raise _ListenerError("cannot remove stale socket %s: %s" % (_path_shown(path), _oserror_text(exc))) from None


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
            raise _ListenerError(
                "cannot tell whether %s is in use: %s" % (_path_shown(path), _oserror_text(exc))) from None
    return True


def _open_unix_listener(path: str, mode: int, log: _Log) -> socket.socket | None:
    """The listening unix socket, or None when its directory is missing (a skip, not a failure)."""
    # A leading "@" names a Linux abstract socket, as in Go: no file at all.
    abstract = path.startswith("@") and sys.platform.startswith("linux")
    if not abstract:
        _validate_unix_path(path)  # first: a relative or NUL path is a failure, not a missing directory
        if not os.path.isdir(os.path.dirname(path)):
            log.error("Could not start UDS listener: socket directory does not exist: %s", _path_shown(path))
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
        raise _ListenerError("cannot listen on unix socket %s: %s" % (_path_shown(path), _oserror_text(exc))) from None
    finally:
        os.umask(old_umask)
    return sock


def _adopt_inherited_socket(fd: int) -> socket.socket:
    try:
        # fileno=: wrap the fd itself (family and type read from the kernel);
        # socket.fromfd would dup it and leave the original behind.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise _ListenerError("inherited fd %d is not a usable socket: %s" % (fd, _oserror_text(exc))) from None
    return sock


def _open_listeners(specs: list[_ListenerSpec], log: _Log) -> list[_Listener]:
    """Open every spec in order; on failure close what was opened and raise."""
    opened: list[_Listener] = []
    try:
        closed = _closed_std_fds()
        if closed:
            # main() fills them with /dev/null; a chroot without it leaves them
            # closed, and the program would take a listener for its stdin.
            raise _ListenerError("fd %s is closed and %s could not be opened in its place: a socket would land "
                                 "there" % (" and ".join(str(fd) for fd in closed), os.devnull))
        for spec in specs:
            sock = _open_listener(spec, log)
            if sock is not None:
                opened.append(_Listener(spec, sock))
    except (LoaderError, OSError) as exc:
        for listener in opened:
            if listener.spec.kind != _INHERITED:  # systemd's fds stay for the fail-open exec
                listener.sock.close()
        if isinstance(exc, OSError):
            raise _ListenerError(_oserror_text(exc)) from None
        raise
    return opened


def _closed_std_fds() -> list[int]:
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise  # open but unusable: for the caller (in _open_listeners, a listener error: fail open)
            closed.append(fd)
    return closed


def _open_listener(spec: _ListenerSpec, log: _Log) -> socket.socket | None:
    if spec.kind == _TCP:
        sock = _open_tcp_listener(spec.host, spec.port)
        # The bound port, which the kernel chose when the address said 0.
        port = int(sock.getsockname()[1])
        log.info("Listening to %s at %s", spec.shown_as, _join_host_port(spec.host, port))
        return sock
    if spec.kind == _UNIX:
        unix_sock = _open_unix_listener(spec.path, spec.mode, log)
        if unix_sock is not None:
            log.info("Listening to %s at path %s", spec.shown_as, _path_shown(spec.path))
        return unix_sock
    return _adopt_inherited_socket(spec.fd)


# ---------------------------------------------------------------------------
# The wait: a small state machine over poll() (README "The wait").
#
#   state    polled                     event                      next
#   IDLE     listeners                  client on probe listener   accept it: HOLDING
#                                       anything else              wake
#   HOLDING  listeners, held client     held client sends          wake
#                                       held client closes         probe absorbed: IDLE
#                                       hold timeout               wake
#                                       2nd client, grace > 0      GRACE
#                                       2nd client, grace 0        wake (the Go loader)
#   GRACE    other listeners,           held client sends          wake
#            held client (the 2nd       held client closes         probe absorbed: IDLE
#            client waits in the        grace or hold timeout      wake
#            backlog, untouched)
#   any      several sockets ready at once with grace 0, another listener,
#            an unexpected error                                    wake
#
# Each transition is one method of _Waiter that sets the poll registrations
# and the deadline together.
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

# POLLPRI too: an urgent (MSG_OOB) byte alone is data, but it is out of band,
# so neither POLLIN nor a peek reports it.
_CLIENT_EVENTS = select.POLLIN | select.POLLPRI
_POLL_EVENT_NAMES = ((select.POLLIN, "POLLIN"), (select.POLLPRI, "POLLPRI"), (select.POLLERR, "POLLERR"),
                     (select.POLLHUP, "POLLHUP"), (select.POLLNVAL, "POLLNVAL"))

# struct linger {int l_onoff = 1; int l_linger = 0}: close() then resets
# instead of sending a FIN. Built without the struct module, which costs a
# shared library at start-up and an import (an fd) where EMFILE may reign.
_LINGER_RESET = (1).to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)

# What a peek at the held client found.
_SENT, _FIN, _RST, _SILENT = "sent", "FIN", "RST", "silent"


def _close_with_reset(sock: socket.socket) -> None:
    """Close with an RST: the peer sees a reset at once, never a hang.

    Only for a socket no other process holds: SO_LINGER belongs to the
    socket, not to our fd, so it would reset another holder's close too.
    """
    try:
        # SO_LINGER on, 0 s: close() discards and resets instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already reset by the peer: a plain close is all there is left to do
    sock.close()


class _HeldClient:
    """The one accepted TCP client the wait holds, and where it came from."""

    __slots__ = ("address", "listener", "sock")

    def __init__(self, sock: socket.socket, address: object, listener: _Listener) -> None:
        self.sock = sock
        self.address = address
        self.listener = listener

    @property
    def peer(self) -> str:
        return _peer_text(self.address)

    def reset(self) -> None:
        _close_with_reset(self.sock)


class _Wake:
    """Why the wait ended, and the client to hand over, if one is held."""

    __slots__ = ("client", "probes", "reason")

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


def _peek(client: _HeldClient) -> str:
    """_SENT, _FIN, _RST or _SILENT; any other error propagates."""
    try:
        # MSG_PEEK: look without consuming, the bytes stay for the agent.
        # MSG_DONTWAIT: the fd stays blocking for the agent, but we never wait.
        data = client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return _SILENT
    except OSError as exc:
        if exc.errno in _RESET_ERRNOS:
            return _RST
        raise
    return _SENT if data else _FIN


class _Waiter:
    """The wait's state: what is polled, what is held, and until when."""

    def __init__(self, listeners: list[_Listener], probe: _Listener | None, *, grace_ms: int,
                 hold_timeout_ms: int, log: _Log, program_label: str) -> None:
        self.listeners = listeners
        self.program_label = program_label
        self.by_fd = {lsn.fd: lsn for lsn in listeners}
        self.probe = probe
        self.grace_ms = grace_ms
        self.hold_timeout_ms = hold_timeout_ms
        self.log = log
        self.probes = {_FIN: 0, _RST: 0}
        self.poller = select.poll()
        for listener in listeners:
            self.poller.register(listener.fd, select.POLLIN)
        # Non-blocking for the wait only: a client that vanishes between poll()
        # and accept() must not block us. wake() restores it: a socket we
        # inherited reaches the program as it came, even when we fail open.
        self.probe_was_blocking = probe is not None and os.get_blocking(probe.fd)
        if probe is not None:
            probe.sock.setblocking(False)
        self.state = _IDLE
        self.held: _HeldClient | None = None
        self.deadline: float | None = None
        self.deadline_reason = ""

    # -- the transitions ----------------------------------------------------

    def enter_idle(self, how: str) -> None:
        """The held client closed (`how`: FIN or RST): a probe; the probe listener is polled again."""
        assert self.held is not None and self.probe is not None
        fd = self.held.sock.fileno()
        self.poller.unregister(fd)
        self.held.sock.close()
        # Logged once closed: a reader of the log may look at our fds next.
        self.log.debug("TCP client closed connection, closing file descriptor %d (peer %s, %s)", fd,
                       self.held.peer, how)
        self.held = None
        if self.state == _GRACE:
            self.poller.register(self.probe.fd, select.POLLIN)
        self.state, self.deadline = _IDLE, None

    def enter_holding(self, client: _HeldClient) -> None:
        self.poller.register(client.sock.fileno(), _CLIENT_EVENTS)
        self.held = client
        self.state = _HOLDING
        self.deadline, self.deadline_reason = None, ""
        if self.hold_timeout_ms:
            self.deadline = time.monotonic() + self.hold_timeout_ms / 1000.0
            self.deadline_reason = "the held TCP client %s sent nothing for %d ms" % (client.peer,
                                                                                       self.hold_timeout_ms)

    def enter_grace(self) -> None:
        """A second client waits: leave it in the backlog, give the held one `grace_ms`."""
        assert self.probe is not None
        self.poller.unregister(self.probe.fd)
        self.state = _GRACE
        grace_end = time.monotonic() + self.grace_ms / 1000.0
        if self.deadline is None or grace_end < self.deadline:  # else the hold timeout comes first
            self.deadline = grace_end
            self.deadline_reason = ("a second TCP client arrived and the held one stayed silent for %d ms"
                                    % self.grace_ms)
        self.log.debug("A second TCP client is waiting; giving the held one %d ms", self.grace_ms)

    # -- the loop -------------------------------------------------------------

    def run(self) -> _Wake:
        self.log.info("Polling... (fds %s%s)", ", ".join(str(fd) for fd in self.by_fd),
                      "; probe check on fd %d" % self.probe.fd if self.probe else "")
        while True:
            self.log.debug("Polling... (state %s)", self.state)
            try:
                ready = dict(self.poller.poll(self.remaining_ms()))  # PEP 475 retries EINTR for us
            except OSError as exc:
                return self.wake("poll() failed: %s" % _oserror_text(exc))
            if not ready:
                return self.wake(self.deadline_reason)  # only a deadline ends an empty poll
            reason = self.on_events(ready)
            if reason:
                return self.wake(reason)

    def remaining_ms(self) -> int | None:
        if self.deadline is None:
            return None  # no timeout: an idle loader never wakes up
        # poll() counts whole milliseconds: round up so we never spin just
        # before the deadline.
        return max(0, int((self.deadline - time.monotonic()) * 1000 + 0.999))

    def wake(self, reason: str) -> _Wake:
        """The end of the wait: the probe listener as it was before, and why we wake."""
        if self.probe is not None:
            self.probe.sock.setblocking(self.probe_was_blocking)
        return _Wake(reason, self.held, self.probes)

    def on_events(self, ready: dict[int, int]) -> str:
        """Handle one poll() result; a non-empty reason ends the wait."""
        if self.log.enabled("debug"):
            for fd, revents in ready.items():
                self.log.debug("Socket %d has events %s", fd, _events_text(revents))
        if self.probe is None:
            return "traffic on %s" % self.listeners_text(ready)
        others = [fd for fd in ready if fd in self.by_fd and fd != self.probe.fd]
        if others:
            return "traffic on %s" % self.listeners_text(others)
        if self.grace_ms == 0 and len(ready) > 1:
            return "events on several sockets at once"
        if self.held is not None and self.held.sock.fileno() in ready:
            reason = self.on_held_client(ready[self.held.sock.fileno()])
            if reason or self.held is None:
                return reason
        if self.probe.fd in ready:
            return self.on_probe_listener()
        return ""

    def on_held_client(self, revents: int) -> str:
        assert self.held is not None
        if revents & select.POLLPRI:
            return "the held TCP client %s sent urgent (out-of-band) data" % self.held.peer
        try:
            outcome = _peek(self.held)
        except OSError as exc:
            return "error reading the held TCP client: %s" % _oserror_text(exc)
        if outcome == _SENT:
            self.log.debug("TCP client sent data, executing %s...", self.program_label)
            return "the held TCP client %s sent data" % self.held.peer
        if outcome in (_FIN, _RST):
            self.probes[outcome] += 1
            self.enter_idle(outcome)
            return ""
        if revents & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            # An error or hang-up the peek did not report: never spin on it.
            return "the held TCP client reported %s" % _events_text(revents)
        return ""

    def on_probe_listener(self) -> str:
        assert self.probe is not None
        if self.state == _HOLDING:
            if self.grace_ms == 0:
                return "a second TCP client arrived while one was held"
            self.enter_grace()
            return ""
        try:
            sock, address = self.probe.sock.accept()  # close-on-exec until handed over (PEP 446)
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                # EMFILE and the like: the program, with a fresh process, can take it.
                return "accept() on the TCP listener failed: %s" % _oserror_text(exc)
            if exc.errno == errno.ECONNABORTED:  # reset while still in the backlog: a probe
                self.probes[_RST] += 1
            self.log.debug("A TCP client left before it was accepted: %s", exc)
            return ""
        client = _HeldClient(sock, address, self.probe)
        self.enter_holding(client)
        self.log.debug("Accepted connection on TCP listener: %d (peer %s)", sock.fileno(), client.peer)
        return ""

    def listeners_text(self, fds: Iterable[int]) -> str:
        return ", ".join(self.by_fd[fd].spec.shown_as if fd in self.by_fd else "fd %d" % fd for fd in sorted(fds))


def _choose_probe_listener(listeners: list[_Listener], *, enabled: bool, only: str = "") -> _Listener | None:
    """The one listener the probe check watches: the first TCP one (named `only`, if given)."""
    if not enabled:
        return None
    for listener in listeners:
        sock = listener.sock
        if only and listener.spec.handoff_name != only:
            continue
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            return listener
    return None


# ---------------------------------------------------------------------------
# Hand-off and exec: put each fd where the program expects it, say so in the
# environment, reset what the interpreter changed, and execve.
# ---------------------------------------------------------------------------


class _HandoffError(LoaderError):
    """The hand-off failed before anything irreversible: fail open cleanly."""


class _HandoffProtocol:
    """How the program learns its fds: `scrub` on every exec, `hand_over` on wake."""

    def scrub(self, env: dict[str, str]) -> None:
        raise NotImplementedError

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  log: _Log) -> list[int]:
        raise NotImplementedError

    def kept_fds(self, listeners: list[_Listener], client: _HeldClient | None,
                 inherited_fds: frozenset[int]) -> set[int]:
        """The fds the program will hold once hand_over() has run (0-2 included)."""
        raise NotImplementedError


class _EnvProtocol(_HandoffProtocol):
    """Each fd in a variable of its own (the Datadog agent's way)."""

    def __init__(self, owned_vars: Iterable[str], client_var: str, *, replaced_vars: Iterable[str] = (),
                 unselected_fds: Iterable[int] = ()) -> None:
        self.owned_vars = tuple(owned_vars) + ((client_var,) if client_var else ())
        self.client_var = client_var
        self.replaced_vars = tuple(replaced_vars)  # still true on fail-open, stale once we hand over
        self.unselected_fds = tuple(unselected_fds)  # inherited sockets nobody asked for

    def scrub(self, env: dict[str, str]) -> None:
        # A variable inherited from our own parent names an fd nobody handed
        # the program: drop it on every path, so it is never adopted.
        for name in self.owned_vars:
            env.pop(name, None)

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  log: _Log) -> list[int]:
        for name in self.replaced_vars:
            env.pop(name, None)
        for fd in self.unselected_fds:
            _close_on_exec_if_open(fd)
        fds = []
        for listener in listeners:
            env[listener.spec.handoff_name] = str(listener.fd)
            fds.append(listener.fd)
        if client is not None and self.client_var:
            env[self.client_var] = str(client.sock.fileno())
            fds.append(client.sock.fileno())
        return fds

    def kept_fds(self, listeners: list[_Listener], client: _HeldClient | None,
                 inherited_fds: frozenset[int]) -> set[int]:
        # The fds stay where they are; those we inherited pass through.
        kept = {0, 1, 2} | {lsn.fd for lsn in listeners} | (inherited_fds - set(self.unselected_fds))
        if client is not None and self.client_var:
            kept.add(client.sock.fileno())
        return kept


class _SystemdProtocol(_HandoffProtocol):
    """sd_listen_fds(3): fds 3, 4, ... with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES."""

    def __init__(self, *, inherited_for_us: bool) -> None:
        # LISTEN_* addressed to this very process belong to the program too
        # when we fail open (same pid after execve): keep them then.
        self.inherited_for_us = inherited_for_us
        import fcntl  # noqa: F401 -- now, while an fd is free to load it (see _dup_at_or_above)

    def scrub(self, env: dict[str, str]) -> None:
        if not self.inherited_for_us:
            for name in _SYSTEMD_VARS:
                env.pop(name, None)

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  log: _Log) -> list[int]:
        sources = [lsn.fd for lsn in listeners] + ([client.sock.fileno()] if client is not None else [])
        # "unknown" is the name systemd reports for a socket it was given no
        # name for; "connection" the one it gives an accepted connection.
        names = [lsn.spec.handoff_name or "unknown" for lsn in listeners]
        names += ["connection"] if client is not None else []
        targets = _move_fds_to(sources, _SD_LISTEN_FDS_START, log)
        for fd in _open_fds():
            if fd > 2 and fd not in targets:
                # Under systemd's protocol the program gets 0-2 and its
                # LISTEN_FDS, nothing else (a socket nobody asked for included).
                _close_on_exec_if_open(fd)
        for name in _SYSTEMD_VARS:
            env.pop(name, None)
        env["LISTEN_FDS"] = str(len(targets))
        env["LISTEN_PID"] = str(os.getpid())  # execve keeps our pid for the program
        env["LISTEN_FDNAMES"] = ":".join(names)
        return targets

    def kept_fds(self, listeners: list[_Listener], client: _HeldClient | None,
                 inherited_fds: frozenset[int]) -> set[int]:
        # 0-2 and fds 3, 4, ...; every other fd is closed.
        return set(range(_SD_LISTEN_FDS_START + len(listeners) + (client is not None)))


def _move_fds_to(sources: list[int], start: int, log: _Log) -> list[int]:
    """dup2 each source fd to start, start+1, ... without clobbering another.

    A source already in its place stays there, and one above the range is
    dup2'ed straight into it: neither needs a spare fd, which matters at a
    low RLIMIT_NOFILE. Only a source inside the range but out of place could
    be overwritten before its turn; those are copied above the range first,
    and only then, when nothing can fail any more (dup2 allocates no fd),
    everything is put into place. A failure while copying (EMFILE) closes
    the copies and leaves every fd as it was, so the caller can still fail
    open cleanly.
    """
    end = start + len(sources)
    targets = list(range(start, end))
    copies: dict[int, int] = {}
    try:
        if 0 <= log.file_fd < end:  # keep the log fd out of the range we fill
            log.file_fd = _dup_at_or_above(log.file_fd, end, close_original=True)
        for fd, target in zip(sources, targets):
            if fd != target and start <= fd < end:
                copies[fd] = _dup_at_or_above(fd, end)
    except OSError as exc:
        for copy in copies.values():
            os.close(copy)
        raise _HandoffError("cannot copy the sockets into place: %s" % _oserror_text(exc)) from None
    for fd in sources:
        if fd >= end:
            os.set_inheritable(fd, False)  # the original stays behind, closed by execve
    for fd, target in zip(sources, targets):
        if fd != target:
            os.dup2(copies.get(fd, fd), target, inheritable=True)
    for copy in copies.values():
        os.close(copy)
    return targets


def _dup_at_or_above(fd: int, floor: int, *, close_original: bool = False) -> int:
    # F_DUPFD_CLOEXEC: the lowest free fd >= floor, closed on exec. fcntl was
    # first imported when the systemd protocol was chosen: a first import
    # needs a free fd, which EMFILE would deny us here.
    import fcntl

    new_fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    if close_original:
        os.close(fd)
    return new_fd


def _open_fds() -> list[int]:
    """Every open fd: from /proc/self/fd or /dev/fd, else a scan bounded by RLIMIT_NOFILE.

    Minimal chroots and some sandboxes have neither directory; the scan
    costs one fstat per possible fd, and only there.
    """
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(fd_dir)  # the listing's own fd is closed by the time we return
        except OSError:
            continue
        return sorted(fd for fd in (int(name) for name in names) if _is_open(fd))
    return [fd for fd in range(_fd_limit()) if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _fd_limit() -> int:
    try:
        limit = os.sysconf("SC_OPEN_MAX")  # the soft RLIMIT_NOFILE
    except (OSError, ValueError):
        limit = -1
    # An unlimited or huge limit would make the scan slow; fds that high are
    # not what a fresh process holds.
    return limit if 0 < limit <= _FD_SCAN_MAX else _FD_SCAN_MAX


_FD_SCAN_MAX = 1 << 16


def _close_on_exec_if_open(fd: int) -> None:
    try:
        os.set_inheritable(fd, False)
    except OSError as exc:
        if exc.errno != errno.EBADF:  # already closed: nothing to keep from the program
            raise


# ---------------------------------------------------------------------------
# The relay: how a held client reaches a program that only takes listeners
# (README "Generic mode"). Just before execve the loader
# connects to the program's own listener (the kernel completes the connect
# from the listen backlog, before the program's first accept()) and a helper
# process copies bytes both ways between that connection and the held client.
# ---------------------------------------------------------------------------

_RELAY_CHUNK = 256 * 1024  # one buffer per direction: memory stays bounded
_RELAY_TURN_CHUNKS = 16
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # a write to a closed peer is EPIPE, not a signal


def _relay_target(listener: socket.socket) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    """Where to connect to reach `listener`: its address, with a wildcard made loopback."""
    address = listener.getsockname()
    if listener.family == socket.AF_INET6:
        host = "::1" if address[0] == "::" else address[0]
        return socket.AF_INET6, (host, address[1], 0, address[3] if len(address) > 3 else 0)
    host = "127.0.0.1" if address[0] == "0.0.0.0" else address[0]
    return socket.AF_INET, (host, address[1])


def _connect_to_own_listener(listener: socket.socket) -> tuple[socket.socket, str]:
    """Start a connect to `listener`, without waiting for it: the socket, and where it goes.

    A loopback connect completes at once from a free backlog; from a full
    one (clients queued before the wake) the kernel drops our SYN and
    retries it, and it completes once the program accepts. The helper waits
    for that (_finish_connect), so the loader's exec is never delayed.
    """
    family, address = _relay_target(listener)
    targets = [(family, address)]
    if family == socket.AF_INET6 and address[0] == "::1":
        # A dual-stack wildcard where ::1 is missing (IPv6 disabled on lo)
        # still takes IPv4 loopback.
        targets.append((socket.AF_INET, ("127.0.0.1", address[1])))
    error: OSError | None = None
    for target_family, target in targets:
        sock = socket.socket(target_family, socket.SOCK_STREAM)  # close-on-exec (PEP 446)
        sock.setblocking(False)
        code = sock.connect_ex(target)  # an immediate failure (no route, refused) shows here
        if code in (0, errno.EINPROGRESS):
            return sock, _peer_text(target)
        sock.close()
        error = OSError(code, os.strerror(code))
    assert error is not None
    raise error


def _start_relay(client: _HeldClient, log: _Log) -> None:
    """Start the connect to the program's listener and fork the helper that relays; OSError if it cannot."""
    upstream, target = _connect_to_own_listener(client.listener.sock)
    try:
        helper = _fork_relay_helper(client.sock, upstream)
    finally:
        upstream.close()  # the helper has its own copy; the program must not inherit ours
    log.info("Relaying the held TCP client %s to %s through helper pid %d", client.peer, target, helper)
    client.sock.close()


def _fork_relay_helper(client: socket.socket, upstream: socket.socket) -> int:
    """Double fork: the helper is not the program's child, but the orphan of a middle child. Its pid.

    Orphans go to the nearest subreaper, or PID 1: where the loader is PID 1
    of a PID namespace (a container's entrypoint), that is the program after
    execve, which must reap the helper or keep a zombie (README "Generic mode").

    The helper started if and only if its pid came through the pipe: the
    middle child writes it as its last act. Its exit status is not asked:
    with SIGCHLD ignored (by our parent, inherited) the kernel reaps it
    itself and waitpid() fails with ECHILD, while the helper runs fine.
    """
    read_end, write_end = os.pipe()  # close-on-exec (PEP 446); carries the helper's pid
    try:
        middle = os.fork()
        if middle == 0:
            _in_child(lambda: _middle_child(read_end, write_end, client, upstream))
        os.close(write_end)
        write_end = -1
        text = os.read(read_end, 32)  # EOF once the middle child has exited, pid or not
        try:
            os.waitpid(middle, 0)  # no zombie left for the program to inherit
        except ChildProcessError:
            pass  # reaped by the kernel already (SIGCHLD ignored)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not text.isdigit():
        raise OSError(errno.ECHILD, "the relay helper did not start")
    return int(text)


def _in_child(body: Callable[[], None]) -> NoReturn:
    """Run `body` in a forked child and leave with os._exit, whatever happens.

    A forked child must never return into the loader's code (it would go on
    to exec the program a second time) nor run the interpreter's shutdown.
    """
    status = 0
    try:
        body()
    except BaseException:  # noqa: BLE001 -- nothing in a child may escape into the loader's code
        status = 1
    os._exit(status)


def _middle_child(read_end: int, write_end: int, client: socket.socket, upstream: socket.socket) -> None:
    os.close(read_end)
    helper = os.fork()
    if helper == 0:
        _in_child(lambda: _relay_helper(client, upstream))
    os.write(write_end, b"%d" % helper)


def _relay_helper(client: socket.socket, upstream: socket.socket) -> None:
    """The helper's whole life: its two sockets, default signals, bytes both ways."""
    keep = {client.fileno(), upstream.fileno()}
    for fd in _open_fds():
        if fd not in keep:
            # No fd but its two sockets: never a listener (the port must free
            # when the program exits), never the loader's stderr pipe.
            os.close(fd)
    _default_signal_dispositions()
    if not _NOSIGNAL and hasattr(signal, "SIGPIPE"):
        # No MSG_NOSIGNAL (macOS): the one exception to the defaults, or a
        # write to a peer that just left would kill the helper, not fail.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        _finish_connect(upstream)
    except OSError:
        # The program never took the connection (it exited, or the kernel
        # gave up retrying): the client sees a reset, never a hang.
        _close_with_reset(client)
        upstream.close()
        return
    _relay_bytes(client, upstream)


def _finish_connect(upstream: socket.socket) -> None:
    """Wait for the connect _connect_to_own_listener started; OSError if it failed.

    No timeout of ours: the kernel's SYN retries bound it (about two minutes
    on Linux), and a program that is slow to start its first accept() is
    not a reason to lose the client.
    """
    poller = select.poll()
    poller.register(upstream.fileno(), select.POLLOUT)
    poller.poll()
    error = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


class _Direction:
    """One direction of the relay: one fixed buffer, so memory stays bounded."""

    def __init__(self, source: socket.socket, sink: socket.socket) -> None:
        self.source = source
        self.sink = sink
        self.buffer = bytearray(_RELAY_CHUNK)
        self.pending = memoryview(self.buffer)[:0]  # read, not yet written
        self.done = False

    def wanted(self) -> tuple[int, int]:
        """(fd, poll events) this direction waits for."""
        if self.done:
            return -1, 0
        if self.pending:
            return self.sink.fileno(), select.POLLOUT
        return self.source.fileno(), select.POLLIN

    def pump(self) -> None:
        """Move what can move now; OSError means a reset (or worse) on either side."""
        if self.done:
            return  # its end of stream is passed on already, once
        try:
            # A few chunks at most, then the other direction gets its turn.
            for _ in range(_RELAY_TURN_CHUNKS):
                if not self.pending:
                    size = self.source.recv_into(self.buffer)
                    if size == 0:
                        # End of stream: a half-close, passed on as one.
                        self.sink.shutdown(socket.SHUT_WR)
                        self.done = True
                        return
                    self.pending = memoryview(self.buffer)[:size]
                sent = self.sink.send(self.pending, _NOSIGNAL)
                self.pending = self.pending[sent:]
        except BlockingIOError:
            return  # nothing to read, or no room to write: poll() tells when


def _relay_bytes(client: socket.socket, upstream: socket.socket) -> None:
    client.setblocking(False)
    upstream.setblocking(False)
    directions = (_Direction(client, upstream), _Direction(upstream, client))
    poller = select.poll()
    registered: dict[int, int] = {}
    try:
        while not all(d.done for d in directions):
            wanted: dict[int, int] = {}
            for direction in directions:
                fd, events = direction.wanted()
                if events:
                    wanted[fd] = wanted.get(fd, 0) | events
            for fd in set(registered) - set(wanted):
                poller.unregister(fd)  # a socket we wait nothing from must not report HUP forever
            for fd, events in wanted.items():
                if registered.get(fd) != events:
                    poller.register(fd, events)  # registering again modifies
            registered = wanted
            poller.poll()
            for direction in directions:
                direction.pump()
    except OSError:
        # A reset on either side ends both: pass it on as a reset.
        _close_with_reset(client)
        _close_with_reset(upstream)
        return
    client.close()
    upstream.close()


# ---------------------------------------------------------------------------
# Signals (README "Signals"): while waiting, the loader is the program to
# whoever signals it.
# ---------------------------------------------------------------------------

# End the waiting loader. As PID 1 of a PID namespace (a container's
# entrypoint) the kernel drops signals whose action is the default, so there
# a handler ends the loader with exit status 128+N instead.
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
# Of those, the ones that stay ignored when our parent ignored them (nohup, a
# shell's background job), as the Go runtime does; SIGTERM, how a service
# manager or container runtime stops us, always ends the wait.
_KEPT_IF_IGNORED = ("SIGINT", "SIGHUP")
# Caught and ignored while waiting, as the Go runtime does. A handler, never
# SIG_IGN: execve resets handlers to the default, but keeps ignored signals
# ignored, and the program must start with the defaults.
_IGNORED_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGIO", "SIGPWR", "SIGVTALRM", "SIGPROF", "SIGXCPU")


def _signals_named(names: Iterable[str]) -> list[int]:
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def _realtime_signals() -> list[int]:
    low, high = getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1)
    return list(range(low, high + 1)) if low else []


def _set_waiting_signal_handlers() -> None:
    # CPython turns SIGINT into KeyboardInterrupt: the default action (or the
    # PID 1 handler) ends the loader at once instead, with no traceback and
    # no half-started agent (the signal lands before execve, or the agent
    # gets it). SIGINT or SIGHUP our parent ignored stays ignored: CPython
    # kept it so, and so does the program.
    as_init = os.getpid() == 1
    kept = _signals_named(_KEPT_IF_IGNORED)
    for signum in _signals_named(_STOP_SIGNALS):
        if signum not in kept or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _exit_as_init if as_init else signal.SIG_DFL)
    for signum in [*_signals_named(_IGNORED_SIGNALS), *_realtime_signals()]:
        try:
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _ignore_signal)
        except (OSError, ValueError):
            pass  # a real-time signal the C library reserves for itself: not ours to set


def _exit_as_init(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _ignore_signal(signum: int, frame: object) -> None:
    """Catch and drop: an ignored disposition would outlive execve."""


def _default_signal_dispositions() -> None:
    """Every disposition the loader changed, back to the default (the relay helper's start)."""
    for signum in [*_signals_named(_STOP_SIGNALS + _IGNORED_SIGNALS), *_realtime_signals()]:
        try:
            if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL, None):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # reserved by the C library, as above
    _reset_signals_for_exec()


def _reset_signals_for_exec() -> None:
    # CPython ignores SIGPIPE and SIGXFSZ at start-up, and an ignored signal
    # stays ignored across execve: give the program the defaults it expects.
    # The handlers set above need nothing: execve resets them by itself.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


# ---------------------------------------------------------------------------
# Finding the program, and exec.
# ---------------------------------------------------------------------------


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
    raise LoaderError("%s was not found in PATH (%s)" % (_quoted(name), _quoted(search_path, 200)))


def _check_runnable(path: str) -> None:
    shown = _path_shown(path)
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        raise LoaderError("%s: %s" % (shown, _oserror_text(exc))) from None
    if stat.S_ISDIR(info.st_mode):
        raise LoaderError("%s is a directory" % shown)
    if not stat.S_ISREG(info.st_mode):
        raise LoaderError("%s is not a regular file" % shown)
    if not os.access(path, os.X_OK):
        raise LoaderError("%s is not executable" % shown)
    problem = _exec_format_problem(path)
    if problem:
        raise LoaderError("%s %s" % (shown, problem))


# What the kernel runs without a '#!': ELF, and Mach-O on macOS (both byte orders, fat binaries).
_BINARY_MAGICS = (b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                  b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
_BINPRM_BUF_SIZE = 256  # the kernel reads this much of a file to decide how to run it
# Linux runs a script's interpreter that is itself a script, and so on: a
# chain of at most 5 '#!' scripts (checked on Linux 6.18); a 6th, or a loop,
# fails with ELOOP.
_MAX_SCRIPT_CHAIN = 5


def _exec_format_problem(path: str, *, depth: int = 0) -> str:
    """Why execve would refuse the file (ENOENT, ENOEXEC), read as the kernel reads it; '' if it would not."""
    try:
        with open(path, "rb") as f:  # close-on-exec (PEP 446), closed at once anyway
            head = f.read(_BINPRM_BUF_SIZE)
    except OSError:
        return ""  # execute-only files exist; execve will tell
    if head.startswith(b"#!"):
        if depth >= _MAX_SCRIPT_CHAIN:
            return "is one '#!' script too many in a row, or a loop (execve would fail with ELOOP)"
        interpreter = _script_interpreter(head)
        if not interpreter:
            return "starts with '#!' but names no interpreter"
        name = os.fsdecode(interpreter)
        shown = _escaped(name, _PATH_SHOWN_MAX)
        if not (os.path.isfile(name) and os.access(name, os.X_OK)):
            return "starts with '#!%s', and that interpreter is missing or not executable" % shown
        # The interpreter may be a script itself: the kernel runs it the same way.
        problem = _exec_format_problem(name, depth=depth + 1)
        return "starts with '#!%s', which %s" % (shown, problem) if problem else ""
    if head.startswith(_BINARY_MAGICS) or _binfmt_misc_active():
        return ""  # a binary, or a format binfmt_misc may know: execve will tell
    return "is neither a binary nor a script starting with '#!' (execve would fail with ENOEXEC)"


def _script_interpreter(head: bytes) -> bytes:
    """The interpreter a '#!' line names, as Linux's binfmt_script reads it.

    The line ends at '\n' only: a '\r' before it is part of the name. The
    name is the first word, and ends at a space, a tab or a NUL byte.
    """
    line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
    for terminator in (b"\0", b"\t", b" "):
        line = line.split(terminator, 1)[0]
    return line


def _binfmt_misc_active() -> bool:
    """Linux may run other formats through binfmt_misc handlers; then we cannot judge."""
    try:
        entries = os.listdir("/proc/sys/fs/binfmt_misc")
    except OSError:
        return False
    return any(entry not in ("register", "status") for entry in entries)


class _Launch:
    """What to exec: the resolved path, argv as given, the base environment, the protocol."""

    def __init__(self, path: str, argv: list[str], env: dict[str, str], label: str,
                 protocol: _HandoffProtocol, *, inherited_fds: Iterable[int]) -> None:
        self.path = path
        self.argv = argv
        self.env = env
        self.label = label
        self.protocol = protocol
        self.inherited_fds = frozenset(inherited_fds)  # open when we started: not ours to close


def _exec_program(launch: _Launch, env: dict[str, str], log: _Log) -> NoReturn:
    log.info("Starting %s...", launch.label)
    if log.enabled("trace"):
        log.trace("Starting %s with env: %s", launch.label, _env_shown(env))
    _reset_signals_for_exec()
    try:
        os.execve(launch.path, launch.argv, env)
    except (OSError, ValueError) as exc:
        # Back to ignoring SIGPIPE so this last line cannot kill us instead.
        if hasattr(signal, "SIGPIPE"):
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        log.error("Failed to start %s with args %s: %s", launch.label,
                  _quoted(" ".join(launch.argv), 300), _oserror_text(exc))
        sys.exit(1)


def _exec_directly(launch: _Launch, log: _Log, client: _HeldClient | None = None) -> NoReturn:
    """Fail open: the program, unchanged environment, none of our fds.

    Safe at any point, even halfway through a hand-off: every fd that was
    not open when we started is made close-on-exec, and a held client is
    reset (its peer sees a reset, never a hang).
    """
    if client is not None:
        client.reset()
    for fd in _open_fds():
        if fd > 2 and fd not in launch.inherited_fds:
            _close_on_exec_if_open(fd)
    env = dict(launch.env)
    launch.protocol.scrub(env)
    _exec_program(launch, env, log)


# Free fds a program needs below RLIMIT_NOFILE to start at all: one, for the
# dynamic loader to open its first library. Anything more a program needs it
# gets by raising its soft limit, as the Go runtime does at start-up (the
# trace-agent among them); CPython does not, and needs two (README "Errors").
# Asking for more here would fail open where such a program starts fine.
_FDS_TO_START = 1


def _check_room_to_start(kept: set[int]) -> None:
    """Raise _HandoffError if the program's fds would leave it too few free to start.

    Failing open, it has them (and no sockets, which it can bind itself).
    """
    limit = _fd_limit()
    free = limit - sum(1 for fd in kept if fd < limit)
    if free < _FDS_TO_START:
        raise _HandoffError("the program would hold %d of the %d file descriptors RLIMIT_NOFILE allows, "
                            "too few left to start with" % (limit - free, limit))


def _exec_with_handoff(launch: _Launch, listeners: list[_Listener], wake: _Wake, held_client: str,
                       log: _Log) -> NoReturn:
    client = wake.client
    if client is not None and held_client == _HELD_RELAY:
        try:
            _start_relay(client, log)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a fork refused by the interpreter
            # The program starts all the same; only this one client is lost.
            log.warn("Cannot relay the held TCP client %s (%s); closing it and starting %s without it",
                     client.peer, _oserror_text(exc), launch.label)
            client.reset()
        client = None
    env = dict(launch.env)
    launch.protocol.scrub(env)
    try:
        _check_room_to_start(launch.protocol.kept_fds(listeners, client, launch.inherited_fds))
        fds = launch.protocol.hand_over(env, listeners, client, log)
    except _HandoffError as exc:
        log.warn("Failed to hand the sockets over to %s: %s", launch.label, exc)
        _exec_directly(launch, log, client)
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
# does. Each step was measured (docs/performance.md); trim and pageout are
# Linux-only.
#
#   defer    run main() only once the script's own module has finished
#            executing: CPython frees a script's syntax tree (~4 MB for this
#            file) only then. See the end of the file.
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
    """Our resident set in kB, for the log; 0 when unknown."""
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
    except (ImportError, OSError) as exc:  # no libc to load, or EMFILE while loading it
        log.debug("Cannot load libc to release memory: %s", exc)
        return
    if "trim" in steps and hasattr(libc, "malloc_trim"):  # glibc has it; musl does not
        libc.malloc_trim(0)
    if "pageout" in steps:
        try:
            _page_out_file_mappings(libc)
        except OSError as exc:  # no /proc (a chroot, a sandbox), or no fd free to read it
            log.debug("Cannot page out file mappings: %s", _oserror_text(exc))
    after = _rss_kb()
    if before and after:
        log.debug("Released memory before waiting: RSS %d kB -> %d kB", before, after)
    else:
        log.debug("Released memory before waiting (no /proc to tell how much)")


def _page_out_file_mappings(libc: ctypes.CDLL) -> None:
    import ctypes  # already loaded by the caller

    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
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
            if ctypes.get_errno() in _MADVISE_UNSUPPORTED:
                return  # an older kernel or a sandbox: nothing more to gain
            continue  # this mapping only (e.g. a locked one)


# ---------------------------------------------------------------------------
# Back to sleep (README "Back to sleep"): with a stop-when-idle time the
# loader forks on wake instead of exec'ing in place. The child does the usual
# hand-off and execs; the loader keeps its listeners and supervises the
# program as tini does: one loop forwards signals, reaps every child and
# mirrors the program's end. Between signals it samples whether anything
# still uses the listeners; idle long enough, the program is stopped and the
# wait begins again. The listeners never close, so a client arriving during
# the stop waits in the backlog for the next start.
# ---------------------------------------------------------------------------

# Sent on to the program; SIGCHLD only wakes the loop to reap.
_FORWARDED_SIGNALS = (*_STOP_SIGNALS, "SIGQUIT", "SIGWINCH", *_IGNORED_SIGNALS)
# include/net/tcp_states.h: ESTABLISHED, SYN_RECV, CLOSE_WAIT are connections
# the program still holds. Once it closed its side (FIN_WAIT*, LAST_ACK,
# TIME_WAIT) a connection no longer keeps it up.
_HELD_TCP_STATES = (1, 3, 8)
_UNIX_CONNECTED = 1  # unix_diag reports a connected stream socket as TCP_ESTABLISHED
_NETLINK_SOCK_DIAG = 4  # linux/netlink.h
_SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
_NLM_F_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_NAME = 1  # linux/unix_diag.h; the name comes back as attribute UNIX_DIAG_NAME (0)
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_MAX_SAMPLE_INTERVAL = 4.0


def _start_and_supervise(launch: _Launch, listeners: list[_Listener], wake: _Wake, activation: _Activation,
                         log: _Log) -> int | None:
    """Fork: the child execs the program with the usual hand-off, and we supervise it.

    Returns the program's end (-N: killed by signal N) if it ended on its
    own or the loader was told to stop, None once it was stopped for
    idleness.
    """
    _become_subreaper(log)
    caught = _signals_named((*_FORWARDED_SIGNALS, "SIGCHLD")) + _realtime_signals()
    # Blocked across the fork: a signal sent meanwhile waits for the loop (in
    # the loader) or for the waiting handlers (in the child, until execve).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, caught)
    # Caught before the fork: a SIGCHLD our parent set to ignored would
    # have the kernel reap the program and lose its status.
    previous = _catch_signals(caught)
    try:
        pid = os.fork()
    except OSError as exc:
        _restore_signals(previous, mask)
        log.warn("Cannot fork (%s); starting %s in place, never stopped", _oserror_text(exc), launch.label)
        _exec_with_handoff(launch, listeners, wake, activation.held_client, log)
    if pid == 0:
        _restore_signals(previous, mask)
        _exec_with_handoff(launch, listeners, wake, activation.held_client, log)
    if wake.client is not None:
        wake.client.sock.close()  # the program's now, or the relay helper's
    # signal.set_wakeup_fd: the C handler writes each signal's number into the
    # pipe, and poll() wakes on it; the Python handler does nothing.
    read_end, write_end = os.pipe()  # close-on-exec (PEP 446)
    for fd in (read_end, write_end):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    status = _supervise(pid, read_end, listeners, activation, launch.label, log)
    # Blocked again while the waiting handlers come back: a signal caught
    # until now is in the pipe, a later one waits for them.
    signal.pthread_sigmask(signal.SIG_BLOCK, caught)
    signal.set_wakeup_fd(-1)
    late = [signum for signum in _read_signals(read_end) if signum in _signals_named(_STOP_SIGNALS)]
    os.close(read_end)
    os.close(write_end)
    _restore_signals(previous, mask)
    return -late[0] if status is None and late else status


def _catch_signals(signums: list[int]) -> dict[int, signal._HANDLER]:
    """Our do-nothing handler on each signal but those our parent set to ignored; their old handlers."""
    previous = {}
    for signum in signums:
        try:
            # SIGINT or SIGHUP ignored stays ignored, for us and the program.
            if signum == signal.SIGCHLD or signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _ignore_signal)
        except (OSError, ValueError):
            pass  # a real-time signal the C library reserves for itself: not ours to set
    return previous


def _restore_signals(previous: dict[int, signal._HANDLER], mask: Iterable[int]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _become_subreaper(log: _Log) -> None:
    """Orphans (the relay helper, the program's lost children) become our children, to reap (Linux)."""
    if os.getpid() == 1 or not sys.platform.startswith("linux"):
        return  # PID 1 gets them anyway
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (ImportError, OSError) as exc:  # no libc to load, or a kernel before 3.4
        log.debug("Cannot become a subreaper: %s", exc)


def _supervise(pid: int, signals: int, listeners: list[_Listener], activation: _Activation, label: str,
               log: _Log) -> int | None:
    """The loop: forward signals, reap, sample idleness, stop. As _start_and_supervise returns."""
    idle_for, usage = activation.stop_when_idle, _Usage(listeners)
    # Idleness begins at most one interval before the first idle sample, so
    # SIGTERM comes at most that late: 8% of the idle time (at most 4 s)
    # leaves the rest of 10% (and 5 s) for a late wake-up and the count.
    interval = min(_MAX_SAMPLE_INTERVAL, idle_for * 0.08)
    poller = select.poll()
    poller.register(signals, select.POLLIN)
    started = time.monotonic()
    next_step: float | None = started + interval  # the next sample, or the SIGKILL once stopping
    idle_since: float | None = None
    stopping_since: float | None = None
    stop_signal = 0
    while True:
        poller.poll(None if next_step is None else max(0, int((next_step - time.monotonic()) * 1000 + 0.999)))
        for signum in _read_signals(signals):
            if signum != signal.SIGCHLD:
                os.kill(pid, signum)  # never fails: the program is our child, reaped below
            # Not lost: after an idle stop the loader ends instead of waiting again. SIGHUP
            # only during the stop: while the program runs, many take it to reload.
            stopping = stopping_since is not None
            if signum in (signal.SIGTERM, signal.SIGINT) or (stopping and signum == signal.SIGHUP):
                stop_signal = signum
        status = _reap_children(pid)
        if status is not None and stopping_since is None:
            log.info("%s ended (%s); the loader ends the same way", label, _status_text(status))
            return status
        if status is not None and stopping_since is not None:
            log.info("Stopped %s in %.1f s (%s)", label, time.monotonic() - stopping_since, _status_text(status))
            return -stop_signal if stop_signal else None
        now = time.monotonic()
        if next_step is None or now < next_step:
            continue
        if stopping_since is not None:
            log.warn("%s still runs %d s after SIGTERM: SIGKILL", label, activation.stop_timeout)
            os.kill(pid, signal.SIGKILL)
            next_step = None
            continue
        busy = usage.count()
        if busy is None:
            log.warn("Cannot count the connections of %s (no socket diagnostics, no /proc/net); it will not "
                     "be stopped when idle", label)
            next_step = None
            continue
        log.debug("Sockets of %s in use: %d (connections and waiting clients)", label, busy)
        idle_since = None if busy else (now if idle_since is None else idle_since)
        if idle_since is not None and now >= idle_since + idle_for:
            log.info("Stopping %s: its sockets were idle for %d s (it ran %d s)", label, idle_for, now - started)
            os.kill(pid, signal.SIGTERM)
            stopping_since, next_step = now, now + activation.stop_timeout
        else:
            next_step = now + interval if idle_since is None else min(now + interval, idle_since + idle_for)


def _read_signals(fd: int) -> bytes:
    try:
        return os.read(fd, 256)  # each byte a signal number; more wait for the next turn
    except BlockingIOError:
        return b""


def _reap_children(pid: int) -> int | None:
    """waitpid(-1, WNOHANG) until no ended child is left: the program's end (-N: signal N), if it came."""
    found = None
    while True:
        try:
            child, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found  # no child left at all
        if child == 0:
            return found
        if child == pid:
            found = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _status_text(status: int) -> str:
    return "killed by signal %d" % -status if status < 0 else "exit status %d" % status


def _end_like(status: int) -> int:
    """The loader's own end for the program's (-N: killed by signal N): where it can, by the same signal."""
    if status >= 0:
        return status
    if os.getpid() != 1:  # as PID 1 the kernel drops it: 128+N below
        if -status != signal.SIGKILL:  # whose action cannot be changed, and is the default
            signal.signal(-status, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-status])
        os.kill(os.getpid(), -status)
    return 128 - status  # PID 1, or a signal whose default does not end a process


class _Usage:
    """What still uses the listeners: connections the program holds, and clients in a backlog."""

    def __init__(self, listeners: list[_Listener]) -> None:
        self.ports: dict[int, set[int]] = {}  # TCP ports by address family
        self.names: set[bytes] = set()  # unix paths; an abstract name starts with NUL
        self.poller = select.poll()
        for listener in listeners:
            sock, address = listener.sock, listener.sock.getsockname()
            self.poller.register(sock.fileno(), select.POLLIN)
            if sock.family == socket.AF_UNIX and address:
                self.names.add(os.fsencode(address) if isinstance(address, str) else address)
            elif sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                self.ports.setdefault(sock.family, set()).add(address[1])

    def count(self) -> int | None:
        """None where the kernel cannot tell (neither socket diagnostics nor /proc/net: macOS)."""
        # A client in a backlog makes its listener readable.
        waiting = len(self.poller.poll(0))
        for counter in (self.count_with_sock_diag, self.count_in_proc_net):
            try:
                return waiting + counter()
            except (OSError, ValueError, IndexError):
                continue  # no AF_NETLINK (macOS) or refused by a sandbox; no /proc, or a row we cannot read
        return None

    def count_with_sock_diag(self) -> int:
        """NETLINK_SOCK_DIAG: one dump per family, of the held states only; filtered on the port here."""
        held = sum(1 << state for state in _HELD_TCP_STATES)
        count = 0
        for family, ports in self.ports.items():
            # inet_diag_req_v2: family, IPPROTO_TCP, no extensions, pad, states, socket id (48 zero bytes).
            request = bytes((family, socket.IPPROTO_TCP, 0, 0)) + _u32(held) + bytes(48)
            # inet_diag_msg: family, state, timer, retrans, then the local port (big-endian).
            count += sum(int.from_bytes(msg[4:6], "big") in ports for msg in _sock_diag(request))
        if self.names:
            # unix_diag_req: family, protocol, pad, states, inode, what to show, cookie. An accepted
            # connection carries its listener's path.
            request = bytes((socket.AF_UNIX, 0, 0, 0)) + _u32(1 << _UNIX_CONNECTED) + _u32(0) \
                + _u32(_UDIAG_SHOW_NAME) + bytes(8)
            count += sum(_unix_diag_name(msg) in self.names for msg in _sock_diag(request))
        return count

    def count_in_proc_net(self) -> int:
        """/proc/net/tcp, tcp6 and unix: slower with many sockets, same answer."""
        count = 0
        for family, ports in self.ports.items():
            # sl local_address rem_address st ...: "0100007F:1F90", the port and the state in hex.
            for row in _proc_net_rows("tcp6" if family == socket.AF_INET6 else "tcp", 4):
                count += int(row[3], 16) in _HELD_TCP_STATES and int(row[1].rpartition(b":")[2], 16) in ports
        # Num RefCount Protocol Flags Type St Inode Path: St 03 is connected; an abstract
        # name is shown with '@' for each NUL.
        shown = {name.replace(b"\0", b"@") for name in self.names}
        for row in (_proc_net_rows("unix", 7) if shown else ()):
            count += len(row) == 8 and row[5] == b"03" and row[7] in shown
        return count


def _u32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)


def _sock_diag(request: bytes) -> list[bytes]:
    """The messages a NETLINK_SOCK_DIAG dump answers to `request`."""
    if not hasattr(socket, "AF_NETLINK"):
        raise OSError(errno.EAFNOSUPPORT, "no AF_NETLINK")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        # nlmsghdr: length, type, flags, sequence, port id (0: the kernel)
        header = _u32(16 + len(request)) + _SOCK_DIAG_BY_FAMILY.to_bytes(2, sys.byteorder) \
            + _NLM_F_DUMP_REQUEST.to_bytes(2, sys.byteorder) + _u32(1) + _u32(0)
        sock.send(header + request)
        messages: list[bytes] = []
        while True:
            data, pos = sock.recv(65536), 0  # the kernel fills at most 32 KB per read
            while pos < len(data):
                length = int.from_bytes(data[pos:pos + 4], sys.byteorder)
                kind = int.from_bytes(data[pos + 4:pos + 6], sys.byteorder)
                if kind == _NLMSG_DONE:
                    return messages
                if kind == _NLMSG_ERROR:  # nlmsgerr: a negative errno
                    code = -int.from_bytes(data[pos + 16:pos + 20], sys.byteorder, signed=True)
                    raise OSError(code, os.strerror(code))
                messages.append(data[pos + 16:pos + length])
                pos += (length + 3) & ~3  # NLMSG_ALIGN


def _unix_diag_name(message: bytes) -> bytes:
    """UNIX_DIAG_NAME, after the 16-byte unix_diag_msg; the kernel counts the path's NUL too."""
    pos = 16
    while pos + 4 <= len(message):
        length, kind = (int.from_bytes(message[i:i + 2], sys.byteorder) for i in (pos, pos + 2))
        if kind == 0:
            name = message[pos + 4:pos + length]
            return name if name[:1] == b"\0" else name.rstrip(b"\0")
        pos += (length + 3) & ~3  # RTA_ALIGN
    return b""


def _proc_net_rows(name: str, maxsplit: int) -> Iterator[list[bytes]]:
    with open("/proc/net/" + name, "rb") as rows:
        next(rows)  # the header
        for row in rows:
            yield row.rstrip(b"\n").split(None, maxsplit)


# ---------------------------------------------------------------------------
# The engine: listeners -> wait -> hand-off -> exec, shared by both front doors.
# ---------------------------------------------------------------------------


class _Activation:
    """How to wait and what to hand over, as each front door read it."""

    def __init__(self, *, probe: bool, probe_only: str = "", grace_ms: int, hold_timeout_ms: int,
                 held_client: str, stop_when_idle: int = 0, stop_timeout: int = _DEFAULT_STOP_TIMEOUT) -> None:
        self.probe = probe  # the probe check is on
        self.probe_only = probe_only  # the listener it may watch ("": the first TCP one)
        self.grace_ms = grace_ms
        self.hold_timeout_ms = hold_timeout_ms
        self.held_client = held_client  # _HELD_FD or _HELD_RELAY
        self.stop_when_idle = stop_when_idle  # seconds; 0: exec in place, never stop
        self.stop_timeout = stop_timeout


def _serve(launch: _Launch, specs: list[_ListenerSpec], activation: _Activation, log: _Log) -> int:
    try:
        listeners = _open_listeners(specs, log)
    except LoaderError as exc:
        log.warn("Failed to get listeners for %s: %s", launch.label, exc)
        _exec_directly(launch, log)
    if not listeners:
        log.info("All %s inputs are disabled, stopping...", launch.label)
        return 0
    for listener in listeners:
        spec = listener.spec
        named = spec.handoff_name if spec.kind != _INHERITED and spec.handoff_name else spec.shown_as
        log.debug("%s file descriptor is %d", named, listener.fd)
    probe = _choose_probe_listener(listeners, enabled=activation.probe, only=activation.probe_only)
    while True:  # wait, hand off; with a stop-when-idle time: supervise, wait again
        _release_memory(_memory_steps(launch.env), log)
        waiter = _Waiter(listeners, probe, grace_ms=activation.grace_ms if probe else 0,
                         hold_timeout_ms=activation.hold_timeout_ms, log=log, program_label=launch.label)
        began = time.monotonic()
        wake = waiter.run()
        fin, rst = wake.probes[_FIN], wake.probes[_RST]
        log.info("Waking %s: %s; %d probe%s absorbed since start (FIN: %d, RST: %d); waited %d s",
                 launch.label, wake.reason, fin + rst, "" if fin + rst == 1 else "s", fin, rst,
                 time.monotonic() - began)
        if not activation.stop_when_idle:
            _exec_with_handoff(launch, listeners, wake, activation.held_client, log)
        status = _start_and_supervise(launch, listeners, wake, activation, log)
        if status is not None:
            return _end_like(status)


def _program_label(name: str) -> str:
    return _escaped(os.path.basename(name) or name)


# ---------------------------------------------------------------------------
# Front door 1: drop-in for the Go trace-loader.
# ---------------------------------------------------------------------------

_USAGE = """\
usage: trace_loader.py CONFIG_FILE AGENT [AGENT_ARGS...]
       trace_loader.py [OPTIONS] -- PROGRAM [ARGS...]
       trace_loader.py --help | --version
"""


def _drop_in_specs(settings: _DropInSettings, log: _Log) -> list[_ListenerSpec]:
    specs: list[_ListenerSpec] = []
    if settings.bind_host_reason.startswith("containerized"):
        log.info("Activating non-local traffic automatically in containerized environment, "
                 "trace-agent will listen on 0.0.0.0")
    if settings.receiver_port > 0:
        specs.append(_ListenerSpec(RECEIVER_FD_VAR, _TCP, host=settings.bind_host, port=settings.receiver_port,
                                   shown_as="TCP receiver"))
    else:
        log.info("Trace-agent TCP receiver is disabled")
    if settings.receiver_socket:
        specs.append(_ListenerSpec(UNIX_FD_VAR, _UNIX, path=settings.receiver_socket, mode=0o722,
                                   shown_as="unix receiver"))
    else:
        log.info("Trace-agent unix receiver is disabled")
    if settings.otlp_enabled:
        specs.append(_ListenerSpec(OTLP_FD_VAR, _TCP, host=settings.bind_host, port=settings.otlp_port,
                                   shown_as="OTLP receiver"))
    else:
        log.info("Trace-agent OTLP receiver is disabled")
    return specs


def _run_drop_in(config_path: str, program: list[str], environ: Mapping[str, str], log: _Log,
                 inherited_fds: list[int]) -> int:
    try:
        path = _find_program(program[0], environ)
    except LoaderError as exc:
        log.critical("Cannot start the trace-agent: %s", exc)
        return 1
    protocol = _EnvProtocol(_DROP_IN_FD_VARS, CLIENT_FD_VAR)
    launch = _Launch(path, program, dict(environ), "the trace-agent", protocol, inherited_fds=inherited_fds)
    try:
        settings = _load_drop_in_settings(config_path, environ, log)
    except _ConfigError as exc:
        log.warn("Failed to load the configuration: %s", exc)
        _exec_directly(launch, log)
    log.configure(level=settings.log_level, console=settings.log_to_console, path=settings.log_file)
    if not settings.apm_enabled and not settings.error_tracking:
        log.info("Trace-agent is disabled, stopping...")
        return 0
    if not settings.socket_activation:
        log.info("Socket-activation for the trace-agent is disabled, running the trace-agent directly...")
        _exec_directly(launch, log)
    specs = _drop_in_specs(settings, log)
    # The probe check watches the TCP receiver only, never the OTLP port.
    activation = _Activation(probe=settings.handle_tcp_probe, probe_only=RECEIVER_FD_VAR,
                             grace_ms=settings.probe_grace_ms, hold_timeout_ms=settings.hold_timeout_ms,
                             held_client=settings.held_client, stop_when_idle=settings.stop_when_idle,
                             stop_timeout=settings.stop_timeout)
    return _serve(launch, specs, activation, log)


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


def _parse_listen(value: str, index: int) -> _ListenerSpec:
    """`[NAME=]tcp://HOST:PORT | tcp://[V6]:PORT | unix:///PATH[?mode=0660] | systemd:[FDNAME]`."""
    name, sep, address = value.partition("=")
    if not sep or "://" in name or name.startswith("systemd:"):
        name, address = "", value
    if address.startswith("tcp://"):
        host, port = _parse_host_port(address[len("tcp://"):], value)
        return _ListenerSpec(name, _TCP, host=host, port=port, shown_as=name or "TCP listener %d" % index)
    if address.startswith("unix://"):
        path, _, query = address[len("unix://"):].partition("?")
        if not path.startswith("/") and not path.startswith("@"):
            raise ValueError("%s: a unix address needs an absolute path (unix:///run/app.sock)" % _quoted(value))
        mode = 0o666  # systemd's SocketMode default
        if query:
            key, _, text = query.partition("=")
            try:
                mode = int(text, 8) if key == "mode" else -1
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise ValueError("%s: expected ?mode=OCTAL (e.g. ?mode=0660)" % _quoted(value))
        return _ListenerSpec(name, _UNIX, path=path, mode=mode, shown_as=name or "unix listener %d" % index)
    if address.startswith("systemd:"):
        return _ListenerSpec(name, _INHERITED, systemd_name=address[len("systemd:"):], shown_as=address)
    raise ValueError("%s: expected tcp://HOST:PORT, tcp://[V6]:PORT, unix:///PATH or systemd:[FDNAME]"
                     % _quoted(value))


def _parse_host_port(text: str, value: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError("%s: put an IPv6 address in brackets (tcp://[::1]:8080)" % _quoted(value))
    # Port 0 asks the kernel for a free port; the log line names the one it chose.
    port = _decimal(port_text, 65535)
    if port is None:
        raise ValueError("%s: the port must be a number from 0 to 65535" % _quoted(value))
    return host, port


def _milliseconds(text: str, high: int, note: str = "") -> int:
    value = _decimal(text, high)
    if value is None:
        raise ValueError("%s: expected milliseconds from 0 to %d%s" % (_quoted(text), high, note))
    return value


def _generic_parser() -> argparse.ArgumentParser:
    import argparse

    listen_count = [0]

    def listen(value: str) -> _ListenerSpec:
        listen_count[0] += 1
        try:
            return _parse_listen(value, listen_count[0])
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def milliseconds(high: int, note: str = "") -> Callable[[str], int]:
        def convert(text: str) -> int:
            try:
                return _milliseconds(text, high, note)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return convert

    def seconds(text: str) -> int:
        value = _decimal(text, _MAX_STOP_SECONDS)
        if value is None:
            raise argparse.ArgumentTypeError("%s: expected seconds from 0 to %d" % (_quoted(text), _MAX_STOP_SECONDS))
        return value

    def one_of(names: tuple[str, ...]) -> Callable[[str], str]:
        # argparse's own `choices` would echo a value of any length in full.
        def convert(text: str) -> str:
            if text.lower() not in names:
                raise argparse.ArgumentTypeError("%s is not one of %s" % (_quoted(text), ", ".join(names)))
            return text.lower()
        return convert

    class Parser(argparse.ArgumentParser):
        def _print_message(self, message: str, file: object = None) -> None:
            # CPython 3.11+ itself ignores a stream it cannot write (closed,
            # full, a broken pipe); 3.8-3.10 let the error escape, and a usage
            # error would become an internal error.
            _say(file or sys.stderr, message)

    parser = Parser(
        prog="trace_loader.py",
        usage="%(prog)s [OPTIONS] -- PROGRAM [ARGS...]\n"
              "       %(prog)s CONFIG_FILE AGENT [AGENT_ARGS...]\n"
              "       %(prog)s --help | --version",
        description="Hold PROGRAM's sockets and exec it on the first real traffic (generic mode). "
                    "With CONFIG_FILE AGENT instead, drop-in mode for the Datadog trace-loader: the sockets "
                    "and settings come from datadog.yaml and the DD_* environment.",
        allow_abbrev=False,  # an option is spelt out, never guessed from a prefix
    )
    parser.add_argument("--version", action="version", version="trace-loader %s" % __version__)
    parser.add_argument("--listen", action="append", type=listen, default=[], metavar="[NAME=]ADDRESS",
                        help="tcp://HOST:PORT, tcp://[V6]:PORT, unix:///PATH[?mode=0660], or systemd:[FDNAME] "
                             "to adopt sockets this process inherited from systemd (repeatable; required)")
    parser.add_argument("--protocol", type=one_of(("systemd", "env")), default="systemd", metavar="{systemd,env}",
                        help="hand-off: systemd's LISTEN_FDS (default) or one variable per fd (NAME=)")
    parser.add_argument("--handle-tcp-probe", action="store_true",
                        help="absorb TCP probes (connect, then close) on the first TCP listener")
    parser.add_argument("--held-client", type=one_of(_HELD_CLIENT_WAYS[::-1]), default=_HELD_RELAY,
                        metavar="{%s}" % ",".join(_HELD_CLIENT_WAYS[::-1]),
                        help="how the first real client reaches PROGRAM: relayed into its listener by a helper "
                             "process (default; any server), or as an inherited fd (a server written for it)")
    parser.add_argument("--client-fd-var", default="", metavar="VAR",
                        help="with --held-client fd under --protocol env: the variable that carries the client")
    parser.add_argument("--hold-timeout", type=milliseconds(_MAX_HOLD_TIMEOUT_MS, " (0: no limit)"),
                        default=_GENERIC_HOLD_TIMEOUT_MS, metavar="MS",
                        help="wake PROGRAM when a held client stays silent this long, for protocols where the "
                             "server speaks first (default 1000, 0: no limit)")
    parser.add_argument("--stop-when-idle", type=seconds, default=0, metavar="SECONDS",
                        help="stop PROGRAM once no client has used its sockets this long, then wait again "
                             "(default 0: never)")
    parser.add_argument("--stop-timeout", type=seconds, default=_DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                        help="SIGKILL a stopped PROGRAM still running this long after SIGTERM (default 30)")
    parser.add_argument("--probe-grace-period", type=milliseconds(_MAX_PROBE_GRACE_MS),
                        default=_DEFAULT_PROBE_GRACE_MS, metavar="MS",
                        help="how long a held silent client may delay a second one (default 250, 0: none)")
    parser.add_argument("--log-level", type=one_of(tuple(_LEVELS)), default="info", metavar="LEVEL",
                        help="trace, debug, info, warn, error, critical or off")
    return parser


def _run_generic(options: list[str], program: list[str], environ: Mapping[str, str], log: _Log,
                 inherited_fds: list[int]) -> int:
    parser = _generic_parser()
    args, unknown = parser.parse_known_args(options)
    # Checked in this order so that a misspelt option is named as such, and
    # not reported as a missing --listen.
    if unknown:
        parser.error("unrecognized arguments: %s" % " ".join(_quoted(word, 40) for word in unknown))
    if not args.listen:
        parser.error("the following arguments are required: --listen")
    if not program:
        parser.error("expected '-- PROGRAM [ARGS...]' after the options")
    problem = _check_generic_options(args.listen, args)
    if problem:
        parser.error(problem)
    log.configure(level=args.log_level, console=True, path=None)
    label = _program_label(program[0])
    try:
        path = _find_program(program[0], environ)
    except LoaderError as exc:
        log.critical("Cannot start %s: %s", label, exc)
        return 1
    for_us = environ.get("LISTEN_PID", "") == str(os.getpid())
    try:
        specs, unselected = _expand_inherited(args.listen, environ, for_us=for_us)
    except _ListenerError as exc:
        fail_open = _Launch(path, program, dict(environ), label, _generic_protocol(args, [], for_us, []),
                            inherited_fds=inherited_fds)
        log.warn("Failed to get listeners for %s: %s", label, exc)
        _exec_directly(fail_open, log)
    problem = _check_unique_names(specs, args.protocol)
    if problem:
        parser.error(problem)
    launch = _Launch(path, program, dict(environ), label, _generic_protocol(args, specs, for_us, unselected),
                     inherited_fds=inherited_fds)
    activation = _Activation(probe=args.handle_tcp_probe, grace_ms=args.probe_grace_period,
                             hold_timeout_ms=args.hold_timeout, held_client=args.held_client,
                             stop_when_idle=args.stop_when_idle, stop_timeout=args.stop_timeout)
    return _serve(launch, specs, activation, log)


def _generic_protocol(args: argparse.Namespace, specs: list[_ListenerSpec], for_us: bool,
                      unselected: list[int]) -> _HandoffProtocol:
    if args.protocol == "systemd":
        return _SystemdProtocol(inherited_for_us=for_us)
    client_var = args.client_fd_var if args.held_client == _HELD_FD else ""
    # LISTEN_* meant for another process are stale here: always dropped. Ours
    # stay true until the hand-off describes the same sockets by NAME instead.
    return _EnvProtocol([s.handoff_name for s in specs] + ([] if for_us else list(_SYSTEMD_VARS)), client_var,
                        replaced_vars=_SYSTEMD_VARS if for_us else (), unselected_fds=unselected)


def _check_generic_options(specs: list[_ListenerSpec], args: argparse.Namespace) -> str:
    protocol = args.protocol
    for spec in specs:
        if protocol == "env" and not _valid_env_name(spec.handoff_name):
            return "argument --listen: %s needs NAME= (the variable that carries its fd) under --protocol env" \
                % spec.shown_as
        if protocol == "systemd" and spec.handoff_name and not _valid_fdname(spec.handoff_name):
            return "argument --listen: %s is not a valid fd name (printable ASCII, no ':')" \
                % _quoted(spec.handoff_name)
    client_var = args.client_fd_var
    if client_var and not _valid_env_name(client_var):
        return "argument --client-fd-var: %s is not a valid variable name" % _quoted(client_var)
    if client_var and (protocol != "env" or args.held_client != _HELD_FD):
        return "argument --client-fd-var: only used with --held-client fd under --protocol env"
    if protocol == "env" and args.handle_tcp_probe and args.held_client == _HELD_FD and not client_var:
        return "--handle-tcp-probe --held-client fd with --protocol env needs --client-fd-var VAR for the client"
    return _check_unique_names(specs, protocol)


def _check_unique_names(specs: list[_ListenerSpec], protocol: str) -> str:
    if protocol != "env":
        return ""  # LISTEN_FDNAMES may repeat a name; systemd allows it
    names = [s.handoff_name for s in specs]
    for name in names:
        if names.count(name) > 1:
            return ("argument --listen: %s would carry %d fds; under --protocol env each NAME takes one socket"
                    % (name, names.count(name)))
    return ""


def _inherited_fds(environ: Mapping[str, str], *, for_us: bool) -> list[tuple[int, str]]:
    """sd_listen_fds(3): (fd, name) pairs passed to this very process."""
    if not for_us:
        raise _ListenerError("no sockets were passed to this process (LISTEN_PID is %s, our pid is %d)"
                            % (_quoted(environ.get("LISTEN_PID", "")), os.getpid()))
    count_text = environ.get("LISTEN_FDS", "")
    count = _decimal(count_text, _MAX_LISTEN_FDS)
    if not count:
        raise _ListenerError("LISTEN_FDS is %s; expected a count of sockets" % _quoted(count_text))
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if len(names) != count:
        names = ["unknown"] * count  # systemd's name when none was set
    return [(_SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _expand_inherited(specs: list[_ListenerSpec], environ: Mapping[str, str], *,
                      for_us: bool) -> tuple[list[_ListenerSpec], list[int]]:
    """Replace each `systemd:[NAME]` spec by one spec per matching inherited fd.

    Also returns the inherited fds that no spec asked for.
    """
    if not any(s.kind == _INHERITED for s in specs):
        return specs, []
    inherited = _inherited_fds(environ, for_us=for_us)
    expanded: list[_ListenerSpec] = []
    for spec in specs:
        if spec.kind != _INHERITED:
            expanded.append(spec)
            continue
        matches = [(fd, name) for fd, name in inherited if not spec.systemd_name or name == spec.systemd_name]
        if not matches:
            raise _ListenerError("no inherited socket is named %s (LISTEN_FDNAMES: %s)"
                                % (_quoted(spec.systemd_name), _quoted(environ.get("LISTEN_FDNAMES", ""))))
        for fd, name in matches:
            expanded.append(_ListenerSpec(spec.handoff_name or name, _INHERITED, fd=fd,
                                          shown_as="systemd socket %s" % _escaped(name)))
    chosen = {s.fd for s in expanded if s.kind == _INHERITED}
    return expanded, [fd for fd, _ in inherited if fd not in chosen]


# ---------------------------------------------------------------------------
# For programs written in Python: adopt what the loader handed over.
# ---------------------------------------------------------------------------


class Handoff:
    """The sockets a loader handed over: listeners by name, and the held client.

    Names are the fd variables (drop-in mode, generic ``--protocol env``) or
    the ``LISTEN_FDNAMES`` entries (generic ``--protocol systemd``; a name
    that repeats is told apart as ``NAME@FD``). ``accept()`` returns the held
    client first, if one was handed over as an fd: it is an accepted
    connection that may already carry a request. Then it accepts from the
    listener. Like ``socketserver.BaseServer``, a ``Handoff`` is a context
    manager that closes every socket it holds.
    """

    def __init__(self, listeners: dict[str, socket.socket], client: socket.socket | None, *,
                 client_listener: str = "") -> None:
        self.listeners = listeners
        self.client = client
        self.client_listener = client_listener  # the listener the held client came from

    def accept(self, *, name: str = "") -> tuple[socket.socket, object]:
        """The held client (once), then the next connection on listener `name` (default: the first)."""
        if not self.listeners:
            raise LoaderError("no listener was handed over")
        key = name or next(iter(self.listeners))
        if key not in self.listeners:
            raise LoaderError("no listener named %s was handed over (%s)" % (_quoted(key), ", ".join(self.listeners)))
        if self.client is not None and key == self.client_listener:
            client, self.client = self.client, None
            try:
                return client, client.getpeername()
            except OSError:
                return client, None  # the peer left already; reading it will say so
        return self.listeners[key].accept()

    def close(self) -> None:
        """Close every socket still held."""
        for sock in self.listeners.values():
            sock.close()
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def adopt(*, environ: Mapping[str, str] | None = None) -> Handoff:
    """Wrap what the loader handed over; raise LoaderError on garbage.

    Reads systemd's protocol when ``LISTEN_PID`` is this process (fds from 3,
    ``LISTEN_FDS``, ``LISTEN_FDNAMES``, the client named ``connection``),
    else the drop-in variables (``DD_APM_NET_RECEIVER_FD`` and the others).
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID", "") == str(os.getpid()) and env.get("LISTEN_FDS", ""):
        return _adopt_systemd(env)
    adopted: dict[str, socket.socket] = {}
    for var in _DROP_IN_FD_VARS:
        text = env.get(var, "")
        if text:
            adopted[var] = _adopt_fd(_fd_number(var, text), var)
    client = adopted.pop(CLIENT_FD_VAR, None)
    return Handoff(adopted, client, client_listener=RECEIVER_FD_VAR)


def _adopt_systemd(env: Mapping[str, str]) -> Handoff:
    text = env.get("LISTEN_FDS", "")
    count = _decimal(text, _MAX_LISTEN_FDS)
    if count is None:
        raise LoaderError("LISTEN_FDS is %s, not a count of sockets" % _quoted(text))
    names = env.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = ["unknown"] * count  # systemd's name when none was set
    listeners: dict[str, socket.socket] = {}
    client: socket.socket | None = None
    for index, name in enumerate(names):
        fd = _SD_LISTEN_FDS_START + index
        sock = _adopt_fd(fd, "LISTEN_FDS fd %d" % fd)
        # sd_listen_fds(3) leaves the fds close-on-exec: they are this
        # program's, not its children's.
        sock.set_inheritable(False)
        if name == "connection" and client is None:
            client = sock
            continue
        listeners[name if names.count(name) == 1 else "%s@%d" % (name, fd)] = sock
    first_tcp = next((key for key, sock in listeners.items()
                      if sock.family in (socket.AF_INET, socket.AF_INET6)), "")
    return Handoff(listeners, client, client_listener=first_tcp)


def _fd_number(var: str, text: str) -> int:
    fd = _decimal(text, _MAX_FD)
    if fd is None:
        raise LoaderError("%s is %s, not a file descriptor number" % (var, _quoted(text)))
    return fd


def _adopt_fd(fd: int, what: str) -> socket.socket:
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise LoaderError("%s=%d is not an open socket: %s" % (what, fd, _oserror_text(exc))) from None


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed; give sys.stdout and sys.stderr a file again.

    Otherwise our first socket would land on 0, 1 or 2, and the program would
    take a listener for its stdin or stdout. Without /dev/null (a chroot) the
    fd stays closed, and _open_listeners refuses to open any socket: the
    program then starts directly, once the arguments and the configuration
    have been read as always. CPython leaves sys.stderr None when fd 2 was
    closed at start-up: a usage error must still exit 2, not fail on writing
    its message.
    """
    for _ in _closed_std_fds():
        try:
            new = os.open(os.devnull, os.O_RDWR)  # lowest free fd: the closed one, lowest first
        except OSError:
            continue  # see above
        os.set_inheritable(new, True)
    try:
        if sys.stdout is None:
            sys.stdout = open(1, "w", closefd=False)  # lives as long as the process
        if sys.stderr is None:
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
    except OSError:
        pass  # still closed (no /dev/null): _say() writes nowhere


def _say(stream: object, text: str) -> None:
    """Write to stdout or stderr; one that is closed, full or a broken pipe costs the text, not the status."""
    try:
        stream.write(text)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pass  # None (closed at start-up), ENOSPC, EPIPE, EBADF: nowhere to say it


def _split_command_line(args: list[str]) -> tuple[bool, list[str], list[str]]:
    """(generic?, the loader's own arguments, the program's argv), split once for every later use."""
    if args[0].startswith("-"):
        if "--" in args:
            return True, args[: args.index("--")], args[args.index("--") + 1:]
        return True, args, []
    return False, args[:1], args[1:]


def main(argv: list[str] | None = None) -> int:
    """Run the loader with `argv` (default: sys.argv[1:]); the exit status, if it does not exec.

    Usage errors raise SystemExit(2), as argparse does.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    _ensure_std_fds()
    if args in (["-h"], ["--help"]):
        _say(sys.stdout, _generic_parser().format_help())
        return 0
    if args == ["--version"]:
        _say(sys.stdout, "trace-loader %s\n" % __version__)
        return 0
    if not args or (len(args) < 2 and not args[0].startswith("-")):
        _say(sys.stderr, _USAGE + "trace_loader.py: error: expected CONFIG_FILE AGENT, or options and "
                         "'-- PROGRAM'\n")
        return 2
    generic, own_args, program = _split_command_line(args)
    if not generic and program[0].startswith("-"):
        _say(sys.stderr, _USAGE + "trace_loader.py: error: AGENT %s looks like an option; the loader's own "
                         "options come first, before '--'\n" % _quoted(program[0]))
        return 2
    _set_waiting_signal_handlers()
    log = _Log()
    environ = dict(os.environ)
    inherited_fds = _open_fds()
    try:
        if generic:
            return _run_generic(own_args, program, environ, log, inherited_fds)
        return _run_drop_in(own_args[0], program, environ, log, inherited_fds)
    except Exception as exc:  # noqa: BLE001 -- the last guard: an internal error must not cost the agent
        log.critical("Internal error (%s: %s); starting the program directly", type(exc).__name__, exc)
        return _last_resort_exec(program, environ, inherited_fds, log)


def _last_resort_exec(program: list[str], environ: dict[str, str], inherited_fds: list[int], log: _Log) -> int:
    try:
        path = _find_program(program[0] if program else "", environ)
    except LoaderError:
        return 1
    for_us = environ.get("LISTEN_PID", "") == str(os.getpid())
    scrubbed = _DROP_IN_FD_VARS + (() if for_us else _SYSTEMD_VARS)
    launch = _Launch(path, program, environ, _program_label(program[0]), _EnvProtocol(scrubbed, ""),
                     inherited_fds=inherited_fds)
    _exec_directly(launch, log)


def _run_as_script() -> None:
    """main() as the program: exit with its status, whatever happens."""
    try:
        status = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:  # SIGINT before main() gave it its default action
        status = 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 -- the script's last guard: one line and a status, no traceback
        try:
            os.write(2, ("trace_loader.py: internal error: %s: %s\n" % (type(exc).__name__, exc)).encode())
        except OSError:
            pass  # nowhere left to say it
        status = 1
    for stream in (sys.stdout, sys.stderr):
        _say(stream, "")  # flushes what is left; closed or absent costs nothing
    os._exit(status)  # we may be inside sys.excepthook: end here, without the shutdown


class _ScriptEnd(Exception):
    """Raised as the script's last line so that main() runs from sys.excepthook (the "defer" step)."""


def _run_from_excepthook(kind: type[BaseException], value: BaseException, traceback: object) -> None:
    if kind is not _ScriptEnd:
        sys.__excepthook__(kind, value, traceback)  # type: ignore[arg-type]
        os._exit(1)
    _run_as_script()


if __name__ == "__main__":
    if "defer" in _memory_steps(os.environ):
        # The "defer" footprint step (see Footprint above). CPython frees a
        # script's syntax tree (~4 MB for this file) only once the script's
        # last line has run; an exception that ends the script then reaches
        # sys.excepthook, still before the interpreter starts shutting down.
        # So main() runs there, with the tree freed and fork() allowed
        # (CPython 3.12 refuses it from atexit, the relay forks).
        sys.excepthook = _run_from_excepthook
        raise _ScriptEnd
    _run_as_script()
