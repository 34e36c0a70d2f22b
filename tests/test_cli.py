"""The ``pbcore`` command: ``pbcore decode`` on streams that Twisted produced."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import testing
from twisted.spread import banana, jelly, pb
from twisted.test import iosim

import pbcore
from pbcore import cli
from pbcore.banana import ACCELERATED, _load_speedups, encode
from pbcore.cli import main

# Twisted's functions are unannotated: call them through Any (mypy --strict).
twisted_testing: Any = testing
twisted_banana: Any = banana
twisted_jelly: Any = jelly
twisted_pb: Any = pb
twisted_iosim: Any = iosim

#: What `pbcore decode` prints for :func:`twisted_stream`, without and with --jelly.
RAW_LINES = [
    "[b'pb', b'none']",
    "[version, 6]",
    "[message, 1, b'root', b'echo', 1, [tuple, [b'unicode', b'hello']], [dictionary]]",
]
JELLY_LINES = [
    "dialects [b'pb', b'none']",
    "version 6",
    "message #1 to b'root'.echo(args=('hello',), kwargs={}) answer=1",
]


def twisted_stream() -> bytes:
    """What a Twisted server's Banana writes: the dialect offer, then (in pb) version and a call."""
    protocol = twisted_banana.Banana(isClient=0)
    transport = twisted_testing.StringTransport()
    protocol.makeConnection(transport)  # a server offers its dialects, in no dialect yet
    protocol.currentDialect = b"pb"
    protocol.sendEncoded([b"version", 6])
    protocol.sendEncoded([b"message", 1, b"root", b"echo", 1, twisted_jelly.jelly(("hello",)), twisted_jelly.jelly({})])
    data: bytes = transport.value()
    return data


STREAM = twisted_stream()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """Run `pbcore` in-process: (exit status, stdout lines, stderr)."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def set_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_the_stream_is_what_twisted_sends() -> None:
    # The vocabulary at work: `version` and `message` are one-byte indexes.
    assert STREAM.startswith(encode([b"pb", b"none"], dialect=b"none"))
    assert bytes.fromhex("02801387068107801a87") in STREAM


def test_decode_raw_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_stdin(monkeypatch, STREAM)
    status, out, err = run(capsys, "decode")
    assert (status, out, err) == (0, RAW_LINES, "")


def test_decode_jelly(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_stdin(monkeypatch, STREAM)
    status, out, err = run(capsys, "decode", "--jelly", "-")
    assert (status, out, err) == (0, JELLY_LINES, "")


def test_hex_input_with_whitespace_and_prefix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = STREAM.hex()
    spaced = "  0x" + " ".join(text[i : i + 8] for i in range(0, len(text), 8)).replace(" ", "\n\t", 3) + "\n"
    set_stdin(monkeypatch, spaced.encode())
    status, out, err = run(capsys, "decode", "--hex", "--jelly")
    assert (status, out, err) == (0, JELLY_LINES, "")


def test_file_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    raw = tmp_path / "capture.bin"
    raw.write_bytes(STREAM)
    text = tmp_path / "capture.hex"
    text.write_text(STREAM.hex().upper())
    assert run(capsys, "decode", str(raw)) == (0, RAW_LINES, "")
    assert run(capsys, "decode", "--hex", str(text)) == (0, RAW_LINES, "")


def test_truncated_stream(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    path.write_bytes(STREAM[:-3])
    status, out, err = run(capsys, "decode", str(path))
    assert status == 1
    assert out == RAW_LINES[:2]
    assert err == (
        "pbcore decode: error: the stream ends inside an expression"
        f" (it starts at byte 18; the stream has {len(STREAM) - 3} bytes)\n"
    )


def test_malformed_stream(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_stdin(monkeypatch, STREAM + b"\x05\x8f" + encode([b"never", b"printed"]))
    status, out, err = run(capsys, "decode", "--jelly")
    assert status == 1
    assert out == JELLY_LINES
    assert err == f"pbcore decode: error: unknown type byte 0x8f (at byte {len(STREAM)} of the stream)\n"


def test_over_the_prefix_limit(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_stdin(monkeypatch, b"\x01" * 65 + b"\x81")
    status, out, err = run(capsys, "decode")
    assert (status, out) == (1, [])
    assert err.startswith("pbcore decode: error: prefix longer than the limit of 64 bytes")
    assert "Traceback" not in err


def test_dialect_none(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_stdin(monkeypatch, encode([b"pb", b"none"], dialect=b"none") + encode([b"version", 6], dialect=b"none"))
    status, out, err = run(capsys, "decode", "--dialect", "none")
    # Without the vocabulary, `version` is an ordinary byte string.
    assert (status, out, err) == (0, ["[b'pb', b'none']", "[b'version', 6]"], "")


def test_vocabulary_refused_in_dialect_none(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_stdin(monkeypatch, STREAM)
    status, out, err = run(capsys, "decode", "--dialect=none")
    assert (status, out) == (1, RAW_LINES[:1])
    assert err == "pbcore decode: error: vocabulary item outside the pb dialect (at byte 14 of the stream)\n"


def test_spelled_out_words_print_bare_in_dialect_pb(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_stdin(monkeypatch, encode([b"list", b"lists", -3, 2**40, 1.5, []], dialect=b"none"))
    assert run(capsys, "decode") == (0, ["[list, b'lists', -3, 1099511627776, 1.5, []]"], "")


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    status, out, err = run(capsys, "decode", str(missing))
    assert (status, out) == (2, [])
    assert f"pbcore decode: error: cannot read {missing}: No such file or directory" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0781 zz", "invalid hex input: 'z' at offset 5 is not a hex digit"),
        ("07 8", "invalid hex input: an odd number of hex digits (3)"),
        ("0x07 0x81", "invalid hex input: 'x' at offset 6 is not a hex digit"),
    ],
)
def test_bad_hex(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str, message: str) -> None:
    set_stdin(monkeypatch, text.encode())
    status, out, err = run(capsys, "decode", "--hex")
    assert (status, out) == (2, [])
    assert err.endswith(f"pbcore decode: error: {message}\n")
    assert "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    # The version, and which Banana codec is in use (pbcore.banana.ACCELERATED).
    status, out, _ = run(capsys, "--version")
    codec = "compiled codec" if ACCELERATED else "pure Python codec"
    assert (status, out) == (0, [f"pbcore {pbcore.__version__} ({codec})"])


@pytest.mark.parametrize(("pure", "codec"), [("1", "pure Python codec"), ("0", None)])
def test_version_says_which_codec(pure: str, codec: str | None) -> None:
    env = {**os.environ, "PBCORE_PURE": pure}
    run = subprocess.run(
        [sys.executable, "-m", "pbcore", "--version"], env=env, capture_output=True, text=True, check=True
    )
    if codec is None:  # compiled if it was built
        codec = "compiled codec" if _load_speedups() is not None else "pure Python codec"
    assert run.stdout.strip() == f"pbcore {pbcore.__version__} ({codec})"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "decode", "--dialect", "banana")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    status, _, err = run(capsys)
    assert status == 2
    assert "decode" in err


def test_help_documents_bare_words(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "decode", "--help")
    assert status == 0
    assert "is printed as a bare word" in "\n".join(out).replace("\n  ", " ")


def jelly_lines(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *sexps: Any) -> list[str]:
    set_stdin(monkeypatch, b"".join(encode(sexp) for sexp in sexps))
    status, out, err = run(capsys, "decode", "--jelly")
    assert (status, err) == (0, "")
    return out


def test_jelly_placeholders_and_messages(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    state = [b"dictionary", [[b"unicode", b"a"], 1]]
    out = jelly_lines(
        capsys,
        monkeypatch,
        [b"answer", 1, [b"list", [b"remote", 3], [b"local", 4], [b"cached", 5], [b"lcache", 6]]],
        [b"answer", 2, [b"mod.Thing", state]],
        [b"answer", 3, [b"mod.Cache", 7, state]],
        [b"cachemessage", 4, 7, b"update", 0, [b"tuple", [b"None"]], [b"dictionary"]],
        [b"decref", 3],
        [b"decache", 7],
        [b"uncache", 7],
        [b"didNotUnderstand", b"frobnicate"],
        [b"pb"],
        [b"dictionary", [[b"unicode", b"k"], [b"set", 1]]],
    )
    assert out == [
        "answer #1: [<remote 3>, <local 4>, <cached 5>, <lcache 6>]",
        "answer #2: <copy b'mod.Thing' {'a': 1}>",
        "answer #3: <cache b'mod.Cache' #7 {'a': 1}>",
        "cachemessage #4 to 7.update(args=(None,), kwargs={}) answer=0",
        "decref 3",
        "decache 7",
        "uncache 7",
        "didNotUnderstand b'frobnicate'",
        "dialects [b'pb']",
        "{'k': {1}}",
    ]


def test_jelly_falls_back_to_raw(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = jelly_lines(
        capsys,
        monkeypatch,
        [b"message", 1, b"root"],
        [b"answer", 1, [b"instance", [b"class", b"os.system"], [b"dictionary"]]],
        [b"remote", b"x"],
        [b"unicode", b"\xff"],
        [b"mod.Thing", 1, 2, 3],
        [b"version", 6],
    )
    assert out == [
        "[message, 1, b'root']  # not jelly: 'message' needs 6 item(s) after its name, not 2",
        "[answer, 1, [instance, [class, b'os.system'], [dictionary]]]  # not jelly:"
        " the security options do not allow b'instance'",
        "[remote, b'x']  # not jelly: 'remote' form needs one int id, got [b'x']",
        "[b'unicode', b'\\xff']  # not jelly: b'unicode' form is not valid UTF-8:"
        " 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        "[b'mod.Thing', 1, 2, 3]  # not jelly: copy tag b'mod.Thing' needs [tag, state] or [tag, id, state]",
        "version 6",
    ]


def test_jelly_survives_an_unjelly_bug(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sexp: Any) -> Any:
        raise OverflowError("int too large")

    monkeypatch.setattr(cli, "_unjelly", broken)
    out = jelly_lines(capsys, monkeypatch, [b"answer", 1, 5], [b"decref", 2])
    assert out == ["[answer, 1, 5]  # unjelly failed: OverflowError: int too large", "decref 2"]


def capture_pb_session() -> bytes:
    """What a Twisted PB server writes to a Twisted client: answers, a failure, a reference, a copy."""

    class Thing(pb.Copyable):
        def __init__(self) -> None:
            self.a = 1

    class RemoteThing(pb.RemoteCopy):
        pass

    class Child(pb.Referenceable):
        pass

    class Root(pb.Root):
        def remote_echo(self, value: object) -> object:
            return value

        def remote_fail(self) -> None:
            raise ValueError("nope")

        def remote_child(self) -> Child:
            return Child()

        def remote_thing(self) -> Thing:
            return Thing()

    Thing.__module__ = RemoteThing.__module__ = "capture"
    twisted_pb.setUnjellyableForClass(Thing, RemoteThing)
    server_factory = twisted_pb.PBServerFactory(Root())
    client_factory = twisted_pb.PBClientFactory()
    written: list[bytes] = []

    def server_protocol() -> Any:
        protocol = server_factory.buildProtocol(None)
        make_connection = protocol.makeConnection

        def spy(transport: Any) -> None:
            write = transport.write

            def record(data: bytes) -> None:
                written.append(data)
                write(data)

            transport.write = record
            make_connection(transport)

        protocol.makeConnection = spy
        return protocol

    _client, _server, pump = twisted_iosim.connectedServerAndClient(
        server_protocol, lambda: client_factory.buildProtocol(None)
    )
    roots: list[Any] = []
    client_factory.getRootObject().addCallback(roots.append)
    pump.flush()
    for call in [("echo", "hello"), ("fail",), ("child",), ("thing",)]:
        roots[0].callRemote(*call).addErrback(lambda failure: None)
        pump.flush()
    return b"".join(written)


def test_jelly_on_a_twisted_pb_session(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "session.bin"
    path.write_bytes(capture_pb_session())
    status, out, err = run(capsys, "decode", "--jelly", str(path))
    assert (status, err) == (0, "")
    assert out[:3] == ["dialects [b'pb', b'none']", "version 6", "answer #1: 'hello'"]
    assert out[3].startswith("error #2: <copy b'twisted.spread.pb.CopyableFailure' {")
    assert "'value': 'nope'" in out[3]
    assert out[4:] == ["answer #3: <remote 1>", "answer #4: <copy b'capture.Thing' {'a': 1}>"]


def test_python_m_pbcore_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pbcore", "decode", "--hex", "--jelly"],
        input=STREAM.hex().encode() + b"\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode().splitlines() == JELLY_LINES


def test_python_m_pbcore_subprocess_bad_input() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pbcore", "decode", "--hex"],
        input=b"0281 8f",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stdout.decode().splitlines()) == (1, ["2"])
    assert result.stderr.decode() == "pbcore decode: error: unknown type byte 0x8f (at byte 2 of the stream)\n"


# -- traces (both directions, as `pbcore call --trace` writes them) ------------------------------

CLIENT_STREAM = encode(b"pb") + encode([b"version", 6])


def write_trace(*chunks: tuple[str, bytes]) -> str:
    text = io.StringIO()
    writer = cli.TraceWriter(text, "a test")
    for direction, data in chunks:
        writer(direction, data)
    return text.getvalue()


def test_trace_writer_lines() -> None:
    trace = write_trace(("<", bytes(range(40))), (">", b"\x01"), (">", b""))
    assert trace.splitlines()[0] == "# pbcore trace: a test"
    assert trace.splitlines()[2:] == [
        "< " + bytes(range(32)).hex(" "),
        "< " + bytes(range(32, 40)).hex(" "),
        "> 01",
    ]
    with pytest.raises(ValueError, match="direction must be"):
        write_trace(("=", b"x"))


def test_decode_a_trace_interleaves_both_directions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Each direction split inside an expression: each is printed once it is complete.
    trace = write_trace(("<", STREAM[:12]), (">", CLIENT_STREAM[:3]), ("<", STREAM[12:14]), (">", CLIENT_STREAM[3:]))
    trace += "< " + STREAM[14:].hex() + "\n"  # one line, no spaces: read as well
    path = tmp_path / "trace"
    path.write_text(trace)
    status, out, err = run(capsys, "decode", "--trace", "--jelly", str(path))
    assert (status, err) == (0, "")
    assert out == [
        "<- dialects [b'pb', b'none']",
        "-> b'pb'",
        "-> version 6",
        "<- version 6",
        "<- message #1 to b'root'.echo(args=('hello',), kwargs={}) answer=1",
    ]
    set_stdin(monkeypatch, trace.encode())
    status, out, err = run(capsys, "decode", "--trace")
    assert (status, err) == (0, "")
    assert out[:4] == ["<- [b'pb', b'none']", "-> b'pb'", "-> [version, 6]", "<- [version, 6]"]


def test_decode_a_broken_trace(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_stdin(monkeypatch, write_trace(("<", STREAM), (">", CLIENT_STREAM[:-1])).encode())
    status, out, err = run(capsys, "decode", "--trace")
    assert (status, out[-1]) == (1, "-> b'pb'")
    assert err == (
        "pbcore decode: error: the sent stream ends inside an expression"
        " (it starts at byte 4; the stream has 9 bytes)\n"
    )
    set_stdin(monkeypatch, write_trace((">", CLIENT_STREAM), ("<", b"\x02\x81\x8f")).encode())
    status, out, err = run(capsys, "decode", "--trace")
    assert (status, out) == (1, ["-> b'pb'", "-> [version, 6]", "<- 2"])
    assert err == "pbcore decode: error: the received stream: unknown type byte 0x8f (at byte 2 of the stream)\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"> 02 80\n= 01\n", "line 2 of the trace: expected '> HEX' or '< HEX', got b'= 01'"),
        (b"# comment\n\n< 0g\n", "line 3 of the trace: invalid hex after '<'"),
        (b"< 028\n", "line 1 of the trace: invalid hex after '<'"),
    ],
)
def test_bad_trace_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: bytes, message: str
) -> None:
    set_stdin(monkeypatch, text)
    status, _, err = run(capsys, "decode", "--trace")
    assert status == 2
    assert err.endswith(f"pbcore decode: error: {message}\n")


def test_trace_and_hex_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "decode", "--trace", "--hex")
    assert status == 2
    assert "not allowed with" in err
