"""The ``pbcore`` command.

``pbcore demo`` serves the demo service (:mod:`pbcore.demo`) on an ephemeral
port of 127.0.0.1, calls it over TCP from two clients in the same process and
prints a tour: values, a copy, a cache kept up to date, errors, logging in, a
view and reference counting.

``pbcore serve [--host H] [--port 8787] [--user NAME [--password-env VAR]]
[--cert FILE [--key FILE] [--cafile FILE]] [--tick SECONDS]`` serves the demo
service until interrupted. Without a user its root answers the demo's calls
and logins are anonymous; with users, the root answers only ``login`` and
everything is behind it. With ``--cert`` it serves TLS only; with
``--cafile`` too, clients must present a certificate that CA signed.

``pbcore call HOST[:PORT] METHOD [ARG...] [--kw NAME=VALUE] [--then METHOD
[ARG...]]... [--user NAME [--password-env VAR] | --anonymous] [--tls]
[--cafile FILE] [--cert FILE [--key FILE]] [--timeout S] [--connect-timeout
S] [--trace FILE]`` connects to any PB server (Twisted's included), calls
METHOD on its root object, or on the avatar after logging in, and prints the
answer's ``repr``; each ``--then`` calls a method on what the call before
answered (a remote reference), each answer printed on its own line. Each ARG
and VALUE is a Python literal (``42``, ``2.5``, ``"42"``, ``b'raw'``, ``[1,
2]``, ``None``) or else a plain string. An answer holding a copy of a class
not loaded here (an unknown copy tag) cannot be shown: the call then fails
with the tag's name.

A password comes from ``--password-env VAR``, or is asked for on the terminal
(``getpass``) when ``--user`` comes alone; with no terminal that is a usage
error. ``--password PW`` works too, but shows in ``ps``. ``--trace FILE``
writes both directions of the connection (the plain PB bytes, under any TLS)
as text lines, ``> HEX`` sent and ``< HEX`` received (:class:`TraceWriter`),
which ``pbcore decode --trace FILE`` decodes, with arrows.

These three need an event loop: they run on :mod:`pbcore_asyncio`, which is
imported only for them, so the core and ``pbcore decode`` load no I/O.

``pbcore decode [FILE] [--hex | --trace] [--dialect pb|none] [--jelly]``
reads a Banana byte stream (a capture of one direction of a PB connection,
say) from FILE or standard input and prints each complete expression on its
own line; with ``--trace``, a trace of both directions, each expression after
``-> `` (sent) or ``<- `` (received), in the order they went.

Without ``--jelly`` an expression is printed as it travels: lists in
brackets, ints and floats as Python writes them, byte strings as Python bytes
literals (``b'root'``). In the ``pb`` dialect a byte string that is a
vocabulary word is printed as a bare word (``message``, ``list``,
``version``): a Twisted peer always sends those words as vocabulary items, so
a bare word is what was on the wire. The decoder does not say whether a word
arrived as a vocabulary index or spelled out, so a spelled-out ``b'list'`` is
printed bare too::

    [b'pb', b'none']
    [version, 6]
    [message, 1, b'root', b'echo', 1, [tuple, [b'unicode', b'hello']], [dictionary]]

With ``--jelly`` PB messages are printed by structure and only their jelly
parts (arguments, result, failure) are unjellied and shown with ``repr``::

    dialects [b'pb', b'none']
    version 6
    message #1 to b'root'.echo(args=('hello',), kwargs={}) answer=1
    cachemessage #2 to 5.update(args=(1,), kwargs={}) answer=0
    answer #1: 'hello'
    error #1: <copy b'twisted.spread.pb.CopyableFailure' {...}>
    decref 3
    decache 3
    uncache 3
    didNotUnderstand b'frobnicate'

Any other expression is unjellied whole. PB's reference forms, which only a
broker can resolve, are shown as placeholders: ``<remote 3>``, ``<local 3>``,
``<cached 3>``, ``<lcache 3>``; so are copy tags (any form named by a dotted
name), since the classes they name are not loaded here: ``<copy b'mod.Class'
{'a': 1}>`` for a Copyable and ``<cache b'mod.Class' #4 {'a': 1}>`` for a
Cacheable's first copy. An expression that does not unjelly (a malformed
message, a refused form such as ``instance``) is printed raw, followed by
``  # not jelly: <why>``; decoding goes on with the next one.

Exit status: 0 when all went well; 1 when a call fails (a remote error, no
connection, a TLS handshake or certificate that failed, no answer in time,
``--then`` after an answer that is no reference), the demo fails, or the decoded stream is
malformed or ends inside an expression (what decoded before the fault is
printed first; the error goes to standard error); 2 for usage errors and
unreadable input.
"""

from __future__ import annotations

import argparse
import ast
import getpass
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, Final

from . import __version__
from .banana import ACCELERATED, DIALECTS, VOCABULARY, Decoder, Sexp
from .cred import Anonymous, UsernamePassword
from .demo import DEFAULT_PORT
from .errors import BananaError, JellyError, ProtocolError
from .jelly import Unjellier
from .preview import preview

__all__ = ["Placeholder", "TraceWriter", "format_jelly", "format_sexp", "main", "parse_address", "parse_value"]

_CHUNK: Final = 64 * 1024

# A PB message's name -> the number of items it has, including the name.
_MESSAGE_SIZES: Final[dict[bytes, int]] = {
    b"message": 7,
    b"cachemessage": 7,
    b"answer": 3,
    b"error": 3,
    b"decref": 2,
    b"decache": 2,
    b"uncache": 2,
    b"version": 2,
    b"didNotUnderstand": 2,
}

_CALL_EPILOG: Final = """\
arguments:
  Each ARG and --kw VALUE is a Python literal (42, 2.5, "42", b'raw', [1, 2],
  None) or else a plain string. --kw goes with the first call only.

calls on what the answer returns:
  pbcore call HOST counter visits --then add 2 --then ...
  calls counter('visits') on the root, then add(2) on the reference it
  answered, and so on. Each answer's repr is printed on its own line as it
  comes, the first call's first; if a call fails, the answers before it are
  printed and the error ends the command (exit 1), as it does when --then
  follows an answer that is not a remote reference.

passwords:
  --user NAME alone asks for the password on the terminal; with no terminal,
  give --password-env NAME. --password PW works, but other users can see it
  in the process list (ps).

timeouts:
  --connect-timeout bounds the TCP connection (and TLS handshake), then the
  PB handshake; --timeout bounds the login, and each call's answer. The error
  says which ran out.

exit status:
  0 every call answered; 1 a remote error, no connection, a TLS handshake or
  certificate that failed, no answer in time; 2 usage error.
"""

_DECODE_EPILOG: Final = """\
output:
  Each complete expression is printed on one line: lists in brackets, ints,
  floats, byte strings as Python bytes literals (b'root'). With --dialect pb
  (the default) every byte string that is a pb vocabulary word (message,
  answer, list, tuple, version, ...) is printed as a bare word, whether it was
  sent as a vocabulary index or spelled out; the decoder does not tell them
  apart, and a Twisted peer always uses the index. A PB capture starts with
  the dialect offer [b'pb', b'none'], which has no vocabulary items, so the
  pb dialect decodes whole captures.

  With --jelly, PB messages are shown by structure with only their arguments,
  result or failure unjellied, for example
      message #1 to b'root'.echo(args=('hello',), kwargs={}) answer=1
  and other expressions are unjellied whole. Remote references and copies of
  classes that are not loaded here print as placeholders (<remote 3>,
  <copy b'mod.Class' {...}>). What does not unjelly is printed raw, followed
  by '# not jelly: <reason>'.

traces:
  With --trace the input is a trace, as `pbcore call --trace FILE` writes it
  (lines '> HEX' sent, '< HEX' received, '#' comments): both directions are
  decoded, each expression printed in the order it went, after '-> ' if it
  was sent or '<- ' if it was received.

exit status:
  0 the stream decoded; 1 the stream is malformed or truncated (what came
  before the fault is printed); 2 usage error or unreadable input.
"""


# ---------------------------------------------------------------------------
# Formatting raw expressions


def format_sexp(sexp: Sexp, dialect: bytes = b"pb") -> str:
    """Render one s-expression on one line (see the module docstring).

    In the ``pb`` dialect, byte strings that are vocabulary words print bare.
    """
    words = VOCABULARY if dialect == b"pb" else {}
    parts: list[str] = []
    _format_into(sexp, words, parts)
    return "".join(parts)


def _format_into(sexp: Sexp, words: Mapping[bytes, int], parts: list[str]) -> None:
    # Recursion is bounded by the decoder's max_depth.
    if isinstance(sexp, (list, tuple)):
        parts.append("[")
        for index, item in enumerate(sexp):
            if index:
                parts.append(", ")
            _format_into(item, words, parts)
        parts.append("]")
    elif isinstance(sexp, bytes):
        parts.append(sexp.decode("ascii") if sexp in words else repr(sexp))
    else:
        parts.append(repr(sexp))


# ---------------------------------------------------------------------------
# Jelly with placeholders for what only a broker could resolve


class Placeholder:
    """Stands in for a PB form that needs a broker: a reference, a copy, a cache.

    Compared and hashed by identity, as the objects it replaces would be.
    """

    __slots__ = ("kind", "luid", "state", "tag")

    def __init__(self, kind: str, *, tag: bytes | None = None, luid: int | None = None, state: Any = None) -> None:
        self.kind = kind
        self.tag = tag
        self.luid = luid
        self.state = state

    def __preview__(self, limit: int) -> str:
        if self.kind == "copy":
            return f"<copy {self.tag!r} {preview(self.state, limit)}>"
        if self.kind == "cache":
            return f"<cache {self.tag!r} #{self.luid} {preview(self.state, limit)}>"
        return f"<{self.kind} {self.luid}>"

    def __repr__(self) -> str:
        return self.__preview__(SHOW_LIMIT)


def _reference_handler(kind: str) -> Callable[[Unjellier, list[Any]], Any]:
    def handle(unjellier: Unjellier, expression: list[Any]) -> Placeholder:
        if len(expression) != 2 or type(expression[1]) is not int:
            raise JellyError(f"{kind!r} form needs one int id, got {expression[1:]!r:.60}")
        return Placeholder(kind, luid=expression[1])

    return handle


def _copy_handler(unjellier: Unjellier, expression: list[Any]) -> Placeholder:
    tag = expression[0]
    if len(expression) == 2:
        return Placeholder("copy", tag=tag, state=unjellier.unjelly(expression[1]))
    if len(expression) == 3 and type(expression[1]) is int:
        return Placeholder("cache", tag=tag, luid=expression[1], state=unjellier.unjelly(expression[2]))
    raise JellyError(f"copy tag {tag!r:.60} needs [tag, state] or [tag, id, state]")


_REFERENCE_HANDLERS: Final[dict[bytes, Callable[[Unjellier, list[Any]], Any]]] = {
    kind.encode(): _reference_handler(kind) for kind in ("remote", "local", "cached", "lcache")
}


def _copy_tags(sexp: Sexp) -> set[bytes]:
    """Every dotted name at the head of a list in *sexp*: the candidate copy tags.

    Handlers only match exact names, so the copy tags of each expression are
    collected first. A dotted name that heads a list which is not a form (a
    dictionary's [key, value] pair) gets a handler that is never called.
    """
    tags: set[bytes] = set()
    pending: list[Any] = [sexp]
    while pending:
        item = pending.pop()
        if isinstance(item, list) and item:
            head = item[0]
            if isinstance(head, bytes) and b"." in head:
                tags.add(head)
            pending.extend(entry for entry in item if isinstance(entry, list))
    return tags


#: How much of one value the CLI prints: a value from the peer may expand to 10**20 items.
SHOW_LIMIT: Final = 8192


def show(value: Any) -> str:
    """A value as the CLI prints it: a repr, cut at :data:`SHOW_LIMIT` characters (see pbcore.preview)."""
    return preview(value, SHOW_LIMIT)


def _unjelly(sexp: Sexp) -> Any:
    """Unjelly with placeholders; raises ProtocolError for what is not jelly."""
    handlers = dict(_REFERENCE_HANDLERS)
    handlers.update(dict.fromkeys(_copy_tags(sexp), _copy_handler))
    return Unjellier(handlers=handlers).unjellyFull(sexp)


def _name(value: Sexp) -> str:
    """A method name: bare if it is a plain identifier, else its repr."""
    if isinstance(value, bytes) and value.isascii() and value.decode("ascii").isidentifier():
        return value.decode("ascii")
    return repr(value)


def _format_message(sexp: list[Sexp]) -> str | None:
    """The structured line for a PB message, or None if *sexp* is not one.

    Raises ProtocolError when it is a message whose jelly parts do not unjelly
    or whose shape is wrong.
    """
    if not sexp or not isinstance(sexp[0], bytes):
        return None
    head = sexp[0]
    if head in DIALECTS and all(isinstance(item, bytes) for item in sexp):
        return f"dialects {sexp!r}"
    size = _MESSAGE_SIZES.get(head)
    if size is None:
        return None
    kind = head.decode("ascii")
    if len(sexp) != size:
        raise JellyError(f"{kind!r} needs {size - 1} item(s) after its name, not {len(sexp) - 1}")
    if kind in ("message", "cachemessage"):
        _, request, target, name, answer, args, kwargs = sexp
        if type(request) is not int or type(answer) is not int:
            raise JellyError(f"{kind!r} needs an int request id and an int answer flag")
        return (
            f"{kind} #{request} to {target!r}.{_name(name)}"
            f"(args={show(_unjelly(args))}, kwargs={show(_unjelly(kwargs))}) answer={answer}"
        )
    if kind in ("answer", "error"):
        request = sexp[1]
        if type(request) is not int:
            raise JellyError(f"{kind!r} needs an int request id")
        return f"{kind} #{request}: {show(_unjelly(sexp[2]))}"
    return f"{kind} {sexp[1]!r}"


def format_jelly(sexp: Sexp, dialect: bytes = b"pb") -> str:
    """Render one expression with its jelly unjellied (see the module docstring).

    Never raises for bad input: what does not unjelly is shown raw with a note.
    """
    try:
        if isinstance(sexp, list):
            line = _format_message(sexp)
            if line is not None:
                return line
        return show(_unjelly(sexp))
    except ProtocolError as error:
        return f"{format_sexp(sexp, dialect)}  # not jelly: {error}"
    except Exception as error:
        # A bug in pbcore (it should have raised a ProtocolError): still show
        # the expression and go on with the rest of the capture.
        return f"{format_sexp(sexp, dialect)}  # unjelly failed: {type(error).__name__}: {error}"


# ---------------------------------------------------------------------------
# Input


class _InputError(Exception):
    """Input that cannot be read or is not valid hex: a usage error (exit 2)."""


def _parse_hex(text: bytes) -> bytes:
    """Bytes from hex text; whitespace and one leading 0x are ignored."""
    start = len(text) - len(text.lstrip())
    if text[start : start + 2] in (b"0x", b"0X"):
        start += 2
    bad = re.compile(rb"[^0-9a-fA-F\s]").search(text, start)
    if bad is not None:
        char = bad.group().decode("latin-1")
        raise _InputError(f"invalid hex input: {char!r} at offset {bad.start()} is not a hex digit")
    digits = re.sub(rb"\s+", b"", text[start:])
    if len(digits) % 2:
        raise _InputError(f"invalid hex input: an odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits.decode("ascii"))


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """Read *stream* as it arrives, so a live pipe is decoded as it goes."""
    read = getattr(stream, "read1", stream.read)
    while chunk := read(_CHUNK):
        yield chunk


# ---------------------------------------------------------------------------
# The decode command


def _write(out: IO[str], line: str) -> None:
    try:
        out.write(line + "\n")
    except UnicodeEncodeError:
        # A terminal that cannot show some character of a str value.
        encoding = getattr(out, "encoding", None) or "ascii"
        out.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")


def _decode(chunks: Iterable[bytes], dialect: bytes, as_jelly: bool, out: IO[str], err: IO[str]) -> int:
    return _decode_directions((("", chunk) for chunk in chunks), dialect, as_jelly, out, err)


class _Stream:
    """One direction of a stream being decoded."""

    def __init__(self, dialect: bytes, name: str) -> None:
        self.decoder = Decoder(dialect)
        self.name = f"the {name} stream" if name else "the stream"
        self.prefix = _ARROWS.get(name, "")
        self.received = 0
        self.start = 0  # where the expression being received began


def _decode_directions(
    chunks: Iterable[tuple[str, bytes]], dialect: bytes, as_jelly: bool, out: IO[str], err: IO[str]
) -> int:
    """Decode chunks of one stream ("") or of two ("sent", "received"), each printed as it completes."""
    render = format_jelly if as_jelly else format_sexp
    streams: dict[str, _Stream] = {}
    for name, chunk in chunks:
        stream = streams.get(name)
        if stream is None:
            stream = streams[name] = _Stream(dialect, name)
        decoder = stream.decoder
        try:
            decoder.feed(chunk)
            stream.received += len(chunk)
            for expression in decoder:
                _write(out, stream.prefix + render(expression, dialect))
                stream.start = decoder.offset
        except BananaError as error:
            out.flush()
            where = f"{stream.name}: " if name else ""
            err.write(f"pbcore decode: error: {where}{error}\n")
            return 1
        out.flush()
    status = 0
    for stream in streams.values():
        if not stream.decoder.at_boundary:
            err.write(
                f"pbcore decode: error: {stream.name} ends inside an expression"
                f" (it starts at byte {stream.start}; the stream has {stream.received} bytes)\n"
            )
            status = 1
    return status


# ---------------------------------------------------------------------------
# Traces: both directions of a connection, as `pbcore call --trace` writes them

_TRACE_MARKERS: Final = {">": "sent", "<": "received"}
_ARROWS: Final = {"sent": "-> ", "received": "<- "}
_TRACE_WIDTH: Final = 32  # bytes per line


class TraceWriter:
    """Writes what a connection carries, as ``pbcore decode --trace`` reads it.

    A trace is text: ``#`` comment lines, then one line per chunk of at most
    32 bytes, ``>`` for what was sent or ``<`` for what was received, a space
    and the bytes in hex, in the order they went. ``grep '^<' FILE | cut -c3-``
    is the received stream alone, as ``pbcore decode --hex`` reads it.
    """

    def __init__(self, file: IO[str], about: str) -> None:
        self.file = file
        file.write(
            f"# pbcore trace: {about}\n"
            "# '>' sent, '<' received, bytes in hex; `pbcore decode --trace FILE` shows the messages\n"
        )
        file.flush()

    def __call__(self, direction: str, data: bytes) -> None:
        """Record *data*, sent (``">"``) or received (``"<"``)."""
        if direction not in _TRACE_MARKERS:
            raise ValueError(f"direction must be '>' or '<', not {direction!r}")
        for start in range(0, len(data), _TRACE_WIDTH):
            self.file.write(f"{direction} {data[start : start + _TRACE_WIDTH].hex(' ')}\n")
        self.file.flush()  # a trace cut short is still read up to there


def _trace_chunks(lines: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
    """(``"sent"`` or ``"received"``, bytes) for each line of a trace; raises _InputError for a bad line."""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        direction = _TRACE_MARKERS.get(text[:1].decode("latin-1"))
        if direction is None:
            raise _InputError(f"line {number} of the trace: expected '> HEX' or '< HEX', got {text[:40]!r}")
        try:
            data = bytes.fromhex(text[1:].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise _InputError(f"line {number} of the trace: invalid hex after {text[:1].decode()!r}") from None
        yield direction, data


def _decode_stream(stream: IO[bytes], args: argparse.Namespace) -> int:
    dialect = args.dialect.encode("ascii")
    if args.trace:
        return _decode_directions(_trace_chunks(stream), dialect, args.jelly, sys.stdout, sys.stderr)
    if args.hex:
        return _decode([_parse_hex(stream.read())], dialect, args.jelly, sys.stdout, sys.stderr)
    return _decode(_chunks(stream), dialect, args.jelly, sys.stdout, sys.stderr)


def _run_decode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path: str | None = args.file
    try:
        if path is None or path == "-":
            return _decode_stream(sys.stdin.buffer, args)
        try:
            with open(path, "rb") as file:
                return _decode_stream(file, args)
        except BrokenPipeError:  # writing the output, not reading the file
            raise
        except OSError as error:
            raise _InputError(f"cannot read {path}: {error.strerror or error}") from None
    except _InputError as error:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {error}\n")
        return 2


# ---------------------------------------------------------------------------
# serve, call, demo: parsing here, running in pbcore_asyncio.cli


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (``42``, ``"42"``, ``b'x'``, ``[1, None]``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_address(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); the port defaults to 8787."""
    host, port = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def _parse_keyword(text: str) -> tuple[str, Any]:
    name, equals, value = text.partition("=")
    if not equals or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, parse_value(value)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _password(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """The password for ``--user``: from --password, --password-env or a prompt; None without a user."""
    if args.user is None:
        if args.password is not None or args.password_env is not None:
            parser.error("a password needs --user")
        return None
    if args.password is not None:
        return str(args.password)
    if args.password_env is not None:
        password = os.environ.get(args.password_env)
        if password is None:
            parser.error(f"--password-env {args.password_env}: the environment variable is not set")
        return password
    if not sys.stdin.isatty():
        parser.error(
            f"--user {args.user} needs a password and standard input is not a terminal to ask it on:"
            " give --password-env NAME (the environment variable that holds it)"
            " or --password PW (which other users can see in ps)"
        )
    try:
        return getpass.getpass(f"password for {args.user}: ")
    except (EOFError, KeyboardInterrupt):
        sys.stderr.write("\n")
        parser.error(f"no password given for {args.user}")


def _run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # The network commands (and ssl) live with the asyncio adapter, loaded only for them.
    from pbcore_asyncio.cli import run_serve, server_tls  # noqa: PLC0415

    ssl_context = server_tls(args, parser)
    password = _password(args, parser)

    users = {args.user: password} if args.user is not None and password is not None else {}
    return run_serve(
        args.host, args.port, users=users, tick=args.tick, out=sys.stdout, err=sys.stderr, ssl_context=ssl_context
    )


def _run_call(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.anonymous and args.user is not None:
        parser.error("--anonymous and --user exclude each other")
    try:
        host, port = parse_address(args.address)
    except ValueError as error:
        parser.error(str(error))
    from pbcore_asyncio.cli import client_tls, run_call  # noqa: PLC0415  (asyncio and ssl for this command only)

    ssl_context = client_tls(args, parser)
    password = _password(args, parser)
    trace_file: IO[str] | None = None
    if args.trace is not None:
        try:
            trace_file = open(args.trace, "w", encoding="utf-8")  # noqa: SIM115  (closed below)
        except OSError as error:
            parser.error(f"--trace {args.trace}: {error.strerror or error}")
    credentials = (
        Anonymous()
        if args.anonymous
        else UsernamePassword(args.user, password)
        if args.user is not None and password is not None
        else None
    )
    calls = [(args.method, [parse_value(arg) for arg in args.args])]
    calls += [(method, [parse_value(arg) for arg in rest]) for method, *rest in args.then]
    try:
        return run_call(
            host,
            port,
            calls,
            kwargs=dict(args.kw),
            credentials=credentials,
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            out=sys.stdout,
            err=sys.stderr,
            ssl_context=ssl_context,
            trace=None if trace_file is None else TraceWriter(trace_file, f"pbcore call {host}:{port}"),
        )
    finally:
        if trace_file is not None:
            trace_file.close()


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pbcore_asyncio.cli import run_demo  # noqa: PLC0415  (loads asyncio only for this command)

    return run_demo(sys.stdout, sys.stderr)


def _add_network_commands(commands: Any) -> dict[str, argparse.ArgumentParser]:
    demo = commands.add_parser(
        "demo",
        help="serve the demo service and call it, printing a short tour",
        description="Serve the demo service on an ephemeral port of 127.0.0.1, call it over TCP and print a tour.",
    )
    serve = commands.add_parser(
        "serve",
        help="serve the demo service (echo, a copy, a cache, a view behind a login)",
        description=(
            "Serve the demo service until interrupted. Its root answers echo(*args), note(text) (a Copyable),"
            " ticker() (a Cacheable that the server ticks), counter(name) (a Referenceable: add(n=1),"
            " count()), fail() and login; an avatar adds whoami() and board() (a Viewable: post(text), read())."
        ),
        epilog=(
            "--user NAME alone asks for the password on the terminal; with no terminal, give --password-env"
            " NAME (--password PW works, but other users can see it in ps). With --cert (and --key) it serves"
            " TLS only."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the port (default: {DEFAULT_PORT}; 0: any)")
    serve.add_argument(
        "--tick", type=_positive, default=1.0, metavar="S", help="seconds between ticker updates (default: 1)"
    )
    _add_login_options(
        serve, "require a login as this user (no anonymous login, nothing before login)", "the user's password"
    )
    tls = serve.add_argument_group("TLS")
    tls.add_argument("--cert", metavar="FILE", help="serve over TLS with this certificate (PEM; its chain too)")
    tls.add_argument("--key", metavar="FILE", help="the certificate's private key (PEM), unless --cert holds it")
    tls.add_argument("--cafile", metavar="FILE", help="require client certificates, signed by a CA in this file (PEM)")
    tls.add_argument("--tls", action="store_true", help="serve over TLS (this needs --cert)")
    call = commands.add_parser(
        "call",
        help="call a method on any PB server and print the answer",
        description=(
            "Connect to a PB server (Twisted's included), call METHOD on its root object, or on\n"
            "the avatar after logging in, and print the answer's repr. With --then, call a\n"
            "method on what the previous call answered (a remote reference), and so on."
        ),
        epilog=_CALL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_argument("address", metavar="HOST[:PORT]", help=f"the server (the port defaults to {DEFAULT_PORT})")
    call.add_argument("method", metavar="METHOD", help="the remote method's name, without remote_/perspective_")
    call.add_argument("args", metavar="ARG", nargs="*", help="positional arguments")
    call.add_argument(
        "--kw",
        metavar="NAME=VALUE",
        type=_parse_keyword,
        action="append",
        default=[],
        help="a keyword argument (of the first call)",
    )
    call.add_argument(
        "--then",
        nargs="+",
        action="append",
        default=[],
        metavar=("METHOD", "ARG"),
        help="then call METHOD on what the previous call answered, which must be a remote reference (repeatable)",
    )
    call.add_argument(
        "--timeout",
        type=_positive,
        metavar="S",
        default=10.0,
        help="seconds to wait for the login and for each call's answer (default: 10)",
    )
    call.add_argument(
        "--connect-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds for the TCP connection (and TLS handshake), then as many for the PB handshake (default: 10)",
    )
    call.add_argument(
        "--trace",
        metavar="FILE",
        help="write the bytes sent and received to FILE; `pbcore decode --trace FILE` shows them",
    )
    _add_login_options(call, "log in as this user first and call the avatar", "the user's password")
    call.add_argument("--anonymous", action="store_true", help="log in anonymously first and call the avatar")
    tls = call.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    tls.add_argument(
        "--cafile", metavar="FILE", help="trust only the CAs (or self-signed certificate) in this file; implies --tls"
    )
    tls.add_argument("--cert", metavar="FILE", help="a client certificate (PEM) to present; implies --tls")
    tls.add_argument("--key", metavar="FILE", help="the client certificate's private key, unless --cert holds it")
    return {"demo": demo, "serve": serve, "call": call}


def _add_login_options(parser: argparse.ArgumentParser, user_help: str, password_help: str) -> None:
    parser.add_argument("--user", help=user_help)
    passwords = parser.add_mutually_exclusive_group()
    passwords.add_argument(
        "--password-env", metavar="NAME", help="read the password from the environment variable NAME"
    )
    passwords.add_argument(
        "--password",
        metavar="PW",
        help=f"{password_help}: other users can see it in ps; prefer --password-env, or the prompt"
        " (given --user alone on a terminal)",
    )


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="pbcore",
        description="Perspective Broker tools.",
    )
    codec = "compiled codec" if ACCELERATED else "pure Python codec"  # PBCORE_PURE, pbcore._speedups
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} ({codec})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands = _add_network_commands(commands)
    decode = commands.add_parser(
        "decode",
        help="print the expressions of a Banana byte stream",
        description="Decode a Banana byte stream (a PB capture) and print one expression per line.",
        epilog=_DECODE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    decode.add_argument("file", metavar="FILE", nargs="?", help="the stream to read; '-' or absent for stdin")
    form = decode.add_mutually_exclusive_group()
    form.add_argument(
        "--hex",
        action="store_true",
        help="the input is hexadecimal text (whitespace and a leading 0x are ignored)",
    )
    form.add_argument(
        "--trace",
        action="store_true",
        help="the input is a trace written by `pbcore call --trace`: both directions, with arrows",
    )
    decode.add_argument(
        "--dialect",
        choices=[name.decode("ascii") for name in DIALECTS],
        default="pb",
        help="the Banana dialect: pb (with vocabulary, the default) or none",
    )
    decode.add_argument(
        "--jelly",
        action="store_true",
        help="show PB messages by structure and unjelly their values",
    )
    subcommands["decode"] = decode
    return parser, subcommands


_RUN: Final[dict[str, Callable[[argparse.Namespace, argparse.ArgumentParser], int]]] = {
    "decode": _run_decode,
    "demo": _run_demo,
    "serve": _run_serve,
    "call": _run_call,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``pbcore`` command with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    parser, subcommands = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return _RUN[args.command](args, subcommands[args.command])
    except SystemExit as exit:
        # argparse exits for --help, --version and usage errors; report the status instead.
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 2)
    except BrokenPipeError:
        # The reader went away (`pbcore decode ... | head`): stop quietly, and
        # keep Python from complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)
        return 1
