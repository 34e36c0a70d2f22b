"""One handle per adapter and runtime, so that every contract test is written once.

A test talks to a server and its clients through :class:`Kit` from its own (plain) thread.
For the async adapters each side runs in an event loop of its own, in a thread of its own
(anyio's blocking portal: asyncio, uvloop or trio), so a client that blocks its loop does not
block the server, as between two processes. ``client.run(fn, *args)`` runs the coroutine
function *fn* in the client's runtime and returns what it returns: the same code awaits PB
calls under asyncio, trio, anyio and the blocking adapter (whose ``connection.run`` drives it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from pbcore.factory import PBClientFactory, PBServerFactory

T = TypeVar("T")

#: How long any one step of a contract test may take before it counts as a hang.
STEP = 20.0


class Server:
    """A running server: ``port``, ``connections()``, ``close(grace)`` (returns when closed)."""

    def __init__(self, obj: Any, portal: BlockingPortal | None) -> None:
        self.obj = obj
        self._portal = portal
        self.port: int = obj.port

    def connections(self) -> list[Any]:
        if self._portal is None:
            return list(self.obj.connections)
        return self._portal.call(lambda: list(self.obj.connections))

    def close(self, grace: float = 0.0) -> None:
        if self._portal is None:
            self.obj.close(grace=grace)
        else:
            self._portal.call(_bounded, STEP, self.obj.aclose, grace)


class Client:
    """One client connection: ``run(fn, *args)`` in its runtime, ``root()``, ``close()``, ``closed_within()``."""

    def __init__(self, factory: PBClientFactory, connection: Any, portal: BlockingPortal | None) -> None:
        self.factory = factory
        self.connection = connection
        self._portal = portal

    @property
    def broker(self) -> Any:
        return self.connection.broker

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = STEP) -> T:
        """``await fn(*args)`` in the client's runtime; TimeoutError past *timeout* (for each call awaited)."""
        if self._portal is None:
            result: T = self.connection.run(fn(*args), timeout=timeout)
            return result
        return cast(T, self._portal.call(_bounded, timeout, fn, *args))

    def call_soon(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function where the connection lives (its loop thread, or here)."""
        if self._portal is None:
            return fn()
        return self._portal.call(fn)

    def root(self) -> Any:
        return self.run(self.factory.getRootObject)

    def close(self) -> None:
        self.call_soon(self.connection.close)

    def closed_within(self, seconds: float) -> bool:
        """Whether the connection is closed (this side saw it) within *seconds*."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.call_soon(lambda: self.connection.broker.closed):
                return True
            time.sleep(0.01)
        return False


async def _bounded(timeout: float, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    with anyio.fail_after(timeout):
        return await fn(*args)


class Kit:
    """How one adapter, on one runtime, serves and connects."""

    def __init__(
        self,
        name: str,
        backend: str | None,
        serve: Callable[[PBServerFactory], Any],
        connect: Callable[[PBClientFactory, int], Any],
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.backend_options = backend_options
        self._serve = serve
        self._connect = connect
        self._stack = contextlib.ExitStack()
        self._portals: list[BlockingPortal] = []

    @property
    def blocking(self) -> bool:
        return self.backend is None

    def _portal(self) -> BlockingPortal | None:
        if self.backend is None:
            return None
        portal = self._stack.enter_context(start_blocking_portal(self.backend, self.backend_options))
        self._portals.append(portal)
        return portal

    def serve(self, factory: PBServerFactory) -> Server:
        portal = self._portal()
        if portal is None:
            server = self._serve(factory)
            self._stack.callback(server.close)
            return Server(server, None)
        obj = self._stack.enter_context(portal.wrap_async_context_manager(self._serve(factory)))
        return Server(obj, portal)

    def connect(self, factory: PBClientFactory, port: int) -> Client:
        portal = self._portal()
        if portal is None:
            connection = self._connect(factory, port)
            self._stack.callback(connection.close)
            return Client(factory, connection, None)
        connection = self._stack.enter_context(portal.wrap_async_context_manager(self._connect(factory, port)))
        return Client(factory, connection, portal)

    def raw_socket(self, connection: Any) -> Any:
        """The socket under a connection of this kit's adapter (to read its options)."""
        if self.name in ("asyncio", "uvloop"):
            return connection.transport.get_extra_info("socket")
        if self.name == "trio":
            return connection.stream.socket
        if self.name.startswith("anyio"):
            from anyio.abc import SocketAttribute  # noqa: PLC0415

            return connection.stream.extra(SocketAttribute.raw_socket)
        return connection._sock

    def close(self) -> None:
        self._stack.close()


# -- the adapters --------------------------------------------------------------------------------


def _asyncio_kit(name: str, options: dict[str, Any] | None) -> Kit:
    import pbcore_asyncio  # noqa: PLC0415

    @contextlib.asynccontextmanager
    async def serve(factory: PBServerFactory) -> AsyncIterator[Any]:
        server = await pbcore_asyncio.serve(factory, "127.0.0.1", 0)
        async with server:
            yield server

    @contextlib.asynccontextmanager
    async def connect(factory: PBClientFactory, port: int) -> AsyncIterator[Any]:
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        async with connection:
            yield connection

    return Kit(name, "asyncio", serve, connect, options)


def _trio_kit() -> Kit:
    import pbcore_trio  # noqa: PLC0415

    def serve(factory: PBServerFactory) -> Any:
        return pbcore_trio.open_server(factory, "127.0.0.1", 0)

    def connect(factory: PBClientFactory, port: int) -> Any:
        return pbcore_trio.open_connection(factory, "127.0.0.1", port)

    return Kit("trio", "trio", serve, connect)


def _anyio_kit(backend: str) -> Kit:
    import pbcore_anyio  # noqa: PLC0415

    def serve(factory: PBServerFactory) -> Any:
        return pbcore_anyio.open_server(factory, "127.0.0.1", 0)

    def connect(factory: PBClientFactory, port: int) -> Any:
        return pbcore_anyio.open_connection(factory, "127.0.0.1", port)

    return Kit(f"anyio-{backend}", backend, serve, connect)


def _blocking_kit() -> Kit:
    import pbcore_blocking  # noqa: PLC0415

    def serve(factory: PBServerFactory) -> Any:
        return pbcore_blocking.serve(factory, "127.0.0.1", 0, timeout=STEP)

    def connect(factory: PBClientFactory, port: int) -> Any:
        return pbcore_blocking.connect(factory, "127.0.0.1", port, timeout=STEP)

    return Kit("blocking", None, serve, connect)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


#: name -> (why it cannot run here, or None; how to make its kit)
KITS: dict[str, tuple[str | None, Callable[[], Kit]]] = {
    "asyncio": (None, lambda: _asyncio_kit("asyncio", None)),
    "uvloop": (
        None if _has("uvloop") else "uvloop is not installed",
        lambda: _asyncio_kit("uvloop", {"use_uvloop": True}),
    ),
    "trio": (None, _trio_kit),
    "anyio-asyncio": (None if _has("pbcore_anyio") else "no pbcore_anyio", lambda: _anyio_kit("asyncio")),
    "anyio-trio": (None if _has("pbcore_anyio") else "no pbcore_anyio", lambda: _anyio_kit("trio")),
    "blocking": (None, _blocking_kit),
}


@contextlib.contextmanager
def open_kit(name: str) -> Iterator[Kit]:
    kit = KITS[name][1]()
    try:
        yield kit
    finally:
        kit.close()
