"""Every order of the static EMA's swap calls, in PIR and legacy programs, crash-free and bit-exact.

The symbols (tests/workers/static_swap_orders.py runs them): A = exe.run(ema.apply_program),
R = exe.run(ema.restore_program), C = `with ema.apply(exe): ...`, N = the same with
need_restore=False, r = ema.restore(exe), T = a training run of the main program. Every order of
length 4 runs from a fresh scope (no cached interpreter), so every order up to length 4 is checked,
as a prefix, after each of its symbols: applied weights = the averages read from the scope cast to
the parameter's dtype (the weights themselves before the first update), restored = the raw weights
saved by the first apply since the last restore, bitwise, -0.0 and a float16 parameter included;
`r` with nothing saved raises a one-line EMAStateError and changes nothing.

The orders run batched in one worker process per program kind, side by side. A crash (PIR once
segfaulted when a restore followed an apply_program run) fails the test naming the order that was
running; the worker is restarted after it, so every crashing order is named. On Paddle older than
the newest supported, the older-Paddle CI legs run the orders of length 3 (216 per kind).
"""

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paddle
import pytest

from test_static import KINDS

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "static_swap_orders.py"
SYMBOLS = "ARCNrT"
VERSION = tuple(int(p) for p in paddle.__version__.split(".")[:2])
LENGTH = 4 if VERSION >= (3, 3) else 3
MAX_CRASHES = 8  # restarts per kind before the rest is reported as not run


def run_worker(kind, orders):
    """Runs `orders` in workers until all ran; returns (finished {order: 'ok' or failure}, crashes
    [(order, exit code, the end of stderr)], orders not run, the worker's first line)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    finished, crashes, remaining, header = {}, [], list(orders), None
    while remaining and len(crashes) < MAX_CRASHES:
        result = subprocess.run([sys.executable, str(WORKER), kind, ",".join(remaining)], env=env,
                                capture_output=True, text=True, timeout=900)
        started = None
        for line in result.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "parameters" and header is None:
                header = line
            elif word == "start":
                started = rest
            elif word == "ok":
                finished[rest] = "ok"
                started = None
            elif word == "fail":
                order, _, why = rest.partition(": ")
                finished[order] = why
                started = None
        if result.returncode == 0 and result.stdout.rstrip().endswith("done"):
            remaining = [o for o in remaining if o not in finished]
            assert not remaining, f"{kind}: the worker ended without running {remaining[:5]}"
            break
        if started is None:
            pytest.fail(f"{kind}: worker exited with {result.returncode} outside any order:\n{result.stderr[-3000:]}")
        crashes.append((started, result.returncode, result.stderr[-400:]))
        remaining = remaining[remaining.index(started) + 1:]
    return finished, crashes, remaining, header


def test_every_order_of_the_swap_calls_is_crash_free_and_bit_exact():
    orders = ["".join(p) for p in itertools.product(SYMBOLS, repeat=LENGTH)]
    with ThreadPoolExecutor(len(KINDS)) as pool:
        results = dict(zip(KINDS, pool.map(lambda kind: run_worker(kind, orders), KINDS)))
    problems = []
    for kind, (finished, crashes, not_run, header) in results.items():
        if VERSION >= (3, 2):  # the float16 parameter is in the model wherever its cast rounds
            assert header is not None and "'half'" in header, f"{kind}: {header}"
        problems += [f"{kind} {order}: crashed (exit {code}): {err.strip()[-200:]}" for order, code, err in crashes]
        problems += [f"{kind} {order}: {why}" for order, why in finished.items() if why != "ok"]
        if not_run:
            problems.append(f"{kind}: {len(not_run)} orders not run after {len(crashes)} crashes")
        ran = sum(why == "ok" for why in finished.values())
        assert ran + len(crashes) + len(not_run) + sum(why != "ok" for why in finished.values()) == len(orders)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])
