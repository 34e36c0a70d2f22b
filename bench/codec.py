#!/usr/bin/env python3
"""The codec benchmark: pbcore's Jelly + Banana against Twisted's, in one process.

For each payload size N (a list of N small dicts), it times, on the same
payload and the same bytes:

* encode: jelly the value, then Banana-encode it in the ``pb`` dialect;
* decode: Banana-decode the bytes (fed in one call), then unjelly.

Before anything is timed it checks that both encoders give identical bytes and
both decoders give the original value back, so both sides do the same work.
Each figure is the minimum, over ``--repeat`` repeats, of the mean time per
operation in a repeat, a repeat being enough loops to last ``--min-time``
seconds (calibrated like :meth:`timeit.Timer.autorange`). The garbage collector
stays enabled but is run before every measurement.

A second section, "decode chunking", feeds the largest payload to pbcore's
Banana decoder in 1 KiB and 64-byte chunks and compares with one feed.

Run ``python bench/codec.py --help`` for the options; bench/README.md explains
the figures and the targets.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import itertools
import json
import platform
import pstats
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import twisted
from twisted.spread import banana as _twisted_banana
from twisted.spread import jelly as _twisted_jelly

import pbcore
from pbcore import banana as pb_banana
from pbcore import jelly as pb_jelly
from pbcore.codec import ValueEncoder

# Twisted ships py.typed but these modules are untyped: go through Any so that
# mypy --strict does not flag every call.
tw_banana: Any = _twisted_banana
tw_jelly: Any = _twisted_jelly

DEFAULT_SIZES: Final = (10, 100, 1000, 3000)
QUICK_SIZES: Final = (10, 30)
#: The size the decode targets and the linearity line compare against.
BASE_N: Final = 100
#: The largest size at which Twisted's decoder is timed with chunked input.
TWISTED_CHUNK_MAX_N: Final = 1000

ENCODE_MIN_RATIO: Final = 4.0
DECODE_MIN_RATIO: Final = {100: 5.0, 3000: 25.0}
LINEARITY_N: Final = (100, 3000)
LINEARITY_MAX: Final = 35.0
#: pbcore's encode and decode against json.dumps and json.loads of the same payload (issue 11).
JSON_MAX_RATIO: Final = 3.0


# ---------------------------------------------------------------------------
# The payload and the four codecs


def make_payload(n: int) -> list[dict[str, Any]]:
    """N dicts with str, int, float, bool, None and list fields, varying by index."""
    return [
        {
            "name": f"user-{i}",
            "id": i,
            "score": i + 0.25,
            "active": i % 2 == 0,
            "note": None,
            "tags": ["a", "b", i],
        }
        for i in range(n)
    ]


def _twisted_protocol() -> Any:
    """A pb-dialect Banana, as a connection has it after the handshake."""
    proto = tw_banana.Banana(isClient=1)
    proto.connectionMade()
    proto._selectDialect(b"pb")
    return proto


class TwistedCodec:
    """twisted.spread.jelly + twisted.spread.banana, one protocol instance per side."""

    name: Final = "Twisted"

    def __init__(self) -> None:
        self._encoder = _twisted_protocol()
        self._decoder = _twisted_protocol()
        self._received: list[Any] = []
        self._decoder.expressionReceived = self._received.append

    def encode(self, value: Any) -> bytes:
        # What Banana.sendEncoded does, minus the transport.
        stream = io.BytesIO()
        self._encoder._encode(tw_jelly.jelly(value, tw_jelly.globalSecurity), stream.write)
        data: bytes = stream.getvalue()
        return data

    def decode_banana(self, chunks: Sequence[bytes]) -> Any:
        received = self._received
        received.clear()
        for chunk in chunks:
            self._decoder.dataReceived(chunk)
        if len(received) != 1:
            raise AssertionError(f"Twisted decoded {len(received)} expressions, expected 1")
        return received.pop()

    def decode(self, data: bytes) -> Any:
        self._received.clear()
        self._decoder.dataReceived(data)
        return tw_jelly.unjelly(self._received.pop(), tw_jelly.globalSecurity)


class PbcoreCodec:
    """pbcore's encoder (pbcore.codec, jelly and banana fused) and decoder (Decoder + unjelly).

    The two-step encode (pbcore.jelly then pbcore.banana) is timed too, for
    information: it is what the fused encoder must equal byte for byte.
    """

    name: Final = "pbcore"

    def __init__(self) -> None:
        self._encoder = pb_banana.Encoder(b"pb")
        self._decoder = pb_banana.Decoder(b"pb", untracked=True)  # as the broker and loads decode
        self._fused = ValueEncoder(b"pb")

    def encode(self, value: Any) -> bytes:
        """pbcore.codec's one-pass jelly + banana: what the broker sends with."""
        return self._fused.encode(value)

    def encode_two_step(self, value: Any) -> bytes:
        """pbcore.jelly, then pbcore.banana (informational, not part of the targets)."""
        return self._encoder.encode(pb_jelly.jelly(value))

    def decode_banana(self, chunks: Sequence[bytes]) -> Any:
        decoder = self._decoder
        found: list[pb_banana.Sexp] = []
        for chunk in chunks:
            decoder.feed(chunk)
            while (expression := decoder.next_expression()) is not None:
                found.append(expression)
        if len(found) != 1 or not decoder.at_boundary:
            raise AssertionError(f"pbcore decoded {len(found)} expressions, expected 1")
        return found[0]

    def decode(self, data: bytes) -> Any:
        decoder = self._decoder
        decoder.feed(data)
        expression = decoder.next_expression()
        if expression is None:
            raise AssertionError("pbcore: incomplete expression")
        return pb_jelly.unjelly(expression)


def check_same_work(payload: list[dict[str, Any]], twisted_codec: TwistedCodec, pbcore_codec: PbcoreCodec) -> bytes:
    """Both sides must produce the same bytes and read back the same value."""
    data = twisted_codec.encode(payload)
    ours = pbcore_codec.encode(payload)
    if data != ours:
        raise SystemExit(f"encoders disagree: Twisted gave {len(data)} bytes, pbcore {len(ours)}")
    two_step = pbcore_codec.encode_two_step(payload)
    if data != two_step:
        raise SystemExit(f"encoders disagree: Twisted gave {len(data)} bytes, pbcore's two-step path {len(two_step)}")
    theirs_back = twisted_codec.decode(data)
    ours_back = pbcore_codec.decode(data)
    if not theirs_back == ours_back == payload:
        raise SystemExit("decoders disagree, or do not give the payload back")
    return data


# ---------------------------------------------------------------------------
# Timing


Clock = Callable[[], float]

#: The clocks --clock offers. process_time counts only this process's CPU
#: time, so time spent descheduled on a loaded machine is left out.
CLOCKS: Final[dict[str, Clock]] = {"perf_counter": time.perf_counter, "process_time": time.process_time}


def _run(func: Callable[[Any], object], arg: Any, loops: int, clock: Clock = time.perf_counter) -> float:
    start = clock()
    for _ in itertools.repeat(None, loops):
        func(arg)
    return clock() - start


def _calibrate(
    func: Callable[[Any], object], arg: Any, min_time: float, max_loops: int | None, clock: Clock
) -> tuple[int, float]:
    """Loops per repeat, 1, 2, 5, 10, 20, 50 ... until a repeat lasts *min_time*; and that last time."""
    gc.collect()
    for base in itertools.count():
        for factor in (1, 2, 5):
            loops = factor * 10**base
            if max_loops is not None:
                loops = min(loops, max_loops)
            elapsed = _run(func, arg, loops, clock)
            if elapsed >= min_time or (max_loops is not None and loops >= max_loops):
                return loops, elapsed
    raise AssertionError("unreachable")


def measure_interleaved(
    cases: Sequence[tuple[Callable[[Any], object], Any]],
    *,
    repeat: int,
    min_time: float,
    max_loops: int | None = None,
    clock: Clock = time.perf_counter,
) -> list[tuple[float, int]]:
    """For each (func, arg): the minimum time per call over *repeat* repeats, and the loops per repeat.

    Each case is calibrated on its own (see :func:`_calibrate`); when one loop
    is already long enough, that calibration run counts as its first repeat.
    Then the repeats of the cases alternate, so that a change in the machine's
    load during the run hits every case alike rather than the last one.
    """
    loops: list[int] = []
    samples: list[list[float]] = []
    for func, arg in cases:
        count, elapsed = _calibrate(func, arg, min_time, max_loops, clock)
        loops.append(count)
        samples.append([elapsed] if count == 1 else [])
    for _ in range(repeat):
        for (func, arg), count, taken in zip(cases, loops, samples, strict=True):
            if len(taken) < repeat:
                gc.collect()
                taken.append(_run(func, arg, count, clock) / count)
    return [(min(taken), count) for taken, count in zip(samples, loops, strict=True)]


def measure(
    func: Callable[[Any], object], arg: Any, *, repeat: int, min_time: float, max_loops: int | None = None
) -> tuple[float, int]:
    """The minimum time per call over *repeat* repeats, and the loops per repeat."""
    return measure_interleaved([(func, arg)], repeat=repeat, min_time=min_time, max_loops=max_loops)[0]


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


# ---------------------------------------------------------------------------
# The sections


def bench_sizes(sizes: Sequence[int], repeat: int, min_time: float, clock: Clock) -> list[dict[str, Any]]:
    twisted_codec = TwistedCodec()
    pbcore_codec = PbcoreCodec()
    rows: list[dict[str, Any]] = []
    header = (
        f"{'N':>6} {'bytes':>9} | {'encode: Twisted':>15} {'pbcore':>10} {'MB/s':>7} {'ratio':>6} |"
        f" {'decode: Twisted':>15} {'pbcore':>10} {'MB/s':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        payload = make_payload(n)
        data = check_same_work(payload, twisted_codec, pbcore_codec)
        row: dict[str, Any] = {"n": n, "bytes": len(data)}
        for op, arg in (("encode", payload), ("decode", data)):
            cases: list[tuple[Callable[[Any], object], Any]] = [
                (getattr(twisted_codec, op), arg),
                (getattr(pbcore_codec, op), arg),
            ]
            if op == "encode":
                cases.append((pbcore_codec.encode_two_step, arg))
            figures = measure_interleaved(cases, repeat=repeat, min_time=min_time, clock=clock)
            (tw_time, tw_loops), (pb_time, pb_loops) = figures[:2]
            if op == "encode":
                two_time, two_loops = figures[2]
                row["encode_two_step"] = {
                    "pbcore_s": two_time,
                    "pbcore_loops": two_loops,
                    "pbcore_mb_s": len(data) / two_time / 1e6,
                    "ratio": tw_time / two_time,
                }
            row[op] = {
                "twisted_s": tw_time,
                "pbcore_s": pb_time,
                "twisted_loops": tw_loops,
                "pbcore_loops": pb_loops,
                "pbcore_mb_s": len(data) / pb_time / 1e6,
                "twisted_mb_s": len(data) / tw_time / 1e6,
                "ratio": tw_time / pb_time,
            }
        enc, dec = row["encode"], row["decode"]
        print(
            f"{n:>6} {len(data):>9} | {fmt_time(enc['twisted_s']):>15} {fmt_time(enc['pbcore_s']):>10}"
            f" {enc['pbcore_mb_s']:>7.1f} {enc['ratio']:>5.1f}x |"
            f" {fmt_time(dec['twisted_s']):>15} {fmt_time(dec['pbcore_s']):>10}"
            f" {dec['pbcore_mb_s']:>7.1f} {dec['ratio']:>5.1f}x",
            flush=True,
        )
        rows.append(row)
    print("\nagainst json (the standard library's, C-accelerated; the same payload as JSON text)")
    print(
        f"{'N':>6} {'JSON bytes':>10} | {'json.dumps':>10} {'pbcore':>10} {'ratio':>6} |"
        f" {'json.loads':>10} {'pbcore':>10} {'ratio':>6}"
    )
    for row in rows:
        payload = make_payload(row["n"])
        text = json.dumps(payload)
        figures = measure_interleaved(
            [
                (json.dumps, payload),
                (pbcore_codec.encode, payload),
                (json.loads, text),
                (pbcore_codec.decode, pbcore_codec.encode(payload)),
            ],
            repeat=repeat,
            min_time=min_time,
            clock=clock,
        )
        (dumps_s, _), (encode_s, _), (loads_s, _), (decode_s, _) = figures
        # pbcore's time over json's: 1 is as fast, 3 is three times as long.
        row["json"] = {
            "bytes": len(text),
            "dumps_s": dumps_s,
            "loads_s": loads_s,
            "encode_over_dumps": encode_s / dumps_s,
            "decode_over_loads": decode_s / loads_s,
        }
        print(
            f"{row['n']:>6} {len(text):>10} | {fmt_time(dumps_s):>10} {fmt_time(encode_s):>10}"
            f" {encode_s / dumps_s:>5.1f}x | {fmt_time(loads_s):>10} {fmt_time(decode_s):>10}"
            f" {decode_s / loads_s:>5.1f}x",
            flush=True,
        )
    print("\ntwo-step encode (pbcore.jelly, then pbcore.banana; informational, not part of the targets)")
    print(f"{'N':>6} {'bytes':>9} | {'two-step':>12} {'MB/s':>7} {'ratio':>6} {'fused is':>11}")
    for row in rows:
        two = row["encode_two_step"]
        print(
            f"{row['n']:>6} {row['bytes']:>9} | {fmt_time(two['pbcore_s']):>12} {two['pbcore_mb_s']:>7.1f}"
            f" {two['ratio']:>5.1f}x {two['pbcore_s'] / row['encode']['pbcore_s']:>9.1f}x faster"
        )
    return rows


def linearity(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Decode time at the largest N over the time at N=100 (or the smallest N)."""
    if len(rows) < 2:
        return None
    by_n = {row["n"]: row for row in rows}
    small = by_n.get(BASE_N, rows[0])
    large = max(rows, key=lambda row: row["n"])
    if large is small:
        return None
    result = {
        "small_n": small["n"],
        "large_n": large["n"],
        "pbcore_decode": large["decode"]["pbcore_s"] / small["decode"]["pbcore_s"],
        "twisted_decode": large["decode"]["twisted_s"] / small["decode"]["twisted_s"],
        "bytes": large["bytes"] / small["bytes"],
    }
    print(
        f"\nlinearity: decode time at N={result['large_n']} / N={result['small_n']}:"
        f" pbcore {result['pbcore_decode']:.1f}x, Twisted {result['twisted_decode']:.1f}x;"
        f" payload bytes grew {result['bytes']:.1f}x (linear cost would give about that)"
    )
    return result


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def bench_chunking(sizes: Sequence[int], repeat: int, min_time: float, clock: Clock) -> dict[str, Any]:
    """Banana decoding (no unjelly) of one payload in one feed, 1 KiB and 64-byte chunks."""
    pb_n = max(sizes)
    small = [n for n in sizes if n <= TWISTED_CHUNK_MAX_N]
    tw_n = max(small) if small else None
    print("\ndecode chunking (Banana layer only, no unjelly; ratio = chunked time / one-feed time)")
    result: dict[str, Any] = {}
    cases: list[tuple[str, Any, int, list[tuple[str, int | None]], int | None]] = [
        ("pbcore", PbcoreCodec(), pb_n, [("one feed", None), ("1 KiB", 1024), ("64 B", 64)], None),
    ]
    if tw_n is not None:
        # Twisted is timed with a single loop: its decoder can be very slow here.
        cases.append(("Twisted", TwistedCodec(), tw_n, [("one feed", None), ("1 KiB", 1024)], 1))
    for name, codec, n, feeds, max_loops in cases:
        data = PbcoreCodec().encode(make_payload(n))
        expected = codec.decode_banana([data])
        chunked: list[list[bytes]] = []
        for label, size in feeds:
            chunks = [data] if size is None else _chunks(data, size)
            if codec.decode_banana(chunks) != expected:
                raise SystemExit(f"{name}: chunked decoding ({label}) gave a different expression")
            chunked.append(chunks)
        # The feedings alternate, repeat by repeat; bounded to three repeats.
        figures = measure_interleaved(
            [(codec.decode_banana, chunks) for chunks in chunked],
            repeat=min(repeat, 3),
            min_time=min_time,
            max_loops=max_loops,
            clock=clock,
        )
        baseline = figures[0][0]
        entry: dict[str, Any] = {"n": n, "bytes": len(data)}
        for (label, size), chunks, (seconds, loops) in zip(feeds, chunked, figures, strict=True):
            ratio = seconds / baseline
            key = "one_feed" if size is None else f"chunks_{size}"
            entry[key] = {"seconds": seconds, "loops": loops, "ratio": ratio, "feeds": len(chunks)}
            print(
                f"  {name:<8} N={n:<5} {label:>9} ({len(chunks):>6} feeds): {fmt_time(seconds):>10}  ratio {ratio:.2f}",
                flush=True,
            )
        result[name.lower()] = entry
    return result


def verdict(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target, what was measured, and whether it is met (None: not measured)."""
    by_n = {row["n"]: row for row in rows}
    targets: list[dict[str, Any]] = []
    for n in sorted(set(DEFAULT_SIZES) | set(by_n)):
        row = by_n.get(n)
        targets.append(
            {
                "target": f"encode >= {ENCODE_MIN_RATIO:g}x faster than Twisted at N={n}",
                "measured": None if row is None else row["encode"]["ratio"],
                "met": None if row is None else row["encode"]["ratio"] >= ENCODE_MIN_RATIO,
            }
        )
    for n, minimum in DECODE_MIN_RATIO.items():
        row = by_n.get(n)
        targets.append(
            {
                "target": f"decode >= {minimum:g}x faster than Twisted at N={n}",
                "measured": None if row is None else row["decode"]["ratio"],
                "met": None if row is None else row["decode"]["ratio"] >= minimum,
            }
        )
    row = by_n.get(BASE_N)
    for op, key in (("encode", "encode_over_dumps"), ("decode", "decode_over_loads")):
        slower = None if row is None or "json" not in row else row["json"][key]
        targets.append(
            {
                "target": f"{op} takes <= {JSON_MAX_RATIO:g}x json's time at N={BASE_N}",
                "measured": slower,
                "met": None if slower is None else slower <= JSON_MAX_RATIO,
            }
        )
    small, large = (by_n.get(n) for n in LINEARITY_N)
    growth = None if small is None or large is None else large["decode"]["pbcore_s"] / small["decode"]["pbcore_s"]
    targets.append(
        {
            "target": f"pbcore decode at N={LINEARITY_N[1]} <= {LINEARITY_MAX:g}x its time at N={LINEARITY_N[0]}",
            "measured": growth,
            "met": None if growth is None else growth <= LINEARITY_MAX,
        }
    )
    print("\ntargets:")
    for target in targets:
        state = {True: "MET   ", False: "MISSED", None: "n/a   "}[target["met"]]
        measured = "not measured" if target["measured"] is None else f"{target['measured']:.1f}x"
        print(f"  {state} {target['target']}: {measured}")
    return targets


# ---------------------------------------------------------------------------
# Profiling (on demand)


def profile(n: int, top: int) -> None:
    """cProfile each pbcore phase (jelly, banana encode, banana decode, unjelly; fused encode) at size *n*."""
    payload = make_payload(n)
    sexp = pb_jelly.jelly(payload)
    encoder = pb_banana.Encoder(b"pb")
    data = encoder.encode(sexp)

    def banana_decode(raw: bytes) -> pb_banana.Sexp | None:
        decoder = pb_banana.Decoder(b"pb")
        decoder.feed(raw)
        return decoder.next_expression()

    phases: list[tuple[str, Callable[[Any], object], Any]] = [
        ("jelly", pb_jelly.jelly, payload),
        ("banana encode", encoder.encode, sexp),
        ("banana decode", banana_decode, data),
        ("unjelly", pb_jelly.unjelly, banana_decode(data)),
        ("fused encode (pbcore.codec)", ValueEncoder(b"pb").encode, payload),
    ]
    for label, func, arg in phases:
        seconds, _ = measure(func, arg, repeat=3, min_time=0.2)
        print(f"\n=== profile: pbcore {label} at N={n} ({fmt_time(seconds)} per call unprofiled) ===")
        profiler = cProfile.Profile()
        loops = max(1, int(0.5 / seconds))
        profiler.enable()
        _run(func, arg, loops)
        profiler.disable()
        print(f"({loops} calls)")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------------------


def _source_state() -> dict[str, Any] | None:
    """The git commit of the checkout and whether pbcore/ differs from it (None if unknown)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "pbcore"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "pbcore_modified": bool(changes.strip())}


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes are positive integers separated by commas")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="payload sizes N, comma separated (10,100,1000,3000)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="repeats per figure; the minimum is reported (5)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds each repeat lasts at least (0.2)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="perf_counter",
        help="perf_counter (wall time, the default) or process_time (CPU time: steadier on a loaded machine)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: N=10,30, one short repeat")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures to FILE")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed or not measured")
    parser.add_argument("--no-chunking", action="store_true", help="skip the decode chunking section")
    parser.add_argument(
        "--profile", type=int, metavar="N", help="only cProfile pbcore's four phases at size N, then exit"
    )
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile (15)")
    args = parser.parse_args(argv)

    if args.profile is not None:
        profile(args.profile, args.top)
        return 0

    sizes: list[int] = list(args.sizes)
    repeat: int = max(1, args.repeat)
    min_time: float = args.min_time
    clock = CLOCKS[args.clock]
    if args.quick:
        sizes, repeat, min_time = list(QUICK_SIZES), 1, 0.01

    print(
        f"pbcore {pbcore.__version__} vs Twisted {twisted.__version__}"
        f" on Python {platform.python_version()} ({platform.python_implementation()}), {platform.platform()}"
    )
    print(f"codec: {'compiled' if pb_banana.ACCELERATED else 'pure Python'} (PBCORE_PURE forces the pure one)")
    print(
        f"sizes {sizes}, repeat {repeat}, min time {min_time} s per repeat, clock {args.clock};"
        " times are per operation, minimum over repeats"
    )
    print()
    rows = bench_sizes(sizes, repeat, min_time, clock)
    lin = linearity(rows)
    chunking = None if args.no_chunking else bench_chunking(sizes, repeat, min_time, clock)
    targets = verdict(rows)
    all_met = all(target["met"] for target in targets)
    print(f"\nverdict: {'all targets met' if all_met else 'some targets missed or not measured'}")

    if args.json:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "python": sys.version,
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "twisted": twisted.__version__,
            "pbcore": pbcore.__version__,
            "compiled": pb_banana.ACCELERATED,
            "source": _source_state(),
            "settings": {
                "sizes": sizes,
                "repeat": repeat,
                "min_time": min_time,
                "clock": args.clock,
                "quick": args.quick,
            },
            "results": rows,
            "linearity": lin,
            "chunking": chunking,
            "targets": targets,
            "all_met": all_met,
        }
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(record, stream, indent=2)
            stream.write("\n")
    if args.check and not all_met:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
