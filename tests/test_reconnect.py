"""pbcore.reconnect: the reconnecting client's policy, with a fake clock and a fixed draw."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbcore.cred import Unauthorized
from pbcore.errors import PBConnectionLost
from pbcore.flavors import CopiedFailure
from pbcore.reconnect import Backoff, ClientState, Reconnector, is_login_refusal


def state(policy: Reconnector) -> ClientState:
    return policy.state


def test_the_first_attempt_is_at_once_and_failures_back_off_up_to_the_maximum() -> None:
    policy = Reconnector(Backoff(initial=1.0, maximum=10.0, factor=2.0, jitter=0.0))
    assert policy.next_attempt() == 0.0 and state(policy) is ClientState.WAITING
    now, waits = 0.0, list[float]()
    for _ in range(6):
        policy.attempt_started(now)
        assert state(policy) is ClientState.CONNECTING and policy.next_attempt() is None
        policy.failed(ConnectionRefusedError(), now)
        when = policy.next_attempt()
        assert when is not None
        waits.append(when - now)
        now = when
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert isinstance(policy.last_error, ConnectionRefusedError) and policy.failures == 6


def test_a_connection_that_was_up_resets_the_delays() -> None:
    policy = Reconnector(Backoff(initial=0.5, maximum=60.0, jitter=0.0))
    for now in (0.0, 0.5, 1.5):
        policy.attempt_started(now)
        policy.failed(OSError(), now)
    policy.attempt_started(10.0)
    policy.connected(10.0)
    assert state(policy) is ClientState.CONNECTED and policy.failures == 0 and policy.connections == 1
    assert policy.next_attempt() is None
    policy.lost(PBConnectionLost("gone"), 100.0)
    assert policy.next_attempt() == 100.5 and isinstance(policy.last_error, PBConnectionLost)


@given(st.floats(min_value=0.0, max_value=0.999999), st.integers(min_value=0, max_value=30))
def test_jitter_stays_within_its_fraction(draw: float, failures: int) -> None:
    backoff = Backoff(initial=1.0, maximum=30.0, factor=2.0, jitter=0.2)
    base = min(30.0, 2.0**failures)
    assert base * 0.8 <= backoff.delay(failures, draw) <= base * 1.2


def test_a_refused_login_stops_unless_told_to_retry() -> None:
    refused = CopiedFailure("twisted.cred.error.UnauthorizedLogin", "bad", "", ["twisted.cred.error.LoginFailed"])
    assert is_login_refusal(refused) and is_login_refusal(Unauthorized())
    assert not is_login_refusal(PBConnectionLost("gone"))
    policy = Reconnector()
    policy.attempt_started(0.0)
    policy.failed(refused, 0.0)
    assert policy.stopped and policy.next_attempt() is None and policy.last_error is refused
    stubborn = Reconnector(retry_refused_login=True, draw=lambda: 0.5)
    stubborn.attempt_started(0.0)
    stubborn.failed(refused, 0.0)
    assert stubborn.next_attempt() == 1.0


def test_stop_wins_over_everything_after_it() -> None:
    policy = Reconnector()
    policy.attempt_started(0.0)
    policy.stop()
    policy.connected(1.0)
    policy.failed(OSError(), 2.0)
    policy.lost(None, 3.0)
    assert policy.stopped and policy.next_attempt() is None and policy.connections == 0


def test_backoff_figures_are_checked() -> None:
    with pytest.raises(ValueError, match="initial must not be negative"):
        Backoff(initial=-1.0)


def test_a_very_long_outage_stays_at_the_maximum() -> None:
    policy = Reconnector(Backoff(initial=1.0, maximum=60.0, jitter=0.0))
    now = 0.0
    for _ in range(2000):
        policy.attempt_started(now)
        policy.failed(OSError(), now)
        when = policy.next_attempt()
        assert when is not None
        now = when
    assert policy.failures == 2000 and Backoff(maximum=60.0, jitter=0.0).delay(10**6, 0.5) == 60.0
