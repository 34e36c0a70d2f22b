"""How connections and servers end, on every adapter: calls cancelled, sockets closed, nothing retained."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from pbcore.errors import PBConnectionLost
from pbcore.factory import PBClientFactory
from tests.contract.helpers import eventually, outcome, send, settled, started
from tests.contract.kits import Kit
from tests.contract.service import ClientSide


def test_a_served_call_is_cancelled_when_its_connection_ends(kit: Kit) -> None:
    root, _, client, ref = started(kit)
    pending = client.run(send, ref, "hang")
    assert eventually(lambda: root.shared.started == 1)
    client.close()
    # Cancelled by the end of the connection itself, not by a later read or a timeout.
    assert eventually(lambda: root.shared.cancelled == 1, seconds=1.0), "the served call was not cancelled"
    assert isinstance(client.run(settled, pending), PBConnectionLost)


@pytest.mark.parametrize("how", ["close", "connection_lost"])
def test_a_broker_that_closes_itself_closes_its_socket_at_once(kit: Kit, how: str) -> None:
    _, server, client, ref = started(kit)
    error = client.run(outcome, ref, "close_me", how, timeout=5.0)
    assert isinstance(error, PBConnectionLost), error
    assert client.closed_within(5.0)
    assert eventually(lambda: not server.connections())


def test_a_dropped_connection_retains_nothing_it_exported(kit: Kit) -> None:
    root, server, client, ref = started(kit)
    things = [client.run(outcome, ref, "thing") for _ in range(3)]
    assert [client.run(outcome, thing, "ping") for thing in things] == ["pong"] * 3
    # The server's application keeps a reference from this connection (and so its broker).
    client.run(outcome, ref, "keep", ClientSide())
    client.close()
    assert eventually(lambda: not server.connections())

    def all_gone() -> bool:
        gc.collect()
        return all(weak() is None for weak in root.shared.exported)

    assert eventually(all_gone, seconds=5.0), "objects exported on a closed connection are still alive"
    assert root.shared.kept and len(root.shared.exported) == 3


def count_held(client: Any) -> int:
    return int(client.call_soon(lambda: len(client.broker.localObjects)))


def test_with_the_cyclic_collector_off_a_failed_call_leaves_no_count(kit: Kit) -> None:
    _, _, client, ref = started(kit)
    assert client.run(outcome, ref, "echo", 0) == 0
    baseline = count_held(client)
    gc.collect()
    gc.disable()
    try:
        for method in ("take", "async_take") * 3:
            client.run(outcome, ref, method, ClientSide())
        # The server's decrefs go out before the answer to a later call.
        assert eventually(lambda: client.run(outcome, ref, "echo", 1) == 1 and count_held(client) == baseline)
    finally:
        gc.enable()


def test_server_close_with_an_idle_client(kit: Kit) -> None:
    _, server, client, ref = started(kit)
    assert client.run(outcome, ref, "echo", 1) == 1
    server.close()
    assert client.closed_within(5.0)
    assert not server.connections()
    refused = kit_connect_fails(kit, server.port)
    assert refused


def kit_connect_fails(kit: Kit, port: int) -> bool:
    try:
        kit.connect(PBClientFactory(), port)
    except OSError:
        return True
    return False


def test_server_close_lets_a_busy_call_finish_within_the_grace(kit: Kit) -> None:
    root, server, client, ref = started(kit)
    pending = client.run(send, ref, "busy", ClientSide(), 0.5)
    assert eventually(lambda: root.shared.started == 1)
    server.close(grace=10.0)
    assert client.run(settled, pending) == "rested"
    assert client.closed_within(5.0)


def test_server_close_without_grace_ends_a_busy_call(kit: Kit) -> None:
    root, server, client, ref = started(kit)
    pending = client.run(send, ref, "busy", ClientSide(), 0.5)
    assert eventually(lambda: root.shared.started == 1)
    server.close(grace=0.0)
    assert isinstance(client.run(settled, pending), PBConnectionLost)
    assert client.closed_within(5.0)
