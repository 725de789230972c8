"""Worker for tests/test_static_swap_orders.py: runs orders of the static EMA's swap calls.

    python static_swap_orders.py {pir,legacy} ORDER[,ORDER...]

Each ORDER is a string over the symbols
    A  exe.run(ema.apply_program)          R  exe.run(ema.restore_program)
    C  with ema.apply(exe): ...            N  with ema.apply(exe, need_restore=False): ...
    r  ema.restore(exe)                    T  one run of the main program (a training step)
and runs from a fresh scope (so from no cached interpreter: the executor caches per scope) right
after the startup program. After every symbol (and inside C's and N's blocks) the parameters are
compared bit for bit with this file's own model of the swaps: an apply saves the raw weights unless
a saved copy is pending, then writes the averages (the float32 shadows read from the scope, cast to
the parameter's dtype; the weights as they are before the first update); a restore puts the saved
copy back and clears it, and does nothing without one, except `r`, which must raise EMAStateError.

Prints `start ORDER` before and `ok ORDER` or `fail ORDER: what` after each order, and `done` at
the end; a crash leaves a `start` line without its end, which names the order that crashed.
"""

import contextlib
import sys

import numpy as np
import paddle

from paddle_ema import kernels
from paddle_ema.errors import EMAStateError
from paddle_ema.static import ExponentialMovingAverage

VERSION = tuple(int(p) for p in paddle.__version__.split(".")[:2])


def half_parameter_rounds():
    """Whether the applied float16 weights are the shadows rounded to nearest-even here: the
    extension's cast does that on every version, Paddle's own static cast from 3.2 on."""
    return kernels.active_kernel() == "fused" or VERSION >= (3, 2)


def build():
    """main (an fc trained by SGD, and a float16 parameter each run sets from a feed), startup
    and the EMA, in the current program kind."""
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [-1, 5], "float32")
        y = paddle.static.data("y", [-1, 3], "float32")
        prediction = paddle.static.nn.fc(
            x, 3, weight_attr=paddle.ParamAttr(name="fc.w"), bias_attr=paddle.ParamAttr(name="fc.b"))
        loss = paddle.nn.functional.mse_loss(prediction, y)
        paddle.optimizer.SGD(learning_rate=0.1).minimize(loss)
        if half_parameter_rounds():
            h = paddle.static.data("h", [4], "float32")
            half = paddle.static.create_parameter(
                [4], "float16", name="half", default_initializer=paddle.nn.initializer.Constant(0.5))
            paddle.assign(paddle.cast(h, "float16"), output=half)  # stands in for its optimizer step
            half.stop_gradient = False
        ema = ExponentialMovingAverage(0.9)
        ema.update()
    return main, startup, ema


def scope_value(name):
    return np.array(paddle.static.global_scope().find_var(name).get_tensor()).copy()


class Model:
    """What the parameters must hold: P, and the pending saved copy B (None: none)."""

    def __init__(self, ema):
        self.ema = ema
        self.params = {n: scope_value(n) for n in ema.names}
        self.saved = None

    def applied(self):
        if self.saved is None:
            self.saved = dict(self.params)
        product = scope_value(self.ema.state_names()["product"]).item()
        if product < 1.0:  # something was averaged: the shadows, cast to the parameter's dtype
            self.params = {n: scope_value(self.ema.shadow_name(n)).astype(self.params[n].dtype)
                           for n in self.ema.names}

    def restored(self):
        if self.saved is not None:
            self.params, self.saved = self.saved, None

    def check(self, where):
        for name, expected in self.params.items():
            actual = scope_value(name)
            width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[expected.dtype.itemsize]
            if actual.dtype != expected.dtype or not np.array_equal(actual.view(width), expected.view(width)):
                raise AssertionError(f"{where}: {name} is {actual.ravel()[:3]}..., expected {expected.ravel()[:3]}...")


def initial_state(startup, ema, exe):
    """{name: value} of every variable the startup program initialises, with a -0.0 put into each
    parameter: restores and applies before the first update must keep its sign bit."""
    with paddle.static.scope_guard(paddle.static.Scope()):
        exe.run(startup)
        scope = paddle.static.global_scope()
        state = {}
        for var in startup.list_vars():
            try:
                name = var.name if var.persistable else None
            except (ValueError, RuntimeError):  # a PIR value without a name
                continue
            if name is not None:
                state[name] = np.array(scope.find_var(name).get_tensor()).copy()
    for name in ema.names:
        state[name].reshape(-1)[0] = -0.0
    return state


def run_order(order, main, state, ema, exe):
    """One order from the state right after the startup program (set into the fresh scope directly,
    which costs less than running startup again)."""
    rng = np.random.default_rng(len(order))
    scope = paddle.static.global_scope()
    for name, value in state.items():
        scope.var(name).get_tensor().set(value, paddle.CPUPlace())
    model = Model(ema)
    for i, symbol in enumerate(order):
        where = f"after {order[:i + 1]}"
        if symbol == "A":
            exe.run(ema.apply_program)
            model.applied()
        elif symbol == "R":
            exe.run(ema.restore_program)
            model.restored()
        elif symbol in "CN":
            with ema.apply(exe, need_restore=symbol == "C"):
                model.applied()
                model.check(f"inside {order[:i + 1]}")
            if symbol == "C":
                model.restored()
        elif symbol == "r":
            before = model.saved
            try:
                ema.restore(exe)
            except EMAStateError as exc:
                if before is not None:
                    raise AssertionError(f"{where}: restore() refused with a saved copy pending: {exc}") from None
                if "\n" in str(exc) or "before any apply" not in str(exc):
                    raise AssertionError(f"{where}: not the one-line EMAStateError: {exc!r}") from None
            else:
                if before is None:
                    raise AssertionError(f"{where}: restore() with nothing pending raised no EMAStateError")
            model.restored()
        elif symbol == "T":
            feed = {"x": rng.standard_normal((8, 5)).astype("float32"),
                    "y": rng.standard_normal((8, 3)).astype("float32")}
            if "half" in model.params:  # values a float16 holds exactly, new at every step
                feed["h"] = np.concatenate([[-0.0], rng.integers(-64, 64, 3) / 16.0]).astype("float32")
            exe.run(main, feed=feed)
            model.params = {n: scope_value(n) for n in ema.names}
        else:
            raise ValueError(f"unknown symbol {symbol!r}")
        model.check(where)


def main(kind, orders):
    paddle.set_device("cpu")
    paddle.enable_static()
    # Paddle 2.6 has legacy programs only; 3.x builds them under OldIrGuard.
    legacy = kind == "legacy" and VERSION >= (3, 0)
    with paddle.pir_utils.OldIrGuard() if legacy else contextlib.nullcontext():
        main_program, startup, ema = build()
        exe = paddle.static.Executor(paddle.CPUPlace())
        state = initial_state(startup, ema, exe)
        print(f"parameters {ema.names} kernel {kernels.active_kernel()}", flush=True)
        for order in orders:
            print(f"start {order}", flush=True)
            with paddle.static.scope_guard(paddle.static.Scope()):
                try:
                    run_order(order, main_program, state, ema, exe)
                except Exception as exc:  # noqa: BLE001 - every failure is reported with its order
                    print(f"fail {order}: {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
                    continue
            print(f"ok {order}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [o for o in sys.argv[2].split(",") if o])
