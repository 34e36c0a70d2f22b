"""examples/selectors_pb.py really works, over real loopback sockets; the docs' snippets run.

The example is loaded from its path (``examples/`` is not a package). Its
server runs in a thread (a Loop of its own) where a test needs a client
that is not a Loop: a raw socket sending garbage, or a Twisted client, which
runs in a subprocess because a Twisted reactor cannot be restarted in-process.
"""

from __future__ import annotations

import importlib.util
import io
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pbcore_blocking
import pytest

from pbcore import (
    Broker,
    CopiedFailure,
    DeadReferenceError,
    PBClientFactory,
    PBConnectionLost,
    ProtocolError,
    Referenceable,
    Unauthorized,
    copyTags,
    globalSecurity,
)
from pbcore.cred import UsernamePassword
from pbcore.events import ConnectionClosed, Event
from pbcore.jelly import unjellyableFactoryRegistry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "selectors_pb.py"

DEMO_OUTPUT = """\
echo('hello') -> 'hello'
add(2, 3) -> 5
echo(<524288 bytes>) -> same bytes: True
counter(10) -> <RemoteReference 1>
counter.increment() -> 11
counter.increment(by=5) -> 16
missing() -> CopiedFailure: twisted.spread.flavors.NoSuchMethod: No such method: remote_missing
login(alice) -> <RemoteReference 3>
avatar.whoami() -> 'alice'
"""


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("selectors_pb", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


@contextmanager
def serving(root: Any = None) -> Iterator[tuple[int, list[tuple[bool, Event]]]]:
    """The example's server (of *root*, a DemoRoot by default) in a thread: yields its port and the events it saw."""
    seen: list[tuple[bool, Event]] = []
    root = example.DemoRoot() if root is None else root
    loop = example.Loop(root=root, on_event=lambda c, e: seen.append((c.broker.is_client, e)))
    _, port = loop.listen("127.0.0.1", 0)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port, seen
    finally:
        loop.stop()
        thread.join(10)
        assert not thread.is_alive(), "the server loop did not stop"
        loop.close()


# -- the program -------------------------------------------------------------------------


def test_demo_mode() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "demo"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == DEMO_OUTPUT + "server released the counter: True\nserver logged alice out\nclosed cleanly\n"
    assert_logged_missing_only(done.stderr)


def assert_logged_missing_only(stderr: str) -> None:
    """The server logged nothing at WARNING or above: the call of missing() is a refusal (NoSuchMethod),
    logged at INFO in one line, not a bug with a traceback."""
    assert stderr == "", stderr


def test_server_and_client_modes() -> None:
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "server", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        found = re.fullmatch(r"serving PB on 127\.0\.0\.1:(\d+)\n", banner)
        assert found, banner
        client = subprocess.run(
            [sys.executable, str(EXAMPLE), "client", found[1]], capture_output=True, text=True, timeout=60, check=False
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout == DEMO_OUTPUT
        assert client.stderr == ""
        assert server.poll() is None  # the server outlives its clients
    finally:
        server.terminate()
        _, server_stderr = server.communicate(timeout=10)
    assert_logged_missing_only(server_stderr)


def test_usage() -> None:
    assert example.main(["bogus"]) == 2


# -- the loop ----------------------------------------------------------------------------


def test_partial_writes_on_both_sides() -> None:
    loop = example.Loop(root=example.DemoRoot())
    try:
        host, port = loop.listen("127.0.0.1", 0)
        client = loop.connect(host, port)
        loop.run_until(lambda: len(loop.connections) == 2)
        for connection in loop.connections:
            # A small send buffer: send() takes a few KB at a time.
            # (Shrinking SO_RCVBUF on a live connection stalls TCP instead.)
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 2048
        assert loop.call(client.broker.root(), "echo", big) == big
        assert all(connection.partial_writes > 0 for connection in loop.connections)
    finally:
        loop.close()


class Hangup(Referenceable):
    """A root whose ``hangup`` closes its own connection (``broker.close()``, as an application may)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def remote_hello(self) -> str:
        return "hello"

    def remote_hangup(self) -> None:
        self.broker.close(ConnectionAbortedError("hung up"))


class HangupRoot:
    def rootObject(self, broker: Broker) -> Hangup:
        return Hangup(broker)


def test_a_broker_that_closes_itself_closes_its_socket_after_writing_its_answers() -> None:
    loop = example.Loop(root=HangupRoot())
    try:
        host, port = loop.listen("127.0.0.1", 0)
        client = loop.connect(host, port)
        root = client.broker.root()
        hello = root.callRemote("hello")
        hangup = root.callRemote("hangup")  # read with hello: hello's answer is queued, then the broker closes
        loop.run_until(lambda: client.closed)
        assert hello.unwrap() == "hello"
        assert isinstance(hangup.error, PBConnectionLost)
        assert not loop.connections  # the server's side closed its socket too
    finally:
        loop.close()


def test_garbage_closes_that_connection_only() -> None:
    with serving() as (port, seen):
        loop = example.Loop()
        try:
            client = loop.connect("127.0.0.1", port)
            root = client.broker.root()
            assert loop.call(root, "add", 1, 2) == 3
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"\xffnot banana")  # 0xff is no Banana type byte
                received = b""
                for _ in range(100):  # the dialect offer, then EOF
                    chunk = raw.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                assert chunk == b"", "the server did not close the garbage connection"
                assert received.startswith(b"\x02\x80")  # it had offered [b"pb", b"none"]
            # The well-behaved client never noticed.
            assert loop.call(root, "echo", "still here") == "still here"
            counter = loop.call(root, "counter", 1)
            assert loop.call(counter, "increment", by=41) == 42
        finally:
            loop.close()
    closed = [event for is_client, event in seen if isinstance(event, ConnectionClosed) and not is_client]
    assert len(closed) == 2  # the garbage one, then the good one at the end
    assert isinstance(closed[0].reason, ProtocolError)
    assert "unknown type byte 0xff" in str(closed[0].reason)
    assert closed[1].reason is None  # plain EOF


def test_pending_calls_fail_when_the_server_goes_away() -> None:
    loop = example.Loop()
    try:
        with serving() as (port, _):
            client = loop.connect("127.0.0.1", port)
            pending = client.broker.root().callRemote("echo", 1)
        # The server loop has closed every connection, before reading the call.
        loop.run_until(lambda: client.closed)
        assert isinstance(pending.error, PBConnectionLost)
        with pytest.raises(DeadReferenceError):
            client.broker.root().callRemote("echo", 2)
    finally:
        loop.close()


TWISTED_CLIENT = """
import sys
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.spread import pb

@defer.inlineCallbacks
def main():
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", int(sys.argv[1]), factory, timeout=10)
    try:
        root = yield factory.getRootObject()
        print((yield root.callRemote("echo", ["hi", 1.5, None])))
        print((yield root.callRemote("add", 2, 40)))
        counter = yield root.callRemote("counter", 1)
        print((yield counter.callRemote("increment", by=2)))
        try:
            yield root.callRemote("missing")
        except Exception as error:
            print("error:", error)
        avatar = yield factory.login(credentials.UsernamePassword(b"alice", b"wonderland"))
        print((yield avatar.callRemote("whoami")))
        def refused(failure):
            failure.trap(UnauthorizedLogin)
            print("refused")
        yield factory.login(credentials.UsernamePassword(b"alice", b"looking glass")).addErrback(refused)
    finally:
        reactor.stop()

reactor.callWhenRunning(main)
reactor.callLater(20, reactor.stop)
reactor.run()
"""


def test_a_twisted_client_talks_to_the_example_server() -> None:
    if importlib.util.find_spec("twisted") is None:
        pytest.skip("Twisted is not installed")
    root = example.DemoRoot()
    with serving(root) as (port, _):
        done = subprocess.run(
            [sys.executable, "-c", TWISTED_CLIENT, str(port)], capture_output=True, text=True, timeout=60, check=False
        )
        # The client has gone: its connection's end logged alice out.
        wait_for(lambda: root.realm.online == [])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['hi', 1.5, None]\n42\n3\nerror: No such method: remote_missing\nalice\nrefused\n"


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    """Poll *condition* (set by the server's thread) until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_a_blocking_client_logs_in_to_the_example_server() -> None:
    """A Portal login served by the selector loop: respond() is async, the loop's driver runs it."""
    root = example.DemoRoot()
    with serving(root) as (port, seen), pbcore_blocking.connect(PBClientFactory(), "127.0.0.1", port) as connection:
        with pytest.raises(CopiedFailure) as caught:
            connection.login(UsernamePassword("alice", "looking glass"))
        assert caught.value.check(Unauthorized) is Unauthorized
        with pytest.raises(CopiedFailure) as caught:
            connection.login(UsernamePassword("bob", "wonderland"))  # no such user: the same refusal
        assert caught.value.check(Unauthorized) is Unauthorized
        avatar = connection.login(UsernamePassword("alice", "wonderland"))
        assert connection.call(avatar, "whoami") == "alice"
        assert root.realm.online == ["alice"]
        # The same connection's root still answers, and a second login is a second avatar.
        assert connection.call(connection.root(), "add", 2, 3) == 5
        again = connection.login(UsernamePassword("alice", "wonderland"))
        assert connection.call(again, "whoami") == "alice"
        wait_for(lambda: root.realm.online == ["alice", "alice"])
        del again  # the client lets go of one avatar: its decref logs that one out
        wait_for(lambda: root.realm.online == ["alice"])
        connection.close()  # and the connection's end logs the other out
        wait_for(lambda: root.realm.online == [])
    assert not [event for _, event in seen if isinstance(event, ConnectionClosed) and event.reason is not None]


# -- the docs ----------------------------------------------------------------------------
#
# The pages' code blocks run as the reader would run them. A marker comment on the line
# before a block says more about it:
#
#   <!-- twisted -->  a python block written for Twisted: the page's consecutive Twisted
#                     blocks are one program, run in a subprocess (a reactor cannot be
#                     restarted in-process);
#   <!-- output -->   a text block: what the python block (or Twisted program) just
#                     before it prints, exactly.
#
# Every other python block runs in-process, in order, in one namespace per page. Servers
# listen on ephemeral ports of 127.0.0.1, so the pages can run side by side.

DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?:<!-- (?P<marker>[a-z ]+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```$", flags=re.S | re.M)


@dataclass(frozen=True)
class Block:
    marker: str  # the marker comment just before the block, or ""
    lang: str
    code: str


def blocks(doc: str) -> list[Block]:
    text = (DOCS / doc).read_text(encoding="utf-8")
    return [Block(m["marker"] or "", m["lang"], m["code"]) for m in FENCE.finditer(text)]


def twisted_programs(doc: str) -> list[tuple[str, str | None]]:
    """The page's Twisted programs (runs of consecutive Twisted blocks), each with the output shown after it."""
    programs: list[tuple[str, str | None]] = []
    parts: list[str] = []
    for block in [*blocks(doc), Block("", "", "")]:
        if block.lang == "python" and block.marker == "twisted":
            parts.append(block.code)
            continue
        if parts:
            programs.append(("\n\n".join(parts), block.code if block.marker == "output" else None))
            parts = []
    return programs


@pytest.mark.parametrize("doc", ["object-model.md", "embedding.md", "tutorial.md", "porting.md", "login.md"])
def test_doc_snippets_run(doc: str) -> None:
    """Every ``python`` block of the page, in order, in one namespace, as the reader would."""
    page = blocks(doc)
    assert any(block.lang == "python" for block in page)
    # The snippets register copy tags: put the global registries back afterwards.
    registries: list[dict[Any, Any]] = [copyTags, unjellyableFactoryRegistry, globalSecurity.allowedTypes]
    saved = [dict(registry) for registry in registries]
    namespace: dict[str, Any] = {"__name__": "__main__"}
    previous: Block | None = None
    printed = ""
    try:
        for number, block in enumerate(page, 1):
            if block.marker == "output":
                assert previous is not None and previous.lang == "python", f"{doc} block {number}: output of what?"
                if previous.marker != "twisted":  # test_twisted_snippets_run checks those
                    assert printed == block.code, f"{doc} block {number}"
            elif block.lang == "python" and block.marker != "twisted":
                with redirect_stdout(io.StringIO()) as out:
                    exec(compile(block.code, f"{doc} block {number}", "exec"), namespace)
                printed = out.getvalue()
            previous = block
    finally:
        for registry, before in zip(registries, saved, strict=True):
            registry.clear()
            registry.update(before)


@pytest.mark.parametrize("doc", ["porting.md"])
def test_twisted_snippets_run(doc: str) -> None:
    """The page's Twisted programs run under Twisted and print what the page says."""
    if importlib.util.find_spec("twisted") is None:
        pytest.skip("Twisted is not installed")
    programs = twisted_programs(doc)
    assert programs
    for source, expected in programs:
        done = subprocess.run(
            [sys.executable, "-c", source], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        if expected is not None:
            assert done.stdout == expected


def test_the_selector_loop_keeps_time_for_the_core() -> None:
    """A port that accepts and never speaks: the loop's timers end the handshake, and say why."""
    example = load_example()
    from pbcore.timers import Timeouts  # noqa: PLC0415

    silent = socket.create_server(("127.0.0.1", 0))
    loop = example.Loop()
    try:
        with pytest.raises(ConnectionError, match="nothing arrived"):
            loop.connect("127.0.0.1", silent.getsockname()[1], Timeouts(handshake=0.3))
    finally:
        loop.close()
        silent.close()
