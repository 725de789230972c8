"""The few program-building operations the static EMA needs, written once for both program kinds.

Paddle 3.x builds static programs in one of two representations, chosen by FLAGS_enable_pir_api:
PIR (`paddle.pir.Program`, the default) and the legacy ProgramDesc (`paddle.base.framework.Program`).
Ordinary ops (arithmetic, cast, where, assign with output=) are emitted by the same Paddle
calls in both; what differs is how a persistable variable is declared, referred to from another
program, how an op updates a variable in place, how a custom op of the fused
extension is appended, and how an op is put at the start of a block. Those differences live here
and nowhere else.
"""

from typing import Any, Dict, Iterable, Optional, Sequence

import paddle

from .. import _compat
from ..core.validation import check_int
from ..errors import ConfigError

__all__ = [
    "in_pir",
    "lerp_",
    "fused_lerp_",
    "fused_all_finite",
    "fused_lerp_takes",
    "fused_all_finite_takes",
    "fused_cast",
    "fused_cast_takes",
    "runs_on_cpu",
    "create_persistable",
    "scope_variable",
    "persistable_variables",
    "step_counter",
    "clone_for_test",
]


def in_pir() -> bool:
    """Whether static programs are built as PIR programs.

    Returns:
        True for PIR (the Paddle 3.x default), False for legacy ProgramDesc programs.
    """
    return _compat.in_pir_mode()


def lerp_(average: Any, value: Any, weight: Any) -> None:
    """average <- average + weight * (value - average), in place: `kernels.lerp_` as program ops.

    Three elementwise ops, the last one in place: on CPU this is faster than Paddle's lerp kernel
    plus an assign (docs/performance.md) (PIR programs turn `Tensor.lerp_` into an out-of-place lerp).
    The step is a multiply by the one-element weight, not a scale op: scale adds its bias (+0 by
    default) after the product, which turns a -0 product into +0, so a -0 average would become +0
    when w * (x - a) underflows, unlike lerp and the fused operator. (A bias of -0.0 does not do:
    PIR keeps one attribute per float value, and -0.0 == 0.0 finds the 0.0 of another op.)

    Args:
        average: the program variable updated in place.
        value: the program value averaged in, of the average's shape.
        weight: a one-element tensor of the average's dtype.
    """
    difference = paddle.subtract(value, average)
    if in_pir():
        _compat.inplace_add_(average, paddle.multiply(difference, weight))
    else:  # paddle.multiply takes no legacy Variable on Paddle 3.3: the ops appended by hand
        helper = _compat.legacy_layer_helper("elementwise_mul")
        step = helper.create_variable_for_type_inference(difference.dtype)
        helper.append_op(type="elementwise_mul", inputs={"X": [difference], "Y": [weight]}, outputs={"Out": [step]},
                         attrs={"axis": -1})
        block = paddle.static.default_main_program().current_block()
        block.append_op(
            type="elementwise_add", inputs={"X": [average], "Y": [step]}, outputs={"Out": [average]}, attrs={"axis": -1}
        )


# The custom operator of kernels/csrc/ema_ops.cc that updates a whole list in place, and the
# (average dtype: value dtypes) pairs it takes, as that file's KindOf does.
FUSED_LERP_OP = "paddle_ema_lerp_by_tensor"
FUSED_LERP_DTYPES = {"float32": ("float32", "float16", "bfloat16"), "float64": ("float64",)}


def fused_lerp_takes(average: Any, value: Any) -> bool:
    """Whether `fused_lerp_` can update `average` from `value`, by their dtypes; a program has no
    fallback inside the op, so the caller gives other pairs the built-in ops.

    Args:
        average: the average's program variable.
        value: the value's program variable.

    Returns:
        True for the (average, value) dtype pairs of FUSED_LERP_DTYPES.
    """
    return any(
        average.dtype == getattr(paddle, a) and value.dtype in tuple(getattr(paddle, v) for v in vs)
        for a, vs in FUSED_LERP_DTYPES.items()
    )


def runs_on_cpu() -> bool:
    """Whether the program being built will run on the CPU: Paddle's expected place, the
    one paddle.set_device chose (`_current_expected_place` says nothing in PIR mode).

    Returns:
        True when the expected place is the CPU.
    """
    return _compat.is_cpu_place(_compat.expected_place())


def fused_lerp_(averages: Iterable[Any], values: Iterable[Any], weight: Any) -> None:
    """`lerp_` for a whole list in one op: the fused extension's `paddle_ema_lerp_by_tensor`.

    CPU programs only, with the extension loaded (kernels.active_kernel() == 'fused'). The thread
    count is fixed now, when the op is built, from kernels.fused.num_threads().

    Args:
        averages: the program variables updated in place.
        values: the values averaged in, one per average (dtype pairs as in `fused_lerp_takes`).
        weight: a one-element float32 or float64 tensor (the averages' dtype); 0 leaves the
            averages untouched even where values hold NaN, 1 copies the values.
    """
    from ..kernels import fused

    averages, values = list(averages), list(values)
    threads = fused.num_threads()
    if in_pir():
        # PIR declares the op in place from its inplace map (custom_op.<name>_).
        _compat.run_custom_op(FUSED_LERP_OP, averages, values, weight, threads)
    else:
        # Legacy programs name a custom op's list arguments "<Name>@VECTOR"; the in-place
        # output is the averages themselves, as Paddle's generated static API writes it.
        _compat.legacy_layer_helper(FUSED_LERP_OP).append_op(
            type=FUSED_LERP_OP,
            inputs={"Averages@VECTOR": averages, "Values@VECTOR": values, "Weight": [weight]},
            outputs={"AveragesOut@VECTOR": averages},
            attrs={"threads": threads},
        )


# The custom operator of kernels/csrc/ema_ops.cc that checks a whole list for NaN/Inf.
FUSED_ALL_FINITE_OP = "paddle_ema_all_finite"

# The parameter dtypes that op reads (every one the fused update reads); a program with others
# keeps `all_finite`.
FUSED_ALL_FINITE_DTYPES = tuple(dict.fromkeys(d for ds in FUSED_LERP_DTYPES.values() for d in ds))


def fused_all_finite_takes(values: Iterable[Any]) -> bool:
    """Whether `fused_all_finite` can check every one of `values`.

    Args:
        values: the program values to check.

    Returns:
        True when each is of a dtype in FUSED_ALL_FINITE_DTYPES.
    """
    dtypes = tuple(getattr(paddle, name) for name in FUSED_ALL_FINITE_DTYPES)
    return all(value.dtype in dtypes for value in values)


def fused_all_finite(values: Iterable[Any]) -> Any:
    """`all_finite` in one op: the fused extension's `paddle_ema_all_finite`.

    One threaded read of all values instead of a full-size isfinite tensor and a reduction per
    value. Same conditions as `fused_lerp_` (CPU programs, extension loaded).

    Args:
        values: the program values to check, each of a dtype in FUSED_ALL_FINITE_DTYPES (else
            the run fails).

    Returns:
        A bool [1] program value: True when no element is NaN or Inf.
    """
    from ..kernels import fused

    values = list(values)
    threads = fused.num_threads()
    if in_pir():
        (finite,) = _compat.run_custom_op(FUSED_ALL_FINITE_OP, values, threads)
        return finite
    helper = _compat.legacy_layer_helper(FUSED_ALL_FINITE_OP)
    finite = helper.create_variable_for_type_inference("bool")
    helper.append_op(
        type=FUSED_ALL_FINITE_OP,
        inputs={"Values@VECTOR": values},
        outputs={"Finite": [finite]},
        attrs={"threads": threads},
    )
    return finite


# The custom operators of kernels/csrc/ema_ops.cc that narrow float32 to a half-precision dtype
# rounding to nearest-even on every Paddle version (Paddle's CPU cast truncates before 3.2).
FUSED_CAST_OPS = {"float16": "paddle_ema_cast_to_float16", "bfloat16": "paddle_ema_cast_to_bfloat16"}


def fused_cast_takes(value: Any, dtype: Any) -> bool:
    """Whether `fused_cast` can narrow `value` to `dtype`.

    Args:
        value: the program value to cast.
        dtype: the target Paddle dtype.

    Returns:
        True for float32 to float16 or bfloat16.
    """
    return value.dtype == paddle.float32 and any(dtype == getattr(paddle, name) for name in FUSED_CAST_OPS)


def fused_cast(value: Any, dtype: Any) -> Any:
    """`paddle.cast(value, dtype)` for a float32 `value` and a float16/bfloat16 `dtype`, rounded to
    nearest, ties to even, the bits of kernels.cast (the dygraph EMA's) on every Paddle version.

    Same conditions as `fused_lerp_` (CPU programs, extension loaded); other pairs raise
    ConfigError (check `fused_cast_takes` first). The thread count is fixed when the op is built.

    Args:
        value: a float32 program value.
        dtype: paddle.float16 or paddle.bfloat16.

    Returns:
        The cast program value.
    """
    from ..kernels import fused

    if not fused_cast_takes(value, dtype):
        raise ConfigError(f"fused_cast narrows float32 to float16 or bfloat16, got {value.dtype} to {dtype}")
    (name,) = [n for n in FUSED_CAST_OPS if dtype == getattr(paddle, n)]
    op = FUSED_CAST_OPS[name]
    threads = fused.num_threads()
    if in_pir():
        (out,) = _compat.run_custom_op(op, value, threads)
        return out
    helper = _compat.legacy_layer_helper(op)
    out = helper.create_variable_for_type_inference(name)
    helper.append_op(type=op, inputs={"X": [value]}, outputs={"Out": [out]}, attrs={"threads": threads})
    return out


def _legacy_variable(x):
    # An eager Tensor is an instance of paddle.static.Variable too: check the mode first.
    return not paddle.in_dynamic_mode() and isinstance(x, paddle.static.Variable)


def all_finite(values):
    """A bool [1] value: True when no element of `values` is NaN or Inf (both program kinds).

    Legacy programs get the operators appended by hand (paddle.isfinite, paddle.all and the
    logical ops on Paddle 3.3 take only PIR values)."""
    if _legacy_variable(values[0]):
        helper = _compat.legacy_layer_helper("all_finite")

        def op(kind, inputs, attrs=None):
            out = helper.create_variable_for_type_inference("bool")
            helper.append_op(type=kind, inputs=inputs, outputs={"Out": [out]}, attrs=attrs or {})
            return out

        result = None
        for value in values:
            finite = op("isfinite_v2", {"X": [value]})
            every = op("reduce_all", {"X": [finite]}, {"dim": [], "keep_dim": False, "reduce_all": True})
            result = every if result is None else op("logical_and", {"X": [result], "Y": [every]})
        return paddle.reshape(result, [1])
    return paddle.reshape(paddle.all(paddle.stack([paddle.all(paddle.isfinite(v)) for v in values])), [1])


def create_persistable(name: str, shape: Sequence[int], dtype: Any, value: float) -> Any:
    """A persistable variable of the current main program, set to `value` by the startup program.

    Args:
        name: the variable's name.
        shape: its shape.
        dtype: its dtype (a Paddle dtype or its name).
        value: the constant it starts from.

    Returns:
        The variable, with stop_gradient set.
    """
    initializer = paddle.nn.initializer.Constant(float(value))
    if in_pir():
        var = _compat.create_pir_persistable(dtype, shape, name, initializer)
    else:
        var = paddle.static.create_global_var(
            shape=list(shape), value=float(value), dtype=dtype, persistable=True, name=name
        )
    var.stop_gradient = True
    return var


def scope_variable(name: str, shape: Sequence[int], dtype: Any) -> Any:
    """A value of the current program that reads and writes the existing scope variable `name`.

    Used by the apply/restore programs to reach parameters and shadows of the main program.

    Args:
        name: the scope variable's name.
        shape: its shape.
        dtype: its dtype.

    Returns:
        The program's variable for it (a legacy program's existing one when it has it).
    """
    if in_pir():
        var = paddle.static.data(name, list(shape), dtype)
        var.persistable = True
    else:
        block = paddle.static.default_main_program().global_block()
        if block.has_var(name):
            return block.var(name)
        var = block.create_var(name=name, shape=list(shape), dtype=dtype, persistable=True)
    var.stop_gradient = True
    return var


def persistable_variables(program: Any) -> Dict[str, Any]:
    """The persistable variables declared in `program`.

    Args:
        program: a PIR or legacy static program.

    Returns:
        {name: variable}; values without a name are left out.
    """
    return {_name(var): var for var in program.list_vars() if var.persistable and _name(var)}


def _name(value):
    try:
        return value.name
    except (ValueError, RuntimeError):  # PIR values made by ordinary ops have no name
        return None


def step_counter(name: str = "@STEP_COUNTER@", begin: int = 1, step: int = 1) -> Any:
    """An int64 counter that every run of the main program advances by `step`, first value `begin`.

    The replacement for `paddle.optimizer.lr.autoincreased_step_counter`, which fails on PIR
    programs in Paddle 3.x. The increment is the first op of the program, so every op of a run sees
    the same value. The counter is persistable, so `paddle.static.save`/`load` carry it.

    Args:
        name: the counter's variable name.
        begin: its value during the first run.
        step: what each run adds.

    Returns:
        The [1] int64 counter variable; the existing one when the program already has `name`.
    """
    begin, step = check_int("step_counter: begin", begin), check_int("step_counter: step", step)
    program = paddle.static.default_main_program()
    existing = persistable_variables(program).get(name)
    if existing is not None:
        return existing
    counter = create_persistable(name, [1], "int64", begin - step)
    if in_pir():
        here = paddle.pir.get_current_insertion_point()
        paddle.pir.set_insertion_point_after(counter.get_defining_op())
        paddle.increment(counter, float(step))
        paddle.pir.set_insertion_point(here)
    else:
        _compat.prepend_legacy_op(
            program.global_block(), type="increment", inputs={"X": [counter]}, outputs={"Out": [counter]},
            attrs={"step": float(step)}
        )
    return counter


def clone_for_test(program: Any, fetch_vars: Optional[Sequence[Any]] = None) -> Any:
    """An evaluation copy of `program`: dropout off, BatchNorm on its running statistics.

    Legacy programs: `program.clone(for_test=True)`. PIR programs have no for_test argument
    (`clone()` takes none on Paddle 3.x), so the copy is made with `clone()` and every op that has
    an `is_test` attribute gets it set, as Paddle's own inference export does. A PIR executor
    fetches only values of the program it runs, so pass the variables to fetch as `fetch_vars` to
    get (test_program, [the same variables in the copy]).

    Clone before `optimizer.minimize()` and before `ema.update()`, as with the legacy call: a clone
    made after carries the backward, optimizer and EMA update ops along.

    Args:
        program: the PIR or legacy program to copy.
        fetch_vars: variables of `program` to find in the copy; None for none.

    Returns:
        The test program, or (test_program, [fetch_vars in the copy]) when `fetch_vars` is given.
    """
    if in_pir():
        value_map = paddle.pir.IrMapping()
        test_program = program.clone(value_map)
        for block in test_program.blocks:
            for op in block.ops:
                if op.has_attr("is_test"):
                    op.set_bool_attr("is_test", True)
        mapped = [value_map.look_up(v) for v in fetch_vars or ()]
    else:
        test_program = program.clone(for_test=True)
        mapped = [test_program.global_block().var(v.name) for v in fetch_vars or ()]
    return test_program if fetch_vars is None else (test_program, mapped)
