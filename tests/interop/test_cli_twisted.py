"""``pbcore call`` against a real Twisted PB server (its reactor in a subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbcore import copyTags
from pbcore.cli import main

from .peers import twisted_server


def call(capsys: pytest.CaptureFixture[str], port: int, *argv: str) -> tuple[int, str, str]:
    status = main(["call", f"127.0.0.1:{port}", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_calls_on_a_twisted_root(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Other test modules register the peer's copy tag; this test wants it unknown.
    monkeypatch.delitem(copyTags, b"twisted_peer.TwistedPoint", raising=False)
    with twisted_server() as port:
        # Twisted's echo answers [list(args), kwargs].
        assert call(capsys, port, "echo", "1", "two", "b'three'", "4.5", "None", "--kw", "key=[1]") == (
            0,
            "[[1, 'two', b'three', 4.5, None], {'key': [1]}]\n",
            "",
        )
        status, out, err = call(capsys, port, "thing", "5")
        assert (status, out.startswith("<RemoteReference "), err) == (0, True, "")
        assert call(capsys, port, "fail") == (1, "", "pbcore call: remote error: builtins.ValueError: nope\n")
        assert call(capsys, port, "known") == (1, "", "pbcore call: remote error: twisted.spread.pb.Error: known\n")
        assert call(capsys, port, "missing") == (
            1,
            "",
            "pbcore call: remote error: twisted.spread.flavors.NoSuchMethod: No such method: remote_missing\n",
        )
        # A copy of a class that is not loaded here cannot be shown: the call says which tag.
        assert call(capsys, port, "point") == (
            1,
            "",
            "pbcore call: error: InsecureJelly: unknown type b'twisted_peer.TwistedPoint':"
            " no class is registered for this copy tag\n",
        )


def test_login_to_a_twisted_portal(capsys: pytest.CaptureFixture[str]) -> None:
    with twisted_server(login=True) as port:
        assert call(capsys, port, "hello", "--user", "alice", "--password", "secret") == (0, "'hello alice'\n", "")
        assert call(capsys, port, "echo", "[1, 2]", "--user", "alice", "--password", "secret") == (0, "[1, 2]\n", "")
        assert call(capsys, port, "hello", "--anonymous") == (0, "'hello anonymous'\n", "")
        status, out, err = call(capsys, port, "hello", "--user", "alice", "--password", "wrong")
        assert (status, out) == (1, "")
        assert err.startswith("pbcore call: remote error: twisted.cred.error.UnauthorizedLogin: ")


def test_then_on_twisted_references(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with twisted_server() as port:
        status, out, err = call(capsys, port, "thing", "b'five'", "--then", "n")
        assert (status, err) == (0, "")
        assert out.splitlines()[0].startswith("<RemoteReference ")
        assert out.splitlines()[1:] == ["b'five'"]
        status, out, err = call(capsys, port, "echo", "1", "--then", "n")
        assert (status, out) == (1, "[[1], {}]\n")
        assert err == "pbcore call: error: cannot call n: what echo answered is not a remote reference but list\n"
        trace = tmp_path / "twisted.trace"
        status, out, err = call(capsys, port, "thing", "3", "--then", "n", "--trace", str(trace))
        assert (status, out.splitlines()[1:], err) == (0, ["3"], "")
    status = main(["decode", "--trace", "--jelly", str(trace)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[:6] == [
        "<- dialects [b'pb', b'none']",
        "-> b'pb'",
        "-> version 6",
        "<- version 6",
        "-> message #1 to b'root'.thing(args=(3,), kwargs={}) answer=1",
        "<- answer #1: <remote 1>",
    ]
    assert lines[6:8] == ["-> message #2 to 1.n(args=(), kwargs={}) answer=1", "<- answer #2: 3"]


def test_then_on_a_twisted_avatar_view(capsys: pytest.CaptureFixture[str]) -> None:
    with twisted_server(login=True) as port:
        status, out, err = call(capsys, port, "board", "--then", "whoami", "--user", "alice", "--password", "secret")
    assert (status, out.splitlines()[1:], err) == (0, ["'alice'"], "")
