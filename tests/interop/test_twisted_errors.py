"""A Twisted client sees the same error answers from a pbcore server as from a Twisted server.

A real Twisted client (tests/interop/twisted_peer.py, script ``faults``) calls the
same fault methods on a Twisted server serving them (twisted_peer.py's root) and on
a pbcore server of each adapter serving :class:`Faults`, and reports, for each, what
its errback sees: the failure's class, ``type``, ``value``, ``parents`` and remote
traceback, and what ``f.check(...)`` and ``f.trap(...)`` give for the original
exception class and for ``pb.Error``. After each fault it makes one more good call
(``echo("alive")``): the connection survives every one of them.

The methods: a sync method raising ``ValueError``, one raising a ``pb.Error``
subclass (sent under the same name, ``twisted_peer.Refused``, by both servers),
one raising ``KeyError``; an async one raising ``ValueError`` once a call back to
the client has answered (on Twisted, a Deferred that errbacks); a Copyable whose
``getStateToCopy`` raises; a result with no wire form; and a relay: the client
passes a Referenceable of its own whose ``fail()`` raises ``KeyError`` and the
server answers with ``await ref.callRemote("fail")`` (on Twisted, returns that
Deferred), so the client gets its own failure back through the server.

What Twisted 26 sends, and pbcore with it: the type as bytes
(``b"builtins.KeyError"``, not ``exceptions.KeyError``), the ``str()`` of the
exception as its value, the qualified names of the class's MRO as its parents
(so ``check(KeyError)`` and ``check(LookupError)`` match), and ``"Traceback
unavailable\\n"`` as the traceback (no ``unsafeTracebacks``). A relayed failure
keeps the far end's type, value, parents and traceback on both.

One difference, by design (docs/porting.md, "Values with no wire form are refused
where they are sent"): for a result with no wire form (an instance of a class
that is neither Copyable nor allowed) Twisted *answers* with a placeholder, an
``Unpersistable("Unpersistable data: b'instance of class ... deemed insecure'")``,
and logs nothing; pbcore answers with an error, ``pbcore.errors.NotJellyable`` (a
``TypeError``), and logs it. Everything else is equal.

The servers' logs: Twisted's logs "Peer will receive following PB traceback"
with the traceback for every failure but a ``pb.Error``; pbcore's logs each on
the ``pbcore.serving`` logger at ERROR with the traceback in the message (and the
unsendable result too), and the ``pb.Error`` subclass at DEBUG only.

One Twisted server and one Twisted client script per server: a few seconds in all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from pbcore import Copyable, Root
from pbcore.errors import Error
from pbcore.factory import PBServerFactory
from pbcore.flavors import RemoteReference, set_wire_name
from tests.interop.peers import twisted_server
from tests.interop.test_tcp_matrix import ADAPTERS, TwistedPorts, run_script

pytest.importorskip("twisted.spread.pb")


# -- the pbcore server: twisted_peer.py's fault methods ------------------------------------------


class Refused(Error):
    """An expected error of the application's own, the twin of twisted_peer's."""


# Sent under twisted_peer's name, so that the Twisted client's check(Refused) matches it too.
set_wire_name(Refused, "twisted_peer.Refused")


class Opaque:
    """A result with no wire form: neither Copyable nor allowed by the security options."""


class BadCopy(Copyable):
    """A Copyable that cannot give its state."""

    def getStateToCopy(self) -> Any:
        raise RuntimeError("no state")


class Faults(Root):
    def remote_echo(self, *args: Any, **kw: Any) -> list[Any]:
        return [list(args), kw]

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_refused(self) -> None:
        raise Refused("refused")

    def remote_key_error(self) -> None:
        raise KeyError("missing")

    async def remote_async_fail(self, ref: RemoteReference) -> None:
        await ref.callRemote("twice", 1)
        raise ValueError("later")

    def remote_unjellyable(self) -> Opaque:
        return Opaque()

    def remote_bad_copy(self) -> BadCopy:
        return BadCopy()

    async def remote_relay(self, ref: RemoteReference) -> Any:
        return await ref.callRemote("fail")


# -- what the Twisted client sees ----------------------------------------------------------------

EXCEPTION = ["builtins.Exception", "builtins.BaseException", "builtins.object"]
ALIVE = [["alive"], {}]


def copied(kind: str, value: str, *bases: str, original: str, pb_error: bool = False) -> dict[str, Any]:
    """A CopiedFailure as the Twisted client's ``describe_fault`` shows it."""
    return {
        "class": "CopiedFailure",
        "type": kind,
        "raw_type": repr(kind.encode()),  # Twisted keeps the type as the bytes it received
        "value": value,
        "message": value,
        "parents": [kind, *bases, *EXCEPTION],
        "traceback": "Traceback unavailable\n",
        "check": original,
        "check_pb_error": "Error" if pb_error else None,
        "trap": original,
        # Twisted's own quirk: trap() of a CopiedFailure it does not match re-raises
        # through Failure.raiseException, whose value is a str: AttributeError.
        "trap_pb_error": "Error" if pb_error else "raised AttributeError",
    }


#: What Twisted 26's server answers (and each outcome is followed by a good call).
TWISTED_ANSWERS: dict[str, Any] = {
    "fail": {"failure": copied("builtins.ValueError", "nope", original="ValueError"), "alive": ALIVE},
    "refused": {
        "failure": copied(
            "twisted_peer.Refused", "refused", "twisted.spread.pb.Error", original="Refused", pb_error=True
        ),
        "alive": ALIVE,
    },
    "key_error": {
        "failure": copied("builtins.KeyError", "'missing'", "builtins.LookupError", original="KeyError"),
        "alive": ALIVE,
    },
    "async_fail": {"failure": copied("builtins.ValueError", "later", original="ValueError"), "alive": ALIVE},
    # A placeholder answer, not an error: Twisted's jelly sends what it may not send as "unpersistable".
    "unjellyable": {
        "answer": "Unpersistable(\"Unpersistable data: b'instance of class twisted_peer.Opaque deemed insecure'\")",
        "alive": ALIVE,
    },
    "bad_copy": {"failure": copied("builtins.RuntimeError", "no state", original="RuntimeError"), "alive": ALIVE},
    "relay": {
        "failure": copied("builtins.KeyError", "'relayed'", "builtins.LookupError", original="KeyError"),
        "alive": ALIVE,
    },
}

#: How each failure shows in a server's log (the last line of its traceback).
LOGGED = {
    "fail": "ValueError: nope",
    "key_error": "KeyError: 'missing'",
    "async_fail": "ValueError: later",
    "bad_copy": "RuntimeError: no state",
    "relay": "KeyError: 'relayed'",
}


class TwistedRun(NamedTuple):
    outcomes: dict[str, Any]
    #: The Twisted server's log (twisted.python.log) for the run.
    log: str


@pytest.fixture(scope="module")
def twisted_run(tmp_path_factory: pytest.TempPathFactory) -> TwistedRun:
    """The Twisted client's ``faults`` script against a Twisted server, once for the module."""
    log_file: Path = tmp_path_factory.mktemp("twisted_errors") / "twisted-server.log"
    with twisted_server(timeout=120, log_file=log_file) as port:
        run = run_script("twisted", "faults", TwistedPorts(port, port), PBServerFactory(Faults()))
        # Twisted logs an error before it sends it: all of it is written by now.
        return TwistedRun(run.outcomes, log_file.read_text())


def test_what_a_twisted_client_sees_from_a_twisted_server(twisted_run: TwistedRun) -> None:
    assert twisted_run.outcomes == TWISTED_ANSWERS


def test_twisted_server_logs_what_its_peer_will_receive(twisted_run: TwistedRun) -> None:
    # One "Peer will receive" entry per failure that is not a pb.Error, in call order.
    entries = twisted_run.log.split("Peer will receive following PB traceback:")[1:]
    assert [[method for method, line in LOGGED.items() if line in entry] for entry in entries] == [
        [method] for method in LOGGED
    ]
    assert "Refused" not in twisted_run.log  # a pb.Error is an expected answer: not logged
    assert "Opaque" not in twisted_run.log  # the placeholder is not logged either


def served(records: list[logging.LogRecord], method: str) -> list[logging.LogRecord]:
    """What the pbcore.serving logger said of the call of *method*."""
    return [
        record
        for record in records
        if record.name == "pbcore.serving"
        and (f": {method} raised " in record.getMessage() or f"the result of {method} could not" in record.getMessage())
    ]


@pytest.mark.parametrize("server", ADAPTERS)
def test_twisted_client_sees_the_same_errors_from_pbcore(
    server: str, twisted_run: TwistedRun, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pbcore.serving")
    run = run_script(server, "faults", TwistedPorts(0, 0), PBServerFactory(Faults()))
    outcomes = dict(run.outcomes)

    # The one difference, by design: an error answer where Twisted sends a placeholder.
    unjellyable = outcomes.pop("unjellyable")
    value = unjellyable["failure"]["value"]
    assert value.startswith("cannot jelly a tests.interop.test_twisted_errors.Opaque object:")
    assert " at 0x" not in value  # no local address reaches the peer
    assert unjellyable == {
        "failure": copied("pbcore.errors.NotJellyable", value, "builtins.TypeError", original="TypeError"),
        "alive": ALIVE,
    }
    # Everything else is what the Twisted server answered, field for field.
    assert outcomes == {method: seen for method, seen in twisted_run.outcomes.items() if method != "unjellyable"}
    # The relayed failure kept the Twisted client's own type: its check(KeyError) matches.
    relayed = outcomes["relay"]["failure"]
    assert (relayed["type"], relayed["value"], relayed["check"]) == ("builtins.KeyError", "'relayed'", "KeyError")
    assert "builtins.LookupError" in relayed["parents"]

    # The log: what Twisted logs as "Peer will receive following PB traceback", pbcore
    # logs at ERROR with the traceback (the unsendable result too); a pb.Error at DEBUG only.
    for method, line in {**LOGGED, "unjellyable": "NotJellyable: cannot jelly"}.items():
        [record] = served(caplog.records, method)
        assert record.levelno == logging.ERROR, method
        assert "Traceback (most recent call last)" in record.getMessage() and line in record.getMessage(), method
    [refused] = served(caplog.records, "refused")
    assert refused.levelno == logging.DEBUG and "refused raised Refused" in refused.getMessage()
    errors = [record for record in caplog.records if record.name == "pbcore.serving" and record.levelno >= logging.INFO]
    assert len(errors) == len(LOGGED) + 1  # nothing else: the good calls are not logged
