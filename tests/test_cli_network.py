"""``pbcore serve``, ``pbcore call`` and ``pbcore demo`` over real sockets."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from pbcore.cli import main, parse_address, parse_value

SERVE_TIMEOUT = 20.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `pbcore` in-process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@contextmanager
def pbcore_serve(*options: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run `pbcore serve --port 0 ...` in a subprocess; yield its port and the process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pbcore", "serve", "--port", "0", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        stdout = process.stdout
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(SERVE_TIMEOUT)
        assert line, "pbcore serve did not say where it listens"
        assert line[0].startswith("pbcore serve: listening on 127.0.0.1:"), line[0]
        port = int(line[0].split("127.0.0.1:")[1].split()[0])
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-2.5", -2.5),
        ('"42"', "42"),
        ("b'raw'", b"raw"),
        ("[1, None, (2,)]", [1, None, (2,)]),
        ("{'k': True}", {"k": True}),
        ("hello", "hello"),
        ("hello world", "hello world"),
        ("[1, 2", "[1, 2"),
        ("__import__('os')", "__import__('os')"),  # never evaluated: not a literal
        ("", ""),
    ],
)
def test_arguments_are_literals_or_strings(text: str, value: Any) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("localhost", ("localhost", 8787)),
        ("localhost:9000", ("localhost", 9000)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", 8787)),
        ("::1", ("::1", 8787)),
    ],
)
def test_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (":9000", "no host"),
        ("host:port", "the port must be a number"),
        ("host:0", "the port must be a number"),
        ("host:65536", "the port must be a number"),
        ("[::1", "expected [IPV6]:PORT"),
        ("[::1]9000", "expected [IPV6]:PORT"),
    ],
)
def test_bad_addresses_are_usage_errors(capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    status, out, err = run(capsys, "call", text, "echo")
    assert (status, out) == (2, "")
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["call", "localhost", "echo", "--user", "alice"], "--user and --password go together"),
        (["call", "localhost", "echo", "--password", "x"], "--user and --password go together"),
        (["call", "localhost", "echo", "--anonymous", "--user", "a", "--password", "b"], "exclude each other"),
        (["call", "localhost", "echo", "--kw", "1x=2"], "expected NAME=VALUE"),
        (["call", "localhost", "echo", "--timeout", "0"], "must be more than 0"),
        (["serve", "--user", "alice"], "--user and --password go together"),
        (["serve", "--tick", "soon"], "not a number"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert message in err


def test_decode_does_not_load_an_event_loop() -> None:
    code = "import sys, pbcore.cli; print(json.dumps(sorted(set(sys.modules) & {'asyncio', 'pbcore_asyncio'})))"
    result = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


# -- demo ---------------------------------------------------------------------------------------


def test_demo_tours_every_flavor(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "demo")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("pbcore demo: a PB server and two clients in one process, over TCP on 127.0.0.1:")
    expected = [
        "  root.echo('hello') -> 'hello'",
        "  root.echo(1, 2.5, [b'x'], {'k': None}) -> (1, 2.5, [b'x'], {'k': None})",
        "  root.note('a Copyable') -> Note('a Copyable', by 'server')",
        "  root.ticker() -> Ticker(value=0)",
        "  (the server ticks twice) -> Ticker(value=2)",
        "  root.fail() -> pbcore.demo.DemoError: this is what an error answer looks like",
        "  root.nosuch() -> twisted.spread.flavors.NoSuchMethod: No such method: remote_nosuch",
        "  login('alice', 'wrong') -> twisted.cred.error.UnauthorizedLogin: Unauthorized login",
        "  alice.whoami() -> 'alice'",
        "  alice.board().post('hi') -> Note('hi', by 'alice')",
        "  anonymous.board().post('hello') -> Note('hello', by 'anonymous')",
        "  anonymous.board().read() -> [Note('hi', by 'alice'), Note('hello', by 'anonymous')]",
        "  the client drops its ticker cache -> observers on the server: 1 -> 0",
    ]
    assert [line for line in lines if line in expected] == expected


# -- serve and call -----------------------------------------------------------------------------


def test_call_an_open_demo_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pbcore_serve("--tick", "0.05") as (port, _):
        address = f"127.0.0.1:{port}"
        assert run(capsys, "call", address, "echo", "hello") == (0, "'hello'\n", "")
        assert run(capsys, "call", address, "echo", "1", "2.5", "b'x'", "[None]") == (0, "(1, 2.5, b'x', [None])\n", "")
        assert run(capsys, "call", address, "note", "hi") == (0, "Note('hi', by 'server')\n", "")
        assert run(capsys, "call", address, "whoami", "--anonymous") == (0, "'anonymous'\n", "")
        status, out, _ = run(capsys, "call", address, "ticker")
        assert status == 0
        assert out.startswith("Ticker(value=")
        status, out, err = run(capsys, "call", address, "fail")
        assert (status, out) == (1, "")
        assert err == "pbcore call: remote error: pbcore.demo.DemoError: this is what an error answer looks like\n"
        status, out, err = run(capsys, "call", address, "echo", "--kw", "a=1")
        assert (status, out) == (1, "")
        assert "builtins.TypeError" in err
        assert "unexpected keyword argument 'a'" in err
        status, out, err = run(capsys, "call", address, "echo", "1j")
        assert (status, out) == (1, "")
        assert err.startswith("pbcore call: error: cannot send the arguments: cannot jelly builtins.complex")
        status, _, err = run(capsys, "call", address, "nosuch")
        assert status == 1
        assert "NoSuchMethod: No such method: remote_nosuch" in err


def test_the_ticker_ticks(capsys: pytest.CaptureFixture[str]) -> None:
    with pbcore_serve("--tick", "0.02") as (port, _):
        seen = set()
        for _ in range(200):  # bounded: each call takes a round trip, the server ticks every 20 ms
            status, out, _ = run(capsys, "call", f"127.0.0.1:{port}", "ticker")
            assert status == 0
            seen.add(int(out.removeprefix("Ticker(value=").removesuffix(")\n")))
            if len(seen) > 1:
                break
        assert len(seen) > 1


def test_call_a_server_that_requires_login(capsys: pytest.CaptureFixture[str]) -> None:
    with pbcore_serve("--user", "alice", "--password", "secret") as (port, _):
        address = f"127.0.0.1:{port}"
        login = ("--user", "alice", "--password", "secret")
        assert run(capsys, "call", address, "whoami", *login) == (0, "'alice'\n", "")
        assert run(capsys, "call", address, "echo", "[1, 2]", *login) == (0, "[1, 2]\n", "")
        status, out, _ = run(capsys, "call", address, "board", *login)
        assert (status, out.startswith("<RemoteReference ")) == (0, True)
        status, _, err = run(capsys, "call", address, "whoami", "--user", "alice", "--password", "wrong")
        assert status == 1
        assert err == "pbcore call: remote error: twisted.cred.error.UnauthorizedLogin: Unauthorized login\n"
        status, _, err = run(capsys, "call", address, "whoami", "--user", "mallory", "--password", "wrong")
        assert status == 1
        assert err == "pbcore call: remote error: twisted.cred.error.UnauthorizedLogin: Unauthorized login\n"
        assert run(capsys, "call", address, "whoami", "--anonymous") == (
            1,
            "",
            "pbcore call: remote error: twisted.cred.error.UnhandledCredentials:"
            " no checker for Anonymous credentials\n",
        )
        status, _, err = run(capsys, "call", address, "echo", "x")
        assert status == 1
        assert "No such method: remote_echo" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_on_a_signal_and_closes_its_connections(signum: signal.Signals) -> None:
    with pbcore_serve() as (port, process), socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(SERVE_TIMEOUT)
        assert client.recv(100).startswith(b"\x02\x80")  # the dialect offer: the server has this connection
        process.send_signal(signum)
        with suppress(ConnectionResetError):
            while client.recv(100):  # until the server closes it (or the timeout fails the test)
                pass
        out, err = process.communicate(timeout=SERVE_TIMEOUT)
    assert (process.returncode, out) == (0, "")
    assert err == f"pbcore serve: {signum.name}, closed 1 connection; stopped\n"


def test_serve_on_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, out, err = run(capsys, "serve", "--port", str(port))
    assert (status, out) == (1, "")
    assert err.startswith(f"pbcore serve: error: cannot listen on 127.0.0.1:{port}: ")


def test_call_with_nobody_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        status, out, err = run(capsys, "call", f"127.0.0.1:{port}", "echo")
    assert (status, out) == (1, "")
    assert err.startswith(f"pbcore call: error: cannot connect to 127.0.0.1:{port}: ")


def test_call_a_server_that_never_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts; nobody ever speaks
        port = silent.getsockname()[1]
        status, out, err = run(capsys, "call", f"127.0.0.1:{port}", "echo", "--timeout", "0.3")
    assert (status, out, err) == (1, "", "pbcore call: error: no answer within 0.3 s\n")


def test_call_a_server_that_speaks_garbage(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def speak_garbage() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"\xff" * 100)  # not Banana: no such type byte
                with suppress(OSError):
                    connection.recv(100)

        talker = threading.Thread(target=speak_garbage, daemon=True)
        talker.start()
        status, out, err = run(capsys, "call", f"127.0.0.1:{port}", "echo", "--timeout", "10")
        talker.join(10)
    assert (status, out) == (1, "")
    assert err.startswith("pbcore call: error: ")
    assert err == "pbcore call: error: PBConnectionLost: unknown type byte 0xff (at byte 0 of the stream)\n"


# -- a Twisted client against `pbcore serve` ------------------------------------------------------

TWISTED_CLIENT = """
import json, sys
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, reactor
from twisted.spread import pb

class NoteCopy(pb.RemoteCopy):
    pass

pb.setUnjellyableForClass("pbcore.demo.Note", NoteCopy)

@defer.inlineCallbacks
def run():
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", int(sys.argv[1]), factory)
    avatar = yield factory.login(UsernamePassword(b"alice", b"secret"))
    out = {"whoami": (yield avatar.callRemote("whoami"))}
    note = yield avatar.callRemote("note", "from twisted")
    out["note"] = [note.text, note.author]
    board = yield avatar.callRemote("board")
    posted = yield board.callRemote("post", "twisted was here")
    out["posted"] = [posted.text, posted.author]
    try:
        yield avatar.callRemote("fail")
    except Exception as error:
        out["fail"] = str(error)
    print(json.dumps(out))

def main():
    d = run()
    d.addErrback(lambda f: print(json.dumps({"error": f.getErrorMessage()})))
    d.addBoth(lambda _: reactor.stop())
    reactor.callLater(20, reactor.stop)
    reactor.run()

main()
"""


def test_a_twisted_client_logs_in_to_pbcore_serve() -> None:
    with pbcore_serve("--user", "alice", "--password", "secret") as (port, _):
        result = subprocess.run(
            [sys.executable, "-c", TWISTED_CLIENT, str(port)], capture_output=True, text=True, timeout=60, check=True
        )
    assert json.loads(result.stdout) == {
        "whoami": "alice",
        "note": ["from twisted", "server"],
        "posted": ["twisted was here", "alice"],
        "fail": "this is what an error answer looks like",
    }
