"""The ``pbcore`` command's network subcommands, run on asyncio: serve, call, demo.

:mod:`pbcore.cli` parses the command line and imports this module only for
these three subcommands, so ``pbcore decode`` and the core never load an
event loop. Each ``run_*`` function runs to completion and returns the exit
status: 0 when all went well, 1 when the call or the service failed (the
reason goes to *err*).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, Any

from pbcore.broker import Broker
from pbcore.cli import show
from pbcore.cred import Anonymous, UsernamePassword
from pbcore.demo import DemoService
from pbcore.errors import (
    CallTimedOut,
    ConnectionTimedOut,
    DeadReferenceError,
    NotJellyable,
    PBConnectionLost,
    ProtocolError,
    RemoteError,
)
from pbcore.factory import PBClientFactory
from pbcore.flavors import RemoteReference
from pbcore.timers import Timeouts

from . import connect, serve

__all__ = ["client_tls", "run_call", "run_demo", "run_serve", "server_tls"]

Credentials = UsernamePassword | Anonymous | None


class _Failed(Exception):
    """Ends a subcommand with exit status 1 and this message."""


def _describe(error: BaseException) -> str:
    if isinstance(error, RemoteError):
        return f"{error.remoteType}: {error}" if not str(error).startswith(error.remoteType) else str(error)
    return f"{type(error).__name__}: {error}"


# -- pbcore serve ---------------------------------------------------------------------------


def run_serve(
    host: str,
    port: int,
    *,
    users: Mapping[str, str],
    tick: float,
    out: IO[str],
    err: IO[str],
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Serve the demo service (over TLS with *ssl_context*) until SIGINT (Ctrl-C) or SIGTERM; then exit 0."""
    try:
        reason, closed = asyncio.run(_serve(host, port, users, tick, out, ssl_context=ssl_context))
    except KeyboardInterrupt:  # where the loop cannot handle signals (Windows)
        reason, closed = "interrupted", None
    except OSError as error:
        err.write(f"pbcore serve: error: cannot listen on {host}:{port}: {error.strerror or error}\n")
        return 1
    closing = "" if closed is None else f", closed {closed} connection{'' if closed == 1 else 's'}"
    err.write(f"pbcore serve: {reason}{closing}; stopped\n")
    return 0


async def _serve(
    host: str, port: int, users: Mapping[str, str], tick: float, out: IO[str], *, ssl_context: ssl.SSLContext | None
) -> tuple[str, int]:
    service = DemoService(users, open=not users)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def stop_on(signum: int) -> None:
        if not stop.done():
            stop.set_result(signal.Signals(signum).name)

    handled = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(signum, stop_on, signum)
            handled.append(signum)
    try:
        async with await serve(service.server_factory(), host, port, ssl_context=ssl_context) as server:
            host, bound = server.addresses[0][:2]
            access = f"login required: {', '.join(users)}" if users else "open, anonymous login allowed"
            if ssl_context is not None:
                clients = ", client certificates required" if ssl_context.verify_mode == ssl.CERT_REQUIRED else ""
                access = f"TLS{clients}; {access}"
            out.write(f"pbcore serve: listening on {host}:{bound} ({access}); Ctrl-C stops\n")
            out.flush()
            ticking = loop.create_task(_tick(service, tick))
            try:
                reason = await stop
            finally:
                ticking.cancel()
            return reason, len(server.connections)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def _tick(service: DemoService, tick: float) -> None:
    while True:
        await asyncio.sleep(tick)
        service.ticker.tick()


# -- pbcore call ----------------------------------------------------------------------------

#: Told every chunk of bytes the connection carries: (">" sent or "<" received, the bytes).
Trace = Callable[[str, bytes], None]


def run_call(
    host: str,
    port: int,
    calls: Sequence[tuple[str, Sequence[Any]]],
    *,
    kwargs: Mapping[str, Any],
    credentials: Credentials,
    timeout: float,
    connect_timeout: float,
    out: IO[str],
    err: IO[str],
    ssl_context: ssl.SSLContext | None = None,
    trace: Trace | None = None,
) -> int:
    """Make *calls* and print each answer's repr on its own line, as it comes.

    The first of *calls* (method name, arguments; *kwargs* go with it) is made
    on the server's root, or with *credentials* on the avatar; each next one
    on what the one before answered, which must be a remote reference.
    """
    try:
        asyncio.run(
            _call(
                host,
                port,
                calls,
                kwargs=kwargs,
                credentials=credentials,
                timeout=timeout,
                connect_timeout=connect_timeout,
                ssl_context=ssl_context,
                trace=trace,
                out=out,
            )
        )
    except _Failed as failure:
        out.flush()
        err.write(f"pbcore call: {failure}\n")
        return 1
    return 0


class _TracingFactory(PBClientFactory):
    """A client factory whose broker tells *trace* the bytes it takes in and gives out."""

    def __init__(self, trace: Trace, **options: Any) -> None:
        super().__init__(**options)
        self.trace = trace

    def make_broker(self, close: Callable[[], object] | None = None, **adapter_options: Any) -> Broker:
        broker = super().make_broker(close, **adapter_options)
        receive_data, data_to_send, trace = broker.receive_data, broker.data_to_send, self.trace

        def traced_receive_data(data: bytes | bytearray | memoryview) -> None:
            if not broker.closed:  # what a closed broker drops is not traced
                trace("<", bytes(data))
            receive_data(data)

        def traced_data_to_send() -> bytes:
            data = data_to_send()
            if data:
                trace(">", data)
            return data

        broker.receive_data = traced_receive_data  # type: ignore[method-assign]
        broker.data_to_send = traced_data_to_send  # type: ignore[method-assign]
        return broker


def _seconds(value: float) -> float:
    """*value* as an int when it is one, so that the core's messages say "2 s", not "2.0 s"."""
    return int(value) if float(value).is_integer() else value


async def _call(
    host: str,
    port: int,
    calls: Sequence[tuple[str, Sequence[Any]]],
    *,
    kwargs: Mapping[str, Any],
    credentials: Credentials,
    timeout: float,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None,
    trace: Trace | None,
    out: IO[str],
) -> None:
    timeouts = Timeouts(handshake=_seconds(connect_timeout))
    factory = PBClientFactory(timeouts=timeouts) if trace is None else _TracingFactory(trace, timeouts=timeouts)
    where = f"{host}:{port}"
    try:
        connection = await asyncio.wait_for(connect(factory, host, port, ssl_context=ssl_context), connect_timeout)
    except asyncio.TimeoutError:
        what = "TCP connection and TLS handshake" if ssl_context is not None else "TCP connection"
        raise _Failed(f"error: cannot connect to {where}: no {what} within {_seconds(connect_timeout)} s") from None
    except ssl.SSLCertVerificationError as error:
        raise _Failed(
            f"error: TLS handshake with {where} failed: its certificate does not verify: {error.verify_message}"
        ) from None
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        if reason == "WRONG_VERSION_NUMBER":  # the first bytes back were not TLS
            reason = "the server does not speak TLS (WRONG_VERSION_NUMBER)"
        raise _Failed(f"error: TLS handshake with {where} failed: {reason}") from None
    except OSError as error:
        raise _Failed(f"error: cannot connect to {where}: {error.strerror or error}") from None
    try:
        try:
            target: Any = await factory.getRootObject()  # the PB handshake, bounded by Timeouts.handshake
            if credentials is not None:
                target = await asyncio.wait_for(factory.login(credentials), timeout)
        except asyncio.TimeoutError:
            raise _Failed(f"error: no answer to the login within {_seconds(timeout)} s") from None
        previous = ""
        for method, args in calls:
            if previous and not isinstance(target, RemoteReference):
                raise _Failed(
                    f"error: cannot call {method}: what {previous} answered is not a remote reference"
                    f" but {type(target).__name__}"
                )
            call_kwargs = kwargs if not previous else {}
            target = await target.callRemote(method, *args, pbtimeout=timeout, **call_kwargs)
            out.write(show(target) + "\n")
            out.flush()
            previous = method
    except CallTimedOut as error:
        raise _Failed(f"error: {error} (--timeout {_seconds(timeout)} s)") from None
    except RemoteError as error:
        raise _Failed(f"remote error: {_describe(error)}") from None
    except (PBConnectionLost, DeadReferenceError, ProtocolError) as error:
        raise _Failed(f"error: {_lost(error)}{_hint(factory.broker, ssl_context)}") from None
    except NotJellyable as error:  # an argument such as 1j or ..., which PB cannot carry
        raise _Failed(f"error: cannot send the arguments: {error}") from None
    finally:
        connection.close()


def _hint(broker: Broker | None, ssl_context: ssl.SSLContext | None) -> str:
    """What a connection closed before anything arrived may mean."""
    if broker is None or broker.ready or broker.bytes_received:
        return ""
    if ssl_context is None:
        return "; if it serves TLS, give --tls or --cafile"
    if broker.close_reason is None:  # closed right after the TLS handshake
        return "; if the server requires a client certificate, give --cert (and --key)"
    return ""


def _lost(error: BaseException) -> str:
    """Why the connection was lost: the core's timer's own words, a TLS error, or the error itself."""
    reason = error.args[0] if isinstance(error, PBConnectionLost) and error.args else None
    if isinstance(reason, ConnectionTimedOut):
        return str(reason)
    if isinstance(reason, ssl.SSLError):
        return f"TLS: {reason.reason or reason}"
    return _describe(error)


# -- pbcore demo ----------------------------------------------------------------------------


def run_demo(out: IO[str], err: IO[str]) -> int:
    """Serve the demo service on an ephemeral port, call it, and print a tour."""
    try:
        asyncio.run(_demo(out))
    except (RemoteError, PBConnectionLost, DeadReferenceError, ProtocolError, OSError) as error:
        err.write(f"pbcore demo: error: {_describe(error)}\n")
        return 1
    return 0


class _Tour:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def heading(self, text: str) -> None:
        self.out.write(f"\n{text}\n")

    async def show(self, what: str, action: Awaitable[Any], why: str = "") -> Any:
        try:
            value = await action
        except RemoteError as error:
            self.line(what, _describe(error), why)
            return error
        self.line(what, repr(value), why)
        return value

    def line(self, what: str, result: str, why: str = "") -> None:
        if why:
            self.out.write(f"  # {why}\n")
        self.out.write(f"  {what} -> {result}\n")


async def _demo(out: IO[str]) -> None:
    service = DemoService({"alice": "secret"})
    server = await serve(service.server_factory(), "127.0.0.1", 0)
    port = server.port
    tour = _Tour(out)
    out.write(f"pbcore demo: a PB server and two clients in one process, over TCP on 127.0.0.1:{port}\n")
    factory = PBClientFactory()
    connection = await connect(factory, "127.0.0.1", port)
    other = PBClientFactory()
    other_connection = await connect(other, "127.0.0.1", port)
    try:
        root = await factory.getRootObject()
        tour.heading("calls on the server's root object")
        await tour.show("root.echo('hello')", root.callRemote("echo", "hello"), "a value goes and comes back")
        await tour.show("root.echo(1, 2.5, [b'x'], {'k': None})", root.callRemote("echo", 1, 2.5, [b"x"], {"k": None}))
        await tour.show(
            "root.note('a Copyable')", root.callRemote("note", "a Copyable"), "a Copyable arrives as a copy"
        )
        ticker = await tour.show("root.ticker()", root.callRemote("ticker"), "a Cacheable arrives as a cache")
        service.ticker.tick()
        service.ticker.tick()
        # The updates were sent before the answer to this call: once it is in, so are they.
        await root.callRemote("echo", None)
        tour.line("(the server ticks twice)", repr(ticker), "its owner keeps the cache up to date")

        tour.heading("errors")
        await tour.show("root.fail()", root.callRemote("fail"), "an expected error, raised on the server")
        await tour.show("root.nosuch()", root.callRemote("nosuch"), "a method the root does not have")

        tour.heading("logging in (challenge-response: no password on the wire)")
        await tour.show(
            "login('alice', 'wrong')",
            other.login(UsernamePassword("alice", "wrong")),
            "a wrong password and an unknown user look the same",
        )
        alice = await tour.show("login('alice', 'secret')", factory.login(UsernamePassword("alice", "secret")))
        await tour.show("alice.whoami()", alice.callRemote("whoami"), "a perspective: the avatar's methods")
        board = await alice.callRemote("board")
        await tour.show("alice.board().post('hi')", board.callRemote("post", "hi"), "a Viewable knows who is calling")
        guest = await tour.show("loginAnonymous()", other.login(Anonymous()))
        guest_board = await guest.callRemote("board")
        await tour.show("anonymous.board().post('hello')", guest_board.callRemote("post", "hello"))
        await tour.show("anonymous.board().read()", guest_board.callRemote("read"))

        tour.heading("references")
        before = len(service.ticker.observers)
        del ticker
        gc.collect()
        # The decache is on its way; the answer to a later call comes after it.
        await root.callRemote("echo", None)
        tour.line(
            "the client drops its ticker cache",
            f"observers on the server: {before} -> {len(service.ticker.observers)}",
            "copies are counted across the wire",
        )
    finally:
        connection.close()
        other_connection.close()
        await server.aclose()
    out.write(
        "\nNext: `pbcore serve` serves this on port 8787;"
        " `pbcore call localhost:8787 echo hi` calls it (or any PB server).\n"
    )


# -- TLS options of pbcore call and pbcore serve (here: the core imports no ssl) -------------


def _tls_error(option: str, path: str, error: Exception) -> str:
    why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"{option} {path}: {re.sub(r' [(]_ssl[.]c:[0-9]+[)]$', '', why)}"  # no "(_ssl.c:4154)"


def client_tls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ssl.SSLContext | None:
    """``pbcore call``'s TLS context: the system's trust, or only --cafile's; a client certificate."""
    if args.key is not None and args.cert is None:
        parser.error("--key goes with --cert")
    if not (args.tls or args.cafile is not None or args.cert is not None):
        return None
    try:
        context = ssl.create_default_context(cafile=args.cafile)
    except (OSError, ValueError) as error:
        parser.error(_tls_error("--cafile", args.cafile, error))
    if args.cert is not None:
        try:
            context.load_cert_chain(args.cert, args.key)
        except (OSError, ValueError) as error:
            parser.error(_tls_error("--cert", args.cert, error))
    return context


def server_tls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ssl.SSLContext | None:
    """``pbcore serve``'s TLS context: its certificate; with --cafile, client certificates required."""
    if args.cert is None:
        if args.tls or args.key is not None or args.cafile is not None:
            parser.error("TLS needs the server's certificate: --cert FILE (and --key FILE unless it holds the key)")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.cert, args.key)
    except (OSError, ValueError) as error:
        parser.error(_tls_error("--cert", args.cert, error))
    if args.cafile is not None:
        try:
            context.load_verify_locations(cafile=args.cafile)
        except (OSError, ValueError) as error:
            parser.error(_tls_error("--cafile", args.cafile, error))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
