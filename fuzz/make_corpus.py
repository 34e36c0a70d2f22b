"""Write the seed corpus in fuzz/corpus/: small, valid PB byte streams.

Run ``python fuzz/make_corpus.py`` after changing it; the output is
deterministic (no str sets, whose order depends on the hash seed), so the
files only change when the seeds do. Each seed is a Banana stream as a PB
peer would send it, chosen to reach one part of the decoder or of jelly.
"""

from __future__ import annotations

import datetime
import decimal
import sys
from pathlib import Path
from typing import Any

from pbcore.banana import Sexp, encode
from pbcore.jelly import jelly
from tests.hostile import bombs  # the attack suite's generators: one set of bombs for both

CORPUS = Path(__file__).resolve().parent / "corpus"


def _stream(*sexps: Sexp, dialect: bytes = b"pb") -> bytes:
    return b"".join(encode(sexp, dialect) for sexp in sexps)


def _shared_and_cyclic() -> Any:
    shared = {"k": [1, 2]}
    cycle: list[Any] = [0]
    cycle.append(cycle)
    # A tuple on a cycle (through a list) is built late, through jelly's holes.
    holder: list[Any] = []
    looped = (holder, 5)
    holder.append(looped)
    return [shared, shared, cycle, looped, frozenset({(1, 2), (3,)})]


def seeds() -> dict[str, bytes]:
    """File name -> contents of every seed."""
    text = "héllo wörld"
    values: Any = [
        None, True, False, 0, 127, 128, -1, -(2**31), 2**31, -(2**31) - 1, 2**100, -(2**100),
        1.5, -0.0, float("inf"), float("nan"), b"bytes", text, (1, "two"), {1: "one", "k": None},
        {3, 1, 2}, frozenset({7}), [],
    ]  # fmt: skip
    failure = [
        b"twisted.spread.pb.CopyableFailure",
        jelly({"type": b"builtins.ValueError", "value": "nope", "traceback": "Traceback unavailable\n"}),
    ]
    return {
        "handshake-server.bin": _stream([b"pb", b"none"], dialect=b"none") + _stream([b"version", 6]),
        "handshake-client.bin": _stream([b"pb"], dialect=b"none") + _stream([b"version", 6]),
        "call-echo.bin": _stream([b"message", 1, b"root", b"echo", 1, jelly(("hello",)), jelly({})]),
        "answer-atoms.bin": _stream([b"answer", 2, jelly(values)]),
        "shared-cyclic.bin": _stream(jelly(_shared_and_cyclic())),
        "dates-decimal.bin": _stream(
            jelly(
                [
                    datetime.datetime(2024, 2, 29, 23, 59, 58, 999),
                    datetime.date(1999, 12, 31),
                    datetime.time(1, 2, 3, 4),
                    datetime.timedelta(days=-1, seconds=5, microseconds=6),
                    decimal.Decimal("-3.14159"),
                    decimal.Decimal("1E+20"),
                ]
            )
        ),
        "pb-references.bin": _stream(
            [b"answer", 3, [b"list", [b"remote", 1], [b"local", 2], [b"cached", 3], [b"lcache", 4]]],
            [b"decref", 1],
            [b"decache", 3],
            [b"uncache", 3],
        ),
        "error-failure.bin": _stream([b"error", 4, failure], [b"didNotUnderstand", b"frobnicate"]),
        "copy-tags.bin": _stream(
            # The copy tags the jelly harness registers (see fuzz_jelly.py).
            [
                b"reference",
                1,
                [
                    b"pbcore_fuzz.Thing",
                    [b"dictionary", [[b"unicode", b"me"], [b"dereference", 1]], [[b"unicode", b"n"], 3]],
                ],
            ],
            [b"pbcore_fuzz.Made", [b"list", 1, [b"None"]]],
            [b"pbcore_fuzz.Plain", [b"dictionary", [[b"unicode", b"x"], 1.25]]],
            [b"unpersistable", b"a socket"],
        ),
        "cachemessage.bin": _stream(
            [b"cachemessage", 5, 3, b"update", 0, jelly(("n", 6)), jelly({"why": b"tick"})],
            [b"answer", 5, [b"mod.Cache", 9, jelly({"n": 6})]],
        ),
        "big-items.bin": _stream(
            [b"x" * 300, 2**447, -(2**447), [[[[[[[[[[]]]]]]]]]], list(range(130))], dialect=b"none"
        ),
        # Well-formed but expensive (docs/security.md): each must be refused or cheap.
        "bomb-dict-key.bin": _stream(bombs.dict_key_bomb(64)),
        "bomb-set-nested.bin": _stream(bombs.set_bomb(40, nested=True)),
        "bomb-frozenset.bin": _stream(bombs.frozenset_bomb(64)),
        "bomb-equal-pair.bin": _stream(bombs.equal_pair_bomb(40)),
        "bomb-failure.bin": _stream(bombs.error(1, bombs.failure_bomb(64))),
        "bomb-collisions.bin": _stream(bombs.collision_dict(2000), bombs.collision_set(2000)),
        "bomb-deep-key.bin": _stream(bombs.deep_key(2000)),
        "vocabulary.bin": _stream(
            [word for word in (b"None", b"class", b"dereference", b"reference", b"dictionary", b"version", b"uncache")]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """Write every seed into fuzz/corpus/ (or the directory given)."""
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else CORPUS
    target.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(seeds().items()):
        (target / name).write_bytes(data)
        print(f"{target / name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
