"""The ``pbcore`` command's network subcommands, run on asyncio: serve, call, demo.

:mod:`pbcore.cli` parses the command line and imports this module only for
these three subcommands, so ``pbcore decode`` and the core never load an
event loop. Each ``run_*`` function runs to completion and returns the exit
status: 0 when all went well, 1 when the call or the service failed (the
reason goes to *err*).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Mapping, Sequence
from typing import IO, Any

from pbcore.cred import Anonymous, UsernamePassword
from pbcore.demo import DemoService
from pbcore.errors import DeadReferenceError, NotJellyable, PBConnectionLost, ProtocolError, RemoteError
from pbcore.factory import PBClientFactory

from . import connect, serve

__all__ = ["run_call", "run_demo", "run_serve"]

Credentials = UsernamePassword | Anonymous | None


class _Failed(Exception):
    """Ends a subcommand with exit status 1 and this message."""


def _describe(error: BaseException) -> str:
    if isinstance(error, RemoteError):
        return f"{error.remoteType}: {error}" if not str(error).startswith(error.remoteType) else str(error)
    return f"{type(error).__name__}: {error}"


# -- pbcore serve ---------------------------------------------------------------------------


def run_serve(host: str, port: int, *, users: Mapping[str, str], tick: float, out: IO[str], err: IO[str]) -> int:
    """Serve the demo service until SIGINT (Ctrl-C) or SIGTERM; then close every connection and exit 0."""
    try:
        reason, closed = asyncio.run(_serve(host, port, users, tick, out))
    except KeyboardInterrupt:  # where the loop cannot handle signals (Windows)
        reason, closed = "interrupted", None
    except OSError as error:
        err.write(f"pbcore serve: error: cannot listen on {host}:{port}: {error.strerror or error}\n")
        return 1
    closing = "" if closed is None else f", closed {closed} connection{'' if closed == 1 else 's'}"
    err.write(f"pbcore serve: {reason}{closing}; stopped\n")
    return 0


async def _serve(host: str, port: int, users: Mapping[str, str], tick: float, out: IO[str]) -> tuple[str, int]:
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
        async with await serve(service.server_factory(), host, port) as server:
            host, bound = server.addresses[0][:2]
            access = f"login required: {', '.join(users)}" if users else "open, anonymous login allowed"
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


def run_call(
    host: str,
    port: int,
    method: str,
    args: Sequence[Any],
    *,
    kwargs: Mapping[str, Any],
    credentials: Credentials,
    timeout: float,
    out: IO[str],
    err: IO[str],
) -> int:
    """Call *method* on the server's root (or, with *credentials*, on the avatar) and print the answer."""
    try:
        result = asyncio.run(_call(host, port, method, args, kwargs=kwargs, credentials=credentials, timeout=timeout))
    except _Failed as failure:
        err.write(f"pbcore call: {failure}\n")
        return 1
    out.write(f"{result}\n")
    return 0


async def _call(
    host: str,
    port: int,
    method: str,
    args: Sequence[Any],
    *,
    kwargs: Mapping[str, Any],
    credentials: Credentials,
    timeout: float,
) -> str:
    factory = PBClientFactory()
    try:
        connection = await asyncio.wait_for(connect(factory, host, port), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        reason = "no answer" if isinstance(error, asyncio.TimeoutError) else error.strerror or error
        raise _Failed(f"error: cannot connect to {host}:{port}: {reason}") from None
    try:
        return repr(await asyncio.wait_for(_call_on(factory, method, args, kwargs, credentials), timeout))
    except asyncio.TimeoutError:
        raise _Failed(f"error: no answer within {timeout:g} s") from None
    except RemoteError as error:
        raise _Failed(f"remote error: {_describe(error)}") from None
    except (PBConnectionLost, DeadReferenceError, ProtocolError) as error:
        raise _Failed(f"error: {_describe(error)}") from None
    except NotJellyable as error:  # an argument such as 1j or ..., which PB cannot carry
        raise _Failed(f"error: cannot send the arguments: {error}") from None
    finally:
        connection.close()


async def _call_on(
    factory: PBClientFactory, method: str, args: Sequence[Any], kwargs: Mapping[str, Any], credentials: Credentials
) -> Any:
    target = await factory.getRootObject() if credentials is None else await factory.login(credentials)
    return await target.callRemote(method, *args, **kwargs)


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
