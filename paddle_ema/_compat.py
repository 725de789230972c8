"""Every reach into Paddle's (and CPython's) private or undocumented API, behind one named function each.

Paddle has no public spelling for some things an EMA library needs: in-place ops and custom
operators in PIR programs, a program's optimizer role, the place a program is built for, a
tensor's copy to another place, BatchNorm's statistics, the operators of a compiled library.
One Paddle release can rename any of them; when one breaks, this file is the only place to mend,
and tests/test_compat.py has a test per shim. Nothing else in paddle_ema names an underscored
attribute of another library, a private namespace such as paddle.base, or an undocumented
function (tests/test_architecture.py fails if it does).

Each docstring says on which Paddle versions the shim was checked (by tests/test_compat.py).
"""

import io
import os
import sys
import warnings

import paddle

__all__ = [
    "exp",
    "inplace_add_",
    "run_custom_op",
    "legacy_layer_helper",
    "expected_place",
    "is_cpu_place",
    "create_pir_persistable",
    "prepend_legacy_op",
    "legacy_optimizer_role",
    "lr_scheduler_variable_name",
    "to_place",
    "copy_to_place",
    "same_place",
    "batchnorm_classes",
    "batchnorm_statistics",
    "unwrap_layers",
    "conv_geometry",
    "find_cuda_home",
    "can_share_buffers",
    "share_buffer",
    "scope_tensor_initialized",
    "batchnorm_momentum",
    "set_batchnorm_momentum",
    "batchnorm_uses_global_stats",
    "batchnorm_data_format",
    "save_to_file",
    "dense_tensor",
    "in_pir_mode",
    "model_optimizer",
    "register_custom_ops",
    "warn_at_caller",
    "environment_reader",
]


def inplace_add_(x, y):
    """x += y in place as a PIR program op (`paddle.add_` is dygraph-only there).

    Checked on Paddle 3.0.0 and 3.3.1.
    """
    from paddle import _C_ops

    return _C_ops.add_(x, y)


def run_custom_op(name, *args):
    """Append the registered custom operator `name` to the current PIR program (or run it in
    dygraph) with positional inputs and attributes; returns its outputs.

    Checked on Paddle 3.0.0 and 3.3.1.
    """
    from paddle import _C_ops

    return _C_ops._run_custom_op(name, *args)


def legacy_layer_helper(op_type):
    """Paddle's LayerHelper for appending `op_type` ops to a legacy (ProgramDesc) program.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    try:
        from paddle.base.layer_helper import LayerHelper
    except ImportError:  # Paddle 2.5 and older spelled the package `fluid`
        from paddle.fluid.layer_helper import LayerHelper
    return LayerHelper(op_type)


def exp(x):
    """paddle.exp that also takes legacy-program Variables: paddle.exp on Paddle 3.3 rejects them,
    so there the op is appended with Paddle's LayerHelper. Used by the schedules' tensor formulas.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    # An eager Tensor is an instance of paddle.static.Variable too: check the mode first.
    if not paddle.in_dynamic_mode() and isinstance(x, paddle.static.Variable):
        helper = legacy_layer_helper("exp")
        out = helper.create_variable_for_type_inference(x.dtype)
        helper.append_op(type="exp", inputs={"X": [x]}, outputs={"Out": [out]})
        return out
    return paddle.exp(x)


def expected_place():
    """The place static programs are being built for: the one `paddle.set_device` chose.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    framework = paddle.framework
    getter = getattr(framework, "_current_expected_place_", None) or framework._current_expected_place
    return getter()


def is_cpu_place(place):
    """True when `place` is the CPU. Paddle 3.0 returns a typed `CPUPlace` from some calls, which
    has no `is_cpu_place()`; the generic `Place` of later versions has it.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    if isinstance(place, paddle.CPUPlace):
        return True
    check = getattr(place, "is_cpu_place", None)
    return bool(check()) if check is not None else False


def create_pir_persistable(dtype, shape, name, initializer):
    """A persistable value of the current PIR program, initialised by the startup program.

    Checked on Paddle 3.0.0 and 3.3.1 (PIR does not exist on 2.6).
    """
    from paddle.pir.core import create_persistable_value

    return create_persistable_value(dtype, list(shape), name=name, initializer=initializer)


def prepend_legacy_op(block, **op):
    """Insert an op at the start of a legacy program block (`type=`, `inputs=`, `outputs=`, `attrs=`).

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return block._prepend_op(**op)


def legacy_optimizer_role(program):
    """A context in which ops appended to a legacy `program` carry the optimizer role, so that
    `clone(for_test=True)` drops them with the optimizer's ops.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return program._optimized_guard([])


def lr_scheduler_variable_name(program):
    """The name of the learning-rate variable a static `program` feeds from its LR scheduler, or None.

    Checked on Paddle 3.0.0 and 3.3.1.
    """
    scheduler = getattr(program, "lr_scheduler", None)
    return None if scheduler is None else getattr(scheduler, "_var_name", None)


def to_place(device):
    """A Paddle Place from a device string such as 'cpu' or 'gpu:0'.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return paddle.device._convert_to_place(device)


def copy_to_place(tensor, place):
    """A copy of `tensor` on `place` (synchronous).

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return tensor._copy_to(place, False)


def same_place(a, b):
    """True when Places `a` and `b` are the same device.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return a._equals(b)


def batchnorm_classes():
    """The layer classes that keep BatchNorm running statistics (`_mean`, `_variance`): Paddle's
    common base of BatchNorm1D/2D/3D and SyncBatchNorm, and the older `paddle.nn.BatchNorm`.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    from paddle.nn.layer.norm import _BatchNormBase

    return (_BatchNormBase, paddle.nn.BatchNorm)


def batchnorm_statistics(layer):
    """(running mean, running variance) parameters of a BatchNorm layer.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return layer._mean, layer._variance


def unwrap_layers(model):
    """The Layer that a wrapper such as `paddle.DataParallel` keeps, or None when `model` keeps none.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return getattr(model, "_layers", None)


def conv_geometry(conv):
    """(out_channels, kernel_size, padding) of a `paddle.nn.Conv2D`.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return conv._out_channels, conv._kernel_size, conv._padding


def find_cuda_home():
    """The CUDA toolkit folder Paddle's extension builder would use, or None.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    from paddle.utils.cpp_extension.extension_utils import find_cuda_home as find

    return find()


def can_share_buffers(tensor):
    """True when this Paddle can point one tensor at another's memory (`share_buffer`).

    Checked on Paddle 3.0.0 and 3.3.1.
    """
    return hasattr(tensor, "_share_buffer_to")


def share_buffer(source, target):
    """Make `target` use `source`'s memory (no copy); `target` keeps its identity (a parameter
    stays the same object for the optimizer and hooks).

    Checked on Paddle 3.0.0 and 3.3.1.
    """
    source._share_buffer_to(target)


def scope_tensor_initialized(variable):
    """True when a static scope variable holds an allocated tensor.

    Checked on Paddle 3.0.0 and 3.3.1.
    """
    return bool(variable.get_tensor()._is_initialized())


def batchnorm_momentum(layer):
    """A BatchNorm layer's momentum, or None for a layer that keeps none.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return getattr(layer, "_momentum", None)


def set_batchnorm_momentum(layer, momentum):
    """Set the momentum the next training forward of a BatchNorm layer uses.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    layer._momentum = momentum


def batchnorm_uses_global_stats(layer):
    """True when a BatchNorm layer normalises with its running statistics even in training.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return bool(getattr(layer, "_use_global_stats", None))


def batchnorm_data_format(layer):
    """'NCHW'-style data format string of a BatchNorm layer (channels first unless it says NHWC/NLC).

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return getattr(layer, "_data_format", None) or getattr(layer, "_data_layout", None) or "NCHW"


class _FileWriter(io.BytesIO):
    """An io.BytesIO whose writes go to an open binary file. paddle.save takes a path or an
    io.BytesIO only, and on a BytesIO it calls nothing but write() and flush()."""

    def __init__(self, file):
        super().__init__()
        self._file = file

    def write(self, data):
        return self._file.write(data)

    def flush(self):
        self._file.flush()


def save_to_file(obj, file):
    """paddle.save(obj) into an already open binary file (one the caller opened safely), streamed:
    the bytes are those paddle.save writes to a path.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    paddle.save(obj, _FileWriter(file))


def dense_tensor(array):
    """What paddle.load returns for a saved array in static mode: a DenseTensor (LoDTensor before
    Paddle 3.0) holding `array` on the place programs are built for.

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    core = paddle.base.core
    tensor = (getattr(core, "DenseTensor", None) or core.LoDTensor)()
    tensor.set(array, expected_place())
    return tensor


def in_pir_mode():
    """Whether static programs are built as PIR programs (`paddle.framework.in_pir_mode`, in no
    __all__ and documented nowhere).

    Checked on Paddle 2.6.2 (no PIR: always False), 3.0.0 and 3.3.1.
    """
    check = getattr(paddle.framework, "in_pir_mode", None)
    return bool(check()) if check is not None else False


def model_optimizer(model):
    """The optimizer `paddle.Model.prepare` was given, or None before prepare().

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    return getattr(model, "_optimizer", None)


def register_custom_ops(library_path):
    """Register the custom operators of a compiled extension library with Paddle, so that static
    programs can append them (`paddle.utils.cpp_extension.load_op_meta_info_and_register_op`).

    Checked on Paddle 2.6.2, 3.0.0 and 3.3.1.
    """
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    return load_op_meta_info_and_register_op(str(library_path))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message, category):
    """warnings.warn attributed to the first frame outside paddle_ema: the user's call, however
    deep inside the package the warning arose (CPython's sys._getframe walks the stack).

    Checked on Paddle 2.6.2-3.3.1 with CPython 3.10-3.13.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def environment_reader():
    """A function name -> that environment variable's raw value, or None, as cheap as a dict
    lookup: os.environ.get of an unset name raises and catches a KeyError inside Mapping.get.
    CPython keeps the process environment in os.environ._data under os.environ.encodekey(name);
    elsewhere this is os.environ.get. Reads os.environ's own mapping, so a change made through
    os.environ is seen at once.

    Checked on Paddle 2.6.2-3.3.1 with CPython 3.10-3.13.
    """
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return os.environ.get
    keys = {}

    def read(name):
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        value = data.get(key)
        return None if value is None else decode(value)

    return read
