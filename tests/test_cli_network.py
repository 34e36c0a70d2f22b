"""``pbcore serve``, ``pbcore call`` and ``pbcore demo`` over real sockets."""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pbcore_asyncio
import pytest

from pbcore.cli import main, parse_address, parse_value
from pbcore.factory import PBServerFactory
from pbcore.flavors import Root
from tests.adapters.certs import make_certificate

SERVE_TIMEOUT = 20.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `pbcore` in-process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def pbcore(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m pbcore ...` to completion, with no terminal on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "pbcore", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture
def no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Standard input is not a terminal (as under cron, CI or a pipe)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@contextmanager
def pbcore_serve(*options: str, env: dict[str, str] | None = None) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run `pbcore serve --port 0 ...` in a subprocess; yield its port and the process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pbcore", "serve", "--port", "0", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
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
        (["call", "localhost", "echo", "--user", "alice"], "standard input is not a terminal"),
        (["call", "localhost", "echo", "--password", "x"], "a password needs --user"),
        (["call", "localhost", "echo", "--password-env", "X"], "a password needs --user"),
        (["call", "localhost", "echo", "--user", "a", "--password", "b", "--password-env", "X"], "not allowed with"),
        (["call", "localhost", "echo", "--anonymous", "--user", "a", "--password", "b"], "exclude each other"),
        (["call", "localhost", "echo", "--kw", "1x=2"], "expected NAME=VALUE"),
        (["call", "localhost", "echo", "--timeout", "0"], "must be more than 0"),
        (["call", "localhost", "echo", "--connect-timeout", "-1"], "must be more than 0"),
        (["call", "localhost", "echo", "--then"], "expected at least one argument"),
        (["call", "localhost", "echo", "--key", "key.pem"], "--key goes with --cert"),
        (
            ["call", "localhost", "echo", "--cafile", "/nonexistent/ca.pem"],
            "--cafile /nonexistent/ca.pem: No such file",
        ),
        (["call", "localhost", "echo", "--trace", "/nonexistent/dir/trace"], "--trace /nonexistent/dir/trace: No such"),
        (["serve", "--user", "alice"], "standard input is not a terminal"),
        (["serve", "--tick", "soon"], "not a number"),
        (["serve", "--tls"], "TLS needs the server's certificate: --cert FILE"),
        (["serve", "--cafile", "ca.pem"], "TLS needs the server's certificate"),
        (["serve", "--cert", "/nonexistent/cert.pem"], "--cert /nonexistent/cert.pem: No such file"),
    ],
)
@pytest.mark.usefixtures("no_tty")
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
        assert err.startswith("pbcore call: error: cannot send the arguments: cannot jelly a builtins.complex")
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


@contextmanager
def silent_port() -> Iterator[int]:
    """A port where the kernel accepts connections and nobody ever speaks."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        yield silent.getsockname()[1]


def test_connect_timeout_against_a_silent_port() -> None:
    # In a subprocess, so that a timer that never fires fails the test instead of hanging it.
    with silent_port() as port:
        started = time.monotonic()
        result = pbcore("call", f"127.0.0.1:{port}", "echo", "--connect-timeout", "2")
        elapsed = time.monotonic() - started
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"pbcore call: error: no PB handshake with peer ('127.0.0.1', {port}) within 2 s:"
        " nothing arrived (is anything speaking PB there?); if it serves TLS, give --tls or --cafile\n"
    )
    assert elapsed < 9  # the 2 s handshake timeout, not --timeout's 10 s


@pytest.mark.skipif(sys.platform != "linux", reason="Linux drops the SYNs a full accept queue cannot take")
def test_connect_timeout_on_a_port_whose_queue_is_full() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # never accepting: once its queue is full, connecting hangs
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            started = time.monotonic()
            result = pbcore("call", f"127.0.0.1:{port}", "echo", "--connect-timeout", "1")
            elapsed = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"pbcore call: error: cannot connect to 127.0.0.1:{port}: no TCP connection within 1 s\n"
    assert elapsed < 9


class HangingRoot(Root):
    """A root that answers echo at once and hang never."""

    def remote_echo(self, value: Any) -> Any:
        return value

    async def remote_hang(self) -> None:
        await asyncio.Event().wait()


@contextmanager
def hanging_server() -> Iterator[int]:
    """A pbcore_asyncio server, on a loop in a thread, whose hang() never answers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        pbcore_asyncio.serve(PBServerFactory(HangingRoot()), "127.0.0.1", 0), loop
    ).result(SERVE_TIMEOUT)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(SERVE_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SERVE_TIMEOUT)
        loop.close()


def test_call_timeout_says_which_call(capsys: pytest.CaptureFixture[str]) -> None:
    with hanging_server() as port:
        address = f"127.0.0.1:{port}"
        assert run(capsys, "call", address, "echo", "hi", "--timeout", "0.5") == (0, "'hi'\n", "")
        started = time.monotonic()
        result = pbcore("call", address, "hang", "--timeout", "0.5", "--connect-timeout", "0.5")  # bounded
        elapsed = time.monotonic() - started
    assert (result.returncode, result.stdout) == (1, "")
    assert elapsed < 9  # the 0.5 s call timeout, not --connect-timeout's, nor for ever
    assert result.stderr == (
        f"pbcore call: error: hang: no answer from peer ('127.0.0.1', {port}) in time (--timeout 0.5 s)\n"
    )


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


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Two self-signed certificates (for localhost and 127.0.0.1) and their keys: "server", "other"."""
    made = {}
    for name in ("server", "other"):
        directory = tmp_path / name
        directory.mkdir()
        cert, key = make_certificate(directory)
        made[name] = (str(cert), str(key))
    return made


def test_tls_with_the_right_and_the_wrong_ca(
    capsys: pytest.CaptureFixture[str], certificates: dict[str, tuple[str, str]]
) -> None:
    cert, key = certificates["server"]
    other_cert, _ = certificates["other"]
    with pbcore_serve("--cert", cert, "--key", key) as (port, process):
        address = f"127.0.0.1:{port}"
        assert run(capsys, "call", address, "echo", "over TLS", "--cafile", cert) == (0, "'over TLS'\n", "")
        assert run(capsys, "call", f"localhost:{port}", "whoami", "--anonymous", "--cafile", cert) == (
            0,
            "'anonymous'\n",
            "",
        )
        for options in (["--cafile", other_cert], ["--tls"]):  # another CA; the system's CAs
            status, out, err = run(capsys, "call", address, "echo", "x", *options)
            assert (status, out) == (1, "")
            assert err == (
                f"pbcore call: error: TLS handshake with {address} failed: its certificate does not verify:"
                " self-signed certificate\n"
            )
        # Plain PB to a TLS port: the server waits for a TLS hello, the client for PB.
        status, out, err = run(capsys, "call", address, "echo", "x", "--connect-timeout", "0.5")
        assert (status, out) == (1, "")
        assert "no PB handshake" in err
        assert err.endswith("; if it serves TLS, give --tls or --cafile\n")
        assert process.poll() is None  # the server took all that in its stride
    with pbcore_serve() as (port, _):
        status, out, err = run(capsys, "call", f"127.0.0.1:{port}", "echo", "x", "--cafile", cert)
    assert (status, out) == (1, "")
    assert err == (
        f"pbcore call: error: TLS handshake with 127.0.0.1:{port} failed:"
        " the server does not speak TLS (WRONG_VERSION_NUMBER)\n"
    )


def test_tls_client_certificates(capsys: pytest.CaptureFixture[str], certificates: dict[str, tuple[str, str]]) -> None:
    cert, key = certificates["server"]
    client_cert, client_key = certificates["other"]
    with pbcore_serve("--cert", cert, "--key", key, "--cafile", client_cert) as (port, _):
        address = f"127.0.0.1:{port}"
        mine = ("--cafile", cert, "--cert", client_cert, "--key", client_key)
        assert run(capsys, "call", address, "echo", "mutual", *mine) == (0, "'mutual'\n", "")
        for options in (["--cafile", cert], ["--cafile", cert, "--cert", cert, "--key", key]):  # none; untrusted
            status, out, err = run(capsys, "call", address, "echo", "x", *options)
            assert (status, out) == (1, "")
            assert err.startswith("pbcore call: error: ")
            assert err.endswith("; if the server requires a client certificate, give --cert (and --key)\n")


def test_tls_files_that_are_not_certificates(
    capsys: pytest.CaptureFixture[str], certificates: dict[str, tuple[str, str]]
) -> None:
    cert, key = certificates["server"]
    _, other_key = certificates["other"]
    status, out, err = run(capsys, "call", "localhost", "echo", "--cafile", key)
    assert (status, out) == (2, "")
    assert f"pbcore call: error: --cafile {key}: [X509: NO_CERTIFICATE_OR_CRL_FOUND]" in err
    status, out, err = run(capsys, "call", "localhost", "echo", "--cert", cert, "--key", other_key)
    assert (status, out) == (2, "")
    assert f"pbcore call: error: --cert {cert}: [X509: KEY_VALUES_MISMATCH] key values mismatch\n" in err


# -- passwords ------------------------------------------------------------------------------------


def test_passwords_from_the_environment(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    serving = pbcore_serve("--user", "alice", "--password-env", "PBCORE_SERVE_PW", env={"PBCORE_SERVE_PW": "s3cret"})
    with serving as (port, _):
        address = f"127.0.0.1:{port}"
        monkeypatch.setenv("PBCORE_CALL_PW", "s3cret")
        assert run(capsys, "call", address, "whoami", "--user", "alice", "--password-env", "PBCORE_CALL_PW") == (
            0,
            "'alice'\n",
            "",
        )
        monkeypatch.setenv("PBCORE_CALL_PW", "wrong")
        status, _, err = run(capsys, "call", address, "whoami", "--user", "alice", "--password-env", "PBCORE_CALL_PW")
        assert (status, err) == (
            1,
            "pbcore call: remote error: twisted.cred.error.UnauthorizedLogin: Unauthorized login\n",
        )
        result = pbcore("call", address, "whoami", "--user", "alice", "--password-env", "PW", env={"PW": "s3cret"})
        assert (result.returncode, result.stdout, result.stderr) == (0, "'alice'\n", "")
        monkeypatch.delenv("PBCORE_UNSET_PW", raising=False)
        status, out, err = run(
            capsys, "call", address, "whoami", "--user", "alice", "--password-env", "PBCORE_UNSET_PW"
        )
        assert (status, out) == (2, "")
        assert "--password-env PBCORE_UNSET_PW: the environment variable is not set" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_password_prompt_on_a_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def typed(prompt: str = "Password: ", stream: Any = None) -> str:
        prompts.append(prompt)
        return "secret"

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(getpass, "getpass", typed)
    with pbcore_serve("--user", "alice", "--password", "secret") as (port, _):
        assert run(capsys, "call", f"127.0.0.1:{port}", "whoami", "--user", "alice") == (0, "'alice'\n", "")
    assert prompts == ["password for alice: "]


def test_no_password_and_no_terminal_is_a_usage_error() -> None:
    with pbcore_serve("--user", "alice", "--password", "secret") as (port, _):
        result = pbcore("call", f"127.0.0.1:{port}", "whoami", "--user", "alice")  # stdin: /dev/null
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == (
        "pbcore call: error: --user alice needs a password and standard input is not a terminal to ask it on:"
        " give --password-env NAME (the environment variable that holds it)"
        " or --password PW (which other users can see in ps)"
    )
    result = pbcore("serve", "--port", "0", "--user", "alice")
    assert (result.returncode, result.stdout) == (2, "")
    assert "--user alice needs a password and standard input is not a terminal" in result.stderr


# -- calls on what the answer returns -----------------------------------------------------------


def test_then_calls_what_the_answer_returns(capsys: pytest.CaptureFixture[str]) -> None:
    with pbcore_serve() as (port, _):
        address = f"127.0.0.1:{port}"
        status, out, err = run(capsys, "call", address, "counter", "visits", "--then", "add", "2")
        assert (status, err) == (0, "")
        assert out.splitlines()[0].startswith("<RemoteReference ")
        assert out.splitlines()[1:] == ["2"]
        status, out, err = run(capsys, "call", address, "counter", "visits", "--then", "add", "3", "--then", "count")
        assert (status, out.splitlines()[1:]) == (1, ["5"])  # the answers before the failure
        assert err == "pbcore call: error: cannot call count: what add answered is not a remote reference but int\n"
        status, out, err = run(capsys, "call", address, "counter", "visits", "--then", "count")
        assert (status, out.splitlines()[1:], err) == (0, ["5"], "")
        # A view through a login: the board knows who posts.
        status, out, err = run(
            capsys, "call", address, "--anonymous", "board", "--then", "post", "hi", "--then", "read"
        )
        assert out.splitlines()[1:] == ["Note('hi', by 'anonymous')"]
        assert (status, err) == (
            1,
            "pbcore call: error: cannot call read: what post answered is not a remote reference but NoteCopy\n",
        )
        # A remote error in the middle of a chain.
        status, out, err = run(capsys, "call", address, "counter", "c", "--then", "add", "'x'", "--then", "count")
        assert (status, len(out.splitlines())) == (1, 1)
        assert err == "pbcore call: remote error: pbcore.demo.DemoError: add() takes an int, not str\n"


def test_then_in_a_subprocess_with_a_login(certificates: dict[str, tuple[str, str]]) -> None:
    cert, key = certificates["server"]
    with pbcore_serve("--user", "alice", "--password", "secret", "--cert", cert, "--key", key) as (port, _):
        result = pbcore(
            "call",
            f"127.0.0.1:{port}",
            "counter",
            "logins",
            "--then",
            "add",
            "-2",
            "--user",
            "alice",
            "--password-env",
            "PW",
            "--cafile",
            cert,
            env={"PW": "secret"},
        )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[1:] == ["-2"]


# -- traces -------------------------------------------------------------------------------------


def test_trace_then_decode(tmp_path: Path, certificates: dict[str, tuple[str, str]]) -> None:
    cert, key = certificates["server"]
    trace = tmp_path / "call.trace"
    with pbcore_serve("--cert", cert, "--key", key) as (port, _):
        call = pbcore(
            "call", f"127.0.0.1:{port}", "counter", "t", "--then", "add", "7", "--cafile", cert, "--trace", str(trace)
        )
        assert (call.returncode, call.stdout.splitlines()[1:], call.stderr) == (0, ["7"], "")
        failed = pbcore("call", f"127.0.0.1:{port}", "fail", "--cafile", cert, "--trace", str(tmp_path / "fail.trace"))
        assert failed.returncode == 1
    assert trace.read_text().startswith(f"# pbcore trace: pbcore call 127.0.0.1:{port}\n")
    decoded = pbcore("decode", "--trace", "--jelly", str(trace))  # what went over TLS, in the clear
    assert (decoded.returncode, decoded.stderr) == (0, "")
    assert decoded.stdout.splitlines() == [
        "<- dialects [b'pb', b'none']",
        "-> b'pb'",
        "-> version 6",
        "<- version 6",
        "-> message #1 to b'root'.counter(args=('t',), kwargs={}) answer=1",
        "<- answer #1: <remote 1>",
        "-> message #2 to 1.add(args=(7,), kwargs={}) answer=1",
        "<- answer #2: 7",
        "-> decref 1",
    ]
    raw = pbcore("decode", "--trace", str(trace))
    assert raw.stdout.splitlines()[:2] == ["<- [b'pb', b'none']", "-> b'pb'"]
    # One direction alone, as `pbcore decode --hex` reads it.
    received = "".join(line[2:] for line in trace.read_text().splitlines() if line.startswith("< "))
    alone = subprocess.run(
        [sys.executable, "-m", "pbcore", "decode", "--hex", "--jelly"],
        input=received,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (alone.returncode, alone.stdout.splitlines()) == (
        0,
        ["dialects [b'pb', b'none']", "version 6", "answer #1: <remote 1>", "answer #2: 7"],
    )
    failure = pbcore("decode", "--trace", "--jelly", str(tmp_path / "fail.trace"))
    assert failure.returncode == 0
    assert "-> message #1 to b'root'.fail(args=(), kwargs={}) answer=1" in failure.stdout.splitlines()
    assert any(
        line.startswith("<- error #1: <copy b'twisted.spread.pb.CopyableFailure'")
        for line in failure.stdout.splitlines()
    )


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


def test_help_documents_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "call", "--help")
    text = " ".join(out.split())
    assert status == 0
    for phrase in (
        "--then METHOD [ARG ...]",
        "Each answer's repr is printed on its own line as it comes, the first call's first",
        "--password-env NAME",
        "other users can see it in ps",
        "--connect-timeout S",
        "--cafile FILE trust only the CAs",
        "`pbcore decode --trace FILE` shows them",
    ):
        assert phrase in text
    status, out, _ = run(capsys, "serve", "--help")
    text = " ".join(out.split())
    assert status == 0
    for phrase in ("counter(name) (a Referenceable", "--cert FILE", "require client certificates", "--password-env"):
        assert phrase in text
