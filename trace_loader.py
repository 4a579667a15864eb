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

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs import time and memory; only mypy needs it
    import argparse
    import ctypes
    import types
    from typing import Callable, Iterable, Iterator, Mapping, NoReturn, TypeVar, Union

    _T = TypeVar("_T")
    _HandoffProtocol = Union["_EnvProtocol", "_SystemdProtocol"]  # see the hand-off section

# ---------------------------------------------------------------------------
# Run as a script from source, start again from bytecode: the first step of
# the footprint (see "Footprint" below), taken before the other imports,
# which the new interpreter would only do again (~10 ms of CPU).
# ---------------------------------------------------------------------------

_MEMORY_STEPS = ("bytecode", "trim", "pageout")


def _memory_steps(environ: Mapping[str, str]) -> frozenset[str]:
    text = environ.get("TRACE_LOADER_RELEASE_MEMORY") or ",".join(_MEMORY_STEPS)  # unset or empty: all
    return frozenset(step.strip() for step in text.split(",")) & frozenset(_MEMORY_STEPS)


# What `python3 -S -c` runs for _exec_as_bytecode, kept short for ps: without
# "" (the working directory) that -c puts in sys.path (the loader imports only
# the standard library), the bytecode read from the memfd, which is then
# closed (no program may inherit it), and argv without "-c", this module runs
# under a name other than __main__ (so it cannot start over), then main().
_BYTECODE_RUNNER = ("import marshal, sys; sys.path = [p for p in sys.path if p]; memfd = open(%d, 'rb'); "
                    "memfd.seek(0); code = marshal.load(memfd); memfd.close(); del sys.argv[0]; "
                    "module = {'__name__': 'trace_loader', '__file__': sys.argv[0]}; exec(code, module); "
                    "module['_run_as_script']()")


_FREE_FDS_TO_START_AGAIN = 4


def _exec_as_bytecode(code: types.CodeType) -> None:
    """Run this script again from its bytecode: the same interpreter and options, plus -S, with _BYTECODE_RUNNER.

    Returns, having changed nothing, where it cannot: no memfd (macOS), no
    /proc, fds 0-2 closed, a command line that does not end in our argv,
    sys.executable not the interpreter that runs, execve refused. Signal dispositions need nothing: execve resets our
    handlers to the default and keeps ignored signals ignored, as they came
    to us; CPython ignores SIGPIPE and SIGXFSZ again at start-up.
    """
    if not hasattr(os, "memfd_create") or not sys.executable:
        return
    try:
        with open("/proc/self/cmdline", "rb") as f:
            command_line = f.read().split(b"\0")[:-1]  # the interpreter, its options, then our argv
        # sys.executable is worked out from argv[0] and PATH: `exec -a`, or a PATH that differs from the
        # one that found us, can name another interpreter, for which our bytecode is garbage.
        if not os.path.samefile(sys.executable, "/proc/self/exe"):
            return
    except OSError:
        return
    head = len(command_line) - len(sys.argv)
    if head < 1 or command_line[head:] != [os.fsencode(arg) for arg in sys.argv]:
        return
    options = command_line[1:head]
    if options[-1:] == [b"--"]:
        options.pop()  # `python3 -- trace_loader.py`: -S and -c must come before it
    import marshal

    try:
        fd = os.memfd_create("trace_loader.pyc", 0)  # inheritable: the runner reads it, then closes it
    except OSError:  # ENOSYS (before Linux 3.17), EPERM (a sandbox), EMFILE: go on from source
        return
    bytecode = marshal.dumps(code)
    try:
        # Below 3, fds 0-2 were closed: it would become the new interpreter's stdin or stdout. And the
        # new interpreter's dynamic loader and imports need free fds beside it (two, one at a time, for
        # CPython): at a lower RLIMIT_NOFILE it would die before main(), where the run from source fails open.
        if 2 < fd < os.sysconf("SC_OPEN_MAX") - _FREE_FDS_TO_START_AGAIN and os.write(fd, bytecode) == len(bytecode):
            runner = (_BYTECODE_RUNNER % fd).encode()
            # The script's path stays in the command line, for ps and pgrep; -S: the loader needs no site.
            os.execv(sys.executable, [command_line[0], *options, b"-S", b"-c", runner, *command_line[head:]])
    except (OSError, ValueError):
        pass  # no memory for it, no limit to read, or the interpreter is gone: go on from source
    os.close(fd)


if __name__ == "__main__" and __spec__ is None and __file__.endswith(".py"):  # a script, from source
    if "bytecode" in _memory_steps(os.environ):
        _exec_as_bytecode(sys._getframe().f_code)  # the module's own code: nothing is compiled again

import errno  # noqa: E402 -- after the bytecode step, on purpose (above)
import fcntl  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402

__version__ = "0.2.0"

__all__ = ["CLIENT_FD_VAR", "OTLP_FD_VAR", "RECEIVER_FD_VAR", "UNIX_FD_VAR", "Handoff", "LoaderError", "adopt", "main"]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class LoaderError(Exception):
    """Root of every error the loader raises on purpose."""


class _ConfigError(LoaderError):
    """The configuration (file or environment) holds something unusable.

    Carries where it was found, so the one log line can name it.
    """

    def __init__(self, message: str, *, source: str = "", line: int = 0, key: str = "") -> None:
        self.message = message
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


# Every control character a message might still carry becomes a visible
# escape: a raw CR or ESC in a log line could forge a line or drive a terminal.
_CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7F, 0xA0))}
_MAX_LOG_LINE = 2048  # bytes, newline included
_PATH_SHOWN_MAX = 300
# A variable whose name holds one of these (any case) is masked at trace level:
# the words that say "secret", and the Datadog variables that carry credentials
# under other names (proxy URLs with user:password@, endpoints' API keys).
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PWD", "CREDENTIAL", "AUTH", "DD_PROXY_",
                 "ADDITIONAL_ENDPOINTS")
# What ends a word of a value, for the masking of what it holds; '?' and '&'
# end a query's NAME=VALUE pair too.
_WORD_ENDS = {ord(c): "\0" for c in " \t\n\r\v\f,;"}
# A secret pair's VALUE runs on over spaces ("Authorization=Bearer TOKEN"), to the next pair.
_PAIR_ENDS = {ord(c): "\0" for c in "\n\r\v\f,;?&"}


class _Log:
    """Writes `DATE UTC | TRACE-LOADER | LEVEL | (file:line in func) | msg`."""

    def __init__(self) -> None:
        self.threshold = _LEVELS["info"]
        self.fds: tuple[int, ...] = (2,)  # where a line goes: stderr, and the log file once one is open

    def configure(self, *, level: str, console: bool, path: str | None) -> None:
        self.threshold = _LEVELS[level]
        self.fds = (2,) if console else ()
        if not path or level == "off":
            return
        # O_APPEND: the agent appends to the same file after execve. os.open
        # makes the fd non-inheritable (PEP 446), so the agent never sees it.
        # O_NONBLOCK: a FIFO named as log file must not hang the loader.
        try:
            self.fds += (os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o640),)
        except (OSError, ValueError) as exc:
            self.warn("Cannot open log file %s (%s); logging to the console only",
                      _path_shown(path), _oserror_text(exc))

    def enabled(self, level: str) -> bool:
        return _LEVELS[level] >= self.threshold

    def _emit(self, level: str, message: str, args: tuple[object, ...]) -> None:
        if not self.enabled(level):
            # Before formatting: every log call passes its arguments for this
            # to format, so a debug line costs nothing at info level.
            return
        caller = sys._getframe(2)  # the caller of debug(), info(), ...
        line = "%s | TRACE-LOADER | %s | (%s:%d in %s) | %s" % (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), level.upper(),
            os.path.basename(caller.f_code.co_filename), caller.f_lineno, caller.f_code.co_name,
            (message % args if args else message).translate(_CONTROL_ESCAPES),
        )
        # backslashreplace: environment values may carry undecodable bytes
        # (surrogate escapes); a log line must never raise on them.
        data = line.encode("utf-8", "backslashreplace")
        if len(data) >= _MAX_LOG_LINE:
            data = data[: _MAX_LOG_LINE - 5].decode("utf-8", "ignore").encode("utf-8") + b" ..."
        data += b"\n"
        for fd in self.fds:
            try:
                os.write(fd, data)
            except OSError:
                # Any error, not a list of errnos: a closed pipe, a full disk, a
                # reader that left a datagram stderr, a read-only remount. The
                # log is never worth the activation; this line is lost, no more.
                pass

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


def _quoted(value: str, limit: int = 64, *, quotes: bool = True) -> str:
    """A user's value, quoted (or escaped alone, for a phrase that labels it itself) and cut short.

    repr() escapes every control character (CR, ESC, ...), so no value can
    forge a line or drive a terminal; README "Logging".
    """
    text = repr(value[:limit]) if quotes else repr(value[:limit])[1:-1]
    return text + ("... (%d characters)" % len(value) if len(value) > limit else "")


def _path_shown(value: str) -> str:
    """A path, address or label from outside: as it is when printable and short, else as _quoted shows it."""
    if value and len(value) <= _PATH_SHOWN_MAX and value.isprintable():
        return value
    return _quoted(value, _PATH_SHOWN_MAX)


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def _env_shown(env: Mapping[str, str]) -> str:
    """The environment for a trace line: secrets masked, every value cut."""
    return ", ".join(
        "%s=%s" % (_quoted(name, 64), "'********'" if _is_secret_name(name) else _quoted(_secrets_masked(value)))
        for name, value in sorted(env.items())
    )


def _secrets_masked(value: str) -> str:
    """`value` with what may be a credential masked: user info, and NAME=VALUE pairs whose NAME says secret.

    The user info of every word (scheme://********@host, ********@proxy:3128)
    and the VALUE of every such pair (?password=********). In linear time
    and with no regular expression: no backtracking, and no import (which
    would need a free fd).
    """
    return _each_word(_each_word(value, _WORD_ENDS, _user_info_masked), _PAIR_ENDS, _secret_pair_masked)


def _each_word(value: str, ends: dict[int, str], masked: Callable[[str], str]) -> str:
    """`value` with `masked` applied to each of its words: the runs between the characters of `ends`."""
    out, pos = [], 0
    for word in value.translate(ends).split("\0"):
        out.append(masked(word) + value[pos + len(word):pos + len(word) + 1])
        pos += len(word) + 1
    return "".join(out)


def _user_info_masked(word: str) -> str:
    # All of it up to the word's last '@': a password may hold '@' (Go's URL
    # parser splits at the last) or '/'; a user name (a token, a Sentry DSN's
    # key) may be the secret itself. A path masked by mistake hides nothing.
    start = word.find("://") + 3 if "://" in word else 0
    at = word.rfind("@", start)
    return word if at < 0 else word[:start] + "********" + word[at:]


def _secret_pair_masked(word: str) -> str:
    name, sep, _ = word.partition("=")
    return name + sep + "********" if sep and _is_secret_name(name) else word


# ---------------------------------------------------------------------------
# Configuration, part 1: a reader for the YAML subset a datadog.yaml needs.
#
# It only descends into the keys the loader needs (`wanted` paths); every
# other key's whole value (lists, block strings, flow collections, anything)
# is skipped by indentation alone. Under a wanted key it reads block mappings
# and plain or quoted scalars; anything else it records by its kind, which is
# an error only if the loader then asks for that key. One pass, each line once.
# ---------------------------------------------------------------------------

_MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a real datadog.yaml is ~200 KB

_NULLS = frozenset({"", "~", "null", "Null", "NULL"})

# What a wanted path holds: a scalar (plain or quoted), null, a mapping, or a
# construct this reader does not read, kept with its detail as text for the
# error that names it if the loader then needs that key.
_PLAIN, _QUOTED, _NULL, _MAPPING, _LIST = "plain", "quoted", "null", "mapping", "list"
_CONTINUED, _ALIAS, _BLOCK, _FLOW, _TAGGED = "continued", "alias", "block", "flow", "tagged"
_SURROGATE, _UNCLOSED, _RESERVED, _NESTED = "surrogate", "unclosed", "reserved", "nested"
# How an error names each kind: "{}" is the detail, "{:.1}" its first character.
_KIND_TEXT = {
    _MAPPING: "a mapping",
    _LIST: "a list",
    _CONTINUED: "a value continued on the next line",
    _ALIAS: "an alias (*{}) to an anchor this reader does not follow",
    _BLOCK: "a multi-line string ({})",
    _FLOW: "a flow collection ({:.1}...)",
    _TAGGED: "a tagged value ({})",
    _SURROGATE: "the escape {}, a surrogate code point, which YAML does not allow",
    _UNCLOSED: "a quoted string that does not end on its line, or text after it",
    _RESERVED: "a value starting with the reserved character {:.1}",
    _NESTED: "a nested 'key: value' on one line",
}
# The first character of a value that is one of those constructs.
_INDICATOR_KINDS = {"|": _BLOCK, ">": _BLOCK, "[": _FLOW, "{": _FLOW, "!": _TAGGED, "@": _RESERVED, "`": _RESERVED,
                    "%": _RESERVED}
# How a line that holds no `key: value` this reader reads may start.
_NOT_A_KEY = ("? ", "[", "{", "|", ">", "!", "&", "*", "@", "`")
_NO_SKIP = sys.maxsize


class _Node:
    """What a wanted path holds: its kind, its text (a construct's detail) and its line."""

    __slots__ = ("kind", "text", "line")

    def __init__(self, kind: str, text: str, line: int) -> None:
        self.kind = kind
        self.text = text
        self.line = line

    @property
    def is_scalar(self) -> bool:
        return self.kind in (_PLAIN, _QUOTED)


class _YamlReader:
    """One pass over the lines; `nodes` maps dotted paths to what they hold."""

    def __init__(self, wanted: Iterable[str], source: str) -> None:
        self.source = source
        wanted = frozenset(wanted)
        self.prefixes = frozenset(".".join(p.split(".")[:i]) for p in wanted for i in range(1, p.count(".") + 1))
        self.paths = wanted | self.prefixes  # the paths this reader reads: the wanted ones and their parents
        self.nodes: dict[str, _Node] = {}
        self.anchors: dict[str, _Node] = {}
        # Open block mappings we descend into: (indent of their keys, path), from the
        # top level's, which the first line of content sets (none before it).
        self.stack: list[tuple[int, str]] = []
        self.last: tuple[int, str] | None = None  # the last wanted key, whose value the next line may go on with
        self.skip_above = _NO_SKIP  # skip lines indented deeper than this,
        self.skip_dashes_at = -1  # and "- " items at this indent

    def error(self, line: int, message: str, key: str = "") -> _ConfigError:
        return _ConfigError(message, source=self.source, line=line, key=key)

    def read(self, text: str) -> dict[str, _Node]:
        for lineno, line in enumerate(_lines(text), 1):
            body = line.lstrip(" ")
            indent = len(line) - len(body)
            # Inside a value the loader does not need (most lines of a real file), or an
            # item of a list written at that value's key's indentation: skipped.
            if indent > self.skip_above or (indent == self.skip_dashes_at and _is_dash_item(body)):
                continue
            content = body.lstrip(" \t")
            if not content or content[0] == "#":
                continue  # blank lines and comments never change the structure
            if line.startswith(("---", "...")) and line[3:4] in ("", " ", "\t"):
                if self.stack or line[0] == ".":
                    break  # only the first document counts, as for the agent
                if _strip_comment(line[3:]):
                    raise self.error(lineno, "content on the '---' line is not supported")
            elif self.stack or line[0] != "%":  # '%' before any content: a %YAML or %TAG directive
                if not self.stack:
                    self.stack.append((indent, ""))
                self.read_line(lineno, indent, body)
        return self.nodes

    def read_line(self, lineno: int, indent: int, body: str) -> None:
        self.skip_above, self.skip_dashes_at = _NO_SKIP, -1
        if body[0] == "\t":
            raise self.error(lineno, "a tab in the indentation (YAML allows spaces only)")
        if self.last is not None and self.continues_last(*self.last, indent, body):
            return
        while len(self.stack) > 1 and self.stack[-1][0] > indent:
            self.stack.pop()
        top_indent, parent = self.stack[-1]
        if top_indent != indent:
            raise self.error(lineno, "indentation of %d spaces matches no enclosing key" % indent)
        self.read_entry(lineno, indent, body, parent)

    def continues_last(self, key_indent: int, path: str, indent: int, body: str) -> bool:
        """Whether this line goes on with the value of the last wanted key, `path`; what that value then is."""
        self.last = None
        node = self.nodes[path]
        empty = node.kind == _NULL and not node.text  # nothing after the colon: what comes below says
        list_item = empty and _is_dash_item(body)  # a list may start at its key's indentation
        if indent < key_indent or (indent == key_indent and not list_item):
            return False
        if empty and not list_item:
            self.nodes[path] = _Node(_MAPPING, "", node.line)
            self.stack.append((indent, path))
            return False
        # A list, or a plain value continued on the next line: skipped as a whole, the lines deeper
        # than the key and the items at this line's indentation (a list may be written at its key's).
        self.nodes[path] = _Node(_LIST if list_item else _CONTINUED, "", node.line)
        self.skip_above, self.skip_dashes_at = key_indent, indent
        return True

    def read_entry(self, lineno: int, indent: int, body: str, parent: str) -> None:
        descending = parent == "" or parent in self.prefixes
        parsed = None if _is_dash_item(body) or body.startswith(_NOT_A_KEY) else _split_key(body)
        if parsed is None and descending:
            where = "" if parent else " at the top level"
            raise self.error(lineno, "expected 'key: value'%s, found %s" % (where, _quoted(body.strip(), 24)), parent)
        key, rest = parsed or ("", "")  # no key, where the loader needs none: skipped below, as an unneeded key
        path = (parent + "." if parent else "") + key.lower()  # keys are case-insensitive, as in viper
        if key == "<<" and descending:
            raise self.error(lineno, "merge keys (<<) are not supported where the loader reads its settings",
                             parent)
        if path not in self.paths:
            if rest.startswith("&"):
                self.value(rest, lineno)  # for the anchor, wherever we pass it
            self.skip_above, self.skip_dashes_at = indent, indent  # its value, even a list at its indentation
            return
        for known in [k for k in self.nodes if k == path or k.startswith(path + ".")]:
            del self.nodes[known]  # a duplicate key: the last one wins, as for the agent
        node = self.nodes[path] = self.value(rest, lineno)
        if node.is_scalar or node.kind == _NULL:
            self.last = (indent, path)
        else:
            self.skip_above, self.skip_dashes_at = indent, -1

    def value(self, rest: str, line: int) -> _Node:
        """What `key: rest` holds; `&name` before a scalar keeps it for later `*name` aliases."""
        anchor = ""
        if rest.startswith("&"):
            anchor, _, rest = rest[1:].partition(" ")
            rest = rest.strip()
        if rest.startswith("*"):
            name = _strip_comment(rest[1:])
            target = self.anchors.get(name)
            node = _Node(_ALIAS, name, line) if target is None else _Node(target.kind, target.text, line)
        else:
            node = _value_node(rest, line)
        if anchor and node.is_scalar:
            self.anchors[anchor] = node
        return node


def _lines(text: str) -> Iterator[str]:
    """The lines of `text`, split a block of about 64 KiB at a time.

    A list of all of them would cost some 50 bytes a line: 4 million short
    keys in a 16 MiB file made 300 MB. str.split on a block is as fast.
    """
    start = 0
    end = text.find("\n", 1 << 16)
    while end >= 0:
        yield from text[start:end].split("\n")
        start, end = end + 1, text.find("\n", end + 1 + (1 << 16))
    yield from text[start:].split("\n")


def _is_dash_item(body: str) -> bool:
    return body == "-" or body.startswith(("- ", "-\t"))


def _strip_comment(text: str) -> str:
    """`text` up to a comment: a '#' that starts it or follows a space or tab (one inside a word stays)."""
    text = " " + text.replace("\t#", " #")  # the space: a '#' at the start begins a comment too
    return text.partition(" #")[0].strip()


def _split_key(body: str) -> tuple[str, str] | None:
    """`key: rest` -> (key, rest); quoted keys allowed; None if no key here."""
    if body[0] in "\"'":
        key, end = _read_quoted(body)
        rest = body[end:].lstrip(" ")
        if key is None or rest[:1] != ":":
            return None
        rest = rest[1:]
    else:
        colon = (body.replace(":\t", ": ") + " ").find(": ")  # the first ':' before a space, a tab or the end
        key, rest = body[:colon].rstrip(), body[colon + 1:]
        if colon < 0 or not key or " #" in key:
            return None
    return (key, rest.strip()) if rest[:1] in ("", " ", "\t") else None


def _value_node(rest: str, line: int) -> _Node:
    """A value on its key's line: a scalar, null, or a construct this reader does not read."""
    if rest.startswith(("\"", "'")):
        text, end = _read_quoted(rest)
        if text is None or _strip_comment(rest[end:]):
            return _Node(_UNCLOSED, "", line)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # an escaped lone surrogate
            return _Node(_SURROGATE, "\\u%04x" % ord(text[exc.start]), line)
        return _Node(_QUOTED, text, line)
    kind = _LIST if _is_dash_item(rest) else _INDICATOR_KINDS.get(rest[:1], "")
    if kind:
        return _Node(kind, rest.split()[0], line)
    text = _strip_comment(rest)
    if rest.startswith("&") or ": " in text or text.endswith(":"):
        return _Node(_NESTED, "", line)
    return _Node(_NULL if text in _NULLS else _PLAIN, text, line)


_ESCAPES = {
    "0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
    "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
    "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _read_quoted(text: str) -> tuple[str | None, int]:
    """The quoted scalar `text` starts with, and the index past it; (None, 0) if it does not end on this line."""
    quote = text[0]
    out: list[str] = []
    i = 1
    while i < len(text):
        char = text[i]
        i += 1
        if char == quote:
            if quote == '"' or text[i: i + 1] != "'":
                return "".join(out), i
            i += 1  # '' is an escaped single quote
        elif char == "\\" and quote == '"':
            code = text[i: i + 1]
            i += 1
            if code in _ESCAPES:
                char = _ESCAPES[code]
            else:
                width = _HEX_ESCAPES.get(code, 0)
                digits = text[i: i + width]
                if not (0 < len(digits) == width and _HEX_DIGITS.issuperset(digits) and int(digits, 16) <= 0x10FFFF):
                    return None, 0  # an unknown or short escape, or beyond Unicode
                char = chr(int(digits, 16))  # a lone surrogate too, which _value_node names
                i += width
        out.append(char)
    return None, 0


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
            raise _ConfigError("is %d bytes; this loader reads at most %d" % (info.st_size, _MAX_CONFIG_BYTES),
                               source=path)
        # A buffered read(n) reads until n bytes or the end, into one buffer.
        with open(fd, "rb", closefd=False) as file:
            data = file.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise _ConfigError("cannot read: %s" % _oserror_text(exc), source=path) from None
    finally:
        os.close(fd)
    if len(data) > _MAX_CONFIG_BYTES:
        raise _ConfigError("grew past %d bytes while being read" % _MAX_CONFIG_BYTES, source=path)
    return _decode_config(data, path)


_FILE_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO",
               stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _file_kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


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
    return _YamlReader(wanted, source).read(text)


# ---------------------------------------------------------------------------
# Configuration, part 2: the settings of the drop-in front door, from the
# environment over the file over defaults (README "Configuration").
# ---------------------------------------------------------------------------

_GO_BOOLS = {**dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
             **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False)}
# What a plain (unquoted) YAML scalar may spell a boolean as; the last four are YAML 1.1's.
_YAML_BOOLS = {"true": True, "false": False, "yes": True, "on": True, "no": False, "off": False}
_INT64 = 1 << 63
# unicode.IsSpace, which strings.TrimSpace uses: narrower than str.isspace,
# which also strips the ASCII separators 0x1c-0x1f.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"

_DEFAULT_SOCKET = "/var/run/datadog/apm.socket" if sys.platform.startswith("linux") else ""
_DEFAULT_LOG_FILE = (
    "/opt/datadog-agent/logs/trace-agent.log" if sys.platform == "darwin" else "/var/log/datadog/trace-agent.log"
)
_DEFAULT_PROBE_GRACE_MS = 250
_MAX_PROBE_GRACE_MS = 60_000
_MAX_HOLD_TIMEOUT_MS = 600_000
_GENERIC_HOLD_TIMEOUT_MS = 1000  # drop-in: 0 (no limit), as the Go loader
# The readiness fd (s6's notification-fd) is one the supervisor opened for us;
# 0-2 are the standard streams, never it.
_NO_READY_FD, _MIN_READY_FD = -1, 3
_READY_FD = "a file descriptor from 3 to %d (0-2 are the standard streams)" % _MAX_FD
_MAX_STOP_SECONDS = 604_800  # a week: --stop-when-idle and --stop-timeout
_DEFAULT_STOP_TIMEOUT = 30
# How the held client reaches the program: as an inherited fd, or relayed by
# a helper process into the program's own listener (README "Generic mode").
_HELD_FD, _HELD_RELAY = "fd", "relay"
_HELD_CLIENT_WAYS = (_HELD_FD, _HELD_RELAY)

# The YAML paths the drop-in front door reads.
_KEYS = (
    "apm_config.enabled", "apm_config.error_tracking_standalone.enabled", "apm_config.socket_activation.enabled",
    *("apm_config.socket_activation." + name for name in ("handle_tcp_probe", "probe_grace_period", "held_client",
                                                         "hold_timeout", "ready_fd", "stop_when_idle", "stop_timeout")),
    "apm_config.receiver_port", "apm_config.receiver_socket", "apm_config.apm_non_local_traffic", "bind_host",
    "otlp_config.receiver", "otlp_config.traces.internal_port", "log_level", "apm_config.log_file", "log_to_console",
    "disable_file_logging",
)


def _env_names(key: str) -> tuple[str, ...]:
    """The variables that set `key`, in order of precedence: the agent's names for it.

    DD_ and the path in upper case with '_' for '.', where apm_config (and an
    apm_ key under it) is APM; the receiver port also has an older name.
    """
    name = "DD_" + key.upper().replace("APM_CONFIG.APM_", "APM_").replace("APM_CONFIG.", "APM_").replace(".", "_")
    return (name, "DD_RECEIVER_PORT") if key == "apm_config.receiver_port" else (name,)


class _Config:
    """Looks a key up in the environment, then the file; converts its value."""

    def __init__(self, nodes: dict[str, _Node], environ: Mapping[str, str], source: str, log: _Log) -> None:
        self.nodes = nodes
        self.environ = environ
        self.source = source
        self.log = log

    def lookup(self, key: str) -> tuple[str, str, _Node | None] | None:
        """Where the key's value is, and its text: (variable, text, None), or (key, text, its node in the file).

        None when neither sets it; an error when the file holds more than a single value there.
        """
        for name in _env_names(key):
            value = self.environ.get(name, "")
            if value != "":  # an empty value counts as unset
                return name, value, None
        node = self.nodes.get(key) if self.parents_are_mappings(key) else None
        if node is None or node.kind == _NULL:
            return None
        if not node.is_scalar:
            raise _ConfigError("holds %s; expected a single value" % _describe_node(node), source=self.source,
                               line=node.line, key=key)
        return key, node.text, node

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

    def key_written(self, key: str) -> bool:
        """The key is written in the file, even with nothing after its colon."""
        return self.parents_are_mappings(key) and key in self.nodes

    def value(self, key: str, default: _T, convert: Callable[[str, str], _T]) -> _T:
        """`convert(text, name)` of the key's value, from the environment, else the file; else `default`.

        Its error names where that value was found: the variable, or the file, line and key.
        """
        found = self.lookup(key)
        if found is None:
            return default
        try:
            return convert(found[1], found[0])
        except _ConfigError as exc:
            raise self.error(key, exc.message) from None

    def boolean(self, key: str, default: bool) -> bool:
        node = (self.lookup(key) or ("", "", None))[2]
        if node is not None and node.kind == _PLAIN and node.text.lower() in _YAML_BOOLS:
            if node.text.lower() not in ("true", "false"):
                self.log.warn("%s:%d: %s: %s is read as a boolean (YAML 1.1); write true or false",
                              _path_shown(self.source), node.line, key, _quoted(node.text))
            return _YAML_BOOLS[node.text.lower()]
        return self.value(key, default, _go_bool)

    def string(self, key: str, default: str) -> str:
        return self.value(key, default, lambda text, name: text)

    def error(self, key: str, message: str) -> _ConfigError:
        """An error about the value `key` has now, naming where that value was found."""
        name, _, node = self.lookup(key) or (key, "", None)
        return _ConfigError(message, source=self.source if node else "", line=node.line if node else 0, key=name)

    def in_range(self, key: str, default: int, high: int, unit: str = "ms") -> int:
        """An integer from 0 to `high` (in `unit`), or an error naming key and value."""
        value = self.value(key, default, _go_int)
        if not 0 <= value <= high:
            raise self.error(key, "%d %s is out of range (0-%d)" % (value, unit, high))
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices` (lower case), in any case: `Relay` reads as `relay`, as log levels do."""
        text = self.string(key, default)
        if text.lower() not in choices:
            raise self.error(key, "%s is not one of %s" % (_quoted(text), ", ".join(choices)))
        return text.lower()


def _describe_node(node: _Node) -> str:
    if node.is_scalar:
        return "the single value %s" % _quoted(node.text)
    return _KIND_TEXT[node.kind].format(node.text)


def _go_bool(text: str, name: str) -> bool:
    """strconv.ParseBool: exactly these spellings, nothing trimmed."""
    if text not in _GO_BOOLS:
        raise _ConfigError("%s is not a boolean (use true or false)" % _quoted(text), key=name)
    return _GO_BOOLS[text]


def _go_int(text: str, name: str) -> int:
    """strconv.ParseInt(strings.TrimSpace(s), 0, 64), exactly: 8126, 0x1fbe, 0o17, 017, 0b1, 1_000."""
    body = text.strip(_GO_SPACE)
    sign = body[:1] if body[:1] in ("+", "-") else ""
    digits = body[len(sign):]
    if digits[:1] == "0" and digits[1:2].lower() not in ("x", "o", "b"):
        digits = "0o" + (digits[1:] or "0")  # Go reads a leading 0 alone as octal; Python spells it 0o
    # int(..., 0) reads the rest of Go's syntax, underscores included, once the
    # text holds only ASCII letters, digits and '_' (int() also takes other
    # digits, and spaces).
    plain = digits.replace("_", "")
    try:
        if not (plain.isascii() and plain.isalnum()):
            raise ValueError(text)
        # int() refuses more than 4300 decimal digits, where Go has long overflowed.
        value = _INT64 if len(plain) > 4300 and plain.isdigit() else int(sign + digits, 0)
    except ValueError:
        raise _ConfigError("%s is not an integer" % _quoted(text), key=name) from None
    if not -_INT64 <= value < _INT64:
        raise _ConfigError("%s is out of range for a 64-bit integer" % _quoted(text), key=name)
    return value


def _decimal(text: str, high: int) -> int | None:
    """Plain ASCII digits naming a number from 0 to `high`, else None.

    The length is checked before int(): CPython refuses to convert more than
    4300 digits (ValueError), and so many digits are garbage here anyway.
    """
    digits = text.lstrip("0") or "0"
    if text.isascii() and text.isdigit() and len(digits) <= len(str(high)) and int(digits) <= high:
        return int(digits)
    return None


class _DropInSettings:
    """Everything the drop-in front door needs from the configuration."""

    def __init__(self, config: _Config, environ: Mapping[str, str]) -> None:
        self.apm_enabled = config.boolean("apm_config.enabled", True)
        self.error_tracking = config.boolean("apm_config.error_tracking_standalone.enabled", False)
        prefix = "apm_config.socket_activation."
        self.socket_activation = config.boolean(prefix + "enabled", False)
        self.handle_tcp_probe = config.boolean(prefix + "handle_tcp_probe", False)
        self.probe_grace_ms = config.in_range(prefix + "probe_grace_period", _DEFAULT_PROBE_GRACE_MS,
                                              _MAX_PROBE_GRACE_MS)
        self.ready_fd = config.value(prefix + "ready_fd", _NO_READY_FD, _go_int)
        if config.lookup(prefix + "ready_fd") is not None and not _MIN_READY_FD <= self.ready_fd <= _MAX_FD:
            raise config.error(prefix + "ready_fd", "%d is not %s" % (self.ready_fd, _READY_FD))
        # The probe check watches the TCP receiver only, never the OTLP port.
        self.activation = _Activation(
            probe_check=self.handle_tcp_probe, probe_listener_name=RECEIVER_FD_VAR, grace_ms=self.probe_grace_ms,
            held_client=config.choice(prefix + "held_client", _HELD_FD, _HELD_CLIENT_WAYS),
            # 0: no limit, as the Go loader, which holds a silent client for ever.
            hold_timeout_ms=config.in_range(prefix + "hold_timeout", 0, _MAX_HOLD_TIMEOUT_MS),
            # 0: never stop the program (README "Back to sleep").
            stop_when_idle=config.in_range(prefix + "stop_when_idle", 0, _MAX_STOP_SECONDS, "s"),
            stop_timeout=config.in_range(prefix + "stop_timeout", _DEFAULT_STOP_TIMEOUT, _MAX_STOP_SECONDS, "s"))
        self.receiver_port = config.value("apm_config.receiver_port", 8126, _go_int)
        self.receiver_socket = config.string("apm_config.receiver_socket", _DEFAULT_SOCKET)
        # `receiver:` with nothing under it still turns OTLP on, as for the agent.
        self.otlp_enabled = config.key_written("otlp_config.receiver") or any(
            name.startswith("DD_OTLP_CONFIG_RECEIVER_") and value for name, value in environ.items()
        )
        self.otlp_port = config.value("otlp_config.traces.internal_port", 5003, _go_int)
        self.bind_host, self.bind_host_reason = _bind_host(config, environ)
        self.log_level = config.value("log_level", "info", _log_level)
        self.log_to_console = config.boolean("log_to_console", True)
        disable_file = config.boolean("disable_file_logging", False)
        log_file = config.string("apm_config.log_file", _DEFAULT_LOG_FILE)
        self.log_file = None if disable_file else log_file
        for key, port in (("apm_config.receiver_port", self.receiver_port),
                          ("otlp_config.traces.internal_port", self.otlp_port)):
            if port > 65535 or (key.startswith("otlp") and self.otlp_enabled and port <= 0):
                raise config.error(key, "port %d is out of range (1-65535)" % port)


def _log_level(text: str, name: str) -> str:
    level = text.strip().lower()
    level = _LEVEL_ALIASES.get(level, level)
    if level not in _LEVELS:
        raise _ConfigError("%s is not a log level (trace, debug, info, warn, error, critical, off)" % _quoted(text),
                           key=name)
    return level


def _bind_host(config: _Config, environ: Mapping[str, str]) -> tuple[str, str]:
    """The receiver's host, and why (the agent's own rule, README "Configuration")."""
    if config.boolean("apm_config.apm_non_local_traffic", False):
        return "0.0.0.0", "apm_non_local_traffic is true"
    if config.lookup("bind_host") is not None or config.lookup("apm_config.apm_non_local_traffic") is not None:
        return config.string("bind_host", "localhost"), "bind_host"
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

    __slots__ = ("fd", "handoff_name", "host", "kind", "mode", "path", "port", "shown_as", "systemd_name")

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


class _Listener:
    """An open listening socket and the spec it came from."""

    __slots__ = ("fd", "spec", "sock")

    def __init__(self, spec: _ListenerSpec, sock: socket.socket) -> None:
        self.spec = spec
        self.sock = sock
        self.fd = sock.fileno()  # a listener stays open on this fd until execve or failure


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
    if host in _WILDCARD_HOSTS:
        # Like Go: a wildcard listens on [::] with IPV6_V6ONLY off, so one
        # socket takes both IPv4 and IPv6 clients; else on IPv4 only.
        dual_stack = socket.has_ipv6 and _dual_stack_supported()
        return (socket.AF_INET6, ("::", port, 0, 0)) if dual_stack else (socket.AF_INET, ("0.0.0.0", port))
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
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as trial:
            trial.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        return False  # no IPv6 in this kernel or namespace, or no dual stack: IPv4 only
    return True


def _open_tcp_listener(host: str, port: int) -> socket.socket:
    family, address = _tcp_address(host, port)
    return _listening_socket(family, address, _path_shown(_join_host_port(host, port)))


def _listening_socket(family: int, address: tuple[object, ...] | str, where: str) -> socket.socket:
    """A stream socket bound to `address` and listening; on failure closed, and an error naming `where`."""
    sock = socket.socket(family, socket.SOCK_STREAM)  # close-on-exec until handed over
    try:
        if family != socket.AF_UNIX:
            # SO_REUSEADDR: as the Go listener does, so a restart can rebind
            # while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(_listen_backlog())
    except OSError as exc:
        sock.close()
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
        raise _ListenerError("unix socket path is %d bytes, longer than the %d the kernel allows (sun_path): %s"
                             % (len(encoded), _SUN_PATH_MAX, _path_shown(path)))


def _clear_stale_socket(path: str) -> None:
    """Make room for the socket: remove a stale one, refuse anything else."""
    shown = _path_shown(path)
    try:
        mode = os.lstat(path).st_mode  # lstat: judge a symlink itself, never its target
        if stat.S_ISLNK(mode):
            raise _ListenerError("%s is a symbolic link; refusing to replace it" % shown)
        if not stat.S_ISSOCK(mode):
            raise _ListenerError("%s exists and is %s, not a socket; refusing to remove it" % (shown, _file_kind(mode)))
        if _unix_socket_is_served(path):
            raise _ListenerError("%s is served by a live process; refusing to take it over" % shown)
        os.unlink(path)
    except FileNotFoundError:
        pass  # no such file, or gone since we looked: the room we wanted
    except OSError as exc:
        raise _ListenerError("cannot clear the way for unix socket %s: %s" % (shown, _oserror_text(exc))) from None


def _unix_socket_is_served(path: str) -> bool:
    """A connect() answers whether anyone listens: refused means stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        # Non-blocking: a live server with a full backlog answers EAGAIN at
        # once instead of making us wait in connect().
        sock.setblocking(False)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            return False
        except BlockingIOError:
            pass  # served, and its backlog is full
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
    # bind() creates the file with 0777 & ~umask: setting the umask first
    # gives it its final mode at once, with no window where it is wider
    # (the Go loader binds, then chmods).
    old_umask = os.umask(0o777 & ~mode)
    try:
        return _listening_socket(socket.AF_UNIX, "\0" + path[1:] if abstract else path,
                                 "unix socket " + _path_shown(path))
    finally:
        os.umask(old_umask)


def _wrap_sockets(found: list[tuple[int, str]], *, source: str = "") -> list[socket.socket]:
    """A socket object for each (fd, name); on failure every fd stays as it came, and the error names `source`."""
    wrapped: list[socket.socket] = []
    for fd, name in found:
        try:
            # fileno=: wrap the fd itself (family and type read from the kernel);
            # socket.fromfd would dup it and leave the original behind.
            wrapped.append(socket.socket(fileno=fd))
        except OSError as exc:
            for sock in wrapped:
                sock.detach()  # the fd stays open: its owner may still fall back to it
            raise LoaderError("%s: fd %d is not an open socket: %s" % (source or name, fd, _oserror_text(exc))) \
                from None
    return wrapped


def _refuse_closed_std_fds() -> None:
    """Raise _ListenerError if fd 0, 1 or 2 is closed: the first socket we open would land there."""
    closed = _closed_std_fds()
    if closed:
        # main() fills them with /dev/null; a chroot without it leaves them
        # closed, and the program would take a listener for its stdin.
        raise _ListenerError("fd %s is closed and %s could not be opened in its place: a socket would land there"
                             % (" and ".join(str(fd) for fd in closed), os.devnull))


def _closed_std_fds() -> list[int]:
    return [fd for fd in (0, 1, 2) if not _is_open(fd)]


def _open_listeners(specs: list[_ListenerSpec], log: _Log) -> list[_Listener]:
    """Open every spec in order; on failure close what was opened and raise."""
    opened: list[_Listener] = []
    try:
        for spec in specs:
            sock = _open_listener(spec, log)
            if sock is not None:
                opened.append(_Listener(spec, sock))
    except (LoaderError, OSError):
        # Now, not at the fail-open exec that follows: what it does first (readiness) may need the
        # fds (EMFILE). systemd's stay for the program.
        for listener in opened:
            if listener.spec.kind != _INHERITED:
                listener.sock.close()
        raise
    return opened


def _open_listener(spec: _ListenerSpec, log: _Log) -> socket.socket | None:
    if spec.kind == _TCP:
        sock = _open_tcp_listener(spec.host, spec.port)
        # The bound port, which the kernel chose when the address said 0.
        log.info("Listening to %s at %s", spec.shown_as, _join_host_port(spec.host, int(sock.getsockname()[1])))
        return sock
    if spec.kind == _UNIX:
        unix_sock = _open_unix_listener(spec.path, spec.mode, log)
        if unix_sock is not None:
            log.info("Listening to %s at path %s", spec.shown_as, _path_shown(spec.path))
        return unix_sock
    return _wrap_sockets([(spec.fd, spec.shown_as)])[0]


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
# and the deadline together, logs it, and returns "" (the wait goes on).
# ---------------------------------------------------------------------------

_IDLE, _HOLDING, _GRACE = "IDLE", "HOLDING", "GRACE"

# accept(2): these mean the client went away before we took it (or a network
# error it reports on Linux); the listener is fine and we keep waiting.
_ACCEPT_RETRY_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EAGAIN", "EWOULDBLOCK", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
    "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name))
# A peek that fails with these saw a reset: a probe closed with an RST.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.ENOTCONN})

# POLLPRI too: an urgent (MSG_OOB) byte alone is data, but it is out of band,
# so neither POLLIN nor a peek reports it.
_CLIENT_EVENTS = select.POLLIN | select.POLLPRI
_POLL_EVENT_NAMES = [(getattr(select, name), name) for name in ("POLLIN", "POLLPRI", "POLLERR", "POLLHUP", "POLLNVAL")]

# struct linger {int l_onoff = 1; int l_linger = 0}: close() then resets
# instead of sending a FIN. Built without the struct module, which costs a
# shared library at start-up and an import (an fd) where EMFILE may reign.
_LINGER_RESET = (1).to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)

# MSG_PEEK: look without consuming, the bytes stay for the agent.
# MSG_DONTWAIT: the fd stays blocking for the agent, but we never wait.
# Combined once: an IntFlag's | costs more than the recv() it is for.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)

# How a probe closed: a FIN, or a reset (RST).
_FIN, _RST = "FIN", "RST"


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


def _peer_text(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return _join_host_port(str(address[0]), int(address[1]))
    return str(address) or "unknown"


def _events_text(revents: int) -> str:
    return " ".join(name for bit, name in _POLL_EVENT_NAMES if revents & bit) or hex(revents)


def _ms_until(deadline: float | None) -> int | None:
    """poll()'s timeout for a time.monotonic() deadline; None (no timeout) for none."""
    if deadline is None:
        return None
    # poll() counts whole milliseconds: round up so we never spin just before the deadline.
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))


class _Waiter:
    """The wait's state: what is polled, what is held, and until when."""

    def __init__(self, listeners: list[_Listener], probe_listener: _Listener | None, *, grace_ms: int,
                 hold_timeout_ms: int, log: _Log, program_label: str) -> None:
        self.program_label = program_label
        self.by_fd = {lsn.fd: lsn for lsn in listeners}
        self.probe_listener = probe_listener
        self.probe_fd = probe_listener.fd if probe_listener is not None else -1
        self.grace_ms = grace_ms
        self.hold_timeout_ms = hold_timeout_ms
        self.log = log
        # Asked once: a probe then costs no debug() call at all at info level.
        self.debugging = log.enabled("debug")
        self.probes = {_FIN: 0, _RST: 0}
        self.poller = select.poll()
        for listener in listeners:
            self.poller.register(listener.fd, select.POLLIN)
        # Non-blocking for the wait only: a client that vanishes between poll()
        # and accept() must not block us. run() restores it: a socket we
        # inherited reaches the program as it came, even when we fail open.
        self.probe_listener_was_blocking = probe_listener is not None and os.get_blocking(probe_listener.fd)
        if probe_listener is not None:
            probe_listener.sock.setblocking(False)
        self.state = _IDLE
        self.held: _HeldClient | None = None
        self.deadline: float | None = None
        self.hold_end: float | None = None

    # -- the transitions ----------------------------------------------------

    def enter_idle(self, how: str) -> str:
        """The held client closed (`how`: FIN or RST): a probe absorbed; the probe listener is polled again."""
        assert self.held is not None and self.probe_listener is not None
        self.probes[how] += 1
        fd = self.held.sock.fileno()
        self.poller.unregister(fd)
        self.held.sock.close()
        if self.debugging:  # logged once closed: a reader of the log may look at our fds next
            self.log.debug("TCP client closed connection, closing file descriptor %d (peer %s, %s)", fd,
                           self.held.peer, how)
        self.held = None
        if self.state == _GRACE:
            self.poller.register(self.probe_listener.fd, select.POLLIN)
        self.state, self.deadline = _IDLE, None
        return ""  # the wait goes on

    def enter_holding(self, client: _HeldClient) -> str:
        self.poller.register(client.sock.fileno(), _CLIENT_EVENTS)
        self.held = client
        self.state = _HOLDING
        self.hold_end = time.monotonic() + self.hold_timeout_ms / 1000.0 if self.hold_timeout_ms else None
        self.deadline = self.hold_end
        if self.debugging:
            self.log.debug("Accepted connection on TCP listener: %d (peer %s)", client.sock.fileno(), client.peer)
        return ""  # the wait goes on

    def enter_grace(self) -> str:
        """A second client waits: leave it in the backlog, give the held one `grace_ms`."""
        assert self.probe_listener is not None
        self.poller.unregister(self.probe_listener.fd)
        self.state = _GRACE
        grace_end = time.monotonic() + self.grace_ms / 1000.0
        self.deadline = min(grace_end, self.hold_end or grace_end)  # the hold timeout may come first
        self.log.debug("A second TCP client is waiting; giving the held one %d ms", self.grace_ms)
        return ""  # the wait goes on

    # -- the loop -------------------------------------------------------------

    def run(self) -> str:
        """Wait: why the wait ended. The client to hand over, if one is held, is then `held`."""
        self.log.info("Polling... (fds %s%s)", ", ".join(str(fd) for fd in self.by_fd),
                      "; probe check on fd %d" % self.probe_listener.fd if self.probe_listener else "")
        reason = ""
        while not reason:
            if self.debugging:
                self.log.debug("Polling... (state %s)", self.state)
            try:
                # No deadline, no timeout: an idle loader never wakes up. PEP 475 retries EINTR for us.
                ready = self.poller.poll(_ms_until(self.deadline))
            except OSError as exc:
                reason = "poll() failed: %s" % _oserror_text(exc)
            else:
                reason = self.on_events(ready) if ready else self.timeout_reason()  # only a deadline ends an empty poll
        # The end of the wait: the probe listener as it was before.
        if self.probe_listener is not None:
            self.probe_listener.sock.setblocking(self.probe_listener_was_blocking)
        return reason

    def timeout_reason(self) -> str:
        """Built only when the deadline passes: which one it was, grace or hold timeout."""
        assert self.held is not None
        if self.deadline != self.hold_end:
            return "a second TCP client arrived and the held one stayed silent for %d ms" % self.grace_ms
        return "the held TCP client %s sent nothing for %d ms" % (self.held.peer, self.hold_timeout_ms)

    def on_events(self, ready: list[tuple[int, int]]) -> str:
        """Handle one poll() result; a non-empty reason ends the wait."""
        if self.debugging:
            for fd, revents in ready:
                self.log.debug("Socket %d has events %s", fd, _events_text(revents))
        if len(ready) > 1:
            return self.on_several(dict(ready))
        fd, revents = ready[0]
        if self.held is not None and fd == self.held.sock.fileno():
            return self.on_held_client(revents)
        if fd == self.probe_fd:
            return self.on_probe_listener()
        return "traffic on %s" % self.listeners_text([fd])

    def on_several(self, ready: dict[int, int]) -> str:
        """Several sockets ready at once: at most the held client and the probe listener keep the wait."""
        held_fd = self.held.sock.fileno() if self.held is not None else -1
        others = [fd for fd in ready if fd not in (held_fd, self.probe_fd)]
        if others:
            return "traffic on %s" % self.listeners_text(others)
        if self.grace_ms == 0:
            return "events on several sockets at once"
        reason = self.on_held_client(ready[held_fd])  # first: it may turn out to be a probe, now closed
        if reason or self.held is None:
            return reason
        return self.on_probe_listener()

    def on_held_client(self, revents: int) -> str:
        assert self.held is not None
        if revents & select.POLLPRI:
            return "the held TCP client %s sent urgent (out-of-band) data" % self.held.peer
        try:
            data: bytes | None = self.held.sock.recv(1, _PEEK_NOW)
        except BlockingIOError:
            data = None  # nothing to read: silent
        except OSError as exc:
            if exc.errno in _RESET_ERRNOS:  # a probe closed with an RST
                return self.enter_idle(_RST)
            return "error reading the held TCP client: %s" % _oserror_text(exc)
        if data:
            self.log.debug("TCP client sent data, executing %s...", self.program_label)
            return "the held TCP client %s sent data" % self.held.peer
        if data is not None:  # end of file: a probe closed with a FIN
            return self.enter_idle(_FIN)
        if revents & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            # An error or hang-up the peek did not report: never spin on it.
            return "the held TCP client reported %s" % _events_text(revents)
        return ""

    def on_probe_listener(self) -> str:
        assert self.probe_listener is not None
        if self.state == _HOLDING:
            if self.grace_ms == 0:
                return "a second TCP client arrived while one was held"
            return self.enter_grace()
        try:
            sock, address = self.probe_listener.sock.accept()  # close-on-exec until handed over (PEP 446)
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                # EMFILE and the like: the program, with a fresh process, can take it.
                return "accept() on the TCP listener failed: %s" % _oserror_text(exc)
            if exc.errno == errno.ECONNABORTED:  # reset while still in the backlog: a probe
                self.probes[_RST] += 1
            if self.debugging:
                self.log.debug("A TCP client left before it was accepted: %s", exc)
            return ""
        return self.enter_holding(_HeldClient(sock, address, self.probe_listener))

    def listeners_text(self, fds: Iterable[int]) -> str:
        return ", ".join(self.by_fd[fd].spec.shown_as if fd in self.by_fd else "fd %d" % fd for fd in sorted(fds))


def _choose_probe_listener(listeners: list[_Listener], *, enabled: bool, only: str = "") -> _Listener | None:
    """The one listener the probe check watches: the first TCP one (named `only`, if given)."""
    tcp = [listener for listener in listeners if listener.sock.type == socket.SOCK_STREAM
           and listener.sock.family in (socket.AF_INET, socket.AF_INET6)
           and listener.spec.handoff_name == (only or listener.spec.handoff_name)]
    return tcp[0] if enabled and tcp else None


# ---------------------------------------------------------------------------
# Hand-off and exec: put each fd where the program expects it, say so in the
# environment, reset what the interpreter changed, and execve.
# ---------------------------------------------------------------------------


class _HandoffError(LoaderError):
    """The hand-off failed before anything irreversible: fail open cleanly."""


# A hand-off protocol (_HandoffProtocol: one of the two classes below) tells
# the program its fds: `scrubbed_vars` are left out of every exec's
# environment (_Launch.scrubbed_env), `hand_over` runs on wake. hand_over
# first checks that the fds the program will hold leave it room to start,
# before it changes anything: until then the loader can still fail open.


class _EnvProtocol:
    """Each fd in a variable of its own (the Datadog agent's way)."""

    def __init__(self, owned_vars: Iterable[str], client_var: str, *, replaced_vars: Iterable[str] = (),
                 unselected_fds: Iterable[int] = ()) -> None:
        # A variable inherited from our own parent names an fd nobody handed
        # the program: dropped on every path, so it is never adopted.
        self.scrubbed_vars = tuple(owned_vars) + ((client_var,) if client_var else ())
        self.client_var = client_var
        self.replaced_vars = tuple(replaced_vars)  # still true on fail-open, stale once we hand over
        self.unselected_fds = tuple(unselected_fds)  # inherited sockets nobody asked for

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  inherited_fds: frozenset[int]) -> list[int]:
        handed = [(lsn.spec.handoff_name, lsn.fd) for lsn in listeners]
        handed += [(self.client_var, client.sock.fileno())] if client is not None and self.client_var else []
        fds = [fd for _, fd in handed]
        # The fds stay where they are; those we inherited pass through.
        _check_room_to_start({0, 1, 2, *fds} | (inherited_fds - set(self.unselected_fds)))
        for name in self.replaced_vars:
            env.pop(name, None)
        _close_on_exec(self.unselected_fds)
        env.update((name, str(fd)) for name, fd in handed)
        return fds


class _SystemdProtocol:
    """sd_listen_fds(3): fds 3, 4, ... with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES."""

    def __init__(self, *, inherited_for_us: bool) -> None:
        # LISTEN_* addressed to this very process belong to the program too
        # when we fail open (same pid after execve): kept then.
        self.scrubbed_vars = () if inherited_for_us else _SYSTEMD_VARS

    def hand_over(self, env: dict[str, str], listeners: list[_Listener], client: _HeldClient | None,
                  inherited_fds: frozenset[int]) -> list[int]:
        # "unknown" is the name systemd reports for a socket it was given no
        # name for; "connection" the one it gives an accepted connection.
        handed = [(lsn.fd, lsn.spec.handoff_name or "unknown") for lsn in listeners]
        handed += [(client.sock.fileno(), "connection")] if client is not None else []
        # The program holds 0-2 and fds 3, 4, ...; every other fd is closed.
        _check_room_to_start(set(range(_SD_LISTEN_FDS_START + len(handed))))
        # Only generic mode hands over this way, and it logs to stderr alone:
        # no log file of ours can sit on the fds we fill.
        targets = _move_fds_to([fd for fd, _ in handed], _SD_LISTEN_FDS_START)
        # Under systemd's protocol the program gets 0-2 and its LISTEN_FDS,
        # nothing else (a socket nobody asked for included).
        _close_on_exec(fd for fd in _open_fds() if fd > 2 and fd not in targets)
        for name in _SYSTEMD_VARS:
            env.pop(name, None)
        env["LISTEN_FDS"] = str(len(targets))
        env["LISTEN_PID"] = str(os.getpid())  # execve keeps our pid for the program
        env["LISTEN_FDNAMES"] = ":".join(name for _, name in handed)
        return targets


def _move_fds_to(sources: list[int], start: int) -> list[int]:
    """dup2 each source fd to start, start+1, ... without clobbering another.

    A source already in its place stays there, and one above the range is
    dup2'ed straight into it: neither needs a spare fd, which matters at a
    low RLIMIT_NOFILE. Only a source inside the range but out of place could
    be overwritten before its turn; those are copied above the range first,
    and only then, when nothing can fail any more (dup2 allocates no fd),
    everything is put into place. A failure while copying (EMFILE) leaves
    every fd as it was, so the caller can still fail open cleanly. The
    copies are close-on-exec: the exec that follows (the program's, or the
    fail-open one) closes them; the originals left behind are the caller's.
    """
    end = start + len(sources)
    targets = list(range(start, end))
    copies: dict[int, int] = {}
    try:
        for fd, target in zip(sources, targets):
            if fd != target and start <= fd < end:
                # The lowest free fd >= end, closed on exec. fcntl is imported
                # with the module: an import needs a free fd, which EMFILE
                # would deny us here.
                copies[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, end)
    except OSError as exc:
        raise _HandoffError("cannot copy the sockets into place: %s" % _oserror_text(exc)) from None
    for fd, target in zip(sources, targets):
        if fd != target:
            os.dup2(copies.get(fd, fd), target, inheritable=True)
    return targets


def _open_fds() -> list[int]:
    """Every open fd: from /proc/self/fd or /dev/fd, else a scan bounded by RLIMIT_NOFILE.

    Minimal chroots and some sandboxes have neither directory; the scan
    costs one fcntl per possible fd, and only there.
    """
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            listed = os.listdir(fd_dir)  # its own fd is in the list, and closed by now: _is_open() drops it
        except OSError:
            continue
        return sorted(fd for fd in map(int, listed) if _is_open(fd))
    return [fd for fd in range(_fd_limit()) if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        os.get_inheritable(fd)  # fcntl(F_GETFD), which fails only on an fd that is not open (EBADF)
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


def _close_on_exec(fds: Iterable[int]) -> None:
    for fd in fds:
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
# A copying thread's stack: a few frames deep, where the default is 8 MiB of
# address space (it counts against RLIMIT_AS).
_RELAY_STACK = 256 * 1024
_SIOCATMARK = 0x40047307 if sys.platform == "darwin" else 0x8905  # <sys/sockio.h>, <asm/sockios.h>


def _connect_to_own_listener(listener: socket.socket) -> tuple[socket.socket, str]:
    """Start a connect to `listener`, without waiting for it: the socket, and where it goes.

    A loopback connect completes at once from a free backlog; from a full
    one (clients queued before the wake) the kernel drops our SYN and
    retries it, and it completes once the program accepts. The helper waits
    for that (_finish_connect), so the loader's exec is never delayed.
    """
    # Its address, with a wildcard made loopback; IPv6 adds the flow info and the scope id.
    host, port, *rest = listener.getsockname()
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    # A dual-stack wildcard where ::1 is missing (IPv6 disabled on lo) still takes IPv4 loopback.
    fallback = [(socket.AF_INET, ("127.0.0.1", port))] if host == "::1" else []
    for target_family, target in [(listener.family, (host, port, *rest)), *fallback]:
        sock = socket.socket(target_family, socket.SOCK_STREAM)  # close-on-exec (PEP 446)
        sock.setblocking(False)
        code = sock.connect_ex(target)  # an immediate failure (no route, refused) shows here
        if code in (0, errno.EINPROGRESS):
            return sock, _peer_text(target)
        sock.close()
    raise OSError(code, os.strerror(code))  # the last target's


def _start_relay(client: _HeldClient, log: _Log) -> None:
    """Start the connect to the program's listener and fork the helper that relays; OSError if it cannot.

    The helper has its own copies of both sockets; ours are close-on-exec
    (PEP 446), so the program, which execs next, never holds either.
    """
    upstream, target = _connect_to_own_listener(client.listener.sock)
    helper = _fork_relay_helper(client.sock, upstream)
    log.info("Relaying the held TCP client %s to %s through helper pid %d", client.peer, target, helper)


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
    # Carries the helper's pid. Close-on-exec (PEP 446): the exec that follows closes the read end.
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
        if middle == 0:
            _in_child(lambda: _middle_child(write_end, client, upstream))
    finally:
        os.close(write_end)
    text = os.read(read_end, 32)  # EOF once the middle child has exited, pid or not
    try:
        os.waitpid(middle, 0)  # no zombie left for the program to inherit
    except ChildProcessError:
        pass  # reaped by the kernel already (SIGCHLD ignored)
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


def _middle_child(write_end: int, client: socket.socket, upstream: socket.socket) -> None:
    helper = os.fork()
    if helper == 0:
        _in_child(lambda: _relay_helper(client, upstream))
    os.write(write_end, b"%d" % helper)


def _relay_helper(client: socket.socket, upstream: socket.socket) -> None:
    """The helper's whole life: its two sockets, stop signals ignored, bytes both ways."""
    for fd in set(_open_fds()) - {client.fileno(), upstream.fileno()}:
        # No fd but its two sockets: never a listener (the port must free
        # when the program exits), never the loader's stderr pipe.
        os.close(fd)
    # A stop signal sent to the whole process group (systemd's
    # KillMode=control-group, Ctrl-C) must not cut the relayed request: the
    # helper ends when its connection ends, so a program that finishes its
    # in-flight requests on SIGTERM finishes this one too. SIG_IGN, not a
    # handler: the helper never execs. SIGPIPE too: a write to a peer that
    # left fails with EPIPE instead (there is no MSG_NOSIGNAL on macOS).
    _set_signals([*_signals_named((*_STOP_SIGNALS, *_IGNORED_SIGNALS, "SIGPIPE")), *_realtime_signals()],
                 signal.SIG_IGN)
    try:
        _finish_connect(upstream)
    except OSError:
        # The program never took the connection (it exited, or the kernel
        # gave up retrying): the client sees a reset, never a hang.
        _close_with_reset(client)
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


def _relay_bytes(client: socket.socket, upstream: socket.socket) -> None:
    """Both directions at once, a thread each; then a reset on both sockets if either direction failed.

    A thread per direction, each blocked in its own calls, adds less to a
    round trip than one poll() loop serving both; the GIL is released in
    every blocking call, so the two run in parallel where it counts.
    """
    import threading  # the helper's alone: the loader itself never starts a thread

    for sock in (client, upstream):
        sock.setblocking(True)
        # The endpoints' writes are coalesced already, by their own Nagle or not: passed on at once,
        # or a small write that follows another waits out the peer's delayed ACK (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.stack_size(_RELAY_STACK)
    failed: list[bool] = []
    back = threading.Thread(target=_copy, args=(upstream, client, failed))
    back.start()
    _copy(client, upstream, failed)
    back.join()
    # The helper's end closes both sockets; if either direction failed, with a reset, passed on
    # after all that could be delivered was.
    if failed:
        for sock in (client, upstream):
            _close_with_reset(sock)


def _copy(source: socket.socket, sink: socket.socket, failed: list[bool]) -> None:
    """One direction, until the source's end of stream, passed on as a half-close (shutdown(SHUT_WR)).

    A reset ends this direction only: the other one goes on delivering what
    its side already sent (a 413 answered before the program reset an
    unread upload), and _relay_bytes passes the reset on once both ended.
    """
    buffer = bytearray(_RELAY_CHUNK)
    view = memoryview(buffer)
    # An urgent (MSG_OOB) byte stays in the stream, in its place (SO_OOBINLINE): none is lost or
    # doubled when a newer one overtakes it. poll() reports one as POLLPRI, which alone would not
    # wake a blocking recv(), and recv() stops at its mark.
    source.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    poller = select.poll()
    poller.register(source.fileno(), select.POLLIN | select.POLLPRI)
    while True:
        ready = poller.poll()[0][1]
        try:
            # Data, end of stream or an error: recv() says which. Urgent: the next byte to read is the
            # urgent one (sockatmark(3)).
            urgent = bool(ready & select.POLLPRI) and fcntl.ioctl(source.fileno(), _SIOCATMARK, bytes(4)) != bytes(4)
            size = source.recv_into(buffer, 1 if urgent else 0)
        except OSError:
            # Nothing more comes from the source, and nothing can reach it:
            # the other direction, reading our sink, has nothing left to do.
            # shutdown(SHUT_RD) wakes it (what is queued stays readable on Linux).
            failed.append(True)
            try:
                sink.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # ENOTCONN: already reset, its reader has woken up by itself
            return
        try:
            if size == 0:
                sink.shutdown(socket.SHUT_WR)
                return
            if urgent:
                sink.send(view[:1], socket.MSG_OOB)  # passed on as urgent, after what came before it
            else:
                sink.sendall(view[:size])
        except OSError:
            failed.append(True)  # the other direction, reading the sink, meets its reset itself
            return


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
# SIG_IGN, also where our parent ignored them: execve resets handlers to the
# default, but keeps ignored signals ignored, and the program must start with
# the defaults.
_IGNORED_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGIO", "SIGPWR", "SIGVTALRM", "SIGPROF", "SIGXCPU")


def _signals_named(names: Iterable[str]) -> list[int]:
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def _realtime_signals() -> list[int]:
    low, high = getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1)
    return list(range(low, high + 1)) if low else []


def _set_signals(signums: Iterable[int], handler: signal._HANDLER) -> dict[int, signal._HANDLER]:
    """`handler` for each signal but those the C library reserves; the handlers they had."""
    previous = {}
    for signum in signums:
        try:
            previous[signum] = signal.signal(signum, handler)
        except (OSError, ValueError):
            pass  # a real-time signal the C library reserves for itself: not ours to set
    return previous


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
    _set_signals([*_signals_named(_IGNORED_SIGNALS), *_realtime_signals()], _ignore_signal)
    # A signal mask survives execve too: one that blocks SIGTERM would leave
    # the waiting loader unstoppable, and any blocked signal pending for the
    # program. Unblock every signal set above, as a Go program waiting on
    # signal.Notify does: a pending one is taken (and ignored) here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [*_signals_named(_STOP_SIGNALS + _IGNORED_SIGNALS),
                                                *_realtime_signals()])


def _exit_as_init(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _ignore_signal(signum: int, frame: object) -> None:
    """Catch and drop: an ignored disposition would outlive execve."""


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
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        raise LoaderError("%s: %s" % (_path_shown(path), _oserror_text(exc))) from None
    if not stat.S_ISREG(mode):
        problem = "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
    elif not os.access(path, os.X_OK):
        problem = "is not executable"
    else:
        problem = _exec_format_problem(path)
    if problem:
        raise LoaderError("%s %s" % (_path_shown(path), problem))


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
        name = os.fsdecode(_script_interpreter(head))
        if not name:
            return "starts with '#!' but names no interpreter"
        shown = _quoted(name, _PATH_SHOWN_MAX, quotes=False)
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
    name is the first word: it ends at a space, a tab or a NUL byte.
    """
    line = head[2:].split(b"\n", 1)[0].split(b"\0", 1)[0].replace(b"\t", b" ")
    return line.lstrip(b" ").split(b" ", 1)[0]


def _binfmt_misc_active() -> bool:
    """Linux may run other formats through binfmt_misc handlers; then we cannot judge."""
    try:
        return bool(set(os.listdir("/proc/sys/fs/binfmt_misc")) - {"register", "status"})
    except OSError:
        return False  # not Linux, or no /proc to tell: judge by the magic alone


class _Launch:
    """What to exec: the resolved path, argv as given, the base environment, the protocol."""

    def __init__(self, path: str, argv: list[str], env: dict[str, str], label: str,
                 protocol: _HandoffProtocol, *, inherited_fds: Iterable[int],
                 ready_fd: int = _NO_READY_FD) -> None:
        self.path = path
        self.argv = argv
        self.env = env
        self.label = label
        self.protocol = protocol
        self.inherited_fds = frozenset(inherited_fds)  # open when we started: not ours to close
        self.ready_fd = ready_fd  # _NO_READY_FD: none, or readiness announced already

    def scrubbed_env(self) -> dict[str, str]:
        """The environment of any exec: the base one less the variables the protocol scrubs."""
        return {name: value for name, value in self.env.items() if name not in self.protocol.scrubbed_vars}


def _exec_program(launch: _Launch, env: dict[str, str], log: _Log) -> NoReturn:
    log.info("Starting %s...", launch.label)
    if log.enabled("trace"):
        log.trace("Starting %s with env: %s", launch.label, _env_shown(env))
    _reset_signals_for_exec()
    try:
        os.execve(launch.path, launch.argv, env)
    except (OSError, ValueError) as exc:
        # Back to ignoring SIGPIPE so this last line cannot kill us instead.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        log.error("Failed to start %s with args %s: %s", launch.label,
                  _quoted(" ".join(launch.argv), 300), _oserror_text(exc))
        sys.exit(1)


def _fail_open(launch: _Launch, log: _Log, client: _HeldClient | None = None) -> NoReturn:
    """Fail open: the program, unchanged environment, none of our fds.

    Safe at any point, even halfway through a hand-off: every fd that was
    not open when we started is made close-on-exec, and a held client is
    reset (its peer sees a reset, never a hang). Readiness is announced if
    it was not yet: the program is starting, and the trace-agent speaks
    neither protocol itself.
    """
    if client is not None:
        _close_with_reset(client.sock)
    _announce_ready(launch, log)
    _close_on_exec(fd for fd in _open_fds() if fd > 2 and fd not in launch.inherited_fds)
    _exec_program(launch, launch.scrubbed_env(), log)


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


def _exec_with_handoff(launch: _Launch, listeners: list[_Listener], client: _HeldClient | None, held_client: str,
                       log: _Log) -> NoReturn:
    if client is not None and held_client == _HELD_RELAY:
        try:
            _start_relay(client, log)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a fork refused by the interpreter
            # The program starts all the same; only this one client is lost.
            log.warn("Cannot relay the held TCP client %s (%s); closing it and starting %s without it",
                     client.peer, _oserror_text(exc), launch.label)
            _close_with_reset(client.sock)
        client = None
    env = launch.scrubbed_env()
    try:
        fds = launch.protocol.hand_over(env, listeners, client, launch.inherited_fds)
    except _HandoffError as exc:
        log.warn("Failed to hand the sockets over to %s: %s", launch.label, exc)
        _fail_open(launch, log, client)
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
#   bytecode run as a script from source (`python3 trace_loader.py`),
#            execve the same interpreter on this module's bytecode, first of
#            all: the syntax tree CPython keeps until a script ends and the
#            allocator arenas compiling left behind (~7 MB) are never there;
#            the pid, argv, environment and fds stay. See the top of the file.
#   trim     malloc_trim(0): hand freed heap pages back to the kernel.
#   pageout  madvise(MADV_PAGEOUT) on read-only file-backed mappings (the
#            interpreter's and libraries' code): the kernel may reclaim them;
#            the few the wait loop touches come back as page faults.
#
# TRACE_LOADER_RELEASE_MEMORY=none (or a comma list) selects steps, for
# measuring them; the default is all of them.
# ---------------------------------------------------------------------------

_MADV_PAGEOUT = 21  # linux/mman.h, since Linux 5.4
_MADVISE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM})
# Not files ("[heap]", "[vdso]"), and system libraries (libc, the dynamic linker): those are what the
# agent maps first after execve, and other processes share them anyway.
_KEPT_MAPPINGS = ("[", "/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")


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
        if len(fields) < 6 or "w" in fields[1] or fields[5].startswith(_KEPT_MAPPINGS):
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
_MAX_SAMPLE_INTERVAL = 5.0
_NEVER = float("inf")  # an idle time or a stop that has not begun


def _start_and_supervise(launch: _Launch, listeners: list[_Listener], client: _HeldClient | None,
                         activation: _Activation, log: _Log) -> int | None:
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
    # Caught before the fork: a SIGCHLD our parent set to ignored would have the kernel reap the program
    # and lose its status. Any other signal ignored (SIGINT, SIGHUP) stays so, for us and the program.
    previous = _set_signals([signum for signum in caught if signum == signal.SIGCHLD
                             or signal.getsignal(signum) is not signal.SIG_IGN], _ignore_signal)
    siblings = _children()  # ours before the program: never what it left behind
    try:
        # signal.set_wakeup_fd: the C handler writes each signal's number into the pipe, and poll()
        # wakes on it; the Python handler does nothing. Made before the fork: after it, nothing may fail.
        read_end, write_end = os.pipe()  # close-on-exec (PEP 446)
        pid = os.fork()
    except OSError as exc:  # EMFILE, EAGAIN, ENOMEM
        log.warn("Cannot fork (%s); starting %s in place, never stopped", _oserror_text(exc), launch.label)
        pid = 0  # as the child would: the hand-off and execve, in place
    if pid == 0:
        _restore_signals(previous, mask)
        _exec_with_handoff(launch, listeners, client, activation.held_client, log)
    if client is not None:
        client.sock.close()  # the program's now, or the relay helper's
    try:
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        # Unblocked even where the mask we inherited blocks them: the loop would never wake for them.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, caught)
        status = _supervise(pid, read_end, listeners, activation, launch.label, log, siblings)
    except Exception as exc:  # noqa: BLE001 -- main()'s last resort would start the program a second time
        log.critical("Internal error while supervising %s (%s: %s); waiting for it to end", launch.label,
                     type(exc).__name__, exc)
        _set_signals([signum for signum in caught if signum != signal.SIGCHLD], lambda signum, _: os.kill(pid, signum))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, caught)
        try:
            status = _status_of(os.waitpid(pid, 0)[1])
        except ChildProcessError:  # reaped before the error: its status is lost
            status = 1
    # Blocked again while the waiting handlers come back: a signal caught
    # until now is in the pipe, a later one waits for them.
    signal.pthread_sigmask(signal.SIG_BLOCK, caught)
    signal.set_wakeup_fd(-1)
    late = [signum for signum in _read_signals(read_end) if signum in _signals_named(_STOP_SIGNALS)]
    os.close(read_end)
    os.close(write_end)
    _restore_signals(previous, mask)
    return -late[0] if status is None and late else status


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
               log: _Log, siblings: set[int]) -> int | None:
    """The loop: forward signals, reap, sample idleness, stop. As _start_and_supervise returns.

    A stop sends SIGTERM, then SIGKILL after the stop timeout: to the
    program, then, once it is reaped, to what it left running, until
    nothing is left.
    """
    idle_for, usage = activation.stop_when_idle, _Usage(listeners)
    # Idleness begins at most one interval before the first idle sample, so SIGTERM comes at most that late.
    interval = min(_MAX_SAMPLE_INTERVAL, idle_for * 0.1)
    poller = select.poll()
    poller.register(signals, select.POLLIN)
    started = time.monotonic()
    next_step: float | None = started + interval  # the next sample, or the SIGKILL once stopping
    idle_since = stopping_since = _NEVER
    stop_signal, stop_with = 0, signal.SIGTERM
    status: int | None = None  # the program's end, once reaped during an idle stop
    signalled: set[int] = set()  # what got `stop_with` already
    while True:
        poller.poll(_ms_until(next_step))
        for signum in _read_signals(signals):
            if signum != signal.SIGCHLD and status is None:
                os.kill(pid, signum)  # never fails: the program is our child, a zombie at worst
            # Not lost: after an idle stop the loader ends instead of waiting again. SIGHUP
            # only during the stop: while the program runs, many take it to reload.
            if signum in (signal.SIGTERM, signal.SIGINT) or (stopping_since < _NEVER and signum == signal.SIGHUP):
                stop_signal = signum
        ended, now = _reap_children(pid), time.monotonic()
        if ended is not None and stopping_since == _NEVER:
            log.info("%s ended (%s); the loader ends the same way", label, _status_text(ended))
            return ended
        if ended is not None:
            status = ended
            log.info("Stopped %s in %.1f s (%s)", label, now - stopping_since, _status_text(status))
        if stopping_since == _NEVER and next_step is not None and now >= next_step:
            busy = usage.count()
            if busy is None and not usage.failed:  # never stopped on a count we could not make
                log.warn("Cannot count the connections of %s (no socket diagnostics, no /proc/net, or no fd "
                         "left); it is not stopped while they cannot be counted", label)
            usage.failed = usage.failed or busy is None
            log.debug("Sockets of %s in use: %s (connections and waiting clients)", label, busy)
            idle_since = min(idle_since, now) if busy == 0 else _NEVER
            next_step = min(now + interval, idle_since + idle_for)
            if now >= idle_since + idle_for:
                log.info("Stopping %s: its sockets were idle for %d s (it ran %d s)", label, idle_for, now - started)
                stopping_since, next_step = now, now + activation.stop_timeout
        elif next_step is not None and now >= next_step:
            log.warn("%s still runs %d s after SIGTERM: SIGKILL", label if status is None else "What %s left" % label,
                     activation.stop_timeout)
            # From now on, what dies wakes us (SIGCHLD), and what the program left is ours by then.
            stop_with, signalled, next_step = signal.SIGKILL, set(), None
        if stopping_since < _NEVER:
            # What it started and left to us (a wrapper's server, a worker) would keep serving on the
            # listeners: stopped too, the same way. Checked on every turn: orphans keep coming to us.
            targets = {pid} if status is None else _children() - siblings
            if not targets:
                return -stop_signal if stop_signal else None
            for child in targets - signalled:
                os.kill(child, stop_with)  # never fails: our child, a zombie at worst
            signalled |= targets


def _children() -> set[int]:
    """The loader's children in its own process group (so never one another session sent us, as PID 1)."""
    try:
        with open("/proc/self/task/%d/children" % os.getpid(), "rb") as children:  # Linux 3.5
            pids = [int(pid) for pid in children.read().split()]
    except OSError:  # no /proc: what the program left keeps running
        return set()
    group = os.getpgrp()
    return {pid for pid in pids if _group_of(pid) == group}


def _group_of(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:  # reaped meanwhile (by the SIGCHLD handler of the wait)
        return -1


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
            found = _status_of(status)


def _status_of(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _status_text(status: int) -> str:
    return "killed by signal %d" % -status if status < 0 else "exit status %d" % status


def _end_like(status: int) -> int:
    """The loader's own end for the program's (-N: killed by signal N): where it can, by the same signal."""
    if status >= 0:
        return status
    if os.getpid() != 1:  # as PID 1 the kernel drops it: 128+N below
        import resource

        # A core-dumping signal (SEGV, ABRT, QUIT...) would dump our core over the program's: no room for one.
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        try:
            if -status != signal.SIGKILL:  # whose action cannot be changed, and is the default
                signal.signal(-status, signal.SIG_DFL)
        except (OSError, ValueError):  # a real-time signal the C library reserves for itself: 128+N
            return 128 - status
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-status])
        os.kill(os.getpid(), -status)  # the program was killed by it: it ends us too
    return 128 - status


class _Usage:
    """What still uses the listeners: connections the program holds, and clients in a backlog."""

    def __init__(self, listeners: list[_Listener]) -> None:
        self.ports: dict[int, set[int]] = {}  # TCP ports by address family
        self.names: set[bytes] = set()  # unix paths; an abstract name starts with NUL
        self.poller = select.poll()
        self.failed = False  # a count failed once: warned
        for listener in listeners:
            sock, address = listener.sock, listener.sock.getsockname()
            self.poller.register(sock.fileno(), select.POLLIN)
            if sock.family == socket.AF_UNIX and address:
                self.names.add(os.fsencode(address) if isinstance(address, str) else address)
            elif sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                self.ports.setdefault(sock.family, set()).add(address[1])

    def count(self) -> int | None:
        """None where it cannot be counted (neither socket diagnostics nor /proc/net: macOS; no fd left)."""
        # A client in a backlog makes its listener readable.
        waiting = len(self.poller.poll(0))
        for counter in (self.count_with_sock_diag, self.count_in_proc_net):
            try:
                return waiting + counter()
            except (AttributeError, OSError, ValueError, IndexError):
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
        # sl local_address rem_address st ...: "0100007F:1F90", the port and the state in hex.
        count = sum(int(row[3], 16) in _HELD_TCP_STATES and int(row[1].rpartition(b":")[2], 16) in ports
                    for family, ports in self.ports.items()
                    for row in _proc_net_rows("tcp6" if family == socket.AF_INET6 else "tcp", 4))
        # Num RefCount Protocol Flags Type St Inode Path: St 03 is connected; an abstract
        # name is shown with '@' for each NUL.
        shown = {name.replace(b"\0", b"@") for name in self.names}
        rows = _proc_net_rows("unix", 7) if shown else iter(())
        return count + sum(len(row) == 8 and row[5] == b"03" and row[7] in shown for row in rows)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)


def _sock_diag(request: bytes) -> Iterator[bytes]:
    """The messages a NETLINK_SOCK_DIAG dump answers to `request`."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        # nlmsghdr: length, type, flags, sequence, port id (0: the kernel)
        header = _u32(16 + len(request)) + _SOCK_DIAG_BY_FAMILY.to_bytes(2, sys.byteorder) \
            + _NLM_F_DUMP_REQUEST.to_bytes(2, sys.byteorder) + _u32(1) + _u32(0)
        sock.send(header + request)
        while True:
            data, pos = sock.recv(65536), 0  # the kernel fills at most 32 KB per read
            while pos < len(data):
                length = int.from_bytes(data[pos:pos + 4], sys.byteorder)
                kind = int.from_bytes(data[pos + 4:pos + 6], sys.byteorder)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:  # nlmsgerr: a negative errno
                    code = -int.from_bytes(data[pos + 16:pos + 20], sys.byteorder, signed=True)
                    raise OSError(code, os.strerror(code))
                yield data[pos + 16:pos + length]
                pos += (length + 3) & ~3  # NLMSG_ALIGN


def _unix_diag_name(message: bytes) -> bytes:
    """UNIX_DIAG_NAME (b"" if unnamed); the kernel counts the path's NUL too.

    The kernel puts it first of the attributes after the 16-byte
    unix_diag_msg; the one that follows it (UNIX_DIAG_SHUTDOWN) it always adds.
    """
    length, kind = (int.from_bytes(message[i:i + 2], sys.byteorder) for i in (16, 18))
    name = message[20:16 + length] if kind == 0 else b""
    return name if name[:1] == b"\0" else name.rstrip(b"\0")


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

    def __init__(self, *, probe_check: bool, probe_listener_name: str = "", grace_ms: int, hold_timeout_ms: int,
                 held_client: str, stop_when_idle: int = 0, stop_timeout: int = _DEFAULT_STOP_TIMEOUT) -> None:
        self.probe_check = probe_check  # the probe check is on
        self.probe_listener_name = probe_listener_name  # the listener it may watch ("": the first TCP one)
        self.grace_ms = grace_ms
        self.hold_timeout_ms = hold_timeout_ms
        self.held_client = held_client  # _HELD_FD or _HELD_RELAY
        self.stop_when_idle = stop_when_idle  # seconds; 0: exec in place, never stop
        self.stop_timeout = stop_timeout


def _announce_ready(launch: _Launch, log: _Log) -> None:
    """Tell the supervisor we are ready: READY=1 to $NOTIFY_SOCKET, a newline on the ready fd; once.

    Once every listener listens, or just before the program starts when the
    loader fails open. Both are used up here, so the program inherits
    neither. Whatever the supervisor's end does (gone, refusing, full, a fd
    that is not open), it costs one warning: the start goes on.
    """
    address, ready_fd, launch.ready_fd = launch.env.pop("NOTIFY_SOCKET", ""), launch.ready_fd, _NO_READY_FD
    if address:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
                # MSG_DONTWAIT: a supervisor whose receive queue is full must not block us for ever.
                # sd_notify(3): a leading '@' names the abstract namespace (a NUL in sun_path).
                notify.sendto(b"READY=1", socket.MSG_DONTWAIT,
                              "\0" + address[1:] if address.startswith("@") else address)
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN, EMFILE, anything else alike
            log.warn("Cannot send READY=1 to NOTIFY_SOCKET %s: %s", _path_shown(address), _oserror_text(exc))
    if ready_fd != _NO_READY_FD:
        try:
            _use_ready_fd(ready_fd, launch)
        except OSError as exc:  # EPIPE (the supervisor is gone), EBADF (opened read-only), anything else alike
            log.warn("Cannot write the readiness newline to fd %d: %s", ready_fd, _oserror_text(exc))


def _use_ready_fd(fd: int, launch: _Launch) -> None:
    """Write the newline to `fd` and close it, so that the program never inherits it."""
    # Only a fd open when we started: any other number is one of ours (a
    # listener, the log file) or none at all.
    if fd not in launch.inherited_fds:
        raise OSError(errno.EBADF, "not open when the loader started")
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        # First: written or not, the program never inherits it (a socket may be a listener it is handed).
        os.set_inheritable(fd, False)
    # A zero-timeout poll first: write() to a full pipe that nobody reads would block the loader for ever.
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if poller.poll(0) != [(fd, select.POLLOUT)]:
        raise OSError(errno.EAGAIN, "not writable (read-only, or full)")
    os.write(fd, b"\n")
    os.close(fd)
    launch.inherited_fds -= {fd}  # its number may come back as one of ours: never to pass through


def _run_activation(launch: _Launch, specs: list[_ListenerSpec], activation: _Activation, log: _Log) -> int:
    try:
        _refuse_closed_std_fds()
        listeners = _open_listeners(specs, log)
    except (LoaderError, OSError) as exc:  # OSError: EMFILE or ENOBUFS at socket(), say
        log.warn("Failed to get listeners for %s: %s", launch.label, _oserror_text(exc))
        _fail_open(launch, log)
    if not listeners:
        log.info("All %s inputs are disabled, stopping...", launch.label)
        return 0
    for listener in listeners:
        spec = listener.spec
        named = spec.handoff_name if spec.kind != _INHERITED and spec.handoff_name else spec.shown_as
        log.debug("%s file descriptor is %d", named, listener.fd)
    _announce_ready(launch, log)
    probe_listener = _choose_probe_listener(listeners, enabled=activation.probe_check,
                                            only=activation.probe_listener_name)
    files = _socket_files(listeners)
    if activation.stop_when_idle:
        # Orphans reparented to us (a subreaper, or PID 1) that end while we wait: reaped at once, no
        # zombie. PEP 475 retries the wait's poll() after the handler; execve resets it for the program.
        signal.signal(signal.SIGCHLD, lambda signum, frame: _reap_children(0))
    while True:  # wait, hand off; with a stop-when-idle time: supervise, wait again
        for path, _ in set(_socket_files(listeners).items()) - set(files.items()):  # a program may delete it
            log.warn("%s no longer names the unix socket the loader listens on: no client can reach it",
                     _path_shown(path))
        _release_memory(_memory_steps(launch.env), log)
        waiter = _Waiter(listeners, probe_listener, grace_ms=activation.grace_ms if probe_listener else 0,
                         hold_timeout_ms=activation.hold_timeout_ms, log=log, program_label=launch.label)
        began = time.monotonic()
        reason = waiter.run()
        fin, rst = waiter.probes[_FIN], waiter.probes[_RST]
        log.info("Waking %s: %s; %d probe%s absorbed since start (FIN: %d, RST: %d); waited %d s",
                 launch.label, reason, fin + rst, "" if fin + rst == 1 else "s", fin, rst,
                 time.monotonic() - began)
        if not activation.stop_when_idle:
            _exec_with_handoff(launch, listeners, waiter.held, activation.held_client, log)
        status = _start_and_supervise(launch, listeners, waiter.held, activation, log)
        if status is not None:
            return _end_like(status)


def _socket_files(listeners: list[_Listener]) -> dict[str, tuple[int, ...]]:
    """The file (st_ino, st_dev; (): none) that each unix listener's path names now."""
    found = {}
    for listener in listeners:
        path = listener.sock.getsockname() if listener.sock.family == socket.AF_UNIX else ""
        if path and isinstance(path, str):  # neither unnamed nor abstract (bytes)
            try:
                found[path] = tuple(os.stat(path)[1:3])
            except OSError:
                found[path] = ()
    return found


def _program_label(name: str) -> str:
    return _quoted(os.path.basename(name) or name, quotes=False)


# ---------------------------------------------------------------------------
# Front door 1: drop-in for the Go trace-loader.
# ---------------------------------------------------------------------------

def _drop_in_specs(settings: _DropInSettings, log: _Log) -> list[_ListenerSpec]:
    if settings.bind_host_reason.startswith("containerized"):
        log.info("Activating non-local traffic automatically in containerized environment, "
                 "trace-agent will listen on 0.0.0.0")
    candidates = (
        (settings.receiver_port > 0, _ListenerSpec(RECEIVER_FD_VAR, _TCP, host=settings.bind_host,
                                                   port=settings.receiver_port, shown_as="TCP receiver")),
        (settings.receiver_socket != "", _ListenerSpec(UNIX_FD_VAR, _UNIX, path=settings.receiver_socket, mode=0o722,
                                                       shown_as="unix receiver")),
        (settings.otlp_enabled, _ListenerSpec(OTLP_FD_VAR, _TCP, host=settings.bind_host, port=settings.otlp_port,
                                              shown_as="OTLP receiver")),
    )
    for enabled, spec in candidates:
        if not enabled:
            log.info("Trace-agent %s is disabled", spec.shown_as)
    return [spec for enabled, spec in candidates if enabled]


def _run_drop_in(config_path: str, program: list[str], environ: Mapping[str, str], log: _Log,
                 inherited_fds: list[int]) -> int:
    try:
        path = _find_program(program[0], environ)
    except LoaderError as exc:
        log.critical("Cannot start the trace-agent: %s", exc)
        return 1
    # Until the configuration is read, the ready fd is what its variable says, if anything.
    ready_fd = _decimal(environ.get("DD_APM_SOCKET_ACTIVATION_READY_FD", ""), _MAX_FD) or _NO_READY_FD
    launch = _Launch(path, program, dict(environ), "the trace-agent", _EnvProtocol(_DROP_IN_FD_VARS, CLIENT_FD_VAR),
                     inherited_fds=inherited_fds, ready_fd=ready_fd if ready_fd >= _MIN_READY_FD else _NO_READY_FD)
    try:
        settings = _load_drop_in_settings(config_path, environ, log)
    except _ConfigError as exc:
        log.warn("Failed to load the configuration: %s", exc)
        _fail_open(launch, log)
    launch.ready_fd = settings.ready_fd
    log.configure(level=settings.log_level, console=settings.log_to_console, path=settings.log_file)
    if not settings.apm_enabled and not settings.error_tracking:
        log.info("Trace-agent is disabled, stopping...")
        return 0
    if not settings.socket_activation:
        log.info("Socket-activation for the trace-agent is disabled, running the trace-agent directly...")
        _fail_open(launch, log)
    return _run_activation(launch, _drop_in_specs(settings, log), settings.activation, log)


# ---------------------------------------------------------------------------
# Front door 2: generic mode, for any server (argparse is imported only here).
# ---------------------------------------------------------------------------

_FDNAME_MAX = 255


def _valid_fdname(name: str) -> bool:
    # sd_listen_fds_with_names(3): printable ASCII, no ':' (the separator).
    return 0 < len(name) <= _FDNAME_MAX and name.isascii() and name.isprintable() and ":" not in name


def _valid_env_name(name: str) -> bool:
    return name.isascii() and name.isidentifier()  # ASCII: [A-Za-z_][A-Za-z0-9_]*


def _parse_listen(value: str, index: int) -> _ListenerSpec:
    """`[NAME=]tcp://HOST:PORT | tcp://[V6]:PORT | unix:///PATH[?mode=0660] | systemd:[FDNAME]`.

    A ValueError says what is wrong with it; the caller names the value.
    """
    name, address = _split_listen_name(value)
    if address.startswith("tcp://"):
        host, port = _parse_host_port(address[len("tcp://"):])
        return _ListenerSpec(name, _TCP, host=host, port=port, shown_as=name or "TCP listener %d" % index)
    if address.startswith("unix://"):
        path, _, query = address[len("unix://"):].partition("?")
        if not path.startswith("/") and not path.startswith("@"):
            raise ValueError("a unix address needs an absolute path (unix:///run/app.sock)")
        mode = 0o666  # systemd's SocketMode default
        if query:
            key, _, text = query.partition("=")
            try:
                mode = int(text, 8) if key == "mode" else -1
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise ValueError("expected ?mode=OCTAL (e.g. ?mode=0660)")
        return _ListenerSpec(name, _UNIX, path=path, mode=mode, shown_as=name or "unix listener %d" % index)
    if address.startswith("systemd:"):
        return _ListenerSpec(name, _INHERITED, systemd_name=address[len("systemd:"):], shown_as=address)
    raise ValueError("expected tcp://HOST:PORT, tcp://[V6]:PORT, unix:///PATH or systemd:[FDNAME]")


def _split_listen_name(value: str) -> tuple[str, str]:
    """`[NAME=]ADDRESS` as (NAME, ADDRESS): an '=' inside the address (unix's ?mode=) names nothing."""
    name, sep, address = value.partition("=")
    if not sep or "://" in name or name.startswith("systemd:"):
        return "", value
    return name, address


def _ready_fd(text: str) -> int:
    fd = _decimal(text, _MAX_FD)
    if fd is None or fd < _MIN_READY_FD:
        raise ValueError("argument --ready-fd: %s is not %s" % (_quoted(text), _READY_FD))
    return fd


def _parse_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets (tcp://[::1]:8080)")
    # Port 0 asks the kernel for a free port; the log line names the one it chose.
    port = _decimal(port_text, 65535)
    if port is None:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, port


def _number(option: str, text: str, high: int, unit: str, note: str = "") -> int:
    """`text` as a count of `unit` from 0 to `high`, or a ValueError naming the option."""
    value = _decimal(text, high)
    if value is None:
        raise ValueError("argument %s: %s: expected %s from 0 to %d%s" % (option, _quoted(text), unit, high, note))
    return value


def _one_of(option: str, text: str, names: tuple[str, ...]) -> str:
    """`text` in any case, as one of `names`: argparse's own `choices` would echo a value of any length in full."""
    if text.lower() not in names:
        raise ValueError("argument %s: %s is not one of %s" % (option, _quoted(text), ", ".join(names)))
    return text.lower()


def _generic_parser() -> argparse.ArgumentParser:
    """The command line's parser; its values are strings, converted by _check_generic_options."""
    import argparse

    class Parser(argparse.ArgumentParser):
        # Through _say: CPython 3.8-3.10 let a failed write to a closed or
        # full stream escape, and help or a usage error would become an
        # internal error.
        def print_help(self, file: object = None) -> None:
            _say(file or sys.stdout, self.format_help())

        def error(self, message: str) -> NoReturn:
            _say(sys.stderr, "%s%s: error: %s\n" % (self.format_usage(), self.prog, message))
            raise SystemExit(2)

    parser = Parser(
        prog="trace_loader.py",
        usage="%(prog)s CONFIG_FILE AGENT [AGENT_ARGS...]\n"
              "       %(prog)s [OPTIONS] -- PROGRAM [ARGS...]\n"
              "       %(prog)s --help | --version",
        description="Hold PROGRAM's sockets and exec it on the first real traffic (generic mode). "
                    "With CONFIG_FILE AGENT instead, drop-in mode for the Datadog trace-loader: the sockets "
                    "and settings come from datadog.yaml and the DD_* environment.",
        allow_abbrev=False,  # an option is spelt out, never guessed from a prefix
    )
    parser.add_argument("--listen", action="append", default=[], metavar="[NAME=]ADDRESS",
                        help="tcp://HOST:PORT, tcp://[V6]:PORT, unix:///PATH[?mode=0660], or systemd:[FDNAME] "
                             "to adopt sockets this process inherited from systemd (repeatable; required)")
    parser.add_argument("--protocol", default="systemd", metavar="{systemd,env}",
                        help="hand-off: systemd's LISTEN_FDS (default) or one variable per fd (NAME=)")
    parser.add_argument("--handle-tcp-probe", action="store_true",
                        help="absorb TCP probes (connect, then close) on the first TCP listener")
    parser.add_argument("--held-client", default=_HELD_RELAY, metavar="{%s}" % ",".join(_HELD_CLIENT_WAYS[::-1]),
                        help="how the first real client reaches PROGRAM: relayed into its listener by a helper "
                             "process (default; any server), or as an inherited fd (a server written for it)")
    parser.add_argument("--client-fd-var", default="", metavar="VAR",
                        help="with --held-client fd under --protocol env: the variable that carries the client")
    parser.add_argument("--hold-timeout", default=str(_GENERIC_HOLD_TIMEOUT_MS), metavar="MS",
                        help="wake PROGRAM when a held client stays silent this long, for protocols where the "
                             "server speaks first (default 1000, 0: no limit)")
    parser.add_argument("--stop-when-idle", default="0", metavar="SECONDS",
                        help="stop PROGRAM once no client has used its sockets this long, then wait again "
                             "(default 0: never)")
    parser.add_argument("--stop-timeout", default=str(_DEFAULT_STOP_TIMEOUT), metavar="SECONDS",
                        help="SIGKILL a stopped PROGRAM still running this long after SIGTERM (default 30)")
    parser.add_argument("--probe-grace-period", default=str(_DEFAULT_PROBE_GRACE_MS), metavar="MS",
                        help="how long a held silent client may delay a second one (default 250, 0: none)")
    parser.add_argument("--ready-fd", metavar="N",
                        help="once listening, write a newline to fd N and close it (s6's notification-fd)")
    parser.add_argument("--log-level", default="info", metavar="LEVEL",
                        help="trace, debug, info, warn, error, critical or off")
    return parser


def _run_generic(options: list[str], program: list[str], environ: Mapping[str, str], log: _Log,
                 inherited_fds: list[int]) -> int:
    parser = _generic_parser()
    args, unknown = parser.parse_known_args(options)
    try:
        _check_generic_options(args, unknown, program)
    except ValueError as exc:
        parser.error(str(exc))
    log.configure(level=args.log_level, console=True, path=None)
    label = _program_label(program[0])
    try:
        path = _find_program(program[0], environ)
    except LoaderError as exc:
        log.critical("Cannot start %s: %s", label, exc)
        return 1
    for_us = environ.get("LISTEN_PID", "") == str(os.getpid())
    launch = _Launch(path, program, dict(environ), label, _generic_protocol(args, for_us, []),
                     inherited_fds=inherited_fds, ready_fd=args.ready_fd)
    try:
        specs, unselected = _expand_inherited(args.listen, environ, one_each=args.protocol == "env")
    except _ListenerError as exc:
        log.warn("Failed to get listeners for %s: %s", label, exc)
        _fail_open(launch, log)
    launch.protocol = _generic_protocol(args, for_us, unselected)
    return _run_activation(launch, specs, args.activation, log)


def _generic_protocol(args: argparse.Namespace, for_us: bool, unselected: list[int]) -> _HandoffProtocol:
    if args.protocol == "systemd":
        return _SystemdProtocol(inherited_for_us=for_us)
    # LISTEN_* meant for another process are stale here: always dropped. Ours
    # stay true until the hand-off describes the same sockets by NAME instead.
    # Each --listen NAME is dropped on every path, fail open included: one
    # inherited from our parent would name an fd nobody handed the program.
    # A --client-fd-var is set only with --held-client fd (_check_generic_options).
    return _EnvProtocol(_env_handoff_vars(args) + ([] if for_us else list(_SYSTEMD_VARS)), args.client_fd_var,
                        replaced_vars=_SYSTEMD_VARS if for_us else (), unselected_fds=unselected)


def _env_handoff_vars(args: argparse.Namespace) -> list[str]:
    """The variables --listen NAME= and --client-fd-var name under --protocol env (none under systemd's).

    Reads the options as parsed or as converted: the last-resort exec has only the former.
    """
    if str(args.protocol).lower() != "env":
        return []
    return [_split_listen_name(value)[0] if isinstance(value, str) else value.handoff_name
            for value in args.listen] + ([args.client_fd_var] if args.client_fd_var else [])


def _check_generic_options(args: argparse.Namespace, unknown: list[str], program: list[str]) -> None:
    """Convert the options in place (those of the wait into args.activation) and check them together.

    A ValueError names the first at fault.
    """
    # In this order, so that a misspelt option is named as such, and not
    # reported as a missing --listen.
    if unknown:
        raise ValueError("unrecognized arguments: %s" % " ".join(_quoted(word, 40) for word in unknown))
    if not args.listen:
        raise ValueError("the following arguments are required: --listen")
    for index, value in enumerate(args.listen):
        try:
            args.listen[index] = _parse_listen(value, index + 1)
        except ValueError as exc:
            raise ValueError("argument --listen: %s: %s" % (_quoted(value), exc)) from None
    protocol = args.protocol = _one_of("--protocol", args.protocol, ("systemd", "env"))
    args.held_client = _one_of("--held-client", args.held_client, _HELD_CLIENT_WAYS[::-1])
    args.activation = _Activation(
        probe_check=args.handle_tcp_probe, held_client=args.held_client,
        hold_timeout_ms=_number("--hold-timeout", args.hold_timeout, _MAX_HOLD_TIMEOUT_MS, "milliseconds",
                                " (0: no limit)"),
        grace_ms=_number("--probe-grace-period", args.probe_grace_period, _MAX_PROBE_GRACE_MS, "milliseconds"),
        stop_when_idle=_number("--stop-when-idle", args.stop_when_idle, _MAX_STOP_SECONDS, "seconds"),
        stop_timeout=_number("--stop-timeout", args.stop_timeout, _MAX_STOP_SECONDS, "seconds"))
    args.log_level = _one_of("--log-level", args.log_level, tuple(_LEVELS))
    args.ready_fd = _NO_READY_FD if args.ready_fd is None else _ready_fd(args.ready_fd)
    if not program:
        raise ValueError("expected '-- PROGRAM [ARGS...]' after the options")
    for spec in args.listen:
        if protocol == "env" and not _valid_env_name(spec.handoff_name):
            raise ValueError("argument --listen: %s needs NAME= (the variable that carries its fd) under "
                             "--protocol env" % _path_shown(spec.shown_as))
        if protocol == "systemd" and spec.handoff_name and not _valid_fdname(spec.handoff_name):
            raise ValueError("argument --listen: %s is not a valid fd name (printable ASCII, no ':')"
                             % _quoted(spec.handoff_name))
        if protocol == "systemd" and spec.handoff_name == "connection":
            raise ValueError("argument --listen: 'connection' is the held client's fd name, not a listener's")
        if protocol == "env" and [s.handoff_name for s in args.listen].count(spec.handoff_name) > 1:
            raise ValueError("argument --listen: %s is named twice; under --protocol env each NAME takes one "
                             "socket" % spec.handoff_name)
    client_var = args.client_fd_var
    if client_var and not _valid_env_name(client_var):
        raise ValueError("argument --client-fd-var: %s is not a valid variable name" % _quoted(client_var))
    if client_var and (protocol != "env" or args.held_client != _HELD_FD):
        raise ValueError("argument --client-fd-var: only used with --held-client fd under --protocol env")
    if protocol == "env" and args.handle_tcp_probe and args.held_client == _HELD_FD and not client_var:
        raise ValueError("--handle-tcp-probe --held-client fd with --protocol env needs --client-fd-var VAR for "
                         "the client")


def _inherited_fds(environ: Mapping[str, str]) -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(3): the (fd, name) pairs passed to this very process.

    The one reader of LISTEN_*, for `--listen systemd:` and for adopt(). Both
    ask because they expect sockets, so LISTEN_FDS=0 is an error like a
    missing LISTEN_PID, never an empty list.
    """
    pid_text = environ.get("LISTEN_PID", "")
    if pid_text != str(os.getpid()):
        raise _ListenerError("no sockets were passed to this process (LISTEN_PID is %s, our pid is %d)"
                             % (_quoted(pid_text), os.getpid()))
    count_text = environ.get("LISTEN_FDS", "")
    count = _decimal(count_text, _MAX_LISTEN_FDS)
    if not count:
        raise _ListenerError("LISTEN_FDS is %s; expected a count of sockets from 1 to %d"
                             % (_quoted(count_text), _MAX_LISTEN_FDS))
    names_text = environ.get("LISTEN_FDNAMES", "")
    names = names_text.split(":") if names_text else [""] * count
    if len(names) != count:
        # sd_listen_fds_with_names(3) refuses this too (EINVAL): which name is whose is anyone's guess.
        raise _ListenerError("LISTEN_FDNAMES is %s: %d names for LISTEN_FDS=%d sockets"
                             % (_quoted(names_text), len(names), count))
    # "unknown" is systemd's name for a socket it was given no name for.
    return [(_SD_LISTEN_FDS_START + i, name or "unknown") for i, name in enumerate(names)]


def _expand_inherited(specs: list[_ListenerSpec], environ: Mapping[str, str], *,
                      one_each: bool = False) -> tuple[list[_ListenerSpec], list[int]]:
    """Replace each `systemd:[NAME]` spec by one spec per matching inherited fd (`one_each`: by one fd).

    Also returns the inherited fds that no spec asked for.
    """
    if not any(s.kind == _INHERITED for s in specs):
        return specs, []
    inherited = _inherited_fds(environ)
    expanded: list[_ListenerSpec] = []
    for spec in specs:
        if spec.kind != _INHERITED:
            expanded.append(spec)
            continue
        matches = [(fd, name) for fd, name in inherited if not spec.systemd_name or name == spec.systemd_name]
        if not matches:
            raise _ListenerError("no inherited socket is named %s (LISTEN_FDNAMES: %s)"
                                % (_quoted(spec.systemd_name), _quoted(environ.get("LISTEN_FDNAMES", ""))))
        if one_each and len(matches) > 1:
            raise _ListenerError("%s=%s matches %d inherited sockets; under --protocol env each NAME takes one"
                                 % (spec.handoff_name, spec.shown_as, len(matches)))
        for fd, name in matches:
            expanded.append(_ListenerSpec(spec.handoff_name or name, _INHERITED, fd=fd,
                                          shown_as="systemd socket %s" % _quoted(name, quotes=False)))
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


def adopt(*, names: Iterable[str] | None = None, client_var: str = "",
          environ: Mapping[str, str] | None = None) -> Handoff:
    """Wrap what the loader handed over; raise LoaderError when there is nothing, or garbage.

    Reads systemd's protocol when ``LISTEN_PID`` is this process (fds from 3,
    ``LISTEN_FDS``, ``LISTEN_FDNAMES``, unnamed sockets ``unknown``, the
    client named ``connection``). Else it reads the variables ``names``
    (generic ``--protocol env``: the ``--listen`` NAMEs; one str is one
    name) and ``client_var`` (``--client-fd-var``), by default the drop-in
    ones (``DD_APM_NET_RECEIVER_FD`` and the others). The held client
    belongs to the first TCP listener in ``names`` order (the ``--listen``
    order): the loader's probe listener. Finding no hand-off at all
    is a LoaderError too: a program started without the loader catches it
    and binds its own sockets. On any error every fd stays open and
    untouched. The sockets it returns are close-on-exec, as
    sd_listen_fds(3) leaves them: they are this program's, not its
    children's.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID", "") == str(os.getpid()):
        found = _inherited_fds(env)
        client_name, source = "connection", "LISTEN_FDS"
    else:
        if names is None:
            names, client_var = _DROP_IN_FD_VARS, client_var or CLIENT_FD_VAR
        names = [names] if isinstance(names, str) else names  # one name, not its characters
        wanted = [var for var in dict.fromkeys([*names, client_var]) if var]
        found = [(_fd_number(var, env[var]), var) for var in wanted if env.get(var)]
        if not found:
            raise LoaderError("no sockets were handed over to this process: LISTEN_PID is not %d, and none of %s "
                              "is set" % (os.getpid(), ", ".join(wanted)))
        for index, (fd, var) in enumerate(found):
            # Two socket objects on one fd: closing one would close the other's.
            twin = next((other for number, other in found[:index] if number == fd), "")
            if twin:
                raise LoaderError("%s and %s both name fd %d" % (twin, var, fd))
        client_name, source = client_var, ""
    socks = dict(zip(found, _wrap_sockets(found, source=source)))
    for sock in socks.values():
        # Close-on-exec, as sd_listen_fds(3) leaves them: the program's sockets, not its children's.
        sock.set_inheritable(False)
    client = next((sock for (_, name), sock in socks.items() if name == client_name), None)
    found_names = [name for _, name in found]
    listeners = {name if found_names.count(name) == 1 else "%s@%d" % (name, fd): sock
                 for (fd, name), sock in socks.items() if sock is not client}
    # The held client came from the probe listener: the first TCP one.
    first_tcp = next((key for key, sock in listeners.items()
                      if sock.family in (socket.AF_INET, socket.AF_INET6)), "")
    return Handoff(listeners, client, client_listener=first_tcp)


def _fd_number(var: str, text: str) -> int:
    fd = _decimal(text, _MAX_FD)
    if fd is None or fd < _SD_LISTEN_FDS_START:
        # 0-2 are the standard streams, never a socket handed over.
        raise LoaderError("%s is %s, not a file descriptor number from 3" % (var, _quoted(text)))
    return fd


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed.

    Otherwise our first socket would land on 0, 1 or 2, and the program would
    take a listener for its stdin or stdout. Without /dev/null (a chroot) the
    fd stays closed, and _open_listeners refuses to open any socket: the
    program then starts directly, once the arguments and the configuration
    have been read as always. CPython leaves sys.stdout or sys.stderr None
    when fd 1 or 2 was closed at start-up; _say() then writes nowhere, and a
    usage error still exits 2.
    """
    for _ in _closed_std_fds():
        try:
            new = os.open(os.devnull, os.O_RDWR)  # lowest free fd: the closed one, lowest first
        except OSError:
            continue  # see above
        os.set_inheritable(new, True)


def _say(stream: object, text: str) -> None:
    """Write to stdout or stderr; one that is closed, full or a broken pipe costs the text, not the status."""
    try:
        stream.write(text)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pass  # None (closed at start-up), ENOSPC, EPIPE, EBADF: nowhere to say it


def main(argv: list[str] | None = None) -> int:
    """Run the loader with `argv` (default: sys.argv[1:]); the exit status, if it does not exec.

    --help raises SystemExit(0), and usage errors SystemExit(2), as argparse does.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    _ensure_std_fds()
    if args == ["--version"]:
        _say(sys.stdout, "trace-loader %s\n" % __version__)
        return 0
    generic = bool(args) and args[0].startswith("-")
    if not generic and len(args) < 2:
        _generic_parser().error("expected CONFIG_FILE AGENT, or options and '-- PROGRAM'")
    # The loader's own arguments, then the program's argv: OPTIONS [-- PROGRAM...] or CONFIG_FILE AGENT [ARGS...].
    end = args.index("--") if "--" in args else len(args)
    own_args, program = (args[:end], args[end + 1:]) if generic else (args[:1], args[1:])
    if not generic and program[0].startswith("-"):
        _generic_parser().error("AGENT %s looks like an option; the loader's own options come first, before '--'"
                                % _quoted(program[0]))
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
        return _last_resort_exec(program, own_args, environ, inherited_fds, log)


def _last_resort_exec(program: list[str], own_args: list[str], environ: dict[str, str], inherited_fds: list[int],
                      log: _Log) -> int:
    try:
        path = _find_program(program[0] if program else "", environ)
    except LoaderError:
        return 1
    for_us = environ.get("LISTEN_PID", "") == str(os.getpid())
    try:
        # Generic mode's --listen NAMEs: its arguments read again, as before whatever failed.
        named = _env_handoff_vars(_generic_parser().parse_known_args(own_args)[0])
    except Exception:  # noqa: BLE001 -- the parser may be what failed; the drop-in names still go
        named = []
    scrubbed = _DROP_IN_FD_VARS + tuple(named) + (() if for_us else _SYSTEMD_VARS)
    launch = _Launch(path, program, environ, _program_label(program[0]), _EnvProtocol(scrubbed, ""),
                     inherited_fds=inherited_fds)
    _fail_open(launch, log)


def _run_as_script() -> None:
    """main() as the program: exit with its status, whatever happens."""
    try:
        status = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:  # SIGINT before main() gave it its default action
        status = 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 -- the script's last guard: one line and a status, no traceback
        _say(sys.stderr, "trace_loader.py: internal error: %s: %s\n" % (type(exc).__name__, exc))
        status = 1
    for stream in (sys.stdout, sys.stderr):
        _say(stream, "")  # flushes what is left; closed or absent costs nothing
    os._exit(status)  # everything is flushed: end here, without the interpreter's shutdown


if __name__ == "__main__":
    _run_as_script()
