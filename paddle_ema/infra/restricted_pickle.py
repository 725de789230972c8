"""Reading paddle.save's files without running what they hold.

paddle.load is pickle.load: a file whose pickle names `os.system`, `builtins.eval` or any other
callable runs it. `load` reads the same files with an allow-listing unpickler: a pickle may name
only the globals paddle.save writes, and each is replaced by a stand-in that checks its
arguments before it builds anything:

- numpy arrays (`numpy[._]core.multiarray._reconstruct`, `numpy.ndarray`) and their dtypes
  (`numpy.dtype`): numeric and bool dtypes only, the data a byte string of the exact size;
- numpy scalars (`numpy[._]core.multiarray.scalar`), e.g. a learning rate of type float64;
- containers: `builtins.tuple` (Paddle's (name, array) tensors), `set`, `frozenset`,
  `collections.OrderedDict`; dicts and lists need no global;
- Paddle's RNG state (`paddle.base.libpaddle.GeneratorState`), plain data;
- `builtins.eval` only as the call paddle.save writes for a static-mode tensor,
  eval('data', {'data': array}), which the stand-in answers without evaluating anything;
- `_codecs.encode(text, 'latin1')` and `bytes()`, how protocol 2 writes bytes.

Any other global is refused before it is looked up, naming it. After loading, the result is
post-processed as paddle.load does for a file path: sliced big arrays joined, arrays turned into
tensors (named from the file's name table), or left as arrays with `return_numpy`.
"""

import collections
import pickle
import re
from typing import Any, BinaryIO

import numpy as np
import paddle

__all__ = ["RefusedGlobal", "UnreadablePickle", "load", "ALLOWED_GLOBALS"]

# Where paddle.save's pickles keep what they are; see paddle/framework/io.py.
NAME_TABLE = "StructuredToParameterName@@"
BIG_ARRAYS = "UnpackBigParamInfor@@"  # typos: disable-line (Paddle's spelling)
# Nesting of containers in a file Paddle writes is a handful of levels; bounded so that a hostile
# file ends in an error, not a RecursionError deep inside the walk.
MAX_DEPTH = 200
_DTYPE = re.compile(r"^[biufc]\d{1,2}$")  # bool, integers, floats, complex: what tensors hold


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list, or calls an allowed one in a way paddle.save never does.

    Args:
        name: the global, `module.name`.
        why: why it is refused.
    """

    def __init__(self, name: str, why: str = "is not in what paddle.save writes"):
        super().__init__(f"{name} {why}")
        self.name, self.why = name, why


class UnreadablePickle(pickle.UnpicklingError):
    """The pickle is well formed but holds something paddle.save never writes (e.g. an object array)."""


class _Dtype:
    """numpy.dtype(spec, align, copy) of a pickle, built once its state (byte order) arrives."""

    __slots__ = ("spec", "dtype")

    def __init__(self, spec):
        self.spec, self.dtype = spec, None

    def __setstate__(self, state):
        if self.dtype is not None:
            raise RefusedGlobal("numpy.dtype", "has its state set twice")
        if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3 or state[1] not in ("<", ">", "|", "=")
                or state[2:5] != (None, None, None) or state[5:7] != (-1, -1) or not isinstance(state[7], int)):
            raise RefusedGlobal("numpy.dtype", "has a state no plain numeric dtype has")
        dtype = np.dtype(self.spec)
        self.dtype = dtype.newbyteorder(state[1]) if state[1] in "<>" and dtype.itemsize > 1 else dtype


def _dtype(spec, align=False, copy=True):
    if not isinstance(spec, str) or not _DTYPE.match(spec) or not isinstance(align, bool) or not isinstance(copy, bool):
        raise RefusedGlobal("numpy.dtype", f"describes {_shown(spec)}, not a bool, integer, float or complex dtype")
    try:
        np.dtype(spec)
    except TypeError:
        raise RefusedGlobal("numpy.dtype", f"describes {_shown(spec)}, which is no dtype") from None
    return _Dtype(spec)


def _resolved_dtype(value, who):
    if isinstance(value, _Dtype) and value.dtype is not None:
        return value.dtype
    raise RefusedGlobal(who, "gets no numeric dtype of this file")


def _as_bytes(value, who):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):  # a protocol 2 pickle read with encoding='latin1', as paddle.load reads it
        return value.encode("latin1")
    raise RefusedGlobal(who, f"gets a {type(value).__name__} where its data are bytes")


class _Array:
    """numpy's _reconstruct(ndarray, (0,), b'b') of a pickle: the array is built from its state."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        who = "numpy.ndarray"
        if self.array is not None:
            raise RefusedGlobal(who, "has its state set twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise RefusedGlobal(who, "has a state no array has")
        if len(state) == 5:
            if state[0] != 1:
                raise RefusedGlobal(who, f"has a state of version {_shown(state[0])}")
            state = state[1:]
        shape, dtype, fortran, data = state
        if (not isinstance(shape, tuple) or len(shape) > 64
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise RefusedGlobal(who, "has a shape that is not a tuple of sizes")
        if not isinstance(fortran, (bool, int)):
            raise RefusedGlobal(who, "has an order flag that is not a bool")
        dtype = _resolved_dtype(dtype, who)
        data = _as_bytes(data, who)
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if len(data) != expected:
            raise UnreadablePickle(f"an array of shape {list(shape)} {dtype} holds {len(data)} bytes, not {expected}")
        # numpy's own reconstruction, now with checked arguments and a dtype built here: it takes
        # the bytes without a copy, as paddle.load's unpickling does.
        array = _NUMPY_RECONSTRUCT(np.ndarray, (0,), b"b")
        array.__setstate__((1, shape, dtype, bool(fortran), data))
        self.array = array


_NDARRAY = object()  # what `numpy.ndarray` names in a pickle: only an argument of _reconstruct
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, whatever its module is called


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or shape != (0,) or _as_bytes(typecode, "numpy.ndarray") != b"b":
        raise RefusedGlobal("numpy.core.multiarray._reconstruct", "is called with other arguments than numpy's own")
    return _Array()


def _scalar(dtype, data):
    dtype = _resolved_dtype(dtype, "numpy.core.multiarray.scalar")
    data = _as_bytes(data, "numpy.core.multiarray.scalar")
    if len(data) != dtype.itemsize:
        raise UnreadablePickle(f"a numpy scalar of {dtype} holds {len(data)} bytes, not {dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype)[0]


def _eval(expression, scope=None, *rest):
    # paddle.save writes a static-mode DenseTensor as eval('data', {'data': array}): answered here,
    # nothing is evaluated.
    if expression == "data" and not rest and isinstance(scope, dict) and set(scope) == {"data"} \
            and isinstance(scope["data"], _Array):
        return scope["data"]
    raise RefusedGlobal("builtins.eval", f"would evaluate {_shown(expression)}, not return the array paddle.save writes")


def _encode(text, encoding="utf-8", *rest):
    if isinstance(text, str) and encoding in ("latin1", "latin-1") and not rest:
        return text.encode("latin1")
    raise RefusedGlobal("_codecs.encode", "is called with other arguments than pickle's own for bytes")


def _empty_bytes(*args):
    if args:
        raise RefusedGlobal("builtins.bytes", "is called with arguments; pickle writes bytes() only for b''")
    return b""


def _shown(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _generator_state():
    return type(paddle.get_rng_state()[0])


# (module, name) -> the stand-in a pickle gets; a callable is called with the pickle's arguments.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "eval"): _eval,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode,
    ("builtins", "bytes"): _empty_bytes,
    ("paddle.base.libpaddle", "GeneratorState"): _generator_state,
    ("paddle.fluid.libpaddle", "GeneratorState"): _generator_state,
}
_PROTOCOL_2_MODULES = {"__builtin__": "builtins"}  # how protocol 2 names builtins


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = _PROTOCOL_2_MODULES.get(module, module)
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}"[:120])
        return found() if found is _generator_state else found

    def persistent_load(self, pid):
        raise RefusedGlobal("a persistent id", "is never written by paddle.save")


class _Walk:
    """One pass over the loaded value: stand-ins become arrays, shared and cyclic parts stay shared."""

    def __init__(self):
        self.done = {}

    def __call__(self, value, depth=0):
        if isinstance(value, _Array):
            if value.array is None:
                raise UnreadablePickle("an array has no data")
            return value.array
        if isinstance(value, _Dtype):
            return _resolved_dtype(value, "numpy.dtype")
        if isinstance(value, np.ndarray) or not isinstance(value, (dict, list, tuple, set, frozenset)):
            return value
        if depth > MAX_DEPTH:
            raise UnreadablePickle(f"values nested more than {MAX_DEPTH} levels deep")
        key = id(value)
        if key in self.done:
            return self.done[key]
        if isinstance(value, list):
            self.done[key] = value
            value[:] = [self(item, depth + 1) for item in value]
        elif isinstance(value, dict):
            self.done[key] = value
            items = [(self(k, depth + 1), self(v, depth + 1)) for k, v in value.items()]
            value.clear()
            value.update(items)
        else:
            self.done[key] = type(value)(self(item, depth + 1) for item in value)
        return self.done[key]


def _join_big_arrays(state):
    """paddle.save with protocol 2 or 3 slices an array over 2**30 bytes into parts; join them."""
    info = state.pop(BIG_ARRAYS)
    if not isinstance(info, dict):
        raise UnreadablePickle(f"{BIG_ARRAYS} is not a dict")
    parts = set()
    for key, entry in info.items():
        slices = entry.get("slices") if isinstance(entry, dict) else None
        shape = entry.get("OriginShape") if isinstance(entry, dict) else None
        if (not isinstance(slices, list) or not slices or any(s not in state or not isinstance(state[s], np.ndarray)
                                                               for s in slices)
                or not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape)):
            raise UnreadablePickle(f"the big array {_shown(key)} has no valid slices and shape")
        joined = np.concatenate([state[s].reshape(-1) for s in slices])
        if joined.size != int(np.prod(shape, dtype=object)):
            raise UnreadablePickle(f"the slices of the big array {_shown(key)} do not make its shape {list(shape)}")
        state[key] = joined.reshape(shape)
        parts.update(slices)
    for part in parts - set(info):
        del state[part]


def _tensor(array, name=None, return_numpy=False):
    if return_numpy:
        return array
    if paddle.in_dynamic_mode():
        tensor = paddle.to_tensor(array)
        if name:
            tensor.name = name
        return tensor
    from .. import _compat

    return _compat.dense_tensor(array)


def _is_named_array(value):
    return type(value) is tuple and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], np.ndarray)


def _contains(value, test):
    """paddle.load's _contain_x: whether `test` holds for `value` or anything in its dicts, lists and
    tuples. Each container is visited once, so shared parts cost nothing more."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if test(item):
            return True
        if type(item) in (dict, collections.OrderedDict, list, tuple) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


def _convert(value, test, convert, done=None, depth=0):
    """paddle.load's _parse_every_object: values passing `test` converted, containers walked (each
    once: a container referenced twice is converted once and stays shared)."""
    done = {} if done is None else done
    if test(value):
        return convert(value)
    if type(value) not in (dict, collections.OrderedDict, list, tuple, set) or depth > MAX_DEPTH:
        return value
    if id(value) in done:
        return done[id(value)]
    if type(value) in (tuple, set):
        result = type(value)(_convert(item, test, convert, done, depth + 1) for item in value)
        done[id(value)] = result
        return result
    done[id(value)] = value
    for key in range(len(value)) if type(value) is list else list(value):
        value[key] = _convert(value[key], test, convert, done, depth + 1)
    return value


def _to_tensors(value, return_numpy):
    """paddle.load's post-processing of an unpickled file (paddle/framework/io.py, `load`)."""
    if isinstance(value, dict):
        if BIG_ARRAYS in value:
            _join_big_arrays(value)
        table = value.get(NAME_TABLE)
        if table is not None:
            if not isinstance(table, dict):
                raise UnreadablePickle(f"{NAME_TABLE} is not a dict")
            for key, name in table.items():
                if key not in value:
                    raise UnreadablePickle(f"{NAME_TABLE} names {_shown(key)}, which the file does not hold")
                if isinstance(value[key], np.ndarray):
                    value[key] = _tensor(value[key], name if isinstance(name, str) else None, return_numpy)
            del value[NAME_TABLE]
            return value
    if _contains(value, _is_named_array):  # tensors saved as (name, array), e.g. inside lists
        return _convert(value, _is_named_array, lambda pair: _tensor(pair[1], pair[0], return_numpy))
    return _convert(value, lambda v: isinstance(v, np.ndarray), lambda a: _tensor(a, None, return_numpy))


def load(file: BinaryIO, return_numpy: bool = False) -> Any:
    """What paddle.load returns for a file paddle.save wrote, read by the allow-listing unpickler.

    Args:
        file: a binary file object positioned at the pickle.
        return_numpy: arrays stay numpy arrays instead of becoming tensors (paddle.load's option).

    Returns:
        The loaded object, as paddle.load gives it.

    Raises:
        RefusedGlobal: the pickle names or calls something outside the allow-list; nothing was called.
        pickle.UnpicklingError, EOFError, ValueError, ...: the file is not a pickle paddle.save wrote.
    """
    value = _Unpickler(file, encoding="latin1").load()
    value = _Walk()(value)
    for array in _arrays(value):
        if array.dtype.hasobject:  # unreachable through the stand-ins; kept as the contract
            raise UnreadablePickle("an array of Python objects")
    return _to_tensors(value, return_numpy)


def _arrays(value, depth=0, seen=None):
    seen = set() if seen is None else seen
    if isinstance(value, np.ndarray):
        yield value
        return
    if depth > MAX_DEPTH or id(value) in seen:
        return
    if isinstance(value, dict):
        seen.add(id(value))
        for item in value.values():
            yield from _arrays(item, depth + 1, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        seen.add(id(value))
        for item in value:
            yield from _arrays(item, depth + 1, seen)
