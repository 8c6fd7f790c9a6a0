#!/usr/bin/env python3
"""Fuzz the control server with many request lines: the strategies and the checks of
tests/test_control_fuzz.py (one truth for both), run longer than CI does.

    .venv/bin/python benchmarks/fuzz_control.py                   # 10,000 lines
    .venv/bin/python benchmarks/fuzz_control.py --examples 50000 --seed 7

A real ControlServer on a Unix socket serves ixyd's methods (their real parameter
schemas) with handlers that record their calls. Every line hypothesis writes is sent on
one connection (a new one after the server closes it) and checked: answers are JSON, a
handler that ran for a request with an id was answered, no handler saw a non-finite
number, no -32603, no Python internals in a message, the server goes on. Prints what came
back by error code, the handler calls, the time taken and the longest single step of the
server thread. Exit 1, with hypothesis's smallest failing line, if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from test_control_fuzz import FuzzTarget, check_line, lines  # noqa: E402

from ixyd.control import ErrorCode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="lines to send")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random)")
    args = parser.parse_args()
    target = FuzzTarget()
    seen: Counter = Counter()
    count = [0]

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(line=lines)
    def fuzz(line: bytes) -> None:
        count[0] += 1
        check_line(target, line, seen)

    if args.seed is not None:
        fuzz = seed(args.seed)(fuzz)
    started = time.monotonic()
    failed = None
    try:
        fuzz()
    except Exception as exc:  # hypothesis has printed the smallest failing line
        failed = exc
    elapsed = time.monotonic() - started
    longest = target.server.longest_step
    calls = len(target.calls)
    target.close()

    print(f"date:     {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(
        f"machine:  {platform.node()}, {os.cpu_count()} CPUs; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(f"python:   {platform.python_implementation()} {platform.python_version()}")
    print(f"lines:    {count[0]:,} in {elapsed:.1f} s ({count[0] / elapsed:.0f}/s)")
    print(f"answers:  {seen['result']:,} results; errors by code:")
    for code in sorted(c for c in seen if c != "result"):
        print(f"  {code:>7} {ErrorCode(code).name:<18} {seen[code]:,}")
    print(f"handlers: {calls:,} calls, each answered or a notification, none with inf")
    print(
        f"server:   longest step of its thread {longest[0] * 1000:.2f} ms "
        f"({longest[1] * 1000:.2f} ms of CPU time)"
    )
    if failed is not None:
        print(f"FAILED: {failed!r}")
        return 1
    print("checks:   all held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
