"""``pbcore call`` against a real Twisted PB server (its reactor in a subprocess)."""

from __future__ import annotations

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
