"""An application's bug costs one call (or one log line) on every adapter: never a connection, never a server."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pbcore.cred import Anonymous, UsernamePassword
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
from tests.contract.helpers import eventually, outcome, started
from tests.contract.kits import Client, Kit
from tests.contract.service import ClientSide, ContractRoot, Faulty, Refused, faulty_portal


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("pbcore") and text in r.getMessage()]


def still_serving(kit: Kit, port: int, *clients: tuple[Client, Any]) -> None:
    """The connections given, and a new one, are answered."""
    for client, ref in clients:
        assert client.run(outcome, ref, "echo", "still here") == "still here"
    fresh = kit.connect(PBClientFactory(), port)
    assert fresh.run(outcome, fresh.root(), "async_echo", "new") == "new"


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("raise", "builtins.ValueError"),
        ("async_raise", "builtins.ValueError"),
        ("boom", "builtins.RuntimeError"),
        ("async_boom", "builtins.RuntimeError"),
        ("unsendable", "pbcore.errors.NotJellyable"),
        ("async_unsendable", "pbcore.errors.NotJellyable"),
    ],
)
def test_a_fault_in_a_method_or_its_result_costs_one_call(
    kit: Kit, method: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pbcore")
    _, server, client, ref = started(kit)
    other = kit.connect(PBClientFactory(), server.port)
    other_ref = other.root()
    error = client.run(outcome, ref, method)
    assert isinstance(error, CopiedFailure) and error.type == kind, error
    assert [r for r in logged(caplog, method) if "Traceback" in r.getMessage()], "not logged with its traceback"
    still_serving(kit, server.port, (client, ref), (other, other_ref))


def test_an_expected_error_is_answered_without_a_traceback_in_the_log(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pbcore")
    _, server, client, ref = started(kit)
    error = client.run(outcome, ref, "refuse")
    assert isinstance(error, CopiedFailure) and error.check(Refused)
    assert not logged(caplog, "refuse")
    still_serving(kit, server.port, (client, ref))


@pytest.mark.parametrize("method", ["relay", "async_relay"])
def test_a_relayed_failure_keeps_its_type(kit: Kit, method: str) -> None:
    _, _, client, ref = started(kit)
    error = client.run(outcome, ref, method, ClientSide())
    assert isinstance(error, CopiedFailure)
    assert error.type == "builtins.KeyError" and error.check(KeyError) and error.check(LookupError)


def test_a_raising_disconnect_notifier_costs_a_log_line(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pbcore")
    root, server, client, ref = started(kit)
    assert client.run(outcome, ref, "bad_notifier") == "armed"
    client.close()
    # The notifier after the broken one still ran, and the server serves on.
    assert eventually(lambda: root.shared.cancelled == 1)
    assert logged(caplog, "notifier")
    still_serving(kit, server.port)


@pytest.mark.parametrize("fault", ["checker", "realm"])
def test_a_raising_checker_or_realm_fails_that_login_only(
    kit: Kit, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pbcore")
    faulty = Faulty()
    server = kit.serve(PBServerFactory(faulty_portal(faulty)))
    factory = PBClientFactory()
    client = kit.connect(factory, server.port)
    faulty.fault = fault
    with pytest.raises(CopiedFailure) as failed:
        client.run(factory.login, UsernamePassword("alice", "secret"))
    assert failed.value.type == "builtins.RuntimeError"
    assert logged(caplog, "raised RuntimeError")
    # The same connection logs in once the fault is gone; so does a new one.
    faulty.fault = None
    avatar = client.run(factory.login, UsernamePassword("alice", "secret"))
    assert client.run(outcome, avatar, "whoami") == "alice"
    fresh_factory = PBClientFactory()
    fresh = kit.connect(fresh_factory, server.port)
    assert fresh.run(fresh_factory.login, Anonymous()) is not None


def test_a_raising_logout_costs_a_log_line(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pbcore")
    faulty = Faulty()
    faulty.fault = "logout"
    server = kit.serve(PBServerFactory(faulty_portal(faulty)))
    factory = PBClientFactory()
    client = kit.connect(factory, server.port)
    client.run(factory.login, UsernamePassword("alice", "secret"))
    client.close()
    assert eventually(lambda: faulty.logouts == 1)
    assert eventually(lambda: bool(logged(caplog, "raised")))
    fresh_factory = PBClientFactory()
    fresh = kit.connect(fresh_factory, server.port)
    avatar = fresh.run(fresh_factory.login, UsernamePassword("alice", "secret"))
    assert fresh.run(outcome, avatar, "whoami") == "alice"


def test_a_contract_root_serves_many_connections(kit: Kit) -> None:
    root = ContractRoot()
    server = kit.serve(PBServerFactory(root))
    clients = [kit.connect(PBClientFactory(), server.port) for _ in range(5)]
    for client in clients:
        assert client.run(outcome, client.root(), "echo", 1) == 1
    assert eventually(lambda: len(server.connections()) == 5)
