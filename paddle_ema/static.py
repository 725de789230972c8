"""The static-graph EMA: `paddle_ema.static.ExponentialMovingAverage`.

A drop-in for `paddle.static.ExponentialMovingAverage`, which no longer runs on Paddle 3.x, for
both program kinds (PIR and legacy). Code written for the old class runs after changing the import:

    from paddle_ema.static import ExponentialMovingAverage
    optimizer.minimize(loss)
    ema = ExponentialMovingAverage(0.999)
    ema.update()                      # appends the update ops: one exe.run(main) trains and averages
    ...
    with ema.apply(exe):              # parameters hold the EMA weights inside the block
        exe.run(test_program, ...)
    exe.run(ema.apply_program)        # or the old class's public programs, run directly
    exe.run(ema.restore_program)      # the raw weights back, bit-exact

Runs whose parameters held NaN or Inf are skipped and counted in the program (nonfinite='skip');
apply() warns when the count grew, and num_nonfinite_skipped() reads it.

Numbers. By default (bias_correction=True) shadows start at zero and are bias-corrected by the
exact product of the decays applied (`EMARule(bias_correction=True)`): the stored shadow is already
the corrected average, and apply() is a cast-copy of the shadows into the parameters. With a
constant decay this is Paddle 2.6's EMA_t / (1 - decay^t); with thres_steps (a varying decay) it is
the correctly debiased average where Paddle 2.6 divided by 1 - decay_t^t. Before the first update
apply() leaves the weights as they are (Paddle 2.6 wrote the zero shadows into them).
bias_correction=False keeps the plain average a <- a + (1 - d) * (x - a) of the shadows from their
start: zeros after the startup program, or the weights after `start_from_weights(exe)` (the
dygraph EMA's default start). apply() copies it the same way; both keep the same variables.

The step scalars (step, decay, weight, product) are computed in float64 ops, as the dygraph EMA
computes them in float64 on the host, so 1 - product keeps its digits near 1. The schedule's
Python-float constants (the decay) enter the program as float32 op attributes, so the decay used
is float32(decay): 0.999 acts as 0.99900001 (the dygraph EMA uses 0.999 exactly). Shadows are
float32 for float16/bfloat16 parameters, else the parameter's dtype.

Ops. When update() builds the program for the CPU (paddle.set_device's place) and the fused
kernel is active (`paddle_ema.kernels`, PADDLE_EMA_KERNEL), each run updates all shadows of one
dtype with one op of the extension, `paddle_ema_lerp_by_tensor`, with the same numbers as the
built-in ops (~3 per parameter) used otherwise, and nonfinite='skip' checks all parameters with
one more, `paddle_ema_all_finite`, instead of two built-in ops per parameter. The choice and the
ops' thread count are fixed when update() is called: a program built for the CPU must run on the
CPU. apply() narrows float32 shadows into float16/bfloat16 parameters with the extension's
`paddle_ema_cast_to_float16` / `paddle_ema_cast_to_bfloat16` (round to nearest, ties to even),
so the applied bits are the same on every Paddle version: before 3.2, Paddle's own CPU cast
truncates.
"""

import contextlib
from typing import Any, Dict, Iterable, Iterator, Optional, Union

import numpy as np
import paddle

from . import _compat, kernels
from .core.averaging import EMARule, rule_from_options, shadow_dtype
from .core.nonfinite import NonfinitePolicy
from .core.schedules import Schedule
from .core.selection import is_floating, select_parameters
from .core.step_policy import StepPolicy
from .core.validation import check_object_or_keywords
from .errors import ConfigError, EMAStateError
from .infra import program_ops
from .infra.checkpoint import staged_prefix
from .infra.program_ops import clone_for_test, step_counter

__all__ = ["ExponentialMovingAverage", "step_counter", "clone_for_test"]

DEFAULT_DECAY = 0.999
# A program counts skipped runs itself and cannot raise: 'raise' is the dygraph EMA's.
STATIC_NONFINITE_MODES = ("skip", "update")
SCALAR_DTYPE = "float64"


# The numpy dtype that makes a scope tensor of a parameter's dtype (uint16 arrays become bfloat16).
_NUMPY_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64,
                 "int64": np.int64}


def _numpy_dtype(dtype):
    (name,) = [n for n in _NUMPY_DTYPES if dtype == getattr(paddle, n)]
    return _NUMPY_DTYPES[name]


def _is_program_variable(value):
    return isinstance(value, (paddle.static.Variable, paddle.pir.Value))


class _ProgramParameters:
    """A program's parameters seen through the model interface that `select_parameters` reads."""

    def __init__(self, program):
        self._program = program

    def named_parameters(self):
        params = self._program.global_block().all_parameters()
        # ParamAttr(do_model_average=False) opted a parameter out of the old class; keep honouring it.
        return [(p.name, p) for p in params if getattr(p, "do_model_average", None) is not False]


def _chosen_parameters(program, parameters):
    """[(name, parameter)] of the program's parameters named in `parameters`, in program order."""
    wanted = [p if isinstance(p, str) else getattr(p, "name", p) for p in parameters]
    present = {p.name: p for p in program.global_block().all_parameters()}
    unknown = [n for n in wanted if n not in present]
    if unknown:
        raise ConfigError(f"parameters: {unknown[:5]} are not parameters of the main program")
    not_floating = [n for n in wanted if not is_floating(present[n])]
    if not_floating:
        raise ConfigError(f"parameters: {not_floating[:5]} are not floating-point; only those can be averaged")
    chosen = set(wanted)
    return [(name, param) for name, param in present.items() if name in chosen]


def _rule_and_policy(rule, policy, decay, thres_steps, schedule, schedule_options, update_every, bias_correction):
    """(EMARule, StepPolicy) from the objects or from the keywords they replace (not both)."""
    # With rule=, a step variable may still feed its schedule; thres_steps=True is a schedule choice.
    check_object_or_keywords("rule", rule, EMARule, {
        "decay": decay, "thres_steps": True if thres_steps is True else None, "schedule": schedule,
        "schedule_options": schedule_options, "bias_correction": bias_correction})
    check_object_or_keywords("policy", policy, StepPolicy, {"update_every": update_every})
    if policy is None:
        policy = StepPolicy(update_every=1 if update_every is None else update_every)
    elif policy.start_step:
        raise ConfigError("policy: start_step is not supported in static programs; use 0")
    if rule is None:
        if schedule is None:
            schedule = "constant" if thres_steps is None or thres_steps is False else "threshold"
        named_decay = (DEFAULT_DECAY if decay is None else decay) if isinstance(schedule, str) else None
        rule = rule_from_options(schedule, named_decay, schedule_options,
                                 True if bias_correction is None else bias_correction)
    return rule, policy


def _program_parameters(program, parameters, include_stop_gradient, exclude):
    """[(name, parameter)] to average: those given, or the program's chosen by the selection rules."""
    if parameters is None:
        named = select_parameters(_ProgramParameters(program), include_stop_gradient, exclude)
    elif exclude is not None:
        raise ConfigError("give the parameters to average either as parameters= or by exclude=, not both")
    else:
        named = _chosen_parameters(program, parameters)
    if not named:
        raise ConfigError(
            "the main program has no parameters to average (none is trainable, or all are excluded); "
            "build the EMA inside the program, after optimizer.minimize(loss)"
        )
    return named


class ExponentialMovingAverage:
    """Exponential moving average of a static program's parameters, for PIR and legacy programs.

    Args:
        decay: the schedule's decay (upper bound). Default 0.999. Ignored when `schedule` is a
            Schedule instance, which carries its own.
        thres_steps: None (default): constant decay. A step variable of the program (int or float,
            e.g. from `step_counter()`): decay = min(decay, (1+t)/(10+t)) with t its value.
            True: the same, t counted by the EMA's own update counter (0 at the first update).
        name: prefix of the EMA's variable names; needed to put two EMAs in one program.
        schedule: a registered schedule name ('constant', 'threshold', 'exponential', 'power') or
            a Schedule instance; overrides the choice made by thres_steps. It is fed by the
            thres_steps variable when one is given, else by the EMA's own update counter.
        schedule_options: the named schedule's own options, e.g. {'tau': 2000}.
        update_every: average on every k-th run of the main program (the step variable, or the
            own counter, divisible by k); t counts averaging updates. Default 1.
        bias_correction: True (default): zero start and the exact correction by 1 - prod(d_i),
            as described above. False: the plain, uncorrected average from the shadows' start
            (zeros; call `start_from_weights(exe)` after the startup program to start from the weights).
        include_stop_gradient: also average parameters with stop_gradient=True (BatchNorm's
            running statistics, frozen layers). Default False.
        exclude: parameter names to leave out: substrings, 're:<regex>' strings or re.Pattern.
        parameters: the parameters to average, chosen by the caller (program parameters or their
            names; e.g. paddle_ema.selection.select_parameters of a model, mapped to the program's
            names, as tools/train.py's static trainer does); replaces the choice by
            include_stop_gradient and exclude. Default None: chosen from the program by those.
        nonfinite: 'skip' (default): a run whose parameters hold NaN or Inf averages nothing and
            is counted in the persistable `@EMA_NONFINITE_SKIPPED@` (apply() warns when it grew;
            num_nonfinite_skipped() reads it); 'update' averages regardless.
        rule: the update rule as one object (`paddle_ema.EMARule`), instead of decay, schedule,
            schedule_options, bias_correction and thres_steps=True (a step variable may still be
            given as thres_steps: it feeds the rule's schedule).
        policy: the step policy as one object (`StepPolicy(update_every=k)`; start_step must be 0),
            instead of update_every.

    Build it inside the main program after `optimizer.minimize(loss)`, then call `update()` once.
    All state (shadows, update counter, decay product) is persistable: `paddle.static.save` and
    `load` carry it and a resumed run continues exactly.
    """

    def __init__(
        self,
        decay: Optional[float] = None,
        thres_steps: Any = None,
        name: Optional[str] = None,
        *,
        schedule: Any = None,
        schedule_options: Optional[Dict[str, Any]] = None,
        update_every: Optional[int] = None,
        bias_correction: Optional[bool] = None,
        include_stop_gradient: bool = False,
        exclude: Any = None,
        parameters: Optional[Iterable[Any]] = None,
        nonfinite: Union[str, NonfinitePolicy] = "skip",
        rule: Optional[EMARule] = None,
        policy: Optional[StepPolicy] = None,
    ):
        if paddle.in_dynamic_mode():
            raise ConfigError(
                "paddle_ema.static.ExponentialMovingAverage builds static programs; call "
                "paddle.enable_static() first, or use paddle_ema.ExponentialMovingAverage in dygraph"
            )
        if not (thres_steps is None or isinstance(thres_steps, bool) or _is_program_variable(thres_steps)):
            raise ConfigError(
                "thres_steps must be None, True (the EMA's own update counter) or a step variable "
                f"of the program, got {type(thres_steps).__name__}"
            )
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"name must be a string or None, got {name!r}")
        self.rule, self.policy = _rule_and_policy(rule, policy, decay, thres_steps, schedule, schedule_options,
                                                  update_every, bias_correction)
        if np.float32(self.schedule.decay) >= 1.0:
            raise ConfigError(
                f"decay {self.schedule.decay!r} rounds to 1.0 in float32, the precision in which programs "
                "carry constants: nothing would be averaged; use a decay below 1 - 3e-8"
            )
        if isinstance(nonfinite, NonfinitePolicy):
            nonfinite = nonfinite.mode  # the count lives in the program (num_nonfinite_skipped)
        self.nonfinite_policy = NonfinitePolicy(nonfinite, modes=STATIC_NONFINITE_MODES,
                                                refused="nonfinite must be 'skip' or 'update' in a static program, "
                                                        "got {mode!r}")
        self._step_variable = thres_steps if _is_program_variable(thres_steps) else None
        self._prefix = name or ""

        self.program = paddle.static.default_main_program()
        named = _program_parameters(self.program, parameters, include_stop_gradient, exclude)
        self.names = [param_name for param_name, _ in named]
        self._params = [param for _, param in named]
        self._check_names_free()

        self._shadows = [
            program_ops.create_persistable(self.shadow_name(n), p.shape, shadow_dtype(p.dtype), 0.0)
            for n, p in named
        ]
        # Runs of update() so far (the step of the schedule without thres_steps), and the product of
        # the decays applied, P: the bias correction divides by 1 - P; P < 1 once anything was averaged.
        self._counter = program_ops.create_persistable(self._var("@EMA_UPDATE_COUNTER@"), [1], "int64", 0)
        self._product = program_ops.create_persistable(self._var("@EMA_DECAY_PRODUCT@"), [1], SCALAR_DTYPE, 1.0)
        self._skipped = program_ops.create_persistable(self._var("@EMA_NONFINITE_SKIPPED@"), [1], "int64", 0)
        self._updated = False
        self._open_applies = 0  # apply() blocks open that restore on exit
        self._start_program = None  # start_from_weights()'s, built on its first call
        self._build_swap_programs()
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    @property
    def schedule(self) -> Schedule:
        """The decay schedule."""
        return self.rule.schedule

    @property
    def update_every(self) -> int:
        """Average on every k-th run of the main program (the step policy's)."""
        return self.policy.update_every

    @property
    def bias_correction(self) -> bool:
        """Whether the shadows start from zero and are corrected by 1 - prod(d_i)."""
        return self.rule.bias_correction

    def _var(self, suffix):
        return f"{self._prefix}{suffix}"

    def shadow_name(self, param_name: str) -> str:
        """The scope name of one parameter's average.

        Args:
            param_name: the parameter's name in the program.

        Returns:
            The name of the persistable variable that holds its average.
        """
        return self._var(f"{param_name}@EMA")

    def settings(self) -> Dict[str, Any]:
        """The settings that change the numbers, in the dygraph EMA's form: a state saved by hand
        (state_names()) should record them, and a resumed EMA must have the same.

        Returns:
            {'schedule': ..., 'bias_correction': ..., 'update_every': ...}.
        """
        return {**self.rule.options(), "update_every": self.update_every}

    def state_names(self) -> Dict[str, Any]:
        """Scope names of the persistable state, for code that saves or sets it by hand.

        Returns:
            {'shadows': {parameter name: shadow name}, 'counter': the int64 count of update runs,
            'product': the float64 product of the decays applied (1 before any update),
            'skipped': the int64 count of runs skipped for non-finite parameters}.
        """
        return {
            "shadows": {n: self.shadow_name(n) for n in self.names},
            "counter": self._counter.name,
            "product": self._product.name,
            "skipped": self._skipped.name,
        }

    def _backup_name(self, param_name):
        return self._var(f"{param_name}@EMA_BACKUP")

    def _check_names_free(self):
        wanted = [self.shadow_name(n) for n in self.names]
        wanted += [self._var("@EMA_UPDATE_COUNTER@"), self._var("@EMA_DECAY_PRODUCT@")]
        declared = program_ops.persistable_variables(self.program)
        taken = [n for n in wanted if n in declared]
        if taken:
            raise ConfigError(
                f"the program already has EMA variables {taken[:3]}: give each EMA of one program its own name="
            )

    def update(self) -> None:
        """Append the EMA update ops to the main program (once); each run of it then averages."""
        if self._updated:
            raise EMAStateError("update() already appended the EMA update ops to the program; call it once")
        if paddle.static.default_main_program() != self.program:
            raise EMAStateError(
                "update() must append to the program the EMA was built in; call it under the same program_guard"
            )
        self._updated = True
        # Legacy programs: marked as optimizer ops, like the old class's, so that a later
        # clone(for_test=True) drops them with the backward and optimizer ops.
        role = contextlib.nullcontext() if program_ops.in_pir() else _compat.legacy_optimizer_role(self.program)
        with role, paddle.static.name_scope("moving_average"):
            self._append_update_ops()

    def _append_update_ops(self):
        call = self._counter if self._step_variable is None else self._step_variable
        averages, t = self.policy.tensor_step(call, SCALAR_DTYPE)
        decay = self.schedule.tensor(t)
        weight, product = self.rule.weight(decay, self._product)
        finite = None
        if self.nonfinite_policy.checks:
            # Weights holding NaN or Inf (a diverged step) must not reach the shadows: such a run
            # averages nothing and is counted, like the dygraph EMA's nonfinite='skip'.
            check = program_ops.fused_all_finite if self._fused_check() else program_ops.all_finite
            finite = check(self._params)
            paddle.assign(self._skipped + (1 - paddle.cast(finite, "int64")), output=self._skipped)
            # where() takes no bool operands: both conditions as integer arithmetic
            averages = finite if averages is None else paddle.cast(
                paddle.cast(averages, "int64") * paddle.cast(finite, "int64"), "bool")
        if averages is not None:
            # A skipped run leaves everything as it is: weight 0 leaves the shadows unchanged.
            weight = paddle.where(averages, weight, paddle.zeros_like(weight))
            product = paddle.where(averages, product, self._product)
        weights = {}

        def weight_for(dtype):
            if dtype not in weights:
                weights[dtype] = paddle.cast(weight, dtype)
            return weights[dtype]

        pairs = list(zip(self._params, self._shadows))
        if self._fused_update():
            # One op per shadow dtype. It takes half-precision weights as they are, and a weight
            # of 0 is a true no-op there, so the non-finite guard is the weight alone.
            groups = {}
            for param, shadow in pairs:
                if program_ops.fused_lerp_takes(shadow, param):
                    groups.setdefault(shadow.dtype, ([], []))
                    groups[shadow.dtype][0].append(shadow)
                    groups[shadow.dtype][1].append(param)
            for dtype, (shadows, params) in groups.items():
                program_ops.fused_lerp_(shadows, params, weight_for(dtype))
            pairs = [(param, shadow) for param, shadow in pairs if not program_ops.fused_lerp_takes(shadow, param)]
        if finite is not None and pairs:
            chosen = paddle.reshape(finite, [])
            chosen.stop_gradient = True  # a bool that broadcast_to expands (no gradient flows here)
        for param, shadow in pairs:
            value = param if param.dtype == shadow.dtype else paddle.cast(param, shadow.dtype)
            if finite is not None:  # a weight of 0 would not do: 0 * NaN is NaN
                value = self._chosen(chosen, value, shadow)
            program_ops.lerp_(shadow, value, weight_for(shadow.dtype))
        paddle.assign(product, output=self._product)
        paddle.increment(self._counter, 1.0)

    def start_from_weights(self, executor: paddle.static.Executor) -> None:
        """(Re)start the average from the parameters' current values, like the dygraph EMA's
        register(): shadows <- weights (cast to the shadows' dtype), update counter 0, decay
        product 1. Run it after the startup program (and after loading weights) so that a
        bias_correction=False average starts from the weights instead of zeros.

        Args:
            executor: the executor whose scope holds the program's variables.
        """
        if self._start_program is None:
            program = paddle.static.Program()
            with paddle.static.program_guard(program, paddle.static.Program()):
                params = self._parameter_references()
                product, shadows = self._average_references()
                counter = program_ops.scope_variable(self._counter.name, [1], "int64")
                for param, shadow in zip(params, shadows):
                    paddle.assign(param if param.dtype == shadow.dtype else paddle.cast(param, shadow.dtype),
                                  output=shadow)
                paddle.assign(paddle.full([1], 1.0, SCALAR_DTYPE), output=product)
                paddle.assign(paddle.full([1], 0, "int64"), output=counter)
            self._start_program = program
        executor.run(self._start_program)

    def _fused_update(self):
        """Update with the fused extension's op: it is the active kernel and the program runs on
        the CPU (the op has no GPU kernel for static programs)."""
        return kernels.active_kernel() == "fused" and program_ops.runs_on_cpu()

    def _fused_check(self):
        """Check the parameters with the fused extension's one op: with the fused update, when it
        reads every parameter's dtype (it has no fallback inside a program)."""
        return self._fused_update() and program_ops.fused_all_finite_takes(self._params)

    def _build_swap_programs(self):
        """The two programs every swap runs, the old class's public pair among them.

        `_apply_program` (= `apply_program`): when no backup is pending, back up the raw weights
        and mark one pending (a pending backup is kept: apply twice, restore once, and the raw
        weights come back); then parameters <- averages. `_restore_program` (= `restore_program`):
        when a backup is pending, parameters <- backup and the mark cleared; otherwise nothing.
        The mark lives in the scope, read by the programs themselves, because scripts run these
        programs with exe.run() directly.

        Both write only scope variables that exist before either runs (`_swap_state_in_scope`),
        with assign(..., output=): a PIR program that writes a persistable variable by name
        (builtin.shadow_output) erases the scope's variable of that name when it builds, and
        the interpreters cached for the other programs keep pointers to the freed one.
        """
        self._apply_program = paddle.static.Program()
        self._restore_program = paddle.static.Program()
        with paddle.static.program_guard(self._apply_program, paddle.static.Program()):
            # One reference per variable (a PIR program may not declare a name twice), all of
            # them before any op (a PIR program reads its data values first).
            targets, backups, flag = self._swap_references()
            averages = self._average_references()
            pending = paddle.reshape(flag > 0, [])
            for target, backup in zip(targets, backups):
                paddle.assign(self._chosen(pending, backup, target), output=backup)
            self._append_apply_ops(targets, averages)
            paddle.assign(paddle.full([1], 1, "int64"), output=flag)
        with paddle.static.program_guard(self._restore_program, paddle.static.Program()):
            targets, backups, flag = self._swap_references()
            pending = paddle.reshape(flag > 0, [])
            for target, backup in zip(targets, backups):
                paddle.assign(self._chosen(pending, backup, target), output=target)
            paddle.assign(paddle.full([1], 0, "int64"), output=flag)

    def _swap_references(self):
        """(parameters, backups, the pending flag) as values of the swap program being built."""
        backups = [program_ops.scope_variable(self._backup_name(n), p.shape, p.dtype)
                   for n, p in zip(self.names, self._params)]
        flag = program_ops.scope_variable(self._pending_name(), [1], "int64")
        return self._parameter_references(), backups, flag

    @staticmethod
    def _chosen(condition, if_true, if_false):
        """where(condition, if_true, if_false), bit-exact, for a bool scalar condition and two
        values of one shape and dtype, half precision included.

        The condition is expanded to the values' shape first: given shapes that differ,
        paddle.where in a program broadcasts by adding zeros, which turns -0 into +0. The CPU has
        no float16/bfloat16 `where`: those are chosen in float32 and cast back, which is exact
        (every half value is a float32 value, and the cast back finds it again).
        """
        condition = paddle.broadcast_to(condition, if_true.shape)
        wide = shadow_dtype(if_true.dtype)
        if wide == if_true.dtype:
            return paddle.where(condition, if_true, if_false)
        chosen = paddle.where(condition, paddle.cast(if_true, wide), paddle.cast(if_false, wide))
        return paddle.cast(chosen, if_true.dtype)

    def _pending_name(self):
        return self._var("@EMA_BACKUP_PENDING@")

    def _swap_state_in_scope(self) -> None:
        """Create the backups (zeros) and the pending flag (0) in the current scope when missing.

        Done before any swap program runs (by the program accessors, apply() and restore()):
        the programs only ever write these variables in place, never create them.
        """
        scope = paddle.static.global_scope()
        wanted = [(self._backup_name(n), p.shape, p.dtype) for n, p in zip(self.names, self._params)]
        wanted.append((self._pending_name(), [1], paddle.int64))
        for name, shape, dtype in wanted:
            var = scope.find_var(name)
            if var is not None and _compat.scope_tensor_initialized(var):
                continue
            zeros = np.zeros([int(d) for d in shape], _numpy_dtype(dtype))
            scope.var(name).get_tensor().set(zeros, paddle.CPUPlace())

    def _backup_pending(self):
        """Whether the current scope holds raw weights that a restore would put back."""
        var = paddle.static.global_scope().find_var(self._pending_name())
        if var is None or not _compat.scope_tensor_initialized(var):
            return False
        return bool(np.array(var.get_tensor()).reshape(-1)[0])

    @property
    def apply_program(self) -> paddle.static.Program:
        """The old class's program: run it and the parameters hold the EMA weights, their raw values
        saved first unless a saved copy is still pending (`restore_program` puts them back).

        It writes the saved copies in place, so fetching it makes them exist in the current scope:
        fetch it under the scope the executor runs in.
        """
        self._swap_state_in_scope()
        return self._apply_program

    @property
    def restore_program(self) -> paddle.static.Program:
        """The old class's program: run it and the raw weights saved by the last apply are back,
        bit-exact; with none pending it changes nothing. Fetching it makes the saved copies
        exist in the current scope, as `apply_program` does.
        """
        self._swap_state_in_scope()
        return self._restore_program

    def _parameter_references(self):
        return [program_ops.scope_variable(name, param.shape, param.dtype) for name, param in zip(self.names, self._params)]

    def _average_references(self):
        """(the decay product, the shadows) as values of the program being built."""
        shadows = [
            program_ops.scope_variable(self.shadow_name(n), s.shape, s.dtype) for n, s in zip(self.names, self._shadows)
        ]
        return program_ops.scope_variable(self._product.name, [1], SCALAR_DTYPE), shadows

    def _append_apply_ops(self, targets, references):
        product, shadows = references
        averaged = paddle.reshape(product < 1.0, [])
        for target, average in zip(targets, shadows):
            # Chosen in the shadow's dtype; half -> float32 -> half is exact, so the kept
            # weights stay bit-exact.
            raw = target if target.dtype == average.dtype else paddle.cast(target, average.dtype)
            # Before the first update there is no average yet: keep the weights.
            chosen = self._chosen(averaged, average, raw)
            if chosen.dtype != target.dtype:
                # Rounded to nearest-even by the extension where it runs (Paddle's CPU cast
                # truncates before 3.2), the dygraph EMA's bits on every version.
                fused = self._fused_update() and program_ops.fused_cast_takes(chosen, target.dtype)
                chosen = program_ops.fused_cast(chosen, target.dtype) if fused else paddle.cast(chosen, target.dtype)
            paddle.assign(chosen, output=target)

    def num_nonfinite_skipped(self, scope: Any = None) -> int:
        """Runs of the main program whose update the non-finite guard skipped.

        Args:
            scope: the scope to read; default the current global scope.

        Returns:
            The count; 0 before the startup program ran.
        """
        scope = scope or paddle.static.global_scope()
        var = scope.find_var(self._skipped.name)
        if var is None:
            return 0
        try:
            return int(np.array(var.get_tensor()).reshape(-1)[0])
        except (RuntimeError, ValueError, IndexError):  # declared but not initialised yet
            return 0

    @property
    def nonfinite(self) -> str:
        """The non-finite policy's mode: 'skip' or 'update'."""
        return self.nonfinite_policy.mode

    def _warn_skipped(self):
        """Warn (at apply(), where the averages get used) when more runs were skipped since the last warning."""
        name = self._skipped.name
        self.nonfinite_policy.report_total(
            self.num_nonfinite_skipped(),
            lambda count: f"the static EMA skipped {count} update run(s) so far because parameters held NaN or Inf "
                          f"(counted in {name!r}); the averages leave those runs out")

    @contextlib.contextmanager
    def apply(self, executor: paddle.static.Executor,
              need_restore: bool = True) -> Iterator["ExponentialMovingAverage"]:
        """Put the EMA weights into the parameters; on leaving the block the raw weights come back.

        The raw weights are saved unless a saved copy is still pending (an earlier apply without
        a restore since): that first copy is kept, and it is what comes back. An apply() nested
        in an open apply() therefore keeps the outer one's copy, and only the outermost block
        restores. A block whose weights were already restored inside it leaves them on exit.

        Args:
            executor: the executor whose scope holds the program's variables.
            need_restore: False keeps the EMA weights after the block (for export);
                `restore(executor)` or `restore_program` still brings the raw ones back.

        Returns:
            A context manager (yielding this EMA).
        """
        self._swap_state_in_scope()
        executor.run(self._apply_program)
        self._warn_skipped()
        self._open_applies += bool(need_restore)
        try:
            yield self
        finally:
            if need_restore:
                self._open_applies -= 1
                if self._open_applies == 0:
                    executor.run(self._restore_program)  # changes nothing when already restored

    def restore(self, executor: paddle.static.Executor) -> None:
        """Put back the raw weights saved by the pending apply (bit-exact).

        Args:
            executor: the executor apply() ran with.

        Raises:
            EMAStateError: no raw weights are pending (nothing applied since the last restore).
        """
        self._swap_state_in_scope()
        if not self._backup_pending():
            raise EMAStateError(
                "restore() before any apply() since the last restore: there are no saved raw weights to put "
                "back (restore after apply(executor, need_restore=False) or a run of apply_program)"
            )
        executor.run(self._restore_program)

    def save_inference_model(self, path_prefix: str, feed_vars: Any, fetch_vars: Any,
                             executor: paddle.static.Executor, **kwargs: Any) -> None:
        """`paddle.static.save_inference_model` with the EMA weights in the saved parameters.

        The training weights are back in the scope afterwards. The files are written crash-safe
        (paddle_ema.checkpoint.staged_prefix).

        Args:
            path_prefix: as for Paddle's function.
            feed_vars: as for Paddle's function.
            fetch_vars: as for Paddle's function.
            executor: the executor whose scope holds the program's variables.
            **kwargs: as for Paddle's function; pass `program=test_program` (see `clone_for_test`).
        """
        with self.apply(executor), staged_prefix(path_prefix) as staged:
            paddle.static.save_inference_model(staged, feed_vars, fetch_vars, executor, **kwargs)

    def __repr__(self):
        return (
            f"paddle_ema.static.ExponentialMovingAverage({len(self.names)} parameters, "
            f"schedule={self.schedule!r}, update_every={self.update_every}, "
            f"step={'own counter' if self._step_variable is None else 'thres_steps variable'})"
        )
