"""The contract suite runs every test once per adapter and runtime (see kits.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.contract.kits import KITS, Kit, open_kit


@pytest.fixture(params=list(KITS))
def kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    missing, _ = KITS[request.param]
    if missing is not None:
        pytest.skip(missing)
    with open_kit(request.param) as opened:
        yield opened
