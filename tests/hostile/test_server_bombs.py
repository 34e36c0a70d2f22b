"""Attacks on pbcore servers over real sockets: each bomb at growing sizes, before login and after.

Every server runs in a subprocess (see processes.py), a well-behaved client
calls it throughout (probe.py), and each attack is bounded (attacks.py): a
server that hangs is killed, so these tests fail in seconds, never hang.

The full matrix (every bomb, both phases) runs against one server
(:data:`MATRIX`, pbcore_asyncio): the defences are in the core, shared by
every adapter. Every server (the four adapters and ``pbcore serve``) gets
the representative attacks: a hash bomb before and after login, a failure
bomb, colliding keys and a deep key, because what an adapter adds (a thread
per connection, a loop that a stuck call stops, a process that can crash) is
what the concurrent client and the checks after each attack see.
"""

from __future__ import annotations

from typing import Final

import pytest

from .attacks import PHASES, Expect, check_series, run_series
from .processes import SERVERS, ServerPool

#: Laughs depths: 2**16 leaves is already far past any budget a defence keeps; 200 needs the siblings form.
DEPTHS: Final = (16, 24, 32, 64, 200)
#: The nested form is about two lists a level: Limits.max_depth (100) allows about 45.
NESTED_DEPTHS: Final = (16, 24, 32, 40)
#: The bombs a hash walks: refused, with a JellyError.
HASH_BOMBS: Final = ("dict-key", "set-member", "frozenset-member", "equal-pair")
#: Shared values that are never hashed: a server may take them (they stay shared), or refuse them.
SHARED_VALUES: Final = ("list-laughs", "dict-laughs")
COLLISION_COUNTS: Final = (1_000, 10_000, 100_000)
#: 2 * 10**5 levels (a 4 MB message) overflow the C stack in CPython's tuple hash (3.10 to 3.13: SIGSEGV).
DEEP_DEPTHS: Final = (1_000, 10_000, 100_000, 200_000)
HOLDER_DEPTHS: Final = (1_000, 10_000, 100_000)
#: The deep keys are megabytes: decoding and unjellying them is linear but not free (2 s for 2 MB today).
DEEP_CPU_BUDGET: Final = 5.0

MATRIX: Final = "asyncio"
OTHERS: Final = tuple(name for name in SERVERS if name != MATRIX)


def _keys(n: int) -> str:
    return f"{n} keys"


# -- the matrix, on one server ----------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", HASH_BOMBS)
def test_hash_bomb_is_refused(server_pool: ServerPool, kind: str, phase: str) -> None:
    """A laughs tuple that would be hashed (key, member, equal pair): a JellyError answer, quickly."""
    results = run_series(server_pool, MATRIX, phase, kind, DEPTHS, expect=Expect.REFUSAL)
    check_series(results, DEPTHS, expect=Expect.REFUSAL)


def test_hash_bomb_mid_login(server_pool: ServerPool) -> None:
    """The laughs key as the challenger's respond() argument: still before any password is checked."""
    results = run_series(server_pool, MATRIX, "mid-login", "dict-key", DEPTHS, expect=Expect.REFUSAL)
    check_series(results, DEPTHS, expect=Expect.REFUSAL)


@pytest.mark.parametrize("phase", PHASES)
def test_nested_hash_bomb_is_refused(server_pool: ServerPool, phase: str) -> None:
    """The same key written as nested definitions rather than siblings."""
    results = run_series(server_pool, MATRIX, phase, "dict-key-nested", NESTED_DEPTHS, expect=Expect.REFUSAL)
    check_series(results, NESTED_DEPTHS, expect=Expect.REFUSAL)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", SHARED_VALUES)
def test_shared_values_stay_cheap(server_pool: ServerPool, kind: str, phase: str) -> None:
    """Laughs lists and dicts (nothing hashed): answered or refused, quickly, whatever the depth."""
    results = run_series(server_pool, MATRIX, phase, kind, DEPTHS, expect=Expect.ANY)
    check_series(results, DEPTHS, expect=Expect.ANY)


@pytest.mark.parametrize("phase", PHASES)
def test_failure_bomb_argument(server_pool: ServerPool, phase: str) -> None:
    """A failure copy whose value is a laughs tuple: answered (as a failure or an error), bounded text, quickly."""
    results = run_series(server_pool, MATRIX, phase, "failure", DEPTHS, expect=Expect.ANY)
    check_series(results, DEPTHS, expect=Expect.ANY)


@pytest.mark.parametrize("kind", ["collision-dict", "collision-set", "collision-tuples"])
def test_hash_collisions(server_pool: ServerPool, kind: str) -> None:
    """Keys that all hash alike: linear cost or a clean refusal; the connection kept."""
    results = run_series(server_pool, MATRIX, "post-login", kind, COLLISION_COUNTS, expect=Expect.ANY, label=_keys)
    check_series(results, COLLISION_COUNTS, expect=Expect.ANY)


def test_deep_holder_key(server_pool: ServerPool) -> None:
    """A key holding every level of a deep-by-reference tuple (hashing it is quadratic): refused."""
    results = run_series(server_pool, MATRIX, "post-login", "deep-holder-key", HOLDER_DEPTHS, expect=Expect.REFUSAL)
    check_series(results, HOLDER_DEPTHS, expect=Expect.REFUSAL)


# -- on every server ----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("server", OTHERS)
def test_hash_bomb_every_server(server_pool: ServerPool, server: str, phase: str) -> None:
    """A laughs dict key, before and after login, on every other server: a JellyError answer, quickly."""
    results = run_series(server_pool, server, phase, "dict-key", DEPTHS, expect=Expect.REFUSAL)
    check_series(results, DEPTHS, expect=Expect.REFUSAL)


@pytest.mark.parametrize("server", OTHERS)
def test_failure_bomb_every_server(server_pool: ServerPool, server: str) -> None:
    """The failure bomb as the login's argument (before login), on every other server."""
    results = run_series(server_pool, server, "pre-login", "failure", DEPTHS, expect=Expect.ANY)
    check_series(results, DEPTHS, expect=Expect.ANY)


@pytest.mark.parametrize("server", OTHERS)
def test_hash_collisions_every_server(server_pool: ServerPool, server: str) -> None:
    """Colliding int keys of growing count, before login, on every other server."""
    results = run_series(
        server_pool, server, "pre-login", "collision-dict", COLLISION_COUNTS, expect=Expect.ANY, label=_keys
    )
    check_series(results, COLLISION_COUNTS, expect=Expect.ANY)


@pytest.mark.parametrize("server", SERVERS)
def test_deep_key(server_pool: ServerPool, server: str) -> None:
    """A tuple nested deep through sibling references, as a key: an error answer, and no crash."""
    results = run_series(
        server_pool, server, "post-login", "deep-key", DEEP_DEPTHS, expect=Expect.REFUSAL, cpu_budget=DEEP_CPU_BUDGET
    )
    check_series(results, DEEP_DEPTHS, expect=Expect.REFUSAL)
